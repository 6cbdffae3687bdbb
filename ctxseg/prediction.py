"""Predicting on a user's own images: reading them, class names and colours, masks and overlays.

Used by ``ctxseg-predict`` (``pipeline/predict.py``), which adds only argument parsing and finding
the model file (a path or an MLflow artifact). Every "the input is wrong" case raises
:class:`PredictError` (a :class:`ctxseg.errors.UserError`) with a message naming the file.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ctxseg.errors import UserError
from ctxseg.io import atomic_path

log = logging.getLogger(__name__)

__all__ = ["IMAGE_SUFFIXES", "PredictError", "list_images", "read_rgb", "predict_image", "output_stems",
           "resolve_classes", "write_mask_and_overlay", "class_fractions"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm")


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
                           alpha: float = 0.5) -> None:
    """``mask_file``: palette PNG (pixel value = class id); ``overlay_file``: the colours blended over the image."""
    from PIL import Image

    from ctxseg.data.info import colorize
    from ctxseg.visualize import overlay, palette_png

    with atomic_path(mask_file) as tmp:
        palette_png(mask, palette).save(tmp, format="PNG")
    with atomic_path(overlay_file) as tmp:
        Image.fromarray(overlay(image, colorize(mask, palette), alpha)).save(tmp, format="PNG")


def class_fractions(mask: np.ndarray, class_names: Sequence[str]) -> dict[str, float]:
    """Share of the image's pixels per predicted class (classes that occur only)."""
    counts = np.bincount(mask.ravel(), minlength=len(class_names))
    return {class_names[k]: round(float(c) / mask.size, 6) for k, c in enumerate(counts) if c}
