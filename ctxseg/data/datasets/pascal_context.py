"""Pascal Context, 59 classes + background (60): VOC2010 JPEGImages + the Stanford ``trainval/*.mat``
(LabelMap), ``trainval_merged.json`` (Detail API) or ``SegmentationClassContext/*.png``; 459 ids -> 60
(unlisted -> background). :mod:`ctxseg.data.datasets.pascal_context59` reuses this lister."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np

from ctxseg.data.datasets import DatasetSpec, Resource
from ctxseg.data.decoders import DetailJsonDecoder, MatDecoder, StrictLutDecoder, lut_from_pairs
from ctxseg.data.layout import Listing, find_dir, find_dirs, read_ids
from ctxseg.data.types import IGNORE_INDEX, LabelDecoder, LayoutError, Sample

#: Pascal Context 459-class ids (Stanford ``labels.txt`` numbering, 0 = unlabelled) of the 60-class
#: benchmark, sorted; index in this list = 60-class train id. All other ids become background (0).
PASCAL_CONTEXT_459_IDS = sorted([
    0, 2, 259, 260, 415, 324, 9, 258, 144, 18, 19, 22, 23, 397, 25, 284, 158, 159, 416, 33, 162,
    420, 454, 295, 296, 427, 44, 45, 46, 308, 59, 440, 445, 31, 232, 65, 354, 424, 68, 326, 72, 458,
    34, 207, 80, 355, 85, 347, 220, 349, 360, 98, 187, 104, 105, 366, 189, 368, 113, 115,
])
#: Names in the same (sorted-id, i.e. alphabetical) order as PASCAL_CONTEXT_459_IDS.
CLASSES = [
    "background", "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat",
    "book", "bottle", "building", "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth",
    "computer", "cow", "cup", "curtain", "dog", "door", "fence", "floor", "flower", "food", "grass",
    "ground", "horse", "keyboard", "light", "motorbike", "mountain", "mouse", "person", "plate",
    "platform", "pottedplant", "road", "rock", "sheep", "shelves", "sidewalk", "sign", "sky",
    "snow", "sofa", "table", "track", "train", "tree", "truck", "tvmonitor", "wall", "water",
    "window", "wood",
]

INSTRUCTIONS = (
    "VOCtrainval_03-May-2010.tar (Pascal VOC 2010 images) and the Pascal Context labels: trainval.tar.gz "
    "(Stanford, per-image .mat LabelMap) from https://cs.stanford.edu/~roozbeh/pascal-context/ or "
    "trainval_merged.json (Detail API, sha1 169325d9f7e9047537fedca7b04de4dddf10b881)")

RESOURCES = (
    Resource("VOCtrainval_03-May-2010.tar",
             "http://host.robots.ox.ac.uk/pascal/VOC/voc2010/VOCtrainval_03-May-2010.tar",
             "md5:da459979d0c395079b5c75ee67908abb"),
    Resource("trainval.tar.gz", "https://cs.stanford.edu/~roozbeh/pascal-context/trainval.tar.gz", None),
)


def pascal_context_lut(num_classes: int) -> np.ndarray:
    """459-class ids (0 = unlabelled) -> 60 classes (other -> background 0) or 59 (background -> 255)."""
    lut = np.zeros(460, dtype=np.int64)  # all unlisted categories -> background
    lut[PASCAL_CONTEXT_459_IDS] = np.arange(60)
    if num_classes == 59:
        lut = np.where(lut == 0, IGNORE_INDEX, lut - 1)
    return lut


def list_pascal_context(cfg: Any, root: Path, num_classes: int) -> Listing:
    name = "pascal_context" if num_classes == 60 else "pascal_context59"
    voc = find_dir(root, ["JPEGImages"], "VOC2010 JPEGImages (VOCdevkit/VOC2010)", name, INSTRUCTIONS)
    lut = pascal_context_lut(num_classes)
    strict = StrictLutDecoder(lut, f"pascal context 459 -> {num_classes}", "Pascal Context ids are 0..459")
    ctx_png = find_dirs(root, ["SegmentationClassContext"])
    mats = find_dirs(root, ["labels.txt"]) + find_dirs(root, ["trainval"])
    mat_dir = None
    for h in mats:
        cand = h / "trainval" if (h / "trainval").is_dir() else h
        if any(cand.glob("*.mat")):
            mat_dir = cand
            break
    json_hits = find_dirs(root, ["trainval_merged.json"])
    # splits: mmseg-style SegmentationContext lists, else VOC2010 Main train/val
    split_dirs = [voc / "ImageSets" / "SegmentationContext", voc / "ImageSets" / "Main"]
    lists = next((d for d in split_dirs if (d / "train.txt").is_file() and (d / "val.txt").is_file()), None)
    samples: List[Sample] = []
    if mat_dir is not None:
        decoder: LabelDecoder = MatDecoder("LabelMap", strict)
        label_of = lambda i: mat_dir / f"{i}.mat"  # noqa: E731
        have = {p.stem for p in mat_dir.glob("*.mat")}
    elif ctx_png:
        # already-converted 60-class PNGs (mmseg layout)
        d = ctx_png[0] / "SegmentationClassContext"
        decoder = StrictLutDecoder(
            lut_from_pairs(256, [(k, k) for k in range(60)] + [(255, 255)]) if num_classes == 60 else
            lut_from_pairs(256, [(0, 255)] + [(k, k - 1) for k in range(1, 60)] + [(255, 255)]),
            "context60 png" if num_classes == 60 else "context60 png, reduce-zero-label", "ids 0..59")
        label_of = lambda i: d / f"{i}.png"  # noqa: E731
        have = {p.stem for p in d.glob("*.png")}
    elif json_hits:
        return _list_json(json_hits[0] / "trainval_merged.json", voc, num_classes, lut)
    else:
        raise LayoutError(f"{name}: no Pascal Context labels under {root}: expected trainval/*.mat (Stanford "
                          f"trainval.tar.gz), trainval_merged.json, or SegmentationClassContext/*.png. "
                          f"{INSTRUCTIONS}")
    if lists is None:
        raise LayoutError(f"{name}: no split lists (ImageSets/SegmentationContext or ImageSets/Main "
                          f"train.txt/val.txt) under {voc}")
    for split in ("train", "val"):
        for i in read_ids(lists / f"{split}.txt"):
            if i in have:
                samples.append(Sample(split, i, voc / "JPEGImages" / f"{i}.jpg", label_of(i)))
    return Listing(samples, decoder)


def _list_json(path: Path, voc: Path, num_classes: int, lut: np.ndarray) -> Listing:
    data = json.loads(path.read_text())
    images = {im["image_id"]: im for im in data.get("images", [])}
    by_img: Dict[Any, List[Tuple[int, Any]]] = {}
    for a in data.get("annos_segmentation", []):
        seg = a.get("segmentation") or {}
        by_img.setdefault(a["image_id"], []).append((int(a["category_id"]), seg.get("counts")))
    samples: List[Sample] = []
    for img_id, im in sorted(images.items(), key=lambda kv: str(kv[1].get("file_name"))):
        phase = im.get("phase", "train")
        split = "val" if phase == "val" else "train" if phase == "train" else None
        if split is None or img_id not in by_img:
            continue
        stem = Path(im["file_name"]).stem
        samples.append(Sample(split, stem, voc / "JPEGImages" / im["file_name"],
                              (int(im["height"]), int(im["width"]), by_img[img_id])))
    return Listing(samples, DetailJsonDecoder(lut, num_classes))


DATASET = DatasetSpec(
    name="pascal_context",
    classes=CLASSES,
    description="Pascal Context, 59 classes + background",
    resources=RESOURCES,
    instructions=INSTRUCTIONS,
    lister=lambda cfg, root: list_pascal_context(cfg, root, 60),
)
