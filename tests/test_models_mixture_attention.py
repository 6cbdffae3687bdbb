"""The row-blocked mixture-of-softmaxes kernel (CFNet ACF on the CPU) against a direct reference."""

from __future__ import annotations

import pytest
import torch

from ctxseg.models import mixture_attention as mix_mod
from ctxseg.models.acf import ACF
from ctxseg.models.mixture_attention import mixture_attention


def reference(q, k, v, prior, scale, mask=None):
    """sum_k pi_k softmax(scale q_k k_k^T), times a dropout mask, times v; every matrix materialised."""
    probs = torch.softmax(scale * q @ k.transpose(-1, -2), dim=-1)  # [G, K, N, M]
    mixed = (prior[..., None, None] * probs).sum(1)  # [G, N, M]
    if mask is not None:
        mixed = mixed * mask
    return mixed @ v


def _inputs(g=3, nk=2, n=23, m=7, d=4, dv=6, dtype=torch.float64):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(g, nk, n, d, generator=gen, dtype=dtype)
    k = torch.randn(g, nk, m, d, generator=gen, dtype=dtype)
    v = torch.randn(g, m, dv, generator=gen, dtype=dtype)
    prior = torch.softmax(torch.randn(g, nk, generator=gen, dtype=dtype), -1)
    return q, k, v, prior


@pytest.fixture(autouse=True)
def blocked_kernel(monkeypatch):
    """Every test here runs the row-blocked kernel, however small its inputs (but the stored form's own)."""
    monkeypatch.setattr(mix_mod, "STORED_MAX_ELEMENTS", 0)


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 5 rows, so 23 rows give 4 full blocks and a ragged one."""
    monkeypatch.setattr(mix_mod, "BLOCK_BYTES", 5 * 3 * 2 * 7 * 8)


def _grads(fn, inputs, grad_out):
    leaves = [x.clone().requires_grad_() for x in inputs]
    out = fn(*leaves)
    out.backward(grad_out)
    return [out.detach()] + [x.grad for x in leaves]


@pytest.mark.parametrize("blocks", ["one", "several"])
def test_matches_reference_values_and_gradients(blocks, request):
    if blocks == "several":
        request.getfixturevalue("small_blocks")
    q, k, v, prior = _inputs()
    grad_out = torch.randn(3, 23, 6, dtype=torch.float64)
    ours = _grads(lambda *t: mixture_attention(*t, scale=0.7), (q, k, v, prior), grad_out)
    ref = _grads(lambda *t: reference(*t, scale=0.7), (q, k, v, prior), grad_out)
    for name, a, b in zip(["out", "q", "k", "v", "prior"], ours, ref):
        assert torch.allclose(a, b, atol=1e-12, rtol=1e-10), name


def test_strided_inputs_as_the_module_passes_them(small_blocks):
    """ACF hands over transposed views of channel-major maps; the output is a channel-major view."""
    q, k, v, prior = _inputs()
    qt, kt, vt = (x.transpose(-1, -2).contiguous().transpose(-1, -2) for x in (q, k, v))
    assert not qt.is_contiguous()
    out = mixture_attention(qt, kt, vt, prior, scale=0.5)
    assert torch.allclose(out, reference(q, k, v, prior, 0.5), atol=1e-12)
    assert out.transpose(1, 2).is_contiguous()  # folding back into [B, C, h, w] is a view


def test_dropout_gradient_is_exact_for_the_mask_drawn(small_blocks):
    """With the RNG fixed the forward is a deterministic function, so gradcheck applies: the backward
    pass redraws each block's mask instead of storing it."""
    q, k, v, prior = (x.requires_grad_() for x in _inputs(n=12, m=5))

    def fn(q, k, v, prior):
        torch.manual_seed(7)
        return mixture_attention(q, k, v, prior, scale=0.9, dropout_p=0.4)

    assert torch.autograd.gradcheck(fn, (q, k, v, prior))


def test_dropout_drops_and_rescales(small_blocks):
    q, k, v, prior = _inputs(g=1, nk=1, n=40, m=30)
    v = torch.ones(1, 30, 1, dtype=torch.float64)  # output = row sum of the (dropped) probabilities
    torch.manual_seed(0)
    kept = mixture_attention(q, k, v, prior, scale=1.0, dropout_p=0.5)
    # each row of P sums to 1; with dropout it sums to (kept mass) / (1 - p): varies around 1
    assert not torch.allclose(kept, torch.ones_like(kept))
    assert abs(float(kept.mean()) - 1.0) < 0.2
    torch.manual_seed(0)
    assert torch.equal(kept, mixture_attention(q, k, v, prior, scale=1.0, dropout_p=0.5))  # seeded


def test_nothing_quadratic_is_saved_for_backward():
    q, k, v, prior = (x.requires_grad_() for x in _inputs(n=64, m=48))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        mixture_attention(q, k, v, prior, scale=1.0, dropout_p=0.1)
    assert saved and max(saved) < 64 * 48  # q, k, v, priors, log-sum-exp: linear in N and M


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_small_problems_store_their_probabilities_with_the_same_result(monkeypatch, dropout_p):
    """Below STORED_MAX_ELEMENTS the probabilities are kept for backward (autograd): the same values and
    gradients as the reference, for the same dropout mask."""
    monkeypatch.setattr(mix_mod, "STORED_MAX_ELEMENTS", 3 * 2 * 23 * 7)
    q, k, v, prior = _inputs()
    grad_out = torch.randn(3, 23, 6, dtype=torch.float64)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        torch.manual_seed(3)
        ours = _grads(lambda *t: mixture_attention(*t, scale=0.7, dropout_p=dropout_p), (q, k, v, prior), grad_out)
    assert max(saved) >= 3 * 2 * 23 * 7, "stored, not recomputed"
    torch.manual_seed(3)
    mask = torch.nn.functional.dropout(torch.ones(3, 23, 7, dtype=torch.float64), dropout_p)
    ref = _grads(lambda *t: reference(*t, scale=0.7, mask=mask if dropout_p else None), (q, k, v, prior), grad_out)
    for name, a, b in zip(["out", "q", "k", "v", "prior"], ours, ref):
        assert torch.allclose(a, b, atol=1e-12, rtol=1e-10), name


def test_acf_uses_the_kernel_in_training_with_the_same_result():
    """ACF training (gradients, dropout 0) through the blocked kernel equals its SDPA path."""
    acf = ACF(16, heads=2, mixtures=2, dropout=0.0).double().train()
    x = torch.randn(2, 16, 9, 7, dtype=torch.float64, requires_grad=True)
    out = acf(x)
    out.sum().backward()
    grad_blocked = x.grad.clone()
    x.grad = None
    acf.zero_grad()
    with torch.no_grad():
        inference = acf.attend(x)  # no gradients: the fused SDPA route
    assert torch.allclose(acf.attend(x), inference, atol=1e-12)
    # the gradient against an explicit reference of the whole attention
    q, kk, v, prior = acf.components(x)
    b, h, nk, n, d = q.shape
    z = reference(q.reshape(b * h, nk, n, d), kk.reshape(b * h, nk, -1, d), v.reshape(b * h, -1, v.shape[-1]),
                  prior.reshape(b * h, nk), acf.scale).view(b, h, n, -1)
    ref_out = acf.out_norm(acf.out_conv(z.transpose(-1, -2).reshape(2, 16, 9, 7))) + x
    ref_out.sum().backward()
    assert torch.allclose(grad_blocked, x.grad, atol=1e-10)
