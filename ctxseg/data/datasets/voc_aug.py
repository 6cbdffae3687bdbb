"""Pascal VOC 2012 + SBD (trainaug 10582 / val 1449): VOC PNG (indexed, grey or colour) or SBD
``cls/*.mat`` -> 0..20, boundary 255 kept."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, List, Optional

from ctxseg.data.datasets import DatasetSpec, Resource
from ctxseg.data.decoders import MatDecoder, MultiDecoder, StrictLutDecoder, VocPngDecoder, identity_lut
from ctxseg.data.layout import Listing, find_dir, find_dirs, read_ids
from ctxseg.data.types import Sample

log = logging.getLogger(__name__)

CLASSES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
]

INSTRUCTIONS = "VOCtrainval_11-May-2012.tar (Pascal VOC 2012) and benchmark.tgz (SBD, Hariharan et al.)"


def _list(cfg: Any, root: Path) -> Listing:
    voc = find_dir(root, ["JPEGImages", "ImageSets/Segmentation"], "VOC2012 (VOCdevkit/VOC2012)", "voc_aug",
                   INSTRUCTIONS)
    sbd_hits = find_dirs(root, ["cls", "img"], 6)
    sbd = next((h for h in sbd_hits if any(h.joinpath("cls").glob("*.mat")) or (h / "train.txt").is_file()), None)
    sets = voc / "ImageSets" / "Segmentation"
    val_ids = read_ids(sets / "val.txt")
    train_ids = list(read_ids(sets / "train.txt")) if (sets / "train.txt").is_file() else []
    if sbd is not None:
        for f in ("train.txt", "val.txt"):
            if (sbd / f).is_file():
                train_ids += read_ids(sbd / f)
    else:
        log.warning("voc_aug: SBD (benchmark_RELEASE/dataset) not found under %s; training on the 1464 VOC "
                    "train images only. Add benchmark.tgz for the 10582-image trainaug set.", root)
    vset = set(val_ids)
    train_ids = sorted(set(train_ids) - vset)
    aug = voc / "SegmentationClassAug"

    def label_for(i: str) -> Optional[Path]:
        for p in (aug / f"{i}.png", voc / "SegmentationClass" / f"{i}.png"):
            if p.is_file():
                return p
        if sbd is not None and (sbd / "cls" / f"{i}.mat").is_file():
            return sbd / "cls" / f"{i}.mat"
        return None

    def image_for(i: str) -> Path:
        p = voc / "JPEGImages" / f"{i}.jpg"
        if not p.is_file() and sbd is not None and (sbd / "img" / f"{i}.jpg").is_file():
            return sbd / "img" / f"{i}.jpg"
        return p

    samples: List[Sample] = []
    problems = []
    for split, ids in (("train", train_ids), ("val", sorted(val_ids))):
        for i in ids:
            lp = label_for(i)
            if lp is None:
                problems.append((str(image_for(i)), f"id {i!r} listed for split {split!r} has no label (VOC "
                                                    f"SegmentationClass or SBD cls/{i}.mat); is benchmark.tgz "
                                                    f"extracted?"))
                continue
            samples.append(Sample(split, i, image_for(i), lp))
    png = VocPngDecoder(21)
    mat = MatDecoder("GTcls", StrictLutDecoder(identity_lut(21), "sbd", "SBD ids are 0..20"),
                     struct_field="Segmentation")
    return Listing(samples, MultiDecoder({".png": png, ".mat": mat}, "voc: indexed/colour PNG or SBD .mat -> 0..20, 255"),
                   problems=problems)


DATASET = DatasetSpec(
    name="voc_aug",
    classes=CLASSES,
    description="Pascal VOC 2012 + SBD (trainaug 10582 / val 1449)",
    resources=(
        Resource("VOCtrainval_11-May-2012.tar",
                 "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar",
                 "md5:6cd6e144f989b92b3379bac3b3de84fd"),
        Resource("benchmark.tgz",
                 "http://www.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/semantic_contours/benchmark.tgz",
                 "md5:82b4d87ceb2ed10f6038a1cba92111cb"),
    ),
    instructions=INSTRUCTIONS,
    lister=_list,
)
