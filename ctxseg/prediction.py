"""Predicting on a user's own images: reading them, class names and colours, masks and overlays.

Used by ``ctxseg-predict`` (``pipeline/predict.py``), which adds only argument parsing and finding
the model file (a path or an MLflow artifact). Every "the input is wrong" case raises
:class:`PredictError` (a :class:`ctxseg.errors.UserError`) with a message naming the file.

The mask is written at the input's size (its pixel values are the class ids). The overlay is for
people to look at, so it is made readable (:func:`display_overlay`): a small image (the synthetic
dataset's are 128 px) is enlarged by a whole factor, the class map with nearest-neighbour sampling
so that no class is invented at its edges; the colours are blended strongly enough to read, the
class boundaries are drawn as lines, and a legend under the image names the colour of every class
present with its share of the image.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ctxseg.errors import UserError
from ctxseg.io import atomic_path

log = logging.getLogger(__name__)

__all__ = ["IMAGE_SUFFIXES", "PredictError", "list_images", "read_rgb", "predict_image", "output_stems",
           "resolve_classes", "write_mask_and_overlay", "class_fractions", "display_scale", "upscale_label",
           "upscale_image", "class_boundaries", "display_overlay", "OVERLAY_ALPHA", "DISPLAY_MIN_SIDE",
           "BOUNDARY_COLOUR"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm")
OVERLAY_ALPHA = 0.6          # class colour weight in the overlay: the colours read, the image shows through
DISPLAY_MIN_SIDE = 512       # overlays of smaller images are enlarged until their short side reaches this
MAX_DISPLAY_SCALE = 8
BOUNDARY_COLOUR = (0, 0, 0)  # class boundary lines


class PredictError(UserError):
    """The inputs of predict are wrong (unreadable image, class-count mismatch, unknown model)."""


def list_images(path: Path) -> list[Path]:
    """``path`` itself, or the images (by suffix) of the folder ``path``, sorted."""
    path = Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise PredictError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
        return files
    raise PredictError(f"{path}: no such image or folder")


def read_rgb(path: Path) -> np.ndarray:
    """An image file as RGB uint8 [H, W, 3]; an unreadable file is a :class:`PredictError`."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise PredictError(f"{path}: cannot read this file as an image ({err}). Remove it from the input or convert "
                           f"it to one of {', '.join(IMAGE_SUFFIXES)}.") from None


def output_stems(files: Sequence[Path]) -> list[str]:
    """Unique output names: the file stem, plus the suffix when two inputs share a stem."""
    stems = [f.stem for f in files]
    return [f"{f.stem}_{f.suffix.lstrip('.').lower()}" if stems.count(f.stem) > 1 else f.stem for f in files]


def predict_image(model: torch.nn.Module, image: np.ndarray, mean, std, *, device: torch.device,
                  short_side: Optional[int] = None, **inference) -> np.ndarray:
    """Class-id map (uint8 HxW, the image's size) for one RGB uint8 image."""
    from ctxseg.data.transforms import Normalize, ResizeShortSide
    from ctxseg.inference import predict_probs, resize_probs

    h, w = image.shape[:2]
    x = image
    if short_side is not None:
        x, _ = ResizeShortSide(short_side, resize_label=False)(x, None, None)
    x, _ = Normalize(mean, std)(x, None, None)
    tensor = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32))[None].to(device)
    probs = predict_probs(model, tensor, **inference)
    if probs.shape[1] > 255:
        raise PredictError(f"the model predicts {probs.shape[1]} classes; palette PNG masks hold at most 255")
    return resize_probs(probs, (h, w)).argmax(1)[0].to(torch.uint8).cpu().numpy()


def resolve_classes(num_classes: int, *, source: str, class_names: Optional[Sequence[str]] = None,
                    dataset: Optional[str] = None, meta: Optional[dict] = None,
                    meta_file: Optional[Path] = None) -> tuple[list[str], list]:
    """Class names and palette for a model's ``num_classes`` outputs.

    Order: a prepared dataset's ``meta`` (checked against the model), else the model file's class
    names with the palette of its ``dataset``, else generic names and the VOC colour map.
    """
    from ctxseg.data.info import voc_colormap

    if meta is not None:
        if int(meta["num_classes"]) != num_classes:
            raise PredictError(f"{meta_file or 'meta.json'}: the dataset has {meta['num_classes']} classes but the "
                               f"model ({source}) predicts {num_classes}. Use the model trained on this dataset, "
                               "or the meta.json of the model's dataset.")
        return list(meta["class_names"]), [tuple(c) for c in meta["palette"]]
    names = list(class_names) if class_names is not None else None
    if names is not None and len(names) != num_classes:
        raise PredictError(f"{source}: the model predicts {num_classes} classes but its file lists "
                           f"{len(names)} class names; the file is inconsistent, re-run the train stage.")
    palette = None
    info = _dataset_info(dataset) if dataset else None
    if info is not None and info.num_classes == num_classes:
        names = names or list(info.class_names)
        palette = [tuple(c) for c in info.palette]
    elif info is not None:
        log.warning("the model predicts %d classes but dataset %r has %d; using generic colours",
                    num_classes, dataset, info.num_classes)
    return names or [f"class_{k}" for k in range(num_classes)], palette or voc_colormap(num_classes)


def _dataset_info(name: str):
    from ctxseg.data.info import get_dataset_info

    try:
        return get_dataset_info(name)
    except (KeyError, ValueError, UserError):
        return None


def write_mask_and_overlay(mask: np.ndarray, image: np.ndarray, palette, mask_file: Path, overlay_file: Path,
                           alpha: float = OVERLAY_ALPHA, class_names: Optional[Sequence[str]] = None,
                           min_side: int = DISPLAY_MIN_SIDE) -> dict:
    """``mask_file``: palette PNG at the input's size (pixel value = class id); ``overlay_file``: the
    readable overlay of :func:`display_overlay`. Returns what the overlay shows (scale, size, legend,
    class shares)."""
    from PIL import Image

    from ctxseg.visualize import palette_png

    with atomic_path(mask_file) as tmp:
        palette_png(mask, palette).save(tmp, format="PNG")
    names = list(class_names) if class_names is not None else [f"class_{k}" for k in range(len(palette))]
    shown, info = display_overlay(image, mask, palette, names, alpha=alpha, min_side=min_side)
    with atomic_path(overlay_file) as tmp:
        Image.fromarray(shown).save(tmp, format="PNG")
    return info


def display_scale(height: int, width: int, min_side: int = DISPLAY_MIN_SIDE, max_scale: int = MAX_DISPLAY_SCALE) -> int:
    """Whole enlargement factor that brings the short side to at least ``min_side`` (1 for large
    images or ``min_side <= 0``; at most ``max_scale``). A whole factor keeps every label pixel a
    square block of the same size."""
    if min_side <= 0:
        return 1
    return int(max(1, min(max_scale, math.ceil(min_side / max(1, min(height, width))))))


def upscale_label(label: np.ndarray, scale: int) -> np.ndarray:
    """Nearest-neighbour enlargement of a class map by a whole factor (no class is made up at edges)."""
    return label if scale == 1 else np.repeat(np.repeat(label, scale, axis=0), scale, axis=1)


def upscale_image(image: np.ndarray, scale: int) -> np.ndarray:
    """Bicubic enlargement of an RGB uint8 image by a whole factor (smooth for the eye)."""
    from PIL import Image

    if scale == 1:
        return image
    h, w = image.shape[:2]
    return np.asarray(Image.fromarray(image).resize((w * scale, h * scale), Image.Resampling.BICUBIC))


def class_boundaries(label: np.ndarray, width: int = 2) -> np.ndarray:
    """Boolean map of the pixels on a class boundary: a pixel whose right or lower neighbour has
    another class (``width`` 1), also its left / upper neighbour's counterpart (``width`` 2: the line
    straddles the boundary), widened by one pixel per further step of ``width``."""
    edge = np.zeros(label.shape, dtype=bool)
    right, down = label[:, 1:] != label[:, :-1], label[1:, :] != label[:-1, :]
    edge[:, :-1] |= right
    edge[:-1, :] |= down
    if width >= 2:
        edge[:, 1:] |= right
        edge[1:, :] |= down
    for _ in range(max(0, width - 2) // 2):
        grown = edge.copy()
        grown[:, 1:] |= edge[:, :-1]
        grown[:, :-1] |= edge[:, 1:]
        grown[1:, :] |= edge[:-1, :]
        grown[:-1, :] |= edge[1:, :]
        edge = grown
    return edge


def display_overlay(image: np.ndarray, mask: np.ndarray, palette, class_names: Sequence[str], *,
                    alpha: float = OVERLAY_ALPHA, min_side: int = DISPLAY_MIN_SIDE,
                    legend: bool = True) -> tuple[np.ndarray, dict]:
    """The overlay people look at: image and class map enlarged by :func:`display_scale` (the map with
    nearest-neighbour sampling), class colours blended at ``alpha``, class boundaries drawn in
    :data:`BOUNDARY_COLOUR`, and under it a legend naming the colour of every class present with its
    share of the image (largest first). Returns ``(RGB uint8 image, info)``, ``info`` = scale, the size
    of the image part, the legend's classes and every class's share (``classes``)."""
    from ctxseg.data.info import colorize
    from ctxseg.visualize import overlay

    scale = display_scale(*mask.shape[:2], min_side=min_side)
    big = upscale_label(mask, scale)
    out = overlay(upscale_image(image, scale), colorize(big, palette), alpha)
    width = 1 if scale == 1 and min(mask.shape[:2]) < 256 else 2 if min(big.shape) < 768 else 4
    out[class_boundaries(big, width)] = BOUNDARY_COLOUR
    fractions = class_fractions(mask, class_names)
    entries = sorted(fractions.items(), key=lambda kv: -kv[1])
    info = {"scale": scale, "size": [int(out.shape[0]), int(out.shape[1])], "legend": [c for c, _ in entries],
            "classes": fractions}
    if legend and entries:
        strip = _legend_strip(entries, {c: palette[k] for k, c in enumerate(class_names) if k < len(palette)},
                              out.shape[1])
        out = np.concatenate([out, strip], axis=0)
    return out, info


def _legend_strip(entries: Sequence[tuple[str, float]], colours: dict, width: int) -> np.ndarray:
    """A white strip of ``width`` px: a colour swatch and ``name NN%`` per entry, wrapped into rows."""
    from PIL import Image, ImageDraw, ImageFont

    size = int(min(28, max(12, width // 40)))
    try:
        font = ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        font = ImageFont.load_default()
    pad, swatch = size // 2, size
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    items = [(name, f"{name} {100 * share:.0f}%" if share >= 0.005 else f"{name} <1%") for name, share in entries]
    widths = [swatch + pad // 2 + int(probe.textlength(text, font=font)) + 2 * pad for _, text in items]
    rows, row, used = [], [], pad
    for item, w in zip(items, widths):
        if row and used + w > width:
            rows.append(row)
            row, used = [], pad
        row.append((item, w))
        used += w
    rows.append(row)
    line = swatch + pad
    strip = Image.new("RGB", (width, pad + line * len(rows)), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    for r, row in enumerate(rows):
        x, y = pad, pad + r * line
        for (name, text), w in row:
            draw.rectangle([x, y, x + swatch - 1, y + swatch - 1], fill=tuple(int(c) for c in colours[name]),
                           outline=(60, 60, 60))
            draw.text((x + swatch + pad // 2, y + swatch / 2), text, fill=(0, 0, 0), font=font, anchor="lm")
            x += w
    return np.asarray(strip)


def class_fractions(mask: np.ndarray, class_names: Sequence[str]) -> dict[str, float]:
    """Share of the image's pixels per predicted class (classes that occur only)."""
    counts = np.bincount(mask.ravel(), minlength=len(class_names))
    return {class_names[k]: round(float(c) / mask.size, 6) for k, c in enumerate(counts) if c}
