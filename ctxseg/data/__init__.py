"""Data layer of ctxseg: the dataset registry (one module per dataset in :mod:`ctxseg.data.datasets`),
download/extraction, preprocessing, the synthetic co-occurrence benchmark, the torch Dataset over the
canonical layout and the transforms. The shared vocabulary (errors, ``Sample``, ``DatasetInfo``) is
:mod:`ctxseg.data.types`.

Heavy parts (torch) are imported lazily, so worker processes that only convert files stay light.
"""
from __future__ import annotations

from typing import Any

from ctxseg.data.config import AugmentConfig, DataConfig, SyntheticConfig
from ctxseg.data.info import IGNORE_INDEX, DatasetInfo, colorize, get_dataset_info

__all__ = [
    "AugmentConfig",
    "DataConfig",
    "SyntheticConfig",
    "DatasetInfo",
    "IGNORE_INDEX",
    "colorize",
    "get_dataset_info",
    "download_dataset",
    "prepare_dataset",
    "SegmentationDataset",
    "build_train_transform",
    "build_eval_transform",
    "DataValidationError",
    "DownloadError",
    "ChecksumError",
    "UnsafeArchiveError",
    "LayoutError",
    "example_grid",
    "DatasetSpec",
    "dataset_names",
    "get_dataset",
]

_LAZY = {
    "download_dataset": "ctxseg.data.download",
    "DownloadError": "ctxseg.data.types",
    "ChecksumError": "ctxseg.data.types",
    "UnsafeArchiveError": "ctxseg.data.types",
    "DataValidationError": "ctxseg.data.types",
    "LayoutError": "ctxseg.data.types",
    "prepare_dataset": "ctxseg.data.prepare",
    "DatasetSpec": "ctxseg.data.datasets",
    "dataset_names": "ctxseg.data.datasets",
    "get_dataset": "ctxseg.data.datasets",
    "SegmentationDataset": "ctxseg.data.dataset",
    "build_train_transform": "ctxseg.data.transforms",
    "build_eval_transform": "ctxseg.data.transforms",
    "example_grid": "ctxseg.data.visualize",
}


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'ctxseg.data' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(mod), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
