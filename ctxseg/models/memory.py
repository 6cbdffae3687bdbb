"""MCIBI dataset-level feature memory M (Jin et al., ICCV 2021, §3.2, Eq 6-10).

M is a K x C registered buffer (K classes, C channels): it takes no gradient, is updated in place
inside the training forward, and is saved in checkpoints (``state_dict`` key ``...memory``).

Update of one training step (all under ``torch.no_grad``):

* Eq 8: the pixel representations R are upsampled (bilinear, align_corners=False) to label size.
  The upsampled map is never materialised: each label-size pixel is a 2 x 2-tap combination of
  feature-size pixels, and everything Eq 9-10 needs is linear in those taps (see "Vectorised" below).
* Eq 9: for class k and each pixel i labelled k, w_i = (1 - cos(r_i, M_k)) / sum_j (1 - cos(r_j, M_k)).
* Eq 10: T(R)_k = sum_i w_i r_i ("mean" strategy: the plain class mean, for the ablation).
* Eq 6: M_k <- (1 - m) M_k + m T(R)_k for every class k present in the batch.
* Eq 7: m_t = (1 - t/T)^p (m0 - m0/100) + m0/100, driven by ``progress`` = t/T, independent of the
  learning rate; the floor m0/100 keeps the memory updating until the last step.

Vectorised (no Python loop over class ids, no label-size feature map): for label pixel i of class
k with taps c_ij on feature-size pixels j (Eq 8, r_i = sum_j c_ij r_j),

* r_i . M_k = sum_j c_ij (r_j . M_k), a gather from the low-resolution [B*h*w, K] product R M^T;
* |r_i|^2 from the inner products of each feature pixel with its 2 x 2 neighbours (low resolution);
* sum_{i in k} w_i r_i = sum_j (sum_{i in k} w_i c_ij) r_j: the per-class tap weights are scattered
  (index_add over class ids) into a [K, B*h*w] matrix S, and the class sums are one GEMM S @ R.

So the cost is O(B*h*w*C*K) + O(labels) instead of O(labels * C * K), and the extra memory is a few
vectors per chunk of ``chunk_pixels`` label pixels (independent of C) plus the [K, B*h*w] matrix S.
``bench/memory_update.py`` compares it with a per-class loop.

Exact distributed update: under ``torch.distributed`` those per-class sums are all-reduced
*before* Eq 9-10 are finished, so N ranks compute exactly the update a single process would
compute on the union of their pixels and every rank ends with the same M. (The reference code
averages per-rank updated memories instead, which dilutes classes seen on few ranks.)

Initialisation (§3.2): a class row is initialised the first time the class appears:
``random`` = one random pixel representation of that class (the paper; under DDP one pixel drawn
from the union of all ranks: the per-class candidate with the largest random score wins),
``mean`` = the class mean, ``clustering`` = k-means (k=3, a few Lloyd steps whose sums are
all-reduced) over the class's pixels, keeping the centroid of the largest cluster. (The
authors' code clusters per-image class means of a pretrained backbone over the whole training
set offline; ours is the online, single-batch analogue so that no extra pass over the data is
needed.) A class initialised in a step is not also momentum-updated in that step.
"""

from __future__ import annotations

import logging
from typing import Dict, Iterator, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

logger = logging.getLogger(__name__)

__all__ = ["FeatureMemory", "poly_momentum", "interp_matrix", "interp_taps", "is_distributed"]

_EPS = 1e-8


def poly_momentum(progress: float, base: float = 0.9, power: float = 0.9) -> float:
    """Eq 7: m_t = (1 - t/T)^p (m0 - m0/100) + m0/100, with ``progress`` = t/T clamped to [0, 1].

    ``base`` is m0 and ``power`` p; m_0 = m0 and m_T = m0/100 (the paper's floor)."""
    progress = min(max(float(progress), 0.0), 1.0)
    floor = base / 100.0
    return (1.0 - progress) ** power * (base - floor) + floor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce(t: torch.Tensor, op=None) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op is None else op)
    return t


def interp_matrix(out_size: int, in_size: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """[out, in] matrix A with A @ x == 1-D linear interpolation of x, matching
    ``F.interpolate(mode='bilinear', align_corners=False)`` along one axis (Eq 8)."""
    a = torch.zeros(out_size, in_size, device=device, dtype=dtype)
    if in_size == out_size:
        return torch.eye(out_size, device=device, dtype=dtype)
    scale = in_size / out_size
    dst = torch.arange(out_size, device=device, dtype=torch.float64)
    src = ((dst + 0.5) * scale - 0.5).clamp_min(0.0)
    i0 = src.floor().long().clamp(max=in_size - 1)
    i1 = (i0 + 1).clamp(max=in_size - 1)
    lam = (src - i0.to(torch.float64)).to(dtype)
    rows = torch.arange(out_size, device=device)
    a.index_put_((rows, i0), 1.0 - lam, accumulate=True)
    a.index_put_((rows, i1), lam, accumulate=True)
    return a


def interp_taps(out_size: int, in_size: int, device=None, dtype=torch.float32):
    """The two taps of :func:`interp_matrix` per output index: ``(i0, i1, w0, w1)`` with
    ``out[o] = w0[o] * x[i0[o]] + w1[o] * x[i1[o]]`` and ``i1 = min(i0 + 1, in_size - 1)``."""
    scale = in_size / out_size
    dst = torch.arange(out_size, device=device, dtype=torch.float64)
    src = ((dst + 0.5) * scale - 0.5).clamp_min(0.0)
    i0 = src.floor().long().clamp(max=in_size - 1)
    i1 = (i0 + 1).clamp(max=in_size - 1)
    lam = src - i0.to(torch.float64)
    return i0, i1, (1.0 - lam).to(dtype), lam.to(dtype)


def _next(n: int, device=None) -> torch.Tensor:
    """Index of each position's successor, clamped at the end (the ``i1`` of the taps)."""
    return (torch.arange(n, device=device) + 1).clamp(max=n - 1)


class FeatureMemory(nn.Module):
    """The K x C memory M with its Eq 6-10 update. ``memory`` and ``initialized`` are buffers."""

    def __init__(self, num_classes: int, channels: int, init: str = "random", update: str = "cosine",
                 ignore_index: int = 255, chunk_pixels: int = 1 << 18, kmeans_clusters: int = 3,
                 kmeans_iters: int = 5, momentum: float = 0.9, momentum_power: float = 0.9) -> None:
        super().__init__()
        if init not in ("random", "mean", "clustering"):
            raise ValueError(f"mcibi.init must be random, mean or clustering; got {init!r}")
        if update not in ("cosine", "mean"):
            raise ValueError(f"mcibi.update must be cosine or mean; got {update!r}")
        self.num_classes, self.channels = num_classes, channels
        self.init, self.strategy = init, update
        self.ignore_index, self.chunk_pixels = ignore_index, chunk_pixels
        self.kmeans_clusters, self.kmeans_iters = kmeans_clusters, kmeans_iters
        self.base_momentum, self.momentum_power = float(momentum), float(momentum_power)  # m0, p of Eq 7
        self.register_buffer("memory", torch.zeros(num_classes, channels))
        self.register_buffer("initialized", torch.zeros(num_classes, dtype=torch.bool))

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, channels={self.channels}, init={self.init}, update={self.strategy}, "
                f"m0={self.base_momentum}, p={self.momentum_power}")

    # ------------------------------------------------------------------ Eq 7: the momentum schedule
    def momentum_at(self, progress: float) -> float:
        """m_t of Eq 7 at ``progress`` = t/T, from this memory's m0 and p."""
        return poly_momentum(progress, self.base_momentum, self.momentum_power)

    @torch.no_grad()
    def step(self, features: torch.Tensor, labels: torch.Tensor, progress: float) -> float:
        """One training step's update (Eq 6, 8-10) with the momentum of Eq 7 at ``progress``; returns m_t."""
        momentum = self.momentum_at(progress)
        self.update(features, labels, momentum)
        return momentum

    # ------------------------------------------------------------------ Eq 8: pixels at label size
    def _pixels(self, features: torch.Tensor, labels: torch.Tensor) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """Yield (r^T [C, n], class id [n]) for label-size pixels in chunks of about
        ``chunk_pixels`` pixels (whole images grouped, or row bands of one large image).
        Invalid pixels (ignore index or out of range) have class id -1; chunks without a valid
        pixel are skipped."""
        b, c, h, w = features.shape
        H, W = labels.shape[-2:]
        feats = features.detach().to(self.memory.dtype)
        ah = interp_matrix(H, h, feats.device, feats.dtype) if H != h else None
        aw_t = interp_matrix(W, w, feats.device, feats.dtype).t().contiguous() if W != w else None
        if H * W <= self.chunk_pixels:
            group, rows = max(1, self.chunk_pixels // (H * W)), H
        else:
            group, rows = 1, max(1, self.chunk_pixels // max(W, 1))
        for i in range(0, b, group):
            x = feats[i : i + group]  # [g, C, h, w]
            for r0 in range(0, H, rows):
                r1 = min(H, r0 + rows)
                lab = labels[i : i + group, r0:r1].reshape(-1).long()
                valid = (lab >= 0) & (lab < self.num_classes)
                if not bool(valid.any()):
                    continue
                part = x[:, :, r0:r1] if ah is None else torch.einsum("rh,gchw->gcrw", ah[r0:r1], x)
                if aw_t is not None:
                    part = part @ aw_t  # [g, C, r, W]
                pix_t = part.transpose(0, 1).reshape(c, -1)  # [C, n], pixel order (image, row, col)
                yield pix_t, torch.where(valid, lab, torch.full_like(lab, -1))

    def _valid_pixels(self, features: torch.Tensor, labels: torch.Tensor) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """(r [n, C], class id [n]) of the valid pixels only."""
        for pix_t, lab in self._pixels(features, labels):
            keep = lab >= 0
            yield pix_t.t()[keep], lab[keep]

    # ------------------------------------------------------------------ Eq 6-10
    @torch.no_grad()
    def update(self, features: torch.Tensor, labels: torch.Tensor, momentum: float) -> Dict[str, int]:
        """One in-place memory update from R ``features`` [B,C,h,w] and ``labels`` [B,H,W] (Eq 6, 8-10).

        Runs in the memory's dtype (float32) with autocast disabled, whatever the AMP setting.
        Collective calls (under DDP) are the same on every rank regardless of its local classes.
        Returns counts of newly initialised and updated classes (for logging).
        """
        with torch.autocast(device_type=features.device.type, enabled=False):
            return self._update(features, labels, momentum)

    def _update(self, features: torch.Tensor, labels: torch.Tensor, momentum: float) -> Dict[str, int]:
        k, c = self.num_classes, self.channels
        dev = self.memory.device
        old = self.memory.clone()
        feats = features.detach().to(self.memory.dtype)
        b, _, h, w = feats.shape
        H, W = labels.shape[-2:]
        m = b * h * w  # low-resolution pixels of the whole batch
        rows = feats.permute(0, 2, 3, 1).reshape(m, c)  # R at feature size, [B*h*w, C]
        # Eq 8 taps: the label-size pixel (y, x) is sum_{a,b} p_a(y) q_b(x) R[a, b] over 2 x 2 sources
        ti0, ti1, tw0, tw1 = interp_taps(H, h, dev, feats.dtype)
        si0, si1, sw0, sw1 = interp_taps(W, w, dev, feats.dtype)
        cosine = self.strategy == "cosine"
        need_random = self.init == "random" and not bool(self.initialized.all())
        count = torch.zeros(k, device=dev)
        wtot = torch.zeros(k, device=dev)  # Eq 9 denominator sum_i (1 - cos_i)
        s_one = torch.zeros(k * m, device=dev)  # per-class weights of the low-res sources (sum_i r_i)
        s_cos = torch.zeros(k * m, device=dev) if cosine else None  # the same, (1 - cos_i)-weighted
        best = torch.full((k,), -1.0, device=dev)  # random-init candidate score per class
        cand = torch.zeros(k, c, device=dev)
        if cosine:
            mem_norm = old.norm(dim=1).clamp_min(_EPS)  # |M_k|
            dots = (rows @ old.t()).reshape(-1)  # r_j . M_k at low resolution, [B*h*w*K]
            grid = feats.transpose(0, 1)  # [C, B, h, w]
            nxt_h, nxt_w = _next(h, dev), _next(w, dev)
            down, right = grid[:, :, nxt_h], grid[:, :, :, nxt_w]
            diag = down[:, :, :, nxt_w]
            # inner products of each source with its 2 x 2 neighbours (indices clamped like the taps)
            n_self = (grid * grid).sum(0).reshape(-1)
            n_down = (grid * down).sum(0).reshape(-1)
            n_right = (grid * right).sum(0).reshape(-1)
            n_cross = ((grid * diag).sum(0) + (down * right).sum(0)).reshape(-1)
            del down, right, diag
        flat = labels.reshape(-1)
        for p0 in range(0, flat.numel(), self.chunk_pixels):
            lab = flat[p0 : p0 + self.chunk_pixels].long()
            valid = (lab >= 0) & (lab < k)
            idx = valid.nonzero().squeeze(1)
            if idx.numel() == 0:
                continue
            cls = lab[idx]
            idx = idx + p0
            img, rem = idx // (H * W), idx % (H * W)
            y, x = rem // W, rem % W
            a0, a1, pa, pb = ti0[y], ti1[y], tw0[y], tw1[y]
            b0, b1, qa, qb = si0[x], si1[x], sw0[x], sw1[x]
            base = img * (h * w)
            j00, j01 = base + a0 * w + b0, base + a0 * w + b1
            j10, j11 = base + a1 * w + b0, base + a1 * w + b1
            c00, c01, c10, c11 = pa * qa, pa * qb, pb * qa, pb * qb
            count += torch.bincount(cls, minlength=k).to(count.dtype)
            slots = torch.cat([cls * m + j00, cls * m + j01, cls * m + j10, cls * m + j11])
            taps = torch.cat([c00, c01, c10, c11])
            s_one.index_add_(0, slots, taps)
            if cosine:
                # cos(r_i, M_k) of the upsampled pixel without materialising it (Eq 9)
                dot = (c00 * dots[j00 * k + cls] + c01 * dots[j01 * k + cls]
                       + c10 * dots[j10 * k + cls] + c11 * dots[j11 * k + cls])
                left = pa * pa * n_self[j00] + pb * pb * n_self[j10] + 2 * pa * pb * n_down[j00]
                right_ = pa * pa * n_self[j01] + pb * pb * n_self[j11] + 2 * pa * pb * n_down[j01]
                pair = pa * pa * n_right[j00] + pb * pb * n_right[j10] + pa * pb * n_cross[j00]
                sq = qa * qa * left + qb * qb * right_ + 2 * qa * qb * pair
                norm = sq.clamp_min(0.0).sqrt().clamp_min(_EPS)  # |r_i|
                weight = 1.0 - dot / (mem_norm[cls] * norm)  # Eq 9 (unnormalised)
                wtot.index_add_(0, cls, weight)
                s_cos.index_add_(0, slots, taps * weight.repeat(4))
            if need_random:
                score = torch.rand(cls.shape[0], device=dev)
                chunk_best = torch.full((k,), -1.0, device=dev).scatter_reduce_(0, cls, score, "amax")
                improved = chunk_best > best
                win = ((score == chunk_best[cls]) & improved[cls]).nonzero().squeeze(1)
                pix = (c00[win, None] * rows[j00[win]] + c01[win, None] * rows[j01[win]]
                       + c10[win, None] * rows[j10[win]] + c11[win, None] * rows[j11[win]])
                cand.index_copy_(0, cls[win], pix)
                best = torch.maximum(best, chunk_best)
        # per-class sums of the upsampled pixels = (per-class source weights) @ R: GEMMs at feature size
        total = s_one.view(k, m) @ rows  # sum_i r_i
        wsum = s_cos.view(k, m) @ rows if cosine else torch.zeros(k, c, device=dev)  # Eq 10 numerator
        # exact DDP: reduce the per-class sums (one coalesced all-reduce), not the updated memories
        if is_distributed():
            flat_sums = torch.cat([count, total.flatten(), wsum.flatten(), wtot])
            _all_reduce(flat_sums)
            count, total, wsum, wtot = flat_sums.split([k, k * c, k * c, k])
            total, wsum = total.view(k, c), wsum.view(k, c)
        present = count > 0
        new = present & ~self.initialized
        upd = present & self.initialized
        if bool(new.any()):
            if self.init == "mean":
                init_rows = total / count.clamp_min(1.0)[:, None]
            elif self.init == "random":
                init_rows = self._reduce_candidates(best, cand)
            else:
                init_rows = self._kmeans_init(features, labels, new, total, count)
            self.memory[new] = init_rows[new]
            self.initialized |= new
            logger.debug("memory: initialised classes %s (%s)", new.nonzero().flatten().tolist(), self.init)
        if bool(upd.any()):
            mean = total / count.clamp_min(1.0)[:, None]
            if cosine:
                ok = wtot > _EPS  # all pixels parallel to M_k -> fall back to the mean
                target = torch.where(ok[:, None], wsum / wtot.clamp_min(_EPS)[:, None], mean)  # Eq 9-10
            else:
                target = mean
            new_rows = (1.0 - momentum) * old + momentum * target  # Eq 6
            self.memory[upd] = new_rows[upd]
        return {"initialised": int(new.sum()), "updated": int(upd.sum())}

    def _reduce_candidates(self, best: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
        """Under DDP keep, per class, the candidate pixel with the globally largest random score."""
        if not is_distributed():
            return cand
        glob = best.clone()
        _all_reduce(glob, dist.ReduceOp.MAX)
        mine = ((best == glob) & (glob >= 0)).float()
        picked = cand * mine[:, None]
        _all_reduce(picked)
        _all_reduce(mine)
        return picked / mine.clamp_min(1.0)[:, None]

    def _kmeans_init(self, features: torch.Tensor, labels: torch.Tensor, new: torch.Tensor,
                     total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """'clustering' init: per new class k-means (Lloyd, all-reduced sums), largest cluster's centroid.

        Centroids start at the class mean plus/minus the per-class standard deviation pattern
        (deterministic, so identical on every rank), then ``kmeans_iters`` Lloyd steps.
        """
        k, c, nc = self.num_classes, self.channels, self.kmeans_clusters
        dev = self.memory.device
        mean = total / count.clamp_min(1.0)[:, None]
        sq = torch.zeros(k, c, device=dev)
        for pix, lab in self._valid_pixels(features, labels):
            sq.index_add_(0, lab, (pix - mean[lab]) ** 2)
        _all_reduce(sq)
        std = (sq / count.clamp_min(1.0)[:, None]).sqrt()
        offsets = torch.linspace(-1.0, 1.0, nc, device=dev)
        cent = mean[:, None, :] + offsets[None, :, None] * std[:, None, :]  # [K, nc, C]
        sizes = torch.zeros(k, nc, device=dev)
        for _ in range(self.kmeans_iters):
            sums = torch.zeros(k * nc, c, device=dev)
            sizes = torch.zeros(k * nc, device=dev)
            for pix, lab in self._valid_pixels(features, labels):
                d = torch.cdist(pix[:, None, :], cent[lab]).squeeze(1)  # [n, nc]
                slot = lab * nc + d.argmin(1)
                sums.index_add_(0, slot, pix)
                sizes.index_add_(0, slot, torch.ones_like(slot, dtype=sizes.dtype))
            _all_reduce(sums)
            _all_reduce(sizes)
            sizes = sizes.view(k, nc)
            upd = sums.view(k, nc, c) / sizes.clamp_min(1.0)[..., None]
            cent = torch.where(sizes[..., None] > 0, upd, cent)
        largest = sizes.argmax(1)
        return cent[torch.arange(k, device=dev), largest]
