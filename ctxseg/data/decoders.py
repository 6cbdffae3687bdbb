"""Label decoders: raw label files (PNG ids, colour PNGs, MATLAB files, COCO RLE) -> train ids.

Every decoder is a picklable :class:`~ctxseg.data.types.LabelDecoder` (it travels to the preprocess
worker processes). Datasets build theirs from these pieces in ``ctxseg/data/datasets/<name>.py``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

import numpy as np
from PIL import Image

from ctxseg.data.types import IGNORE_INDEX, LabelDecoder, voc_colormap

__all__ = [
    "read_png_label", "LutDecoder", "StrictLutDecoder", "MatDecoder", "MultiDecoder", "VocPngDecoder",
    "DetailJsonDecoder", "lut_from_pairs", "identity_lut", "rle_decode",
]


def read_png_label(path: Path) -> np.ndarray:
    """Single-channel label image (mode L, P, I or I;16) -> integer array of raw ids."""
    with Image.open(path) as im:
        im.load()
        if im.mode in ("L", "P"):
            return np.asarray(im)
        if im.mode in ("I", "I;16", "I;16B", "I;16L"):
            return np.asarray(im).astype(np.int64)
        raise ValueError(f"label must be a single-channel PNG (mode L or P), found mode {im.mode}")


def lut_from_pairs(size: int, pairs: Iterable[Tuple[int, int]], default: int = -1) -> np.ndarray:
    """A lookup table of ``size`` entries, ``default`` everywhere except the given ``(raw, train)`` pairs."""
    lut = np.full(size, default, dtype=np.int64)
    for k, v in pairs:
        lut[k] = v
    return lut


def identity_lut(num_ids: int, size: int = 256) -> np.ndarray:
    """``0..num_ids-1`` and 255 map to themselves; every other raw id is invalid (-1)."""
    return lut_from_pairs(size, [(k, k) for k in range(num_ids)] + [(IGNORE_INDEX, IGNORE_INDEX)])


class LutDecoder(LabelDecoder):
    """raw id -> train id through a lookup table (ids beyond the table -> ``default``)."""

    def __init__(self, lut: Optional[np.ndarray] = None, default: int = IGNORE_INDEX, name: str = "identity"):
        self.lut = None if lut is None else np.asarray(lut, dtype=np.int64)
        self.default = default
        self.name = name

    def map(self, raw: np.ndarray) -> np.ndarray:
        raw = np.asarray(raw)
        if self.lut is None:
            if raw.dtype == np.uint8:
                return raw
            if raw.min(initial=0) < 0 or raw.max(initial=0) > 255:
                bad = np.unique(raw[(raw < 0) | (raw > 255)])[:10].tolist()
                raise ValueError(f"label values {bad} do not fit in uint8")
            return raw.astype(np.uint8)
        raw = raw.astype(np.int64)
        out = np.full(raw.shape, self.default, dtype=np.int64)
        ok = (raw >= 0) & (raw < len(self.lut))
        out[ok] = self.lut[raw[ok]]
        return out.astype(np.uint8)

    def __call__(self, src: Any) -> np.ndarray:
        return self.map(read_png_label(Path(src)))

    def describe(self) -> str:
        return self.name


class StrictLutDecoder(LutDecoder):
    """LUT with -1 marking raw ids that must not occur; such ids raise naming the raw values."""

    def __init__(self, lut: np.ndarray, name: str, valid_desc: str):
        super().__init__(np.asarray(lut, dtype=np.int64), name=name)
        self.valid_desc = valid_desc

    def map(self, raw: np.ndarray) -> np.ndarray:
        raw = np.asarray(raw).astype(np.int64)
        uniq = np.unique(raw)
        bad = uniq[(uniq < 0) | (uniq >= len(self.lut))]
        inside = uniq[(uniq >= 0) & (uniq < len(self.lut))]
        bad = np.concatenate([bad, inside[self.lut[inside] < 0]])
        if len(bad):
            raise ValueError(f"raw label values {sorted(bad.tolist())[:10]} are not valid ({self.valid_desc})")
        return self.lut[raw].astype(np.uint8)


class MatDecoder(LabelDecoder):
    """Label stored in a MATLAB file: ``key`` (optionally ``.field`` of a struct), then a LUT."""

    def __init__(self, key: str, lut: LutDecoder, struct_field: Optional[str] = None):
        self.key = key
        self.struct_field = struct_field
        self.lut = lut

    def __call__(self, src: Any) -> np.ndarray:
        try:
            from scipy.io import loadmat
        except ImportError as e:  # pragma: no cover - scipy ships with the pipeline's dependencies
            raise RuntimeError("reading .mat labels needs scipy (pip install scipy)") from e
        mat = loadmat(str(src), squeeze_me=True, struct_as_record=False)
        if self.key not in mat:
            raise ValueError(f"no variable {self.key!r} in {src} (found {sorted(k for k in mat if not k.startswith('__'))})")
        arr = mat[self.key]
        if self.struct_field:
            arr = getattr(arr, self.struct_field)
        return self.lut.map(np.asarray(arr))

    def describe(self) -> str:
        return f"{self.lut.describe()} (from .mat {self.key}{'.' + self.struct_field if self.struct_field else ''})"


class MultiDecoder(LabelDecoder):
    """Dispatch on the label file's suffix."""

    def __init__(self, by_suffix: Dict[str, LabelDecoder], name: str):
        self.by_suffix = by_suffix
        self.name = name

    def __call__(self, src: Any) -> np.ndarray:
        return self.by_suffix[Path(src).suffix.lower()](src)

    def describe(self) -> str:
        return self.name


class VocPngDecoder(LabelDecoder):
    """VOC label PNG: indexed (P) or grey (L) -> ids as stored; RGB colour -> ids via the VOC colour
    map (boundary colour (224,224,192) -> 255). Unknown colours raise naming them."""

    def __init__(self, num_classes: int = 21):
        self.colors = {tuple(c): i for i, c in enumerate(voc_colormap(num_classes))}
        self.colors[(224, 224, 192)] = IGNORE_INDEX

    def __call__(self, src: Any) -> np.ndarray:
        with Image.open(src) as im:
            im.load()
            if im.mode in ("P", "L"):
                return np.asarray(im).astype(np.uint8)
            if im.mode not in ("RGB", "RGBA"):
                raise ValueError(f"unsupported VOC label mode {im.mode}")
            rgb = np.asarray(im.convert("RGB")).astype(np.int64)
        code = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
        uniq, inv = np.unique(code, return_inverse=True)
        ids = np.empty(len(uniq), dtype=np.int64)
        for k, c in enumerate(uniq):
            col = (int(c) >> 16, (int(c) >> 8) & 255, int(c) & 255)
            if col not in self.colors:
                raise ValueError(f"colour {col} is not a VOC class colour")
            ids[k] = self.colors[col]
        return ids[inv].reshape(code.shape).astype(np.uint8)

    def describe(self) -> str:
        return "voc: indexed/grey ids or VOC colour map -> ids, boundary 255 kept"


# ------------------------------------------------------------------------------------- COCO RLE


def rle_decode(counts: Any, h: int, w: int) -> np.ndarray:
    """COCO RLE (list of ints or the compressed string form) -> HxW bool mask (column-major runs)."""
    if isinstance(counts, str):
        counts = _rle_from_string(counts)
    flat = np.zeros(h * w, dtype=bool)
    pos = 0
    val = False
    for c in counts:
        if val:
            flat[pos:pos + c] = True
        pos += c
        val = not val
    return flat.reshape(w, h).T


def _rle_from_string(s: str) -> List[int]:
    """pycocotools ``rleFrString``: LEB128-like 5-bit groups, deltas from the run two back."""
    counts: List[int] = []
    p = 0
    while p < len(s):
        x = 0
        k = 0
        more = True
        while more:
            c = ord(s[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


class DetailJsonDecoder(LabelDecoder):
    """Pascal Context label from Detail-API segmentation annotations (list of (category_id, rle))."""

    def __init__(self, lut: np.ndarray, num_classes: int):
        self.lut = lut
        self.num_classes = num_classes

    def __call__(self, src: Any) -> np.ndarray:
        h, w, annos = src
        raw = np.zeros((h, w), dtype=np.int64)
        for cat, counts in annos:
            raw[rle_decode(counts, h, w)] = cat
        if raw.max(initial=0) >= len(self.lut):
            raise ValueError(f"category ids {np.unique(raw[raw >= len(self.lut)])[:10].tolist()} exceed 459")
        return self.lut[raw].astype(np.uint8)

    def describe(self) -> str:
        return f"pascal context detail json 459 -> {self.num_classes}"
