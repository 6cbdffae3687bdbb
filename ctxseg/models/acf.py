"""CFNet aggregated co-occurrent feature (ACF) module (Zhang et al., CVPR 2019, §2-3, Fig 3), built as
the authors' released code builds it (PyTorch-Encoding ``encoding/nn/attention.py``: ``ACFModule``,
``MixtureOfSoftMaxACF``).

For an input X with C channels, H heads and K mixtures (C/H channels per head, d_k = (C/H) K):

* Φ, shared by the target and the co-occurrent side (Φ_t = Φ_c), maps X to H d_k channels. ``phi=
  "conv1x1"`` is the code's ``conv`` transform (a plain 1x1 convolution with bias); ``phi="atrous"`` is
  the code's ``dffn`` transform, the paper's atrous Φ (§4.2): 3x3 conv, dilation 4 -> BN -> ReLU -> 1x1.
  The co-occurrent side is Φ of the 3x3 / stride 2 average-pooled X.
* Ψ (value transform): a plain 1x1 convolution of the pooled X to C channels (C/H per head).
  (With the 1x1 Φ, Φ of the pooled X is computed as the pooled Φ_t(X): the same numbers, one
  convolution fewer; see :meth:`ACF.components`.)
* s^k_ij = Φ_t(x_i)^k · Φ_c(x_j)^k / sqrt(d_k): mixture k of a head sees C/H of the head's d_k channels;
  the temperature is sqrt(d_k) of the head (``scale="none"`` drops it).
* Mixture of softmaxes (Eq 2): P(j | i) = Σ_k π_k softmax_j(s^k_ij), with the contextual prior
  π = softmax_k(W q̄) (§2.1), q̄ = (1/N) Σ_i Φ_t(x_i) the mean target vector of the head and W a
  [K, d_k] matrix shared by the heads (no bias); with K = 1, π = 1.
* Dropout (p = ``dropout``) on the co-occurrent probabilities; Eq 3: z_i = Σ_j P(j | i) Ψ(x_j); the
  heads' z are concatenated (§2.2).
* Output (``output``): ``"authors"`` (default): BN(Conv1x1(z)) + X, no ReLU, the module keeps the
  input feature (``ACFModule.forward``); ``"z_only"``: z alone, the earlier reading of Fig 3 in which
  the classifier sees nothing of the pixel's own feature.

Dropout order: the authors' code drops each of the K softmaxes before mixing them; ctxseg drops the
mixture P once. Both have the same expectation; dropping P lets the blocked kernel apply the mixture
before the value product and draw one mask per block instead of K.

The N x N/4 probability matrices are never stored (the reference code materialises one per mixture):
see :func:`mos_attention`.
"""

from __future__ import annotations

import math
from typing import List

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import modules_of
from .mixture_attention import mixture_attention

__all__ = ["ACF", "GlobalPool", "mos_attention", "check_acf_widths"]


def check_acf_widths(channels: int, heads: int, mixtures: int) -> None:
    """Clear error when the ACF input width cannot be split into ``heads`` heads."""
    if heads < 1 or mixtures < 1:
        raise ValueError(f"acf.heads ({heads}) and acf.mixtures ({mixtures}) must be >= 1")
    if channels % heads:
        raise ValueError(
            f"channels={channels} (the ACF module's width) is not divisible by acf.heads={heads}; "
            f"pick channels as a multiple of {heads}"
        )


def mos_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prior: torch.Tensor,
                  scale: float, dropout_p: float = 0.0, pad_head_dims: bool = True) -> torch.Tensor:
    """Mixture-of-softmaxes attention: sum_k prior_k softmax(q_k k_k^T * scale), dropout, times v.

    q: [B, H, K, N, d], k: [B, H, K, M, d], v: [B, H, M, dv], prior: [B, H, K] (sums to 1 over K);
    returns [B, H, N, dv].

    * CPU training (gradients or dropout): :func:`ctxseg.models.mixture_attention.mixture_attention`,
      row-blocked with the mixture applied before the value product: nothing of size N x M outlives a
      block, one value product per head instead of K, and dropout with exact masks that are never
      stored (CPU SDPA has no fused dropout).
    * Otherwise (CPU inference, GPU, the ``meta`` device of the FLOP counter): one fused SDPA call
      per component, sum_k pi_k SDPA(Q_k, K_k, V), the same maths because the mixture is linear in
      each softmax. On GPUs dropout is drawn per component inside SDPA (the authors' order).

    ``pad_head_dims=False`` skips the zero-padding that lets the fused SDPA kernels run when d != dv
    (see :func:`_sdpa`): the same result, computed as the maths says, so that a FLOP counter counts
    the model rather than the kernel's needs (``ctxseg.models.complexity`` passes False).
    """
    b, h, nk, n, d = q.shape
    m, dv = k.shape[3], v.shape[-1]
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, prior))
    if q.device.type == "cpu" and (dropout_p > 0 or needs_grad):
        out = mixture_attention(q.reshape(b * h, nk, n, d), k.reshape(b * h, nk, m, d),
                                v.reshape(b * h, m, dv), prior.reshape(b * h, nk), scale, dropout_p)
        return out.view(b, h, n, dv)
    vv = v.unsqueeze(2).expand(b, h, nk, m, dv).reshape(b, h * nk, m, dv)
    out = _sdpa(q.reshape(b, h * nk, n, d), k.reshape(b, h * nk, m, d), vv, scale, dropout_p, pad_head_dims)
    # sum_k pi_k out_k as one batched product: no [B, H, K, N, dv] temporary for out * prior
    mixed = torch.matmul(prior.reshape(b * h, 1, nk), out.reshape(b * h, nk, n * dv))
    return mixed.view(b, h, n, dv)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, dropout_p: float,
          pad_head_dims: bool = True) -> torch.Tensor:
    """Fused SDPA over [B, G, N, d] tensors (GPU; the FLOP counter's meta device).

    With ``pad_head_dims`` (the default) q/k (or v) are zero-padded to a common head dim so the fused
    kernels apply; the padding is skipped on the ``meta`` device (shapes only, nothing to run)."""
    d, dv = q.shape[-1], v.shape[-1]
    if d != dv and pad_head_dims and q.device.type != "meta":
        # The fused kernels need equal head dims for q, k and v, else SDPA silently takes the math
        # path and stores N x M (measured: 838 MiB instead of 34 MiB at 64^2). Zero-padding q and k
        # leaves q k^T unchanged (the scale is explicit); zero-padding v adds zero output columns.
        if d < dv:
            q, k = F.pad(q, (0, dv - d)), F.pad(k, (0, dv - d))
        else:
            return _sdpa(q, k, F.pad(v, (0, d - dv)), scale, dropout_p, pad_head_dims)[..., :dv]
    # unit stride on the last dim, or SDPA falls back to the math path (see dca.flat_attention)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)


def _query_key_transform(channels: int, out: int, phi: str) -> nn.Module:
    """Φ (shared Φ_t = Φ_c): the authors' ``conv`` (1x1) or ``dffn`` (the paper's atrous Φ) transform."""
    if phi == "conv1x1":
        return nn.Conv2d(channels, out, 1)
    if phi == "atrous":
        last = nn.Conv2d(out, out, 1)
        return nn.Sequential(nn.Conv2d(channels, out, 3, padding=4, dilation=4, bias=False),
                             nn.BatchNorm2d(out), nn.ReLU(inplace=True), last)
    raise ValueError(f"acf.phi must be conv1x1 or atrous; got {phi!r}")


class ACF(nn.Module):
    """Co-occurrent feature module (Eq 1-3): ``forward(x)`` -> BN(Conv1x1(z)) + x [B, C, h, w]
    (``output="authors"``) or z [B, C, h, w] (``output="z_only"``)."""

    def __init__(self, channels: int, heads: int = 2, mixtures: int = 2, dropout: float = 0.1,
                 phi: str = "conv1x1", scale: str = "sqrt", output: str = "authors") -> None:
        super().__init__()
        check_acf_widths(channels, heads, mixtures)
        if output not in ("authors", "z_only"):
            raise ValueError(f"acf.output must be authors or z_only; got {output!r}")
        self.channels, self.heads, self.mixtures = channels, heads, mixtures
        self.value_dim = channels // heads  # d_v = C/H per head; also the width each softmax sees
        self.key_dim = self.value_dim * mixtures  # d_k = (C/H) K per head
        self.dropout, self.scale_mode, self.output = dropout, scale, output
        self.phi = _query_key_transform(channels, heads * self.key_dim, phi)
        if phi == "conv1x1":  # the authors' init of conv_qs: N(0, 2 / (d_model + d_k))
            nn.init.normal_(self.phi.weight, 0.0, math.sqrt(2.0 / (channels + self.key_dim)))
        else:  # dffn: N(0, 1 / d_k) on its last conv
            nn.init.normal_(self.phi[-1].weight, 0.0, math.sqrt(1.0 / self.key_dim))
        self.pool = nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False)
        self.psi = nn.Conv2d(channels, heads * self.value_dim, 1)  # Ψ
        nn.init.normal_(self.psi.weight, 0.0, math.sqrt(2.0 / (channels + self.value_dim)))
        # W of π = softmax_k(W q̄), shared by the heads; none with K = 1 (π = 1)
        self.prior_weight = nn.Parameter(torch.empty(mixtures, self.key_dim)) if mixtures > 1 else None
        if self.prior_weight is not None:
            bound = mixtures ** -0.5
            nn.init.uniform_(self.prior_weight, -bound, bound)
        if output == "authors":
            self.out_conv = nn.Conv2d(heads * self.value_dim, channels, 1, bias=False)
            self.out_norm = nn.BatchNorm2d(channels)
        else:
            self.out_conv = self.out_norm = None
        self.out_channels = channels

    @property
    def scale(self) -> float:
        return self.key_dim ** -0.5 if self.scale_mode == "sqrt" else 1.0

    def components(self, x: torch.Tensor):
        """(q [B,H,K,N,d], k [B,H,K,M,d], v [B,H,M,dv], prior π [B,H,K]) for input x; d = dv = C/H."""
        b, _, h, w = x.shape
        hh, kk, d = self.heads, self.mixtures, self.value_dim
        target = self.phi(x)  # Φ_t(x): [B, H d_k, h, w]
        pooled = self.pool(x)  # 3x3 avg-pool, stride 2 (before Φ_c and Ψ)
        # Φ_c = Φ_t (shared weights) of the pooled map. A 1x1 Φ commutes with the average pool (both
        # are linear and the pool's weights sum to 1, at the borders too: count_include_pad=False), so
        # Φ(pool x) = pool(Φ(x)) exactly: pooling the target map saves a convolution. The atrous Φ
        # (BN, ReLU) does not commute and is applied to the pooled map, as in the authors' code.
        cooc = self.pool(target) if isinstance(self.phi, nn.Conv2d) else self.phi(pooled)
        value = self.psi(pooled)
        m = pooled.shape[-2] * pooled.shape[-1]
        q = target.view(b, hh, kk, d, h * w).transpose(-1, -2)
        k = cooc.view(b, hh, kk, d, m).transpose(-1, -2)
        v = value.view(b, hh, self.value_dim, m).transpose(-1, -2)
        if self.prior_weight is None:
            prior = target.new_ones(b, hh, 1)
        else:
            q_bar = target.mean(dim=(2, 3)).view(b, hh, self.key_dim)  # mean target vector per head
            prior = torch.softmax(q_bar @ self.prior_weight.t(), dim=-1)  # π_k per head, [B, H, K]
        return q, k, v, prior

    def attend(self, x: torch.Tensor, pad_head_dims: bool = True) -> torch.Tensor:
        """Aggregated co-occurrent features z (Eq 3, heads concatenated): [B, C, h, w].

        ``pad_head_dims``: see :func:`mos_attention` (False = count the maths only, same result)."""
        b, _, h, w = x.shape
        q, k, v, prior = self.components(x)
        p = self.dropout if self.training else 0.0
        z = mos_attention(q, k, v, prior, self.scale, dropout_p=p, pad_head_dims=pad_head_dims)  # [B, H, N, dv]
        return z.transpose(-1, -2).reshape(b, self.heads * self.value_dim, h, w)

    def forward(self, x: torch.Tensor, pad_head_dims: bool = True) -> torch.Tensor:
        z = self.attend(x, pad_head_dims)
        if self.out_conv is None:
            return z
        return self.out_norm(self.out_conv(z)) + x

    def rf_path(self) -> List[nn.Module]:
        return modules_of(self.phi)


class GlobalPool(nn.Module):
    """CFNet global-pooling branch (the authors' ``GlobalPooling``): GAP -> 1x1 conv -> BN -> ReLU,
    broadcast to every position.

    A training batch of one image cannot give BatchNorm a statistic over a 1x1 map; for that batch
    (a per-rank batch of 1) the branch normalises with its running statistics instead of failing."""

    def __init__(self, in_channels: int, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, channels, 1, bias=False)
        self.norm = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x.mean(dim=(2, 3), keepdim=True))
        if self.training and y.shape[0] == 1:
            n = self.norm
            y = F.batch_norm(y, n.running_mean, n.running_var, n.weight, n.bias, False, 0.0, n.eps)
        else:
            y = self.norm(y)
        return F.relu(y).expand(-1, -1, *x.shape[-2:])
