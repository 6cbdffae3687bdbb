"""Inference: whole-image, sliding-window, and multi-scale + flip (the test-time setting of both papers).

All functions take a segmentor whose ``forward(images)`` returns ``{"logits": [B, K, H, W]}`` at the
input resolution, and return class *probabilities* ``[B, K, H, W]`` at the input resolution. Multi-scale
+ flip averages the softmax probabilities over every scale and (optionally) the horizontal flip.

Also here: :func:`predict_single_and_multi` (single-scale and multi-scale + flip from one set of
forward passes, as the evaluate stage reports both), :func:`batched_by_size` (groups same-size
images of a variable-size dataset into batches), :class:`ClassifierInput` (a forward hook that
records the features entering the final classifier, for the feature-space figure) and
:func:`measure_latency` (wall-clock latency of a module on CPU).
"""
from __future__ import annotations

import math
import time
from typing import Any, Iterable, Iterator, Literal, Optional, Sequence

import torch
import torch.nn.functional as F


def _logits(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    out = model(images)
    return out["logits"] if isinstance(out, dict) else out


@torch.no_grad()
def whole_probs(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Softmax over the whole image in one pass."""
    return _logits(model, images).float().softmax(dim=1)


def window_starts(length: int, crop: int, stride: int) -> list[int]:
    """Start offsets of sliding windows along one axis (mmseg's grid: the last window is flush with the end)."""
    if length <= crop:
        return [0]
    n = math.ceil((length - crop) / stride) + 1
    return sorted({min(i * stride, length - crop) for i in range(n)})


@torch.no_grad()
def slide_probs(model: torch.nn.Module, images: torch.Tensor, crop_size: int, stride: int) -> torch.Tensor:
    """Sliding-window inference: overlapping ``crop_size`` windows every ``stride`` pixels, averaged.

    Images smaller than the crop are processed whole (no padding is invented), so with a crop that
    covers the image this equals :func:`whole_probs`. Along an axis shorter than the crop the window
    spans the whole axis.
    """
    if stride < 1 or crop_size < 1:
        raise ValueError(f"crop_size ({crop_size}) and stride ({stride}) must be >= 1")
    b, _, h, w = images.shape
    if h <= crop_size and w <= crop_size:
        return whole_probs(model, images)
    total: Optional[torch.Tensor] = None
    count = images.new_zeros(1, 1, h, w)
    for y0 in window_starts(h, crop_size, stride):
        for x0 in window_starts(w, crop_size, stride):
            y1, x1 = min(y0 + crop_size, h), min(x0 + crop_size, w)
            probs = whole_probs(model, images[:, :, y0:y1, x0:x1])
            if total is None:
                total = images.new_zeros(b, probs.shape[1], h, w)
            total[:, :, y0:y1, x0:x1] += probs
            count[:, :, y0:y1, x0:x1] += 1
    assert total is not None
    return total / count


def _one_pass(model, images, mode, crop_size, stride) -> torch.Tensor:
    if mode == "slide":
        return slide_probs(model, images, crop_size, stride)
    if mode == "whole":
        return whole_probs(model, images)
    raise ValueError(f"mode must be 'whole' or 'slide', got {mode!r}")


def resize_probs(probs: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize of ``[B, K, h, w]`` probabilities to ``size`` (a no-op when already that size)."""
    size = (int(size[0]), int(size[1]))
    if tuple(probs.shape[-2:]) == size:
        return probs
    return F.interpolate(probs, size=size, mode="bilinear", align_corners=False)


def _scaled(images: torch.Tensor, scale: float) -> torch.Tensor:
    if scale == 1.0:
        return images
    h, w = images.shape[-2:]
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False)


@torch.no_grad()
def predict_single_and_multi(
    model: torch.nn.Module,
    images: torch.Tensor,
    *,
    mode: Literal["whole", "slide"] = "whole",
    crop_size: int = 512,
    stride: int = 341,
    scales: Optional[Sequence[float]] = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75),
    flip: bool = True,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(single-scale probs, multi-scale + flip probs)`` at the input resolution.

    The single-scale result is the scale-1.0, unflipped pass; when 1.0 is among ``scales`` that
    pass is shared with the multi-scale average (no extra forward). ``scales=None`` (or ``[]``)
    returns ``(single, None)``.
    """
    single = _one_pass(model, images, mode, crop_size, stride)
    if not scales:
        return single, None
    return single, _average_passes(model, images, scales, flip, mode, crop_size, stride, identity=single)


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
    if not scales:
        raise ValueError("scales must hold at least one scale")
    return _average_passes(model, images, scales, flip, mode, crop_size, stride)


def _average_passes(model, images, scales, flip, mode, crop_size, stride,
                    identity: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean probabilities over ``scales`` × (identity, flip), each resized to the input resolution;
    ``identity`` (the scale-1.0 unflipped result, if already computed) is reused instead of recomputed."""
    h, w = images.shape[-2:]
    total: Optional[torch.Tensor] = None
    n = 0
    for scale in scales:
        scaled = _scaled(images, float(scale))
        for flipped in ([False, True] if flip else [False]):
            if identity is not None and float(scale) == 1.0 and not flipped:
                probs = identity
            else:
                probs = _one_pass(model, scaled.flip(-1) if flipped else scaled, mode, crop_size, stride)
                if flipped:
                    probs = probs.flip(-1)
                probs = resize_probs(probs, (h, w))
            total = probs if total is None else total + probs
            n += 1
    return total / n


def batched_by_size(samples: Iterable[Any], batch_size: int, key=lambda s: tuple(s[0].shape)) -> Iterator[list]:
    """Group consecutive samples with equal ``key`` (default: the image shape) into lists of at most
    ``batch_size``; order is kept. Datasets with one image size batch fully; others still work."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    batch: list = []
    current = None
    for sample in samples:
        k = key(sample)
        if batch and (k != current or len(batch) >= batch_size):
            yield batch
            batch = []
        current = k
        batch.append(sample)
    if batch:
        yield batch


class ClassifierInput:
    """Records the input of a model's final classifier with a forward pre-hook.

    ``module`` defaults to ``model.decode_head.classifier`` (the 1x1 classifier of every ctxseg
    segmentor: for MCIBI it is H2, whose input F lives in the same space as the memory rows, Eq 15).
    Use as a context manager; ``.features`` is the last recorded ``[B, C, h, w]`` tensor (detached).
    """

    def __init__(self, model: torch.nn.Module, module: Optional[torch.nn.Module] = None):
        model = getattr(model, "module", model)
        if module is None:
            head = getattr(model, "decode_head", None)
            module = getattr(head, "classifier", None)
            if module is None:
                raise ValueError(f"{type(model).__name__} has no decode_head.classifier; pass the classifier module")
        self.module = module
        self.features: Optional[torch.Tensor] = None
        self._handle = None

    def _hook(self, _module, inputs) -> None:
        self.features = inputs[0].detach()

    def __enter__(self) -> "ClassifierInput":
        self._handle = self.module.register_forward_pre_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def memory_of(model_or_state: Any) -> Optional[torch.Tensor]:
    """Class prototypes (the MCIBI feature memory ``M`` [K, C]) of a model or a segmentor state dict, or None.

    A thin wrapper kept for callers of the earlier API: for a model it is
    ``model.class_prototypes()`` (DDP wrappers unwrapped); for a state dict each registered context
    head is asked to find its prototypes in it (``ContextHead.prototypes_in_state``).
    """
    if isinstance(model_or_state, torch.nn.Module):
        model = getattr(model_or_state, "module", model_or_state)
        protos = model.class_prototypes() if hasattr(model, "class_prototypes") else None
        return None if protos is None else protos.detach().float().cpu()
    from ctxseg.models.heads import HEADS

    for head in HEADS.values():
        protos = head.prototypes_in_state(model_or_state)
        if protos is not None:
            return protos
    return None


@torch.no_grad()
def measure_latency(module: torch.nn.Module, *inputs: Any, warmup: int = 1, repeats: int = 5) -> dict:
    """Wall-clock latency of ``module(*inputs)`` on the inputs' device: median and min over ``repeats`` (ms)."""
    module.eval()
    for _ in range(max(warmup, 0)):
        module(*inputs)
    times = []
    for _ in range(max(repeats, 1)):
        start = time.perf_counter()
        module(*inputs)
        times.append((time.perf_counter() - start) * 1000.0)
    times.sort()
    return {"median_ms": times[len(times) // 2], "min_ms": times[0], "repeats": len(times)}


@torch.no_grad()
def measure_latencies(cases: dict, warmup: int = 1, repeats: int = 5) -> dict:
    """Latency of several modules, timed round-robin so that background load hits them alike.

    ``cases[name] = (module, inputs_tuple)``; returns ``name -> {"median_ms", "min_ms", "repeats"}``.
    """
    for module, inputs in cases.values():
        module.eval()
        for _ in range(max(warmup, 0)):
            module(*inputs)
    times: dict = {name: [] for name in cases}
    for _ in range(max(repeats, 1)):
        for name, (module, inputs) in cases.items():
            start = time.perf_counter()
            module(*inputs)
            times[name].append((time.perf_counter() - start) * 1000.0)
    out = {}
    for name, values in times.items():
        values.sort()
        out[name] = {"median_ms": values[len(values) // 2], "min_ms": values[0], "repeats": len(values)}
    return out
