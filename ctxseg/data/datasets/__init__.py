"""The dataset registry: one module per dataset, ``ctxseg/data/datasets/<name>.py``.

Each module defines ``DATASET``, a :class:`DatasetSpec` holding everything the data layer knows about
that dataset: its classes and palette, where its archives come from (URLs, published checksums), how
its raw layout becomes ``(image, label)`` samples (the lister) and how raw labels become train ids
(the decoder the lister returns), plus optional hooks (a local generator instead of a download, an
augmentation warning, a per-config class list). Nothing else in :mod:`ctxseg.data` tests a dataset
name: adding a dataset is adding one file here.

The registry is discovered from the package folder without importing the entries, so
:mod:`ctxseg.data.config` can validate ``data.name`` cheaply; an entry is imported on first use.
"""
from __future__ import annotations

import difflib
import importlib
import pkgutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

from ctxseg.data.types import RGB, DatasetInfo, voc_colormap

__all__ = ["Resource", "DatasetSpec", "dataset_names", "get_dataset", "unknown_dataset_message"]


@dataclass(frozen=True)
class Resource:
    """One archive of a dataset."""

    filename: str
    url: Optional[str]  # None: login-gated, must come from `source`
    checksum: Optional[str] = None  # 'md5:..' / 'sha1:..'; None: sha256 recorded on first download


#: ``lister(cfg, root) -> ctxseg.data.layout.Listing``
Lister = Callable[[Any, Path], Any]


@dataclass(frozen=True)
class DatasetSpec:
    """Everything about one dataset. ``cfg`` below is a :class:`ctxseg.data.DataConfig`."""

    name: str
    classes: Sequence[str]
    lister: Lister
    palette: Optional[Sequence[RGB]] = None  # None: the VOC colour map
    description: str = ""
    resources: Tuple[Resource, ...] = ()
    instructions: str = ""  # what to get and from where (shown when nothing can serve the data)
    gated: bool = False  # login-gated: only `data.source` can serve it
    #: ``generate(cfg, raw_dir) -> raw_dir``: the dataset is made locally instead of downloaded
    generate: Optional[Callable[[Any, Path], Path]] = None
    #: ``augmentation_warning(cfg) -> str | None``: a warning about ``cfg.augment`` for this dataset
    augmentation_warning: Optional[Callable[[Any], Optional[str]]] = None
    #: ``info_for(cfg) -> DatasetInfo``: classes that depend on the config (e.g. the user's folder)
    info_for: Optional[Callable[[Any], DatasetInfo]] = None
    #: ``check_raw(cfg, raw_dir) -> problem | None``: was ``raw_dir`` made from these params? (default:
    #: the source recorded in ``download.json`` must be ``data.source``)
    check_raw: Optional[Callable[[Any, Path], Optional[str]]] = None

    @property
    def info(self) -> DatasetInfo:
        """The static class names / palette / ignore index of the dataset."""
        classes = list(self.classes)
        pal = list(self.palette) if self.palette is not None else voc_colormap(len(classes))
        return DatasetInfo(name=self.name, num_classes=len(classes), class_names=classes, palette=pal,
                           description=self.description)

    def dataset_info(self, cfg: Any = None) -> DatasetInfo:
        """The info for ``cfg`` (differs from :attr:`info` only for datasets with ``info_for``)."""
        if self.info_for is not None and cfg is not None:
            return self.info_for(cfg)
        return self.info

    def list(self, cfg: Any, root: Path):
        """``Listing`` of the raw data under ``root``."""
        return self.lister(cfg, Path(root))


_PKG_DIR = Path(__file__).resolve().parent
_CACHE: Dict[str, DatasetSpec] = {}


def dataset_names() -> Tuple[str, ...]:
    """Every registered dataset name (the module names of this package), sorted."""
    return tuple(sorted(m.name for m in pkgutil.iter_modules([str(_PKG_DIR)])
                        if not m.name.startswith("_") and not m.ispkg))


def unknown_dataset_message(name: Any) -> str:
    names = dataset_names()
    close = difflib.get_close_matches(str(name), names, n=1)
    hint = f" Did you mean `{close[0]}`?" if close else ""
    return (f"unknown dataset {name!r}.{hint} Choose one of: {', '.join(names)} (each is a module in "
            f"ctxseg/data/datasets/)")


def get_dataset(name: str) -> DatasetSpec:
    """The :class:`DatasetSpec` of ``name``; ``ValueError`` (with a "did you mean") if unknown."""
    spec = _CACHE.get(name)
    if spec is not None:
        return spec
    if not isinstance(name, str) or name not in dataset_names():
        raise ValueError(unknown_dataset_message(name))
    module = importlib.import_module(f"{__name__}.{name}")
    spec = getattr(module, "DATASET", None)
    if not isinstance(spec, DatasetSpec) or spec.name != name:
        raise TypeError(f"{module.__name__} must define DATASET = DatasetSpec(name={name!r}, ...)")
    _CACHE[name] = spec
    return spec
