"""DCA (MCIBI Eq 11-14), ACF mixture-of-softmaxes (CFNet) and OCR attention vs explicit-softmax references."""

from __future__ import annotations

import pytest
import torch

from ctxseg.models.acf import ACF, mos_attention
from ctxseg.models.context import OCR
from ctxseg.models.dca import DCA, Fusion


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _randomise_bn(module):
    """Non-trivial BN statistics so the eval-mode reference exercises them."""
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    return module.eval()


def explicit_attention(q, k, v, scale):
    """softmax(q k^T * scale) v with the full matrix materialised."""
    return torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1) @ v


def test_dca_matches_explicit_reference_odd_size():
    ch, ncls = 16, 5
    dca = _randomise_bn(DCA(ch))
    feats = torch.randn(2, ch, 5, 7)
    w_logits = torch.randn(2, ncls, 5, 7)
    memory = torch.randn(ncls, ch)
    with torch.no_grad():
        out = dca(feats, w_logits, memory)
        # Eq 11-12: per-pixel W-weighted memory rows, by an explicit loop
        w = torch.softmax(w_logits, dim=1)
        ctx = torch.zeros(2, ch, 5, 7)
        for k in range(ncls):
            ctx += w[:, k : k + 1] * memory[k][None, :, None, None]
        assert torch.allclose(dca.gather(w_logits, memory), ctx, atol=1e-6)
        q = dca.query(feats).flatten(2).transpose(1, 2)
        kk = dca.key(ctx).flatten(2).transpose(1, 2)
        v = dca.value(ctx).flatten(2).transpose(1, 2)
        att = explicit_attention(q, kk, v, (ch / 2) ** -0.5)  # Eq 13, scale 1/sqrt(C/2)
        ref = dca.out(att.transpose(1, 2).reshape(2, ch // 2, 5, 7))  # Eq 14
    assert out.shape == (2, ch, 5, 7)
    assert torch.allclose(out, ref, atol=1e-5)


def reference_prior(acf: ACF, x: torch.Tensor) -> torch.Tensor:
    """CFNet §2.1 by loops, as MixtureOfSoftMaxACF computes it: pi_k = exp(w_k^T q_bar) / sum_k' exp(...),
    q_bar = (1/N) sum_i q_i the mean of the head's d_k target channels Phi_t(x_i), W [K, d_k] shared by
    the heads."""
    b = x.shape[0]
    hh, kk, dk = acf.heads, acf.mixtures, acf.key_dim
    t = acf.phi(x).flatten(2)  # q_i as columns, [B, H d_k, N]
    prior = torch.zeros(b, hh, kk, dtype=x.dtype)
    for n in range(b):
        for head in range(hh):
            q_bar = sum(t[n, head * dk:(head + 1) * dk, i] for i in range(t.shape[-1])) / t.shape[-1]
            logits = torch.stack([(acf.prior_weight[k] * q_bar).sum() for k in range(kk)])
            prior[n, head] = logits.exp() / logits.exp().sum()
    return prior


def reference_acf(acf: ACF, x: torch.Tensor) -> torch.Tensor:
    """Explicit mixture of softmaxes: P = sum_k pi_k softmax(s_k / sqrt(d_k)); z = P Psi(x_pool), per head;
    mixture k of head h uses channels [h d_k + k C/H, h d_k + (k+1) C/H) of Phi."""
    b, _, h, w = x.shape
    hh, kk, d, dk = acf.heads, acf.mixtures, acf.value_dim, acf.key_dim
    t = acf.phi(x).flatten(2)  # [B, H d_k, N]
    pooled = torch.nn.functional.avg_pool2d(x, 3, 2, 1, count_include_pad=False)
    c = acf.phi(pooled).flatten(2)
    v = acf.psi(pooled).flatten(2)
    prior = reference_prior(acf, x) if kk > 1 else torch.ones(b, hh, 1)
    outs = []
    for head in range(hh):
        probs = 0
        for k in range(kk):
            sl = slice(head * dk + k * d, head * dk + (k + 1) * d)
            s = t[:, sl].transpose(1, 2) @ c[:, sl] * acf.scale  # [B, N, M]
            probs = probs + prior[:, head, k, None, None] * torch.softmax(s, dim=-1)
        outs.append(probs @ v[:, head * d:(head + 1) * d].transpose(1, 2))  # [B, N, dv]
    return torch.cat(outs, dim=2).transpose(1, 2).reshape(b, hh * d, h, w)


@pytest.mark.parametrize("heads, mixtures, phi, scale", [(2, 2, "conv1x1", "sqrt"), (1, 3, "atrous", "sqrt"),
                                                          (3, 1, "conv1x1", "none")])
def test_acf_matches_explicit_mos_reference(heads, mixtures, phi, scale):
    channels = 4 * heads
    acf = _randomise_bn(ACF(channels, heads=heads, mixtures=mixtures, dropout=0.3, phi=phi, scale=scale))
    x = torch.randn(2, channels, 7, 9)  # odd sizes: pooled map is 4 x 5
    with torch.no_grad():
        z = acf.attend(x)
        ref = reference_acf(acf, x)
        assert torch.allclose(z, ref, atol=1e-5)
        assert torch.allclose(acf(x), acf.out_norm(acf.out_conv(ref)) + x, atol=1e-5)  # BN(conv(z)) + x
        q, k, v, prior = acf.components(x)
        assert k.shape[3] == 4 * 5 and q.shape[3] == 7 * 9
        assert q.shape[-1] == v.shape[-1] == channels // heads  # each softmax sees C/H channels
        assert acf.scale == ((channels // heads * mixtures) ** -0.5 if scale == "sqrt" else 1.0)
        assert torch.allclose(prior.sum(-1), torch.ones(2, heads))


def test_cfnet_prior_is_a_softmax_on_the_mean_target_vector_per_head():
    """pi_k = softmax(W q_bar) with q_bar the mean of Phi_t(x) (not of the raw input), per head."""
    acf = _randomise_bn(ACF(12, heads=3, mixtures=2))
    with torch.no_grad():
        acf.prior_weight.normal_()
        x = torch.randn(2, 12, 5, 4)
        prior = acf.components(x)[3]
        assert torch.allclose(prior, reference_prior(acf, x), atol=1e-6)
        assert acf.prior_weight.shape == (2, 12 // 3 * 2)  # [K, d_k], shared by the heads, no bias
        # with the linear 1x1 Phi (the authors' `conv`), the mean target vector is Phi of the mean input;
        # with the nonlinear atrous Phi (`dffn`), an input whose raw mean is unchanged but whose target
        # vectors change moves the prior
        shifted = x.clone()
        shifted[:, :, 0, 0] += 3.0
        shifted[:, :, 1, 1] -= 3.0
        assert torch.allclose(shifted.mean(dim=(2, 3)), x.mean(dim=(2, 3)), atol=1e-6)
        assert torch.allclose(acf.components(shifted)[3], prior, atol=1e-5)
        atrous = _randomise_bn(ACF(12, heads=3, mixtures=2, phi="atrous"))
        atrous.prior_weight.normal_()
        assert torch.allclose(atrous.components(x)[3], reference_prior(atrous, x), atol=1e-6)
        assert not torch.allclose(atrous.components(shifted)[3], atrous.components(x)[3], atol=1e-4)


def test_mos_with_one_mixture_is_plain_softmax_attention():
    q, k, v = torch.randn(2, 3, 1, 11, 4), torch.randn(2, 3, 1, 6, 4), torch.randn(2, 3, 6, 5)
    out = mos_attention(q, k, v, torch.ones(2, 3, 1), scale=0.5)
    ref = explicit_attention(q[:, :, 0], k[:, :, 0], v, 0.5)
    assert torch.allclose(out, ref, atol=1e-6)
    # and a K=1 ACF module has prior exactly 1
    acf = ACF(8, heads=2, mixtures=1).eval()
    assert acf.prior_weight is None
    assert torch.equal(acf.components(torch.randn(1, 8, 5, 5))[3], torch.ones(1, 2, 1))


def test_mos_is_linear_in_components():
    q, k, v = torch.randn(1, 1, 3, 9, 4), torch.randn(1, 1, 3, 5, 4), torch.randn(1, 1, 5, 2)
    prior = torch.softmax(torch.randn(1, 1, 3), -1)
    probs = sum(prior[0, 0, i] * torch.softmax(q[:, :, i] @ k[:, :, i].transpose(-1, -2), -1) for i in range(3))
    assert torch.allclose(mos_attention(q, k, v, prior, scale=1.0), probs @ v, atol=1e-6)


def test_acf_dropout_only_in_training():
    acf = ACF(8, heads=2, mixtures=2, dropout=0.5)
    x = torch.randn(1, 8, 6, 6)
    acf.eval()
    assert torch.equal(acf.attend(x), acf.attend(x))
    acf.train()
    torch.manual_seed(1)
    a = acf.attend(x)
    torch.manual_seed(2)
    assert not torch.allclose(a, acf.attend(x))


def test_ocr_object_attention_matches_reference():
    ocr = _randomise_bn(OCR(12, 8, 4))
    x, soft = torch.randn(2, 12, 5, 7), torch.randn(2, 3, 5, 7)
    with torch.no_grad():
        out = ocr(x, soft)
        feats = ocr.bottleneck(x)
        probs = torch.softmax(soft.flatten(2), dim=2)  # soft object regions
        proxy = torch.einsum("bkn,bcn->bck", probs, feats.flatten(2)).unsqueeze(-1)
        q = ocr.f_pixel(feats).flatten(2).transpose(1, 2)
        kk = ocr.f_object(proxy).flatten(2).transpose(1, 2)
        v = ocr.f_down(proxy).flatten(2).transpose(1, 2)
        ctx = explicit_attention(q, kk, v, 4 ** -0.5).transpose(1, 2).reshape(2, 4, 5, 7)
        ref = ocr.fuse(torch.cat([ocr.f_up(ctx), feats], 1))
    assert torch.allclose(out, ref, atol=1e-5)


def test_fusion_modes():
    a, b, c = torch.randn(3, 2, 4, 5, 5)
    assert torch.equal(Fusion("add", 3, 4)([a, b, c]), a + b + c)
    wa = Fusion("weighted_add", 2, 4)
    assert torch.allclose(wa([a, a]), a, atol=1e-6)  # weights are a convex combination
    out = wa([a, b])
    w = torch.softmax(wa.weight(torch.cat([a, b], 1)), 1)
    assert torch.allclose(out, w[:, :1] * a + w[:, 1:] * b, atol=1e-6)
    assert Fusion("concat", 3, 4)([a, b, c]).shape == a.shape
    with pytest.raises(ValueError, match="mcibi.fusion"):
        Fusion("mul", 2, 4)
