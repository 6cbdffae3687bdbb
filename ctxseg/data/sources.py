"""Locating a dataset's raw data and listing its samples through the dataset registry.

What each dataset accepts and how its labels are converted lives in its own entry,
``ctxseg/data/datasets/<name>.py``:

================  =========================================  ======================================
dataset           raw layout accepted                        label conversion
================  =========================================  ======================================
synthetic         generated (images/, labels/, <split>.txt)  identity
ade20k            ADEChallengeData2016/{images,annotations}  reduce-zero-label: 0 -> 255, k -> k-1
voc_aug           VOC2012 + SBD (benchmark_RELEASE or        VOC PNG (indexed, grey or colour) /
                  SegmentationClassAug)                      SBD .mat -> 0..20, 255 boundary kept
pascal_context    VOC2010 JPEGImages + Stanford trainval/    459 -> 60 (unlisted -> background)
pascal_context59  *.mat (LabelMap) or trainval_merged.json   459 -> 59 (background -> 255)
coco_stuff164k    train2017/val2017 + stuffthingmaps         182 -> 171 (unused ids -> 255)
coco_stuff10k     cocostuff-10k-v1.1 (images, annotations    1..182 -> 171, 0 -> 255
                  .mat, imageLists)
cityscapes        leftImg8bit + gtFine (*_labelIds.png)      labelId -> trainId
lip               {train,val}_images + _segmentations        identity (0..19)
cihp              instance-level_human_parsing/{Training,    identity (0..19)
                  Validation}/{Images,Category_ids}
camvid            SegNet (train|val|test + *annot) or        SegNet: 11 (void) -> 255;
                  fastai camvid.tgz (images, labels, codes)  fastai: 32 codes -> 11, Void -> 255
================  =========================================  ======================================
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from ctxseg.data.datasets import get_dataset
from ctxseg.data.decoders import rle_decode
from ctxseg.data.layout import Listing, find_dirs
from ctxseg.data.types import DatasetInfo, LayoutError

__all__ = ["SOURCE_LINK", "EXTRACTED", "resolve_root", "list_samples", "dataset_info", "LayoutError",
           "rle_decode", "find_dirs"]

log = logging.getLogger(__name__)

SOURCE_LINK = "source.json"  # written by download_dataset when `source` is an extracted folder
EXTRACTED = "extracted"  # archives are extracted into raw_dir/extracted/<archive stem>/


def dataset_info(name: str, cfg=None) -> DatasetInfo:
    return get_dataset(name).dataset_info(cfg)


def resolve_root(cfg, raw_dir: Path) -> Path:
    """The folder the lister walks: the linked source folder, ``raw_dir/extracted`` or ``raw_dir``."""
    raw_dir = Path(raw_dir)
    link = raw_dir / SOURCE_LINK
    if link.is_file():
        p = Path(json.loads(link.read_text())["path"])
        if not p.is_dir():
            raise FileNotFoundError(f"{link} points to {p}, which is not a folder any more; fix data.source "
                                    f"and re-run the download stage")
        return p
    if cfg.source and Path(cfg.source).expanduser().is_dir() and not raw_dir.exists():
        return Path(cfg.source).expanduser().resolve()
    if (raw_dir / EXTRACTED).is_dir():
        return raw_dir / EXTRACTED
    if not raw_dir.is_dir():
        raise FileNotFoundError(f"raw data folder {raw_dir} does not exist; run the download stage first "
                                f"(ctxseg.data.download_dataset / `dvc repro download`)")
    return raw_dir


def list_samples(cfg, root: Path) -> Listing:
    """The :class:`~ctxseg.data.layout.Listing` of dataset ``cfg.name`` under ``root`` (unpacks as
    ``samples, decoder, extra``; ``.problems`` lists missing / unpaired labels)."""
    listing = get_dataset(cfg.name).list(cfg, Path(root))
    listing.extra = dict(listing.extra)
    return listing
