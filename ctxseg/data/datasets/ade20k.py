"""ADE20K SceneParsing (ADEChallengeData2016): 150 classes, reduce-zero-label (0 -> 255, k -> k-1)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, List

from ctxseg.data.datasets import DatasetSpec, Resource
from ctxseg.data.decoders import StrictLutDecoder, lut_from_pairs
from ctxseg.data.layout import Listing, find_dir, images_in, pair_by_stem
from ctxseg.data.types import IGNORE_INDEX, Sample

CLASSES = [
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain",
    "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion",
    "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink",
    "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case",
    "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind",
    "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth",
    "television receiver", "airplane", "dirt track", "apparel", "pole", "land", "bannister",
    "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship", "fountain",
    "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool", "barrel", "basket",
    "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen",
    "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan",
    "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass",
    "clock", "flag",
]

INSTRUCTIONS = "ADEChallengeData2016.zip from http://sceneparsing.csail.mit.edu/"


def _list(cfg: Any, root: Path) -> Listing:
    d = find_dir(root, ["images/training", "annotations/training"], "ADEChallengeData2016", "ade20k", INSTRUCTIONS)
    samples: List[Sample] = []
    problems: list = []
    for split, sub in (("train", "training"), ("val", "validation")):
        if not (d / "images" / sub).is_dir():
            continue
        lbls = {p.stem: p for p in (d / "annotations" / sub).glob("*.png")}
        samples += pair_by_stem(split, images_in(d / "images" / sub), lbls, problems)
    lut = lut_from_pairs(256, [(0, IGNORE_INDEX)] + [(k, k - 1) for k in range(1, 151)])
    return Listing(samples, StrictLutDecoder(lut, "reduce-zero-label: 0 -> 255, k -> k-1", "ADE20K ids are 0..150"),
                   problems=problems)


DATASET = DatasetSpec(
    name="ade20k",
    classes=CLASSES,
    description="ADE20K SceneParsing, 150 classes, 0 -> ignore",
    resources=(Resource("ADEChallengeData2016.zip",
                        "http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip",
                        "sha1:219e1696abb36c8ba3a3afe7fb2f4b4606a897c7"),),
    instructions=INSTRUCTIONS,
    lister=_list,
)
