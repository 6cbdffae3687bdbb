"""Training and evaluation transforms (mmseg-style, as used by both papers), in NumPy + PIL.

Every transform is a callable ``t(image, label, rng) -> (image, label)`` where ``image`` is an
HxWx3 array (uint8 until :class:`Normalize`, float32 after), ``label`` an HxW uint8 array of train
ids (255 = ignore) and ``rng`` a :class:`numpy.random.Generator`. Labels are always resized with
nearest-neighbour interpolation. The final :class:`ToTensor` returns
``(FloatTensor[3,H,W], LongTensor[H,W])``.

Seeding and DataLoader workers
------------------------------
The transforms never touch a global RNG. :class:`ctxseg.data.SegmentationDataset` hands each fetch
its own generator:

* after ``dataset.set_epoch(epoch)`` (call it before iterating each epoch, like
  ``DistributedSampler.set_epoch``) sample ``i`` uses ``numpy.random.default_rng([seed, epoch, i])``:
  the augmentation depends only on ``(seed, epoch, index)``, identical for any ``num_workers``,
  persistent or not (the epoch lives in shared memory, so persistent workers see the update), any
  worker assignment and any DDP rank layout;
* if ``set_epoch`` is never called, every fetch still gets fresh randomness (so epochs differ),
  reproducible for a fixed DataLoader ``generator`` seed and worker count: the key adds the
  worker's torch seed and a per-process fetch counter.

:func:`seed_worker` additionally seeds Python's and NumPy's global RNGs of each worker from
``torch.initial_seed()`` for third-party code.
"""
from __future__ import annotations

import logging
import random
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from ctxseg.data.config import DataConfig
from ctxseg.data.datasets import get_dataset

IGNORE = 255
log = logging.getLogger(__name__)

Sample = Tuple[np.ndarray, np.ndarray]
Transform = Callable[[np.ndarray, np.ndarray, np.random.Generator], Sample]


def _check(image: np.ndarray, label: np.ndarray) -> None:
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be HxWx3, got shape {image.shape}")
    if label.shape != image.shape[:2]:
        raise ValueError(f"label shape {label.shape} does not match image shape {image.shape[:2]}")


def resize_pair(image: np.ndarray, label: Optional[np.ndarray], size_hw: Tuple[int, int]) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Resize an uint8 image (bilinear) and its label (nearest) to ``(h, w)``."""
    h, w = int(size_hw[0]), int(size_hw[1])
    if image.shape[:2] == (h, w):
        return image, label
    img = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))
    lbl = None if label is None else np.asarray(Image.fromarray(label).resize((w, h), Image.NEAREST))
    return img, lbl


class Compose:
    def __init__(self, transforms: Sequence[Transform]):
        self.transforms = list(transforms)

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: Optional[np.random.Generator] = None):
        if rng is None:
            rng = np.random.default_rng()
        _check(image, label)
        for t in self.transforms:
            image, label = t(image, label, rng)
        return image, label

    def __repr__(self) -> str:
        return "Compose(" + ", ".join(type(t).__name__ for t in self.transforms) + ")"


class RandomResize:
    """Resize by a ratio drawn uniformly from ``scale_range`` (mmseg ``Resize(ratio_range=...)``).

    With ``base_size`` the ratio scales a target short side of ``base_size``; otherwise it scales
    the image itself. Aspect ratio is kept.
    """

    def __init__(self, scale_range: Tuple[float, float] = (0.5, 2.0), base_size: Optional[int] = None):
        self.scale_range = scale_range
        self.base_size = base_size

    def __call__(self, image, label, rng):
        ratio = rng.uniform(*self.scale_range)
        h, w = image.shape[:2]
        factor = ratio if self.base_size is None else ratio * self.base_size / min(h, w)
        size = (max(1, int(round(h * factor))), max(1, int(round(w * factor))))
        return resize_pair(image, label, size)


class RandomCrop:
    """Random crop of at most ``crop_size``; a crop where one class covers more than
    ``cat_max_ratio`` of the labelled pixels is re-drawn (up to ``retries`` times)."""

    def __init__(self, crop_size: Tuple[int, int], cat_max_ratio: float = 0.75, retries: int = 10,
                 ignore_index: int = IGNORE):
        self.crop_size = crop_size
        self.cat_max_ratio = cat_max_ratio
        self.retries = retries
        self.ignore_index = ignore_index

    def _bbox(self, h: int, w: int, rng) -> Tuple[int, int, int, int]:
        ch, cw = min(self.crop_size[0], h), min(self.crop_size[1], w)
        y0 = int(rng.integers(0, h - ch + 1))
        x0 = int(rng.integers(0, w - cw + 1))
        return y0, y0 + ch, x0, x0 + cw

    def __call__(self, image, label, rng):
        h, w = label.shape
        box = self._bbox(h, w, rng)
        if self.cat_max_ratio < 1.0:
            for _ in range(self.retries):
                crop = label[box[0]:box[1], box[2]:box[3]]
                counts = np.bincount(crop[crop != self.ignore_index].ravel())
                counts = counts[counts > 0]
                if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                    break
                box = self._bbox(h, w, rng)
        y0, y1, x0, x1 = box
        return image[y0:y1, x0:x1], label[y0:y1, x0:x1]


class RandomFlip:
    """Horizontal flip with probability ``prob``."""

    def __init__(self, prob: float = 0.5):
        self.prob = prob

    def __call__(self, image, label, rng):
        if rng.random() < self.prob:
            return image[:, ::-1], label[:, ::-1]
        return image, label


def rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    """float RGB in [0,255] -> HSV with H in [0,360), S in [0,1], V in [0,255] (vectorised)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    maxc = rgb.max(-1)
    minc = rgb.min(-1)
    delta = maxc - minc
    s = np.where(maxc > 0, delta / np.maximum(maxc, 1e-12), 0.0)
    safe = np.maximum(delta, 1e-12)
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = np.where(maxc == r, bc - gc, np.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = np.where(delta > 0, (h / 6.0) % 1.0, 0.0) * 360.0
    return np.stack([h, s, maxc], -1)


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    h, s, v = hsv[..., 0] / 360.0 % 1.0, hsv[..., 1], hsv[..., 2]
    i = np.floor(h * 6.0)
    f = h * 6.0 - i
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    i = i.astype(np.int64) % 6
    choices_r = [v, q, p, p, t, v]
    choices_g = [t, v, v, q, p, p]
    choices_b = [p, p, t, v, v, q]
    r = np.choose(i, choices_r)
    g = np.choose(i, choices_g)
    b = np.choose(i, choices_b)
    return np.stack([r, g, b], -1)


class PhotometricDistortion:
    """mmseg ``PhotoMetricDistortion``: each step with probability 0.5, contrast before or after the
    HSV steps: brightness +U(-delta, delta); contrast x U(range); saturation x U(range);
    hue + U(-hue_delta, hue_delta) (OpenCV units: 180 = full turn)."""

    def __init__(self, brightness_delta: float = 32.0, contrast_range=(0.5, 1.5),
                 saturation_range=(0.5, 1.5), hue_delta: float = 18.0):
        self.brightness_delta = brightness_delta
        self.contrast_range = contrast_range
        self.saturation_range = saturation_range
        self.hue_delta = hue_delta

    def __call__(self, image, label, rng):
        img = image.astype(np.float32)
        if rng.random() < 0.5:
            img = np.clip(img + rng.uniform(-self.brightness_delta, self.brightness_delta), 0, 255)
        contrast_first = rng.random() < 0.5

        def contrast(x):
            if rng.random() < 0.5:
                x = x * rng.uniform(*self.contrast_range)
            return x

        if contrast_first:
            img = contrast(img)
        img = np.clip(img, 0, 255)
        do_sat, do_hue = rng.random() < 0.5, rng.random() < 0.5
        sat = rng.uniform(*self.saturation_range)
        hue = rng.uniform(-self.hue_delta, self.hue_delta) * 2.0  # OpenCV units -> degrees
        if do_sat or do_hue:
            hsv = rgb_to_hsv(img)
            if do_sat:
                hsv[..., 1] = np.clip(hsv[..., 1] * sat, 0, 1)
            if do_hue:
                hsv[..., 0] = (hsv[..., 0] + hue) % 360.0
            img = hsv_to_rgb(hsv)
        if not contrast_first:
            img = contrast(img)
        return np.clip(np.rint(img), 0, 255).astype(np.uint8), label


class Normalize:
    """(image - mean) / std per channel -> float32 (0-255 scale statistics)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)

    def __call__(self, image, label, rng):
        return (image.astype(np.float32) - self.mean) / self.std, label


class Pad:
    """Pad bottom/right to at least ``size`` with ``image_value`` (0 = the mean after Normalize) and
    ignore for the label."""

    def __init__(self, size: Tuple[int, int], image_value: float = 0.0, ignore_index: int = IGNORE):
        self.size = size
        self.image_value = image_value
        self.ignore_index = ignore_index

    def __call__(self, image, label, rng):
        h, w = label.shape
        ph, pw = max(self.size[0] - h, 0), max(self.size[1] - w, 0)
        if ph == 0 and pw == 0:
            return image, label
        image = np.pad(image, ((0, ph), (0, pw), (0, 0)), constant_values=self.image_value)
        label = np.pad(label, ((0, ph), (0, pw)), constant_values=self.ignore_index)
        return image, label


class ResizeShortSide:
    """Resize so the short side equals ``short_side`` (aspect kept); ``None`` keeps the size."""

    def __init__(self, short_side: Optional[int], resize_label: bool = True):
        self.short_side = short_side
        self.resize_label = resize_label

    def __call__(self, image, label, rng):
        if self.short_side is None:
            return image, label
        h, w = image.shape[:2]
        f = self.short_side / min(h, w)
        size = (max(1, int(round(h * f))), max(1, int(round(w * f))))
        img, lbl = resize_pair(image, label if self.resize_label else None, size)
        return img, (lbl if self.resize_label else label)


class ToTensor:
    """HxWx3 float -> FloatTensor[3,H,W]; HxW uint8 -> LongTensor[H,W]."""

    def __call__(self, image, label, rng):
        import torch

        img = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32))
        lbl = torch.from_numpy(np.ascontiguousarray(label).astype(np.int64))
        return img, lbl


def build_train_transform(cfg: DataConfig) -> Compose:
    """Random resize -> random crop (cat_max_ratio) -> flip -> photometric -> normalise -> pad -> tensor."""
    a = cfg.augment
    hook = get_dataset(cfg.name).augmentation_warning
    warning = hook(cfg) if hook is not None else None
    if warning:
        log.warning("%s", warning)
    steps: List[Transform] = [
        RandomResize(a.scale_range, a.base_size),
        RandomCrop(a.crop_size, a.cat_max_ratio, a.crop_retries),
    ]
    if a.flip:
        steps.append(RandomFlip(a.flip_prob))
    if a.photometric:
        steps.append(PhotometricDistortion(a.brightness_delta, a.contrast_range, a.saturation_range, a.hue_delta))
    steps += [Normalize(a.mean, a.std), Pad(a.crop_size), ToTensor()]
    return Compose(steps)


def build_eval_transform(cfg: DataConfig, resize_label: bool = True) -> Compose:
    """Resize the short side to ``cfg.eval_short_side`` (or keep) -> normalise -> tensor.

    ``resize_label=False`` keeps the label at its original resolution (score at full resolution by
    resizing the prediction back)."""
    a = cfg.augment
    return Compose([ResizeShortSide(cfg.eval_short_side, resize_label), Normalize(a.mean, a.std), ToTensor()])


def seed_worker(worker_id: int) -> None:
    """``DataLoader(worker_init_fn=seed_worker)``: seed Python's and NumPy's global RNGs per worker
    from torch's per-worker seed (our transforms do not use them; third-party code might)."""
    import torch

    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)
