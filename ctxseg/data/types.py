"""The shared vocabulary of the data layer: errors, samples, label decoders' interface, dataset info.

Every other module of :mod:`ctxseg.data` may import this one; it imports nothing from the data layer
itself, so no import cycle can run through it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from ctxseg.errors import UserError

__all__ = [
    "IGNORE_INDEX", "RGB", "DataValidationError", "LayoutError", "DownloadError", "ChecksumError",
    "UnsafeArchiveError", "Sample", "LabelDecoder", "DatasetInfo", "voc_colormap", "colorize",
]

IGNORE_INDEX = 255

RGB = Tuple[int, int, int]


# ------------------------------------------------------------------------------------------ errors


class DataValidationError(UserError, ValueError):
    """Raw data failed validation; ``.problems`` lists ``(file, message)`` for every offending pair."""

    def __init__(self, message: str, problems: Sequence[Tuple[str, str]] = ()):
        super().__init__(message)
        self.problems = list(problems)


class LayoutError(DataValidationError):
    """The raw folder does not look like the dataset it should be."""


class DownloadError(UserError, RuntimeError):
    """Nothing could serve the dataset; the message says what to get and where to put it."""


class ChecksumError(DownloadError):
    """A file's digest differs from the published, recorded or override one."""


class UnsafeArchiveError(DownloadError):
    """An archive member would escape the destination, is a device/FIFO, or the archive exceeds a limit."""


# ----------------------------------------------------------------------------------------- samples


@dataclass
class Sample:
    """One raw pair to convert. ``label`` is whatever the dataset's label decoder understands
    (usually a path)."""

    split: str
    id: str
    image: Path
    label: Any


class LabelDecoder:
    """Turns a ``Sample.label`` into an HxW uint8 array of train ids (255 = ignore). Subclasses must be
    picklable (they travel to worker processes)."""

    def __call__(self, src: Any) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def describe(self) -> str:
        return type(self).__name__


# ------------------------------------------------------------------------------------ dataset info


@dataclass(frozen=True)
class DatasetInfo:
    """What a prepared dataset's labels mean. Labels are train ids 0..num_classes-1, ignore = 255."""

    name: str
    num_classes: int
    class_names: List[str]
    palette: List[RGB]
    ignore_index: int = IGNORE_INDEX
    description: str = ""
    extra: Dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.class_names) != self.num_classes or len(self.palette) != self.num_classes:
            raise ValueError(
                f"{self.name}: {self.num_classes} classes but {len(self.class_names)} names and "
                f"{len(self.palette)} palette entries"
            )


def voc_colormap(n: int) -> List[RGB]:
    """The Pascal VOC colour map (bit-interleaved), used for datasets without an official palette."""
    out: List[RGB] = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out.append((r, g, b))
    return out


def colorize(label: np.ndarray, palette: List[RGB], ignore_color: RGB = (0, 0, 0)) -> np.ndarray:
    """Map an HxW label map (train ids, 255 = ignore) to an HxWx3 uint8 colour image."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[:] = ignore_color
    lut[: len(palette)] = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
    return lut[np.asarray(label, dtype=np.uint8)]
