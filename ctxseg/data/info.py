"""Dataset metadata: class names, palettes and ignore handling of every supported dataset.

``get_dataset_info(name)`` is the single source of truth for ``num_classes`` and class names; the
preprocess stage copies it into ``meta.json`` so consumers of a prepared dataset never need this
module.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import numpy as np

IGNORE_INDEX = 255

RGB = Tuple[int, int, int]


@dataclass(frozen=True)
class DatasetInfo:
    """What a prepared dataset's labels mean. Labels are train ids 0..num_classes-1, ignore = 255."""

    name: str
    num_classes: int
    class_names: List[str]
    palette: List[RGB]
    ignore_index: int = IGNORE_INDEX
    description: str = ""
    extra: Dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.class_names) != self.num_classes or len(self.palette) != self.num_classes:
            raise ValueError(
                f"{self.name}: {self.num_classes} classes but {len(self.class_names)} names and "
                f"{len(self.palette)} palette entries"
            )


def voc_colormap(n: int) -> List[RGB]:
    """The Pascal VOC colour map (bit-interleaved), used for datasets without an official palette."""
    out: List[RGB] = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out.append((r, g, b))
    return out


def colorize(label: np.ndarray, palette: List[RGB], ignore_color: RGB = (0, 0, 0)) -> np.ndarray:
    """Map an HxW label map (train ids, 255 = ignore) to an HxWx3 uint8 colour image."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[:] = ignore_color
    lut[: len(palette)] = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
    return lut[np.asarray(label, dtype=np.uint8)]


# --------------------------------------------------------------------------------------------- names

VOC_CLASSES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
]

ADE20K_CLASSES = [
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

#: Pascal Context 459-class ids (Stanford ``labels.txt`` numbering, 0 = unlabelled) of the 60-class
#: benchmark, sorted; index in this list = 60-class train id. All other ids become background (0).
PASCAL_CONTEXT_459_IDS = sorted([
    0, 2, 259, 260, 415, 324, 9, 258, 144, 18, 19, 22, 23, 397, 25, 284, 158, 159, 416, 33, 162,
    420, 454, 295, 296, 427, 44, 45, 46, 308, 59, 440, 445, 31, 232, 65, 354, 424, 68, 326, 72, 458,
    34, 207, 80, 355, 85, 347, 220, 349, 360, 98, 187, 104, 105, 366, 189, 368, 113, 115,
])
#: Names in the same (sorted-id, i.e. alphabetical) order as PASCAL_CONTEXT_459_IDS.
PASCAL_CONTEXT60_CLASSES = [
    "background", "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat",
    "book", "bottle", "building", "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth",
    "computer", "cow", "cup", "curtain", "dog", "door", "fence", "floor", "flower", "food", "grass",
    "ground", "horse", "keyboard", "light", "motorbike", "mountain", "mouse", "person", "plate",
    "platform", "pottedplant", "road", "rock", "sheep", "shelves", "sidewalk", "sign", "sky",
    "snow", "sofa", "table", "track", "train", "tree", "truck", "tvmonitor", "wall", "water",
    "window", "wood",
]

COCO_STUFF_CLASSES = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush", "banner", "blanket", "branch", "bridge",
    "building-other", "bush", "cabinet", "cage", "cardboard", "carpet", "ceiling-other",
    "ceiling-tile", "cloth", "clothes", "clouds", "counter", "cupboard", "curtain", "desk-stuff",
    "dirt", "door-stuff", "fence", "floor-marble", "floor-other", "floor-stone", "floor-tile",
    "floor-wood", "flower", "fog", "food-other", "fruit", "furniture-other", "grass", "gravel",
    "ground-other", "hill", "house", "leaves", "light", "mat", "metal", "mirror-stuff", "moss",
    "mountain", "mud", "napkin", "net", "paper", "pavement", "pillow", "plant-other", "plastic",
    "platform", "playingfield", "railing", "railroad", "river", "road", "rock", "roof", "rug",
    "salad", "sand", "sea", "shelf", "sky-other", "skyscraper", "snow", "solid-other", "stairs",
    "stone", "straw", "structural-other", "table", "tent", "textile-other", "towel", "tree",
    "vegetable", "wall-brick", "wall-concrete", "wall-other", "wall-panel", "wall-stone",
    "wall-tile", "wall-wood", "water-other", "waterdrops", "window-blind", "window-other", "wood",
]
#: 0-based ids (COCO category id - 1) of the 11 thing slots COCO defines but never annotates.
COCO_UNUSED_IDS = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)

#: (labelId, name, trainId) of the 34 Cityscapes labels (cityscapesScripts helpers/labels.py),
#: plus license plate (-1 -> ignore).
CITYSCAPES_LABELS = [
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
CITYSCAPES_CLASSES = [
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
    "bicycle",
]
CITYSCAPES_PALETTE: List[RGB] = [
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
]

HUMAN_PARSING_CLASSES = [
    "background", "hat", "hair", "glove", "sunglasses", "upper-clothes", "dress", "coat", "socks",
    "pants", "jumpsuits", "scarf", "skirt", "face", "left-arm", "right-arm", "left-leg",
    "right-leg", "left-shoe", "right-shoe",
]

CAMVID_CLASSES = [
    "sky", "building", "pole", "road", "pavement", "tree", "sign_symbol", "fence", "car",
    "pedestrian", "bicyclist",
]
CAMVID_PALETTE: List[RGB] = [
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


def _info(name: str, classes: List[str], palette: List[RGB] | None = None, description: str = "",
          **extra: object) -> DatasetInfo:
    pal = list(palette) if palette is not None else voc_colormap(len(classes))
    return DatasetInfo(name=name, num_classes=len(classes), class_names=list(classes), palette=pal,
                       description=description, extra=dict(extra))


def _registry() -> Dict[str, DatasetInfo]:
    from ctxseg.data.synthetic import SYNTHETIC_CLASSES, SYNTHETIC_PALETTE

    return {
        "synthetic": _info("synthetic", SYNTHETIC_CLASSES, SYNTHETIC_PALETTE,
                           "embedded synthetic co-occurrence benchmark (see README.md)"),
        "ade20k": _info("ade20k", ADE20K_CLASSES, None, "ADE20K SceneParsing, 150 classes, 0 -> ignore"),
        "voc_aug": _info("voc_aug", VOC_CLASSES, None, "Pascal VOC 2012 + SBD (trainaug 10582 / val 1449)"),
        "pascal_context": _info("pascal_context", PASCAL_CONTEXT60_CLASSES, None,
                                "Pascal Context, 59 classes + background"),
        "pascal_context59": _info("pascal_context59", PASCAL_CONTEXT60_CLASSES[1:], voc_colormap(60)[1:],
                                  "Pascal Context, 59 classes, background -> ignore"),
        "coco_stuff164k": _info("coco_stuff164k", COCO_STUFF_CLASSES, None, "COCO-Stuff 164k, 171 classes"),
        "coco_stuff10k": _info("coco_stuff10k", COCO_STUFF_CLASSES, None, "COCO-Stuff 10k, 171 classes"),
        "cityscapes": _info("cityscapes", CITYSCAPES_CLASSES, CITYSCAPES_PALETTE, "Cityscapes fine, 19 classes"),
        "lip": _info("lip", HUMAN_PARSING_CLASSES, None, "Look Into Person, 20 classes"),
        "cihp": _info("cihp", HUMAN_PARSING_CLASSES, None, "Crowd Instance-level Human Parsing, 20 classes"),
        "camvid": _info("camvid", CAMVID_CLASSES, CAMVID_PALETTE, "CamVid (SegNet 11 classes), void -> ignore"),
    }


_CACHE: Dict[str, DatasetInfo] = {}


def get_dataset_info(name: str) -> DatasetInfo:
    """Class names, palette and ignore index of a dataset (``DataConfig.name``)."""
    if not _CACHE:
        _CACHE.update(_registry())
    try:
        return _CACHE[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(_CACHE)}") from None
