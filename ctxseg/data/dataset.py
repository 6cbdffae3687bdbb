"""A torch Dataset over the canonical prepared layout written by :func:`ctxseg.data.prepare_dataset`.

``root/images/<split>/<id><suffix>`` (the original image file: ``.jpg`` or ``.png``, named by
``meta["image_suffix"]`` and ``meta["image_suffix_by_id"]``, see :func:`image_file`),
``root/labels/<split>/<id>.png`` (uint8 train ids, 255 = ignore), ``root/<split>.txt`` (ids) and
``root/meta.json``. Each image is read once, in its original format. See :mod:`ctxseg.data.transforms` for how
augmentation is seeded (per sample, from ``(seed, epoch, index)``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ctxseg.data.config import IMAGENET_MEAN, IMAGENET_STD
from ctxseg.data.transforms import Compose, Normalize, ToTensor


def image_file(root: Path | str, meta: dict, split: str, sample_id: str) -> Path:
    """The image file of ``sample_id`` in a prepared layout: its suffix is the split's usual one
    (``meta["image_suffix"][split]``) unless ``meta["image_suffix_by_id"]`` names another; layouts
    prepared before images kept their format hold ``.png`` files."""
    odd = meta.get("image_suffix_by_id", {}).get(split, {})
    suffix = odd.get(sample_id) or meta.get("image_suffix", {}).get(split, ".png")
    return Path(root) / "images" / split / f"{sample_id}{suffix}"


def read_image(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def read_label(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        if im.mode not in ("L", "P"):
            raise ValueError(f"{path}: label PNG must be single-channel (mode L), found mode {im.mode}; "
                             f"re-run the preprocess stage")
        return np.asarray(im)  # P-mode: the palette indices are the ids


class SegmentationDataset(Dataset):
    """``(image FloatTensor[3,H,W] normalised, label LongTensor[H,W])`` pairs of one split.

    ``transform(image_uint8_HWC, label_uint8_HW, rng)`` defaults to normalisation with the ImageNet
    statistics and conversion to tensors. ``seed`` and :meth:`set_epoch` make augmentation
    reproducible: sample ``i`` of epoch ``e`` uses ``numpy.random.default_rng([seed, e, i])``
    (see :meth:`rng` for what happens when ``set_epoch`` is never called).
    """

    def __init__(self, root: Path | str, split: str, transform: Optional[Callable] = None, seed: int = 0):
        self.root = Path(root)
        self.split = split
        meta_path = self.root / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"{meta_path} not found: {self.root} is not a prepared dataset; run the preprocess stage "
                f"(ctxseg.data.prepare_dataset / `dvc repro preprocess`) first")
        self.meta = json.loads(meta_path.read_text())
        manifest = self.root / f"{split}.txt"
        if not manifest.is_file():
            raise FileNotFoundError(
                f"{manifest} not found: split {split!r} does not exist in {self.root}; available splits: "
                f"{sorted(self.meta.get('splits', {}))}")
        self.ids: List[str] = [ln.strip() for ln in manifest.read_text().splitlines() if ln.strip()]
        self.transform = transform if transform is not None else Compose(
            [Normalize(IMAGENET_MEAN, IMAGENET_STD), ToTensor()])
        self.seed = int(seed)
        # shared memory, so set_epoch() reaches persistent DataLoader workers too; -1 = never set
        self._epoch = torch.full((1,), -1, dtype=torch.int64).share_memory_()
        self._draws: dict = {}
        self.num_classes = int(self.meta["num_classes"])
        self.ignore_index = int(self.meta.get("ignore_index", 255))
        self.class_names = list(self.meta["class_names"])

    def set_epoch(self, epoch: int) -> None:
        """Seed augmentation by epoch: sample ``i`` then uses ``default_rng([seed, epoch, i])``,
        identical for any number of DataLoader workers (persistent or not) and any rank layout.
        Call it before iterating each epoch (like ``DistributedSampler.set_epoch``)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self._epoch[0] = int(epoch)

    @property
    def epoch(self) -> Optional[int]:
        e = int(self._epoch[0])
        return None if e < 0 else e

    def __len__(self) -> int:
        return len(self.ids)

    def image_path(self, index: int) -> Path:
        return image_file(self.root, self.meta, self.split, self.ids[index])

    def label_path(self, index: int) -> Path:
        return self.root / "labels" / self.split / f"{self.ids[index]}.png"

    def load(self, index: int) -> Tuple[np.ndarray, np.ndarray]:
        """The raw ``(uint8 HxWx3 image, uint8 HxW label)`` of sample ``index``, untransformed."""
        return read_image(self.image_path(index)), read_label(self.label_path(index))

    def rng(self, index: int) -> np.random.Generator:
        """The generator for one fetch of sample ``index``.

        After :meth:`set_epoch`: ``default_rng([seed, epoch, index])``. Without it (automatic mode),
        every fetch still gets fresh randomness, reproducible for a fixed DataLoader seed and worker
        count: the key adds the DataLoader worker's seed (new per epoch unless workers persist) and
        how often this process has fetched the sample.
        """
        e = int(self._epoch[0])
        if e >= 0:
            return np.random.default_rng([self.seed, e, int(index)])
        info = torch.utils.data.get_worker_info()
        stream = int(info.seed) % (2**63) if info is not None else 0
        n = self._draws.get(index, 0)
        self._draws[index] = n + 1
        return np.random.default_rng([self.seed, 2**32 + int(index), stream, n])

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        image, label = self.load(index)
        return self.transform(image, label, self.rng(index))
