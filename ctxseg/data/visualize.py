"""Example grids of a prepared dataset (image | colour-coded label), e.g. for the report."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ctxseg.data.info import colorize


def example_grid(root: Path | str, split: str = "val", n: int = 8, ids: Optional[Sequence[str]] = None,
                 columns: int = 2, size: Optional[int] = None, gap: int = 2) -> np.ndarray:
    """An HxWx3 uint8 mosaic of ``n`` (image, label) pairs of a prepared dataset.

    Each cell is the image next to its label coloured with the dataset palette (ignore = black).
    ``size`` resizes every image so its short side is ``size`` (labels nearest-neighbour).
    """
    import json

    from PIL import Image

    from ctxseg.data.dataset import image_file
    from ctxseg.data.transforms import ResizeShortSide

    root = Path(root)
    meta = json.loads((root / "meta.json").read_text())
    palette = [tuple(c) for c in meta["palette"]]
    if ids is None:
        ids = (root / f"{split}.txt").read_text().split()[:n]
    cells = []
    for i in ids:
        img = np.asarray(Image.open(image_file(root, meta, split, i)).convert("RGB"))
        lbl = np.asarray(Image.open(root / "labels" / split / f"{i}.png"))
        if size is not None:
            img, lbl = ResizeShortSide(size)(img, lbl, None)
        pad = np.full((img.shape[0], gap, 3), 255, np.uint8)
        cells.append(np.concatenate([img, pad, colorize(lbl, palette)], axis=1))
    if not cells:
        raise ValueError(f"no samples in split {split!r} of {root}")
    h = max(c.shape[0] for c in cells)
    w = max(c.shape[1] for c in cells)
    rows = []
    for r in range(0, len(cells), columns):
        row = []
        for c in cells[r:r + columns] + [None] * (columns - len(cells[r:r + columns])):
            canvas = np.full((h + gap, w + gap, 3), 255, np.uint8)
            if c is not None:
                canvas[: c.shape[0], : c.shape[1]] = c
            row.append(canvas)
        rows.append(np.concatenate(row, axis=1))
    return np.concatenate(rows, axis=0)
