"""CFNet aggregated co-occurrent feature (ACF) module (Zhang et al., CVPR 2019, §2-3, Fig 3).

For target pixel i and co-occurrent (context) position j of the 3x3/stride-2 average-pooled map:

* s_ij = Phi_t(x_i)^T Phi_c(x_j)   dot-product similarity, shared Phi_t = Phi_c (1x1 conv, or the
  paper's atrous-rate-4 3x3 feed-forward with ``phi="atrous"``), divided by sqrt(d) unless
  ``scale="none"``;
* mixture of softmaxes (Eq 2): P(j | i) = sum_k pi_k softmax_j(s^k_ij), with K mixtures computed on
  channel slices of Phi and the contextual prior pi_k = softmax_k(w_k^T v_bar) (§2.1), v_bar =
  (1/N) sum_i v_i the mean of the *target vectors* v_i = Phi_t(x_i); with H heads, each head has its
  own K slices, its own v_bar (the mean of its slice of the target vectors) and its own w_k (no
  bias: the paper's exp(w_k^T v_bar) has none);
* dropout on the co-occurrent probabilities; aggregated feature (Eq 3) z_i = sum_j P(j | i) Psi(x_j),
  Psi a 1x1 value transform; the heads' z are concatenated (§2.2, multi-head);
* ``residual=True`` (ctxseg's ``acf.output: residual_fusion`` variant, not the paper's): the module
  returns x + proj(z), a 1x1 projection back to the input width with a residual connection;
  ``residual=False`` (the paper's Fig 3 path, the default of the CFNet head) returns z itself.
  The global-pooling (GP) branch of Fig 3 is a separate module :class:`GlobalPool`; the head
  (:mod:`ctxseg.models.heads.acf`) concatenates it.

The N x N/4 probability matrices are never stored (the reference code materialises one per mixture):
see :func:`mos_attention`.
"""

from __future__ import annotations

from typing import List

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import ConvBNReLU, modules_of
from .mixture_attention import mixture_attention

__all__ = ["ACF", "GlobalPool", "mos_attention", "check_acf_channels"]


def check_acf_channels(channels: int, heads: int, mixtures: int) -> None:
    """Clear error when acf.channels is not divisible by acf.heads x acf.mixtures."""
    if heads < 1 or mixtures < 1:
        raise ValueError(f"acf.heads ({heads}) and acf.mixtures ({mixtures}) must be >= 1")
    if channels % (heads * mixtures):
        raise ValueError(
            f"acf.channels={channels} is not divisible by acf.heads x acf.mixtures = "
            f"{heads} x {mixtures} = {heads * mixtures}"
        )


def mos_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prior: torch.Tensor,
                  scale: float, dropout_p: float = 0.0, pad_head_dims: bool = True) -> torch.Tensor:
    """Mixture-of-softmaxes attention: sum_k prior_k softmax(q_k k_k^T * scale), dropout, times v.

    q: [B, H, K, N, d], k: [B, H, K, M, d], v: [B, H, M, dv], prior: [B, H, K] (sums to 1 over K);
    returns [B, H, N, dv].

    * CPU training (gradients or dropout): :func:`ctxseg.models.mixture_attention.mixture_attention`,
      row-blocked with the mixture applied before the value product: half the products of one SDPA
      call per component, half its stored activations, and dropout with exact masks that are never
      stored (CPU SDPA has no fused dropout). Measured at d_model 512, H 4, K 2, batch 2, forward +
      backward: 1.2x faster than SDPA per component at 16^2 to 96^2 and half the peak memory at 128^2.
    * Otherwise (CPU inference, GPU, the ``meta`` device of the FLOP counter): one fused SDPA call
      per component, sum_k pi_k SDPA(Q_k, K_k, V), the same maths because the mixture is linear in
      each softmax. For inference with narrow heads (d = 8) it is 3x faster than the blocked kernel on
      the CPU. On GPUs dropout is drawn per component inside SDPA rather than on the mixture.

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


class ACF(nn.Module):
    """Co-occurrent feature module (Eq 1-3): ``forward(x) -> z`` [B, channels, h, w] (``residual=False``,
    the paper) or ``x + proj(z)`` of the same width as x (``residual=True``)."""

    def __init__(self, in_channels: int, channels: int = 32, heads: int = 2, mixtures: int = 2,
                 dropout: float = 0.1, phi: str = "conv1x1", scale: str = "sqrt", residual: bool = True) -> None:
        super().__init__()
        check_acf_channels(channels, heads, mixtures)
        self.channels, self.heads, self.mixtures = channels, heads, mixtures
        self.head_dim = channels // (heads * mixtures)  # d per mixture component
        self.value_dim = channels // heads  # dv per head
        self.dropout = dropout
        self.scale_mode = scale
        if phi == "conv1x1":
            self.phi = ConvBNReLU(in_channels, channels, 1)  # shared Phi_t = Phi_c
        elif phi == "atrous":
            self.phi = ConvBNReLU(in_channels, channels, 3, dilation=4)
        else:
            raise ValueError(f"acf.phi must be conv1x1 or atrous; got {phi!r}")
        self.pool = nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False)
        self.psi = ConvBNReLU(in_channels, channels, 1)  # Psi value transform
        # w_k of pi_k = softmax_k(w_k^T v_bar), one [K, C/H] matrix per head on that head's slice of
        # v_bar (a grouped 1x1 conv: group h sees channels h*C/H ... (h+1)*C/H - 1 of Phi_t)
        self.prior = nn.Conv1d(channels, heads * mixtures, 1, groups=heads, bias=False)
        self.residual = residual
        self.proj = ConvBNReLU(channels, in_channels, 1) if residual else None  # output projection (+ residual)
        self.out_channels = in_channels if residual else channels

    @property
    def scale(self) -> float:
        return self.head_dim ** -0.5 if self.scale_mode == "sqrt" else 1.0

    def components(self, x: torch.Tensor):
        """(q [B,H,K,N,d], k [B,H,K,M,d], v [B,H,M,dv], prior [B,H,K]) for input x."""
        b, _, h, w = x.shape
        hh, kk, d = self.heads, self.mixtures, self.head_dim
        target = self.phi(x)  # Phi_t(x): [B, C, h, w]
        pooled = self.pool(x)  # 3x3 avg-pool, stride 2 (before Phi_c and Psi)
        cooc = self.phi(pooled)  # Phi_c, shared weights
        value = self.psi(pooled)
        m = pooled.shape[-2] * pooled.shape[-1]
        q = target.view(b, hh, kk, d, h * w).transpose(-1, -2)
        k = cooc.view(b, hh, kk, d, m).transpose(-1, -2)
        v = value.view(b, hh, self.value_dim, m).transpose(-1, -2)
        v_bar = target.mean(dim=(2, 3))  # mean of the target vectors Phi_t(x_i), [B, C]
        prior = torch.softmax(self.prior(v_bar.unsqueeze(-1)).view(b, hh, kk), dim=-1)  # pi_k per head
        return q, k, v, prior

    def attend(self, x: torch.Tensor, pad_head_dims: bool = True) -> torch.Tensor:
        """Aggregated co-occurrent features before the projection: [B, channels, h, w].

        ``pad_head_dims``: see :func:`mos_attention` (False = count the maths only, same result)."""
        b, _, h, w = x.shape
        q, k, v, prior = self.components(x)
        p = self.dropout if self.training else 0.0
        z = mos_attention(q, k, v, prior, self.scale, dropout_p=p, pad_head_dims=pad_head_dims)  # [B, H, N, dv]
        return z.transpose(-1, -2).reshape(b, self.channels, h, w)

    def forward(self, x: torch.Tensor, pad_head_dims: bool = True) -> torch.Tensor:
        z = self.attend(x, pad_head_dims)
        return x + self.proj(z) if self.proj is not None else z

    def rf_path(self) -> List[nn.Module]:
        return modules_of(self.phi, self.proj) if self.proj is not None else modules_of(self.phi)


class GlobalPool(nn.Module):
    """CFNet global-pooling branch: GAP -> 1x1 conv + ReLU (no BN, batch-1 safe) -> broadcast."""

    def __init__(self, in_channels: int, channels: int) -> None:
        super().__init__()
        self.conv = ConvBNReLU(in_channels, channels, 1, norm=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x.mean(dim=(2, 3), keepdim=True)).expand(-1, -1, *x.shape[-2:])
