"""Inference: whole-image, sliding-window, and multi-scale + flip (the test-time setting of both papers).

All functions take a segmentor whose ``forward(images)`` returns ``{"logits": [B, K, H, W]}`` at the
input resolution, and return class *probabilities* ``[B, K, H, W]`` at the input resolution. Multi-scale
+ flip averages the softmax probabilities over every scale and (optionally) the horizontal flip.
"""
from __future__ import annotations

import math
from typing import Literal, Sequence

import torch
import torch.nn.functional as F


def _logits(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    out = model(images)
    return out["logits"] if isinstance(out, dict) else out


@torch.no_grad()
def whole_probs(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Softmax over the whole image in one pass."""
    return _logits(model, images).float().softmax(dim=1)


@torch.no_grad()
def slide_probs(model: torch.nn.Module, images: torch.Tensor, crop_size: int, stride: int) -> torch.Tensor:
    """Sliding-window inference: overlapping ``crop_size`` windows every ``stride`` pixels, averaged.

    Images smaller than the crop are processed whole (no padding is invented), so with a crop that
    covers the image this equals :func:`whole_probs`.
    """
    b, _, h, w = images.shape
    if h <= crop_size and w <= crop_size:
        return whole_probs(model, images)
    rows = max(math.ceil((h - crop_size) / stride), 0) + 1
    cols = max(math.ceil((w - crop_size) / stride), 0) + 1
    total = None
    count = images.new_zeros(1, 1, h, w)
    for r in range(rows):
        for c in range(cols):
            y0 = min(r * stride, max(h - crop_size, 0))
            x0 = min(c * stride, max(w - crop_size, 0))
            y1, x1 = min(y0 + crop_size, h), min(x0 + crop_size, w)
            probs = whole_probs(model, images[:, :, y0:y1, x0:x1])
            if total is None:
                total = images.new_zeros(b, probs.shape[1], h, w)
            total[:, :, y0:y1, x0:x1] += probs
            count[:, :, y0:y1, x0:x1] += 1
    return total / count


@torch.no_grad()
def predict_probs(
    model: torch.nn.Module,
    images: torch.Tensor,
    *,
    mode: Literal["whole", "slide"] = "whole",
    crop_size: int = 512,
    stride: int = 341,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
) -> torch.Tensor:
    """Probabilities averaged over ``scales`` × (identity, horizontal flip if ``flip``)."""
    _, _, h, w = images.shape
    total = None
    n = 0
    for scale in scales:
        if scale == 1.0:
            scaled = images
        else:
            size = (max(1, round(h * scale)), max(1, round(w * scale)))
            scaled = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        variants = [False, True] if flip else [False]
        for flipped in variants:
            inp = scaled.flip(-1) if flipped else scaled
            if mode == "slide":
                probs = slide_probs(model, inp, crop_size, stride)
            else:
                probs = whole_probs(model, inp)
            if flipped:
                probs = probs.flip(-1)
            if probs.shape[-2:] != (h, w):
                probs = F.interpolate(probs, size=(h, w), mode="bilinear", align_corners=False)
            total = probs if total is None else total + probs
            n += 1
    return total / n
