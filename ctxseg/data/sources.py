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
folder            classes.yaml + images/<split>/ +           classes.yaml: identity or
                  labels/<split>/ (your own data)            id_to_train_id, ignore_index -> 255
================  =========================================  ======================================
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

from ctxseg.data.datasets import get_dataset
from ctxseg.data.decoders import rle_decode
from ctxseg.data.layout import Listing, find_dirs
from ctxseg.data.types import DatasetInfo, DataValidationError, LayoutError
from ctxseg.errors import UserError

__all__ = ["SOURCE_LINK", "EXTRACTED", "DOWNLOAD_STAMP", "resolve_root", "list_samples", "dataset_info",
           "source_id", "check_raw", "LayoutError", "rle_decode", "find_dirs"]

log = logging.getLogger(__name__)

SOURCE_LINK = "source.json"  # written by download_dataset when `source` is an extracted folder
EXTRACTED = "extracted"  # archives are extracted into raw_dir/extracted/<archive stem>/
DOWNLOAD_STAMP = "download.json"  # what made raw_dir: dataset, source, verified archives


def dataset_info(name: str, cfg=None) -> DatasetInfo:
    return get_dataset(name).dataset_info(cfg)


def source_id(cfg) -> Optional[str]:
    """``data.source`` as an absolute path (what ``download.json`` records), or None."""
    return str(Path(cfg.source).expanduser().resolve()) if cfg.source else None


def check_raw(cfg, raw_dir: Path) -> None:
    """Refuse raw data that params did not make: another dataset, another ``data.source`` (a stale
    ``source.json`` never wins), or a generated set made from other settings.

    Raises :class:`DataValidationError` saying to re-run the download stage."""
    raw_dir = Path(raw_dir)
    spec = get_dataset(cfg.name)
    problem: Optional[str] = None
    if spec.check_raw is not None:
        problem = spec.check_raw(cfg, raw_dir)
    else:
        stamp_path = raw_dir / DOWNLOAD_STAMP
        if stamp_path.is_file():
            try:
                stamp = json.loads(stamp_path.read_text())
            except ValueError:
                stamp = {}
            want = source_id(cfg)
            if stamp.get("dataset") != cfg.name:
                problem = f"it holds {stamp.get('dataset')!r}, not data.name={cfg.name!r}"
            elif "source" not in stamp:
                problem = "it was made by an older version that did not record its source"
            elif stamp["source"] != want:
                problem = (f"it was made from data.source={stamp['source']!r} but params say data.source={want!r} "
                           f"(the last download with these params failed or was not run)")
        elif (raw_dir / SOURCE_LINK).is_file() or (raw_dir / EXTRACTED).is_dir():
            problem = f"its download did not complete (no {DOWNLOAD_STAMP})"
    if problem:
        raise DataValidationError(
            f"refusing to prepare {raw_dir}: {problem}. Run the download stage with the current params first "
            f"(`dvc repro download`, or `python -m pipeline.download`); the prepared data was left untouched.")


def resolve_root(cfg, raw_dir: Path) -> Path:
    """The folder the lister walks: the linked source folder, ``raw_dir/extracted`` or ``raw_dir``."""
    raw_dir = Path(raw_dir)
    link = raw_dir / SOURCE_LINK
    if link.is_file():
        p = Path(json.loads(link.read_text())["path"])
        if source_id(cfg) != str(p):
            raise DataValidationError(
                f"{link} links {p} but params say data.source={source_id(cfg)!r}; run the download stage again "
                f"(data.source always wins over a stale record)")
        if not p.is_dir():
            raise DataValidationError(f"{link} points to {p}, which is not a folder any more; fix data.source "
                                      f"and re-run the download stage")
        return p
    if cfg.source and Path(cfg.source).expanduser().is_dir() and not raw_dir.exists():
        return Path(cfg.source).expanduser().resolve()
    if (raw_dir / EXTRACTED).is_dir():
        return raw_dir / EXTRACTED
    if not raw_dir.is_dir():
        raise DataValidationError(f"raw data folder {raw_dir} does not exist; run the download stage first "
                                  f"(ctxseg.data.download_dataset / `dvc repro download`)")
    return raw_dir


def list_samples(cfg, root: Path) -> Listing:
    """The :class:`~ctxseg.data.layout.Listing` of dataset ``cfg.name`` under ``root`` (unpacks as
    ``samples, decoder, extra``; ``.problems`` lists missing / unpaired labels).

    A file the lister cannot read (permissions, a broken split list or json) is a
    :class:`DataValidationError` naming it, not a raw ``OSError`` / ``ValueError``."""
    try:
        listing = get_dataset(cfg.name).list(cfg, Path(root))
    except UserError:
        raise
    except (OSError, ValueError, KeyError) as e:
        where = f" ({e.filename})" if isinstance(e, OSError) and e.filename else ""
        raise DataValidationError(
            f"{cfg.name}: cannot read the raw data under {root}{where}: {type(e).__name__}: {e}. Fix or replace "
            f"the file (re-extract the dataset) and run the stage again.") from None
    listing.extra = dict(listing.extra)
    return listing
