"""Whole / sliding-window / multi-scale + flip inference, and the feature hook."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from ctxseg.inference import (
    ClassifierInput,
    batched_by_size,
    measure_latency,
    memory_of,
    predict_probs,
    predict_single_and_multi,
    slide_probs,
    whole_probs,
    window_starts,
)
from ctxseg.models import ModelConfig, build_segmentor


class SymmetricConv(nn.Module):
    """Flip-equivariant by construction: a 3x3 conv whose kernels are mirror-symmetric left-right."""

    def __init__(self, classes: int = 4, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, classes, 3, padding=1, padding_mode="replicate")
        with torch.no_grad():
            self.conv.weight.copy_((self.conv.weight + self.conv.weight.flip(-1)) / 2)
            self.conv.weight.mul_(4)

    def forward(self, x):
        return {"logits": self.conv(x)}


class PerPixel(nn.Module):
    """A 1x1 conv: no spatial context at all."""

    def __init__(self, classes: int = 4):
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(3, classes, 1)

    def forward(self, x):
        return {"logits": 3 * self.conv(x)}


def block_image(h: int = 64, w: int = 96, block: int = 16, seed: int = 0) -> torch.Tensor:
    """Piecewise-constant colour blocks (not mirror-symmetric)."""
    g = torch.Generator().manual_seed(seed)
    colours = torch.randn(3, h // block, w // block, generator=g)
    return colours.repeat_interleave(block, 1).repeat_interleave(block, 2)[None]


def interior_mask(h: int, w: int, block: int, margin: int) -> torch.Tensor:
    ys = torch.arange(h) % block
    xs = torch.arange(w) % block
    ok_y = (ys >= margin) & (ys < block - margin)
    ok_x = (xs >= margin) & (xs < block - margin)
    return ok_y[:, None] & ok_x[None, :]


def test_multi_scale_flip_equals_single_scale_for_a_flip_equivariant_model():
    model = SymmetricConv().eval()
    image = block_image()
    # the image is not symmetric: forgetting to un-flip the flipped pass would change the result
    assert not torch.allclose(whole_probs(model, image.flip(-1)), whole_probs(model, image), atol=1e-3)
    single = whole_probs(model, image)
    ms = predict_probs(model, image, scales=[0.5, 0.75, 1.0, 1.25, 1.5, 1.75], flip=True)
    flip_only = predict_probs(model, image, scales=[1.0], flip=True)
    assert ms.shape == single.shape
    torch.testing.assert_close(flip_only, single, atol=1e-5, rtol=0)  # exact flip equivariance
    # resampling blurs block edges only; block interiors are resolution-independent for this model
    keep = interior_mask(64, 96, 16, margin=5)
    torch.testing.assert_close(ms[..., keep], single[..., keep], atol=1e-5, rtol=0)
    assert (ms.argmax(1)[..., keep] == single.argmax(1)[..., keep]).all()
    # the shared-pass variant gives the same two results
    s2, ms2 = predict_single_and_multi(model, image, scales=[0.5, 0.75, 1.0, 1.25, 1.5, 1.75], flip=True)
    torch.testing.assert_close(s2, single)
    torch.testing.assert_close(ms2, ms, atol=1e-6, rtol=0)


def test_predict_single_and_multi_without_scales_and_without_1_0():
    model = SymmetricConv().eval()
    image = block_image()
    single, ms = predict_single_and_multi(model, image, scales=None)
    assert ms is None and torch.equal(single, whole_probs(model, image))
    _, ms = predict_single_and_multi(model, image, scales=[0.5, 1.5], flip=False)
    torch.testing.assert_close(ms, predict_probs(model, image, scales=[0.5, 1.5]), atol=1e-6, rtol=0)


def test_sliding_window_equals_whole_when_the_crop_covers_the_image():
    torch.manual_seed(0)
    model = build_segmentor(ModelConfig(context="acf"), num_classes=5).eval()
    image = torch.randn(2, 3, 40, 56)
    whole = whole_probs(model, image)
    assert torch.equal(slide_probs(model, image, crop_size=56, stride=30), whole)
    assert torch.equal(predict_probs(model, image, mode="slide", crop_size=64, stride=64), whole)
    # a crop smaller than the image really slides (context models then differ from whole)
    assert not torch.allclose(slide_probs(model, image, crop_size=32, stride=16), whole, atol=1e-4)


def test_sliding_window_covers_every_pixel():
    # without spatial context every window agrees with the whole image, so the average must too;
    # a pixel missed by all windows would be 0/0 = NaN, one counted twice would not average right
    model = PerPixel().eval()
    image = torch.randn(1, 3, 45, 70)
    torch.testing.assert_close(slide_probs(model, image, crop_size=32, stride=21), whole_probs(model, image),
                               atol=1e-6, rtol=0)


def test_window_starts_hand_cases():
    assert window_starts(100, 64, 30) == [0, 30, 36]
    assert window_starts(64, 64, 30) == [0]
    assert window_starts(50, 64, 30) == [0]
    assert window_starts(128, 64, 64) == [0, 64]


def test_batched_by_size_groups_equal_shapes_in_order():
    samples = [(torch.zeros(3, 4, 4), i) for i in range(3)] + [(torch.zeros(3, 5, 4), 3)] + \
              [(torch.zeros(3, 4, 4), i) for i in (4, 5)]
    batches = [[s[1] for s in b] for b in batched_by_size(samples, batch_size=2)]
    assert batches == [[0, 1], [2], [3], [4, 5]]
    with pytest.raises(ValueError):
        list(batched_by_size(samples, 0))


def test_classifier_input_hook_and_memory():
    torch.manual_seed(0)
    model = build_segmentor(ModelConfig(context="mcibi", channels=16), num_classes=4).eval()
    with ClassifierInput(model) as hook:
        model(torch.randn(2, 3, 32, 32))
    assert hook.features is not None and hook.features.shape[:2] == (2, 16)
    assert hook._handle is None  # removed on exit
    mem = memory_of(model)
    assert mem is not None and mem.shape == (4, 16)
    assert torch.equal(mem, model.decode_head.memory.memory)
    assert memory_of(model.state_dict()) is not None
    assert memory_of(build_segmentor(ModelConfig(), num_classes=4)) is None


def test_measure_latency_reports_numbers():
    out = measure_latency(nn.Conv2d(3, 3, 1), torch.randn(1, 3, 8, 8), warmup=1, repeats=3)
    assert out["repeats"] == 3 and 0 < out["min_ms"] <= out["median_ms"]


def test_single_and_multi_share_the_scale_1_pass():
    class Counting(PerPixel):
        calls = 0

        def forward(self, x):
            Counting.calls += 1
            return super().forward(x)

    model = Counting().eval()
    predict_single_and_multi(model, torch.randn(1, 3, 16, 16), scales=[0.5, 1.0], flip=True)
    assert Counting.calls == 4  # single (= scale 1.0 unflipped), 1.0 flipped, 0.5, 0.5 flipped
