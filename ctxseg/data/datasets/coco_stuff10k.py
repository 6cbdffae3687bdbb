"""COCO-Stuff 10k (cocostuff-10k-v1.1: images, annotations/*.mat, imageLists): 1..182 -> 171, 0 -> 255."""
from __future__ import annotations

from pathlib import Path
from typing import Any, List

import numpy as np

from ctxseg.data.datasets import DatasetSpec, Resource
from ctxseg.data.datasets._coco import CLASSES, coco182_lut
from ctxseg.data.decoders import MatDecoder, StrictLutDecoder
from ctxseg.data.layout import Listing, find_dir, read_ids
from ctxseg.data.types import IGNORE_INDEX, Sample

INSTRUCTIONS = "cocostuff-10k-v1.1.zip (COCO-Stuff 10k)"


def _list(cfg: Any, root: Path) -> Listing:
    d = find_dir(root, ["imageLists/train.txt", "images", "annotations"], "cocostuff-10k-v1.1", "coco_stuff10k",
                 INSTRUCTIONS)
    lut = np.full(256, -1, dtype=np.int64)
    lut[0] = IGNORE_INDEX
    lut[1:183] = coco182_lut()[0:182]
    dec = MatDecoder("S", StrictLutDecoder(lut, "coco-stuff-10k 1..182 -> 171, 0 -> 255", "ids are 0..182"))
    samples: List[Sample] = []
    for split, lst in (("train", "train.txt"), ("val", "test.txt")):
        p = d / "imageLists" / lst
        if not p.is_file():
            continue
        for i in read_ids(p):
            samples.append(Sample(split, i, d / "images" / f"{i}.jpg", d / "annotations" / f"{i}.mat"))
    return Listing(samples, dec, {"split_note": "val = the official 1000-image test list"})


DATASET = DatasetSpec(
    name="coco_stuff10k",
    classes=CLASSES,
    description="COCO-Stuff 10k, 171 classes",
    resources=(Resource("cocostuff-10k-v1.1.zip",
                        "http://calvin.inf.ed.ac.uk/wp-content/uploads/data/cocostuffdataset/cocostuff-10k-v1.1.zip",
                        None),),
    instructions=INSTRUCTIONS,
    lister=_list,
)
