"""Row-blocked mixture-of-softmaxes attention (CFNet ACF, §3) for the CPU.

For each head (batch and heads flattened into G) with K mixture components:

    P_k = softmax_j(scale * q_k k_k^T)          [N, M]  per component
    P   = sum_k pi_k P_k                          the co-occurrent probabilities P(j | i)
    z   = dropout(P) v                            [N, dv]

PyTorch's fused SDPA kernels cannot use this structure: they need equal head dims for q, k and v
(ACF has d = C/(H K) and dv = C/H) and return one output per component, so the SDPA route pads q and k
to dv (double the q k^T work) and stores K outputs of width dv; on the CPU they have no fused dropout
either. Here the queries are processed in blocks of rows: each block's K score matrices exist only
while that block is computed, the forward pass keeps q, k, v, the priors and one log-sum-exp per
(row, component), and the backward pass recomputes the block's probabilities from them (as flash
attention does). Nothing of size N x M outlives a block, and the mixture is applied before the value
product, so P v is one product per head instead of K.

Dropout (on P, as in the reference implementation) draws each block's mask from a generator seeded
from the global RNG at the forward call, and the backward pass redraws the same mask: the gradient is
exact for the mask used, and nothing is stored for it.

Small problems (at most :data:`STORED_MAX_ELEMENTS` score elements G x K x N x M, e.g. the 16^2-32^2
feature maps of the default study) keep their probabilities for backward instead, through autograd, as
the reference code does: there, recomputing them block by block costs more time than storing them
costs memory. The maths (and where dropout applies: on P) is the same.

Gradients, for one block (dP = dropout_mask * (dz v^T), D_k = rowsum(P_k * dP)):

    dv   += dropout(P)^T dz
    dpi_k = sum_i D_k[i]
    dS_k  = pi_k * (P_k * dP - P_k * D_k)       (the softmax Jacobian of component k)
    dq_k  = scale * dS_k k_k,   dk_k += scale * dS_k^T q_k
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

__all__ = ["mixture_attention", "BLOCK_BYTES", "STORED_MAX_ELEMENTS"]

# bytes of one block's K score matrices (G x K x rows x M floats); a few such buffers are alive at
# once. 16 MiB measured fastest at 96^2 and 128^2 (d_model 512, H 4, K 2) among 2 to 64 MiB.
BLOCK_BYTES = 16 << 20
# Up to this many score elements (G x K x N x M; 16 MiB in fp32) the probabilities are stored for
# backward rather than recomputed (bench/attention.py: the stored form is faster at 16^2 and 32^2).
STORED_MAX_ELEMENTS = 1 << 22


def _block_rows(g: int, nk: int, m: int, n: int, element_size: int) -> int:
    return int(max(1, min(n, BLOCK_BYTES // max(1, g * nk * m * element_size))))


def _probabilities(q_blk: torch.Tensor, k_t: torch.Tensor, scale: float,
                   lse: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-component softmax of one block of rows: ([G, K, r, M] probabilities, [G, K, r] log-sum-exp).

    With ``lse`` given (backward), the probabilities are recomputed as exp(scale q k^T - lse), the
    scale and the shift folded into the product."""
    g, nk, r, d = q_blk.shape
    q_flat = q_blk.reshape(g * nk, r, d)
    if lse is not None:
        shift = lse.reshape(g * nk, r, 1).neg()
        return torch.baddbmm(shift, q_flat, k_t, alpha=scale).exp_().view(g, nk, r, -1), lse
    s = torch.baddbmm(q_flat.new_empty(()), q_flat, k_t, beta=0.0, alpha=scale).view(g, nk, r, -1)
    row_max = s.amax(-1, keepdim=True)
    s.sub_(row_max).exp_()
    total = s.sum(-1, keepdim=True)
    s.div_(total)
    return s, (row_max + total.log()).squeeze(-1)


def _mix(probs: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """sum_k pi_k P_k as one batched product: [G, K, r, M], [G, K] -> [G, r, M]."""
    g, nk, r, m = probs.shape
    return torch.bmm(prior.view(g, 1, nk), probs.view(g, nk, r * m)).view(g, r, m)


def _dropout_mask(like: torch.Tensor, p: float, seed: int, block: int) -> torch.Tensor:
    """Block ``block``'s inverted-dropout mask (kept / (1 - p), dropped 0), the same on every call."""
    gen = torch.Generator(device=like.device)
    gen.manual_seed(seed + block)
    keep = torch.rand(like.shape, generator=gen, device=like.device) >= p
    return keep.to(like.dtype).mul_(1.0 / (1.0 - p))


class _MixtureAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, prior, scale: float, dropout_p: float):
        g, nk, n, d = q.shape
        m, dv = k.shape[2], v.shape[-1]
        # q, k, v are usually transposed views of channel-major feature maps; the batched products
        # take them as they are (no copies, so saving them for backward costs no memory)
        k_t = k.reshape(g * nk, m, d).transpose(1, 2)
        prior = prior.contiguous()
        rows = _block_rows(g, nk, m, n, q.element_size())
        seed = int(torch.randint(0, 2**62, (1,)).item()) if dropout_p > 0 else 0
        # channel-major output ([G, dv, N] memory, returned as its [G, N, dv] view): folding it back
        # into a feature map is then a view, not a copy
        out = q.new_empty(g, dv, n).transpose(1, 2)
        lse = q.new_empty(g, nk, n)
        for block, start in enumerate(range(0, n, rows)):
            stop = min(n, start + rows)
            probs, lse[:, :, start:stop] = _probabilities(q[:, :, start:stop], k_t, scale)
            mixed = _mix(probs, prior)
            del probs
            if dropout_p > 0:
                mixed.mul_(_dropout_mask(mixed, dropout_p, seed, block))
            out[:, start:stop] = torch.bmm(mixed, v)
        ctx.save_for_backward(q, k, v, prior, lse)
        ctx.scale, ctx.dropout_p, ctx.seed, ctx.rows = scale, dropout_p, seed, rows
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, prior, lse = ctx.saved_tensors
        scale, dropout_p, seed, rows = ctx.scale, ctx.dropout_p, ctx.seed, ctx.rows
        g, nk, n, d = q.shape
        m = k.shape[2]
        k_flat = k.reshape(g * nk, m, d)
        k_t = k_flat.transpose(1, 2)
        v_t = v.transpose(1, 2)
        factor = (prior * scale).view(g, nk, 1, 1)
        grad_q = torch.empty_like(q)
        grad_k = torch.zeros(g * nk, m, d, dtype=k.dtype, device=k.device)
        grad_v = torch.zeros_like(v)
        grad_prior = torch.zeros_like(prior)
        for block, start in enumerate(range(0, n, rows)):
            stop = min(n, start + rows)
            r = stop - start
            grad_blk = grad_out[:, start:stop]
            probs, _ = _probabilities(q[:, :, start:stop], k_t, scale, lse[:, :, start:stop])
            mixed = _mix(probs, prior)
            grad_mixed = torch.bmm(grad_blk, v_t)  # dP, the gradient of the (dropped-out) mixture [G, r, M]
            if dropout_p > 0:
                mask = _dropout_mask(mixed, dropout_p, seed, block)
                mixed.mul_(mask)
                grad_mixed.mul_(mask)
                del mask
            grad_v.baddbmm_(mixed.transpose(1, 2), grad_blk)
            del mixed
            # dS_k = pi_k * scale * T_k with T_k = P_k * dP - P_k * D_k, D_k = rowsum(P_k * dP); the
            # factor pi_k * scale goes on the small [r, d] operands, not on the [r, M] matrix
            t = probs.mul(grad_mixed.unsqueeze(1))  # P_k * dP   [G, K, r, M]
            del grad_mixed
            row_dot = t.sum(-1, keepdim=True)  # D_k         [G, K, r, 1]
            grad_prior += row_dot.sum((2, 3))
            t = t.addcmul_(probs, row_dot, value=-1.0).view(g * nk, r, m)
            del probs
            grad_q[:, :, start:stop] = torch.bmm(t, k_flat).view(g, nk, r, d).mul_(factor)
            q_scaled = (q[:, :, start:stop] * factor).reshape(g * nk, r, d)
            grad_k.baddbmm_(t.transpose(1, 2), q_scaled)
        return grad_q, grad_k.view(g, nk, m, d), grad_v, grad_prior, None, None


def mixture_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prior: torch.Tensor,
                      scale: float, dropout_p: float = 0.0) -> torch.Tensor:
    """sum_k prior_k softmax(scale q_k k_k^T), dropout, times v.

    q: [G, K, N, d], k: [G, K, M, d], v: [G, M, dv], prior: [G, K] -> [G, N, dv]. Row-blocked with
    recomputation (:class:`_MixtureAttention`) above :data:`STORED_MAX_ELEMENTS` score elements, else
    :func:`_stored_mixture_attention`."""
    g, nk, n, _ = q.shape
    if g * nk * n * k.shape[2] <= STORED_MAX_ELEMENTS:
        return _stored_mixture_attention(q, k, v, prior, float(scale), float(dropout_p))
    return _MixtureAttention.apply(q, k, v, prior, float(scale), float(dropout_p))


def _stored_mixture_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prior: torch.Tensor,
                              scale: float, dropout_p: float) -> torch.Tensor:
    """The same maths through autograd, every [G, K, N, M] matrix kept for backward (small problems):
    the K softmaxes in one batched product, the mixture as one [G, 1, K] x [G, K, N M] product,
    dropout on P, one value product per head."""
    g, nk, n, _ = q.shape
    m = k.shape[2]
    probs = torch.softmax(torch.matmul(q * scale, k.transpose(-1, -2)), dim=-1)  # P_k, [G, K, N, M]
    mixed = torch.bmm(prior.unsqueeze(1), probs.reshape(g, nk, n * m)).view(g, n, m)  # P = sum_k pi_k P_k
    if dropout_p > 0:
        mixed = torch.nn.functional.dropout(mixed, dropout_p)
    return torch.bmm(mixed, v)
