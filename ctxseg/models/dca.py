"""MCIBI dataset-level context aggregation (DCA, §3.3, Eq 11-14) and the fusion F (Eq 4).

* Eq 11: W = softmax(H1(R)) over the K classes, H1 = two 1x1 convs (the second is the classifier).
* Eq 12: C' = W^T M: each pixel's W-weighted combination of the memory rows.
* Eq 13: C_bi = softmax(g_q(R) g_k(C')^T / sqrt(C/2)) g_v(C')   (refinement attention)
* Eq 14: C_bi <- g_o(C_bi)

Eq 13 is computed with ``torch.nn.functional.scaled_dot_product_attention`` so the HW x HW
similarity matrix is never stored (the reference code materialises it). The first layers of g_k and
g_v (1x1 convolution, BN, ReLU) meet C' = W^T M through their convolution, which is linear: it is
applied to the K memory rows and the result mixed by W, the same numbers as convolving every pixel's
C' (K x C x C/2 multiply-adds instead of HW x C x C/2 for each; :meth:`DCA.context_projection`).
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import ConvBNReLU

__all__ = ["DCA", "Fusion", "flat_attention"]


def flat_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                   dropout_p: float = 0.0) -> torch.Tensor:
    """SDPA over [B, heads, N, d] tensors; nothing quadratic in N is stored.

    The fused kernels (CPU flash attention, CUDA flash / memory-efficient) need a unit stride on the
    last dimension; channel-major feature maps flattened to tokens do not have it, and SDPA then
    silently falls back to the math path, which stores the N x N matrix (``bench/attention.py``
    caught this: peak memory equal to the explicit form). Hence the ``contiguous()`` copies (N x d).
    """
    return F.scaled_dot_product_attention(q.contiguous(), k.contiguous(), v.contiguous(),
                                          dropout_p=dropout_p, scale=scale)


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, 1, h*w, C]"""
    return x.flatten(2).transpose(1, 2).unsqueeze(1)


class DCA(nn.Module):
    """Eq 11-14. ``forward(R, w_logits, memory) -> C_bi`` with ``w_logits`` = H1(R) (pre-softmax)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        if channels % 2:
            raise ValueError(f"mcibi.channels={channels} must be even: DCA projects to C/2 (Eq 13)")
        t = channels // 2
        self.channels, self.transform_channels = channels, t
        self.query = nn.Sequential(ConvBNReLU(channels, t, 1), ConvBNReLU(t, t, 1))  # g_q
        self.key = nn.Sequential(ConvBNReLU(channels, t, 1), ConvBNReLU(t, t, 1))  # g_k
        self.value = ConvBNReLU(channels, t, 1)  # g_v
        self.out = ConvBNReLU(t, channels, 1)  # g_o

    @property
    def scale(self) -> float:
        return self.transform_channels ** -0.5  # 1 / sqrt(C/2), Eq 13

    def gather(self, w_logits: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """Eq 11-12: C' = softmax(H1(R))^T M, [B, C, h, w]."""
        weights = torch.softmax(w_logits, dim=1)  # W, Eq 11
        return torch.einsum("bkhw,kc->bchw", weights, memory)  # C', Eq 12

    def project(self, feats: torch.Tensor, ctx: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """g_q(R), g_k(C'), g_v(C') as tokens, from a formed C' (the direct reading of Eq 13)."""
        return _tokens(self.query(feats)), _tokens(self.key(ctx)), _tokens(self.value(ctx))

    @staticmethod
    def context_projection(layer: nn.Sequential, weights: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """``layer`` (a 1x1 ConvBNReLU) of C' = W^T M without forming C' (Eq 12): the convolution is
        linear, so conv(sum_k w_k m_k) = sum_k w_k conv(m_k) (no bias; W sums to 1 over k in any case):
        the K memory rows are projected once and mixed per pixel, then BN and ReLU as usual."""
        conv = layer[0]
        rows = memory @ conv.weight.flatten(1).t()  # [K, C/2]
        if conv.bias is not None:
            rows = rows + conv.bias
        out = torch.einsum("bkhw,kc->bchw", weights, rows)
        for module in list(layer)[1:]:
            out = module(out)
        return out

    def forward(self, feats: torch.Tensor, w_logits: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        b, _, h, w = feats.shape
        weights = torch.softmax(w_logits, dim=1)  # W, Eq 11
        key = self.key[1](self.context_projection(self.key[0], weights, memory))  # g_k(C'), Eq 12-13
        value = self.context_projection(self.value, weights, memory)  # g_v(C')
        q, k, v = _tokens(self.query(feats)), _tokens(key), _tokens(value)
        att = flat_attention(q, k, v, self.scale)  # Eq 13
        att = att.squeeze(1).transpose(1, 2).reshape(b, self.transform_channels, h, w)
        return self.out(att)  # Eq 14


class Fusion(nn.Module):
    """F of Eq 4 over same-width inputs [R, C_bi, (C_wi)]:

    * ``add``: sum of the inputs;
    * ``weighted_add``: per-pixel weights predicted by a 1x1 conv on the concatenation, softmax
      over the inputs (a convex combination);
    * ``concat`` (default): ConvBNReLU (3x3 by default, ``kernel``) on the concatenation.
    """

    def __init__(self, mode: str, num_inputs: int, channels: int, kernel: int = 3) -> None:
        super().__init__()
        if mode not in ("add", "weighted_add", "concat"):
            raise ValueError(f"mcibi.fusion must be add, weighted_add or concat; got {mode!r}")
        self.mode, self.num_inputs = mode, num_inputs
        if mode == "weighted_add":
            self.weight = nn.Conv2d(num_inputs * channels, num_inputs, 1)
        elif mode == "concat":
            self.conv = ConvBNReLU(num_inputs * channels, channels, kernel)

    def forward(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(inputs) != self.num_inputs:
            raise ValueError(f"Fusion expects {self.num_inputs} inputs, got {len(inputs)}")
        if self.mode == "add":
            out = inputs[0]
            for x in inputs[1:]:
                out = out + x
            return out
        cat = torch.cat(list(inputs), dim=1)
        if self.mode == "concat":
            return self.conv(cat)
        w = torch.softmax(self.weight(cat), dim=1)
        return sum(w[:, i : i + 1] * x for i, x in enumerate(inputs))

    def rf_path(self) -> List[nn.Module]:
        return [self.conv[0]] if self.mode == "concat" else []
