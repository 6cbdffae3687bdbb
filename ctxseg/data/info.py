"""Dataset metadata: class names, palettes and ignore handling of every supported dataset.

``get_dataset_info(name)`` is the single source of truth for ``num_classes`` and class names (it reads
the dataset's entry in :mod:`ctxseg.data.datasets`); the preprocess stage copies it into
``meta.json`` so consumers of a prepared dataset never need this module.
"""
from __future__ import annotations

from typing import Any, Optional

from ctxseg.data.types import IGNORE_INDEX, RGB, DatasetInfo, colorize, voc_colormap

__all__ = ["IGNORE_INDEX", "RGB", "DatasetInfo", "colorize", "voc_colormap", "get_dataset_info"]


def get_dataset_info(name: str, cfg: Optional[Any] = None) -> DatasetInfo:
    """Class names, palette and ignore index of a dataset (``DataConfig.name``).

    ``cfg`` (a ``DataConfig``) is needed only by datasets whose classes come from the data itself
    (``folder``); ``ValueError`` for an unknown name."""
    from ctxseg.data.datasets import get_dataset

    return get_dataset(name).dataset_info(cfg)
