"""Cityscapes fine (leftImg8bit + gtFine ``*_labelIds.png``): labelId -> trainId, 19 classes."""
from __future__ import annotations

from pathlib import Path
from typing import Any, List

from ctxseg.data.datasets import DatasetSpec, Resource
from ctxseg.data.decoders import StrictLutDecoder, lut_from_pairs
from ctxseg.data.layout import Listing, find_dir, unpaired_labels
from ctxseg.data.types import Sample

#: (labelId, name, trainId) of the 34 Cityscapes labels (cityscapesScripts helpers/labels.py).
LABELS = [
    (0, "unlabeled", 255), (1, "ego vehicle", 255), (2, "rectification border", 255),
    (3, "out of roi", 255), (4, "static", 255), (5, "dynamic", 255), (6, "ground", 255),
    (7, "road", 0), (8, "sidewalk", 1), (9, "parking", 255), (10, "rail track", 255),
    (11, "building", 2), (12, "wall", 3), (13, "fence", 4), (14, "guard rail", 255),
    (15, "bridge", 255), (16, "tunnel", 255), (17, "pole", 5), (18, "polegroup", 255),
    (19, "traffic light", 6), (20, "traffic sign", 7), (21, "vegetation", 8), (22, "terrain", 9),
    (23, "sky", 10), (24, "person", 11), (25, "rider", 12), (26, "car", 13), (27, "truck", 14),
    (28, "bus", 15), (29, "caravan", 255), (30, "trailer", 255), (31, "train", 16),
    (32, "motorcycle", 17), (33, "bicycle", 18),
]
CLASSES = [
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
    "bicycle",
]
PALETTE = [
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
]

INSTRUCTIONS = ("gtFine_trainvaltest.zip and leftImg8bit_trainvaltest.zip from https://www.cityscapes-dataset.com/ "
                "(login required)")


def _list(cfg: Any, root: Path) -> Listing:
    di = find_dir(root, ["leftImg8bit/train"], "leftImg8bit/ (leftImg8bit_trainvaltest.zip)", "cityscapes",
                  INSTRUCTIONS)
    dg = find_dir(root, ["gtFine/train"], "gtFine/ (gtFine_trainvaltest.zip)", "cityscapes", INSTRUCTIONS)
    lut = lut_from_pairs(256, [(i, t) for i, _, t in LABELS])
    samples: List[Sample] = []
    problems: list = []
    for split in ("train", "val"):
        used = set()
        for ip in sorted((di / "leftImg8bit" / split).glob("*/*_leftImg8bit.png")):
            base = ip.name[: -len("_leftImg8bit.png")]
            lp = dg / "gtFine" / split / ip.parent.name / f"{base}_gtFine_labelIds.png"
            used.add(str(lp))
            if not lp.is_file():
                problems.append((str(lp), f"label file of {ip.name} is missing; extract gtFine_trainvaltest.zip"))
                continue
            samples.append(Sample(split, base, ip, lp))
        labels = {str(p): p for p in (dg / "gtFine" / split).glob("*/*_gtFine_labelIds.png")}
        problems += unpaired_labels(labels, used, split)
    return Listing(samples, StrictLutDecoder(lut, "cityscapes labelId -> trainId", "labelIds are 0..33"),
                   {"split_note": "test has no public labels and is not prepared"}, problems)


DATASET = DatasetSpec(
    name="cityscapes",
    classes=CLASSES,
    palette=PALETTE,
    description="Cityscapes fine, 19 classes",
    resources=(
        Resource("gtFine_trainvaltest.zip", None, "md5:4237c19de34c8a376e9ba46b495d6f66"),
        Resource("leftImg8bit_trainvaltest.zip", None, "md5:0a6e97e94b616a514066c9e2adb0c97f"),
    ),
    instructions=INSTRUCTIONS,
    gated=True,
    lister=_list,
)
