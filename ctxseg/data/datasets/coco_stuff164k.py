"""COCO-Stuff 164k: train2017/val2017 images + stuffthingmaps PNGs; 182 ids -> 171 (unused -> 255)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

from ctxseg.data.datasets import DatasetSpec, Resource
from ctxseg.data.datasets._coco import CLASSES, coco182_lut
from ctxseg.data.decoders import StrictLutDecoder
from ctxseg.data.layout import Listing, images_in, pair_by_stem, walk_dirs
from ctxseg.data.types import LayoutError, Sample

INSTRUCTIONS = "train2017.zip, val2017.zip (COCO images) and stuffthingmaps_trainval2017.zip (COCO-Stuff)"


def _list(cfg: Any, root: Path) -> Listing:
    imgs: Dict[str, Path] = {}
    anns: Dict[str, Path] = {}
    for d in walk_dirs(root, 5):
        if d.name not in ("train2017", "val2017"):
            continue
        if any(d.glob("*.jpg")):
            imgs[d.name] = d
        elif any(d.glob("*.png")):
            anns[d.name] = d
    if "train2017" not in imgs or "train2017" not in anns:
        raise LayoutError(f"coco_stuff164k: need train2017/ (jpg images) and train2017/ (png stuffthingmaps) "
                          f"folders under {root}; found images {sorted(imgs)} and maps {sorted(anns)}. "
                          f"{INSTRUCTIONS}")
    samples: List[Sample] = []
    problems: list = []
    for split, sub in (("train", "train2017"), ("val", "val2017")):
        if sub in imgs and sub in anns:
            labels = {p.stem.replace("_labelTrainIds", ""): p for p in anns[sub].glob("*.png")}
            samples += pair_by_stem(split, images_in(imgs[sub]), labels, problems)
    return Listing(samples, StrictLutDecoder(coco182_lut(), "coco-stuff 182 -> 171", "COCO-Stuff ids are 0..181, 255"),
                   problems=problems)


DATASET = DatasetSpec(
    name="coco_stuff164k",
    classes=CLASSES,
    description="COCO-Stuff 164k, 171 classes",
    resources=(
        Resource("train2017.zip", "http://images.cocodataset.org/zips/train2017.zip",
                 "md5:cced6f7f71b7629ddf16f17bbcfab6b2"),
        Resource("val2017.zip", "http://images.cocodataset.org/zips/val2017.zip",
                 "md5:442b8da7639aecaf257c1dceb8ba8c80"),
        Resource("stuffthingmaps_trainval2017.zip",
                 "http://calvin.inf.ed.ac.uk/wp-content/uploads/data/cocostuffdataset/stuffthingmaps_trainval2017.zip",
                 None),
    ),
    instructions=INSTRUCTIONS,
    lister=_list,
)
