"""Training and validation data loaders, sharded over DDP ranks, with an order that needs no state.

The training order of epoch ``e`` is a permutation drawn from a generator seeded with ``(seed, e)``
alone (:class:`EpochShuffleSampler`), and augmentation is seeded per sample from ``(seed, e, index)``
(:meth:`ctxseg.data.SegmentationDataset.set_epoch`). A run resumed at any epoch therefore sees the
same batches as an uninterrupted one, in any new process, without saving a loader's generator.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Sampler, Subset

from ctxseg.data.config import DataConfig

__all__ = ["EpochShuffleSampler", "Loaders", "build_loaders", "set_epoch"]


class EpochShuffleSampler(Sampler[int]):
    """Indices of rank ``rank`` of ``world`` for the current epoch, shuffled by ``(seed, epoch)``.

    Like :class:`torch.utils.data.DistributedSampler`: every rank gets ``ceil(n / world)`` indices
    (the permutation is padded by wrapping when ``n`` is not divisible), rank ``r`` taking positions
    ``r, r + world, ...``. Call :meth:`set_epoch` before each epoch.
    """

    def __init__(self, size: int, seed: int, rank: int = 0, world: int = 1) -> None:
        if size < 1:
            raise ValueError("EpochShuffleSampler needs at least one sample")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in [0, {world})")
        self.size, self.seed, self.rank, self.world = size, seed, rank, world
        self.per_rank = math.ceil(size / world)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def order(self) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.size, generator=generator).tolist()
        total = self.per_rank * self.world
        perm += perm[: total - self.size]  # pad by wrapping (at most world - 1 repeats)
        return perm[self.rank:total:self.world]

    def __iter__(self) -> Iterator[int]:
        return iter(self.order())

    def __len__(self) -> int:
        return self.per_rank


@dataclasses.dataclass
class Loaders:
    """The data one DDP rank trains and validates on."""

    train_set: object
    train: DataLoader
    val: DataLoader
    num_classes: int


def build_loaders(data: DataConfig, prepared: Path, *, batch_size: int, seed: int, rank: int = 0,
                  world: int = 1) -> Loaders:
    """Loaders of one rank: ``batch_size`` is global (split over ``world``); validation is an unpadded
    shard (``rank, rank + world, ...``) whose confusion matrices the caller sums over ranks."""
    from ctxseg.data import SegmentationDataset
    from ctxseg.data.transforms import build_eval_transform, build_train_transform

    train_set = SegmentationDataset(prepared, "train", build_train_transform(data), seed=seed)
    val_set = SegmentationDataset(prepared, "val", build_eval_transform(data), seed=seed)
    per_rank = max(1, batch_size // world)
    sampler = EpochShuffleSampler(len(train_set), seed, rank, world)
    train = DataLoader(
        train_set, batch_size=per_rank, sampler=sampler, drop_last=len(sampler) >= per_rank,
        num_workers=data.num_loader_workers, persistent_workers=data.num_loader_workers > 0,
    )
    shard = Subset(val_set, list(range(rank, len(val_set), world)))
    val = DataLoader(shard, batch_size=1, shuffle=False, num_workers=0)
    return Loaders(train_set, train, val, int(train_set.meta["num_classes"]))


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Tell a loader's sampler and dataset which epoch begins (order and augmentation depend on it)."""
    for owner in (getattr(loader, "sampler", None), getattr(loader, "dataset", None)):
        if hasattr(owner, "set_epoch"):
            owner.set_epoch(epoch)
