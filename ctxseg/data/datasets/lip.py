"""Look Into Person (single-person parsing): ``{train,val}_images`` + ``{train,val}_segmentations``."""
from __future__ import annotations

from pathlib import Path
from typing import Any, List

from ctxseg.data.datasets import DatasetSpec
from ctxseg.data.datasets._human import CLASSES, human_decoder
from ctxseg.data.layout import Listing, images_in, pair_by_stem, walk_dirs
from ctxseg.data.types import LayoutError, Sample

INSTRUCTIONS = ("the LIP single-person parsing set (TrainVal_images.zip and TrainVal_parsing_annotations.zip, "
                "or a folder holding train_images/, val_images/, train_segmentations/, val_segmentations/) from "
                "https://www.sysu-hcp.net/lip/ (Google Drive, login required)")


def _list(cfg: Any, root: Path) -> Listing:
    samples: List[Sample] = []
    problems: list = []
    dirs = list(walk_dirs(root, 6))
    for split in ("train", "val"):
        idirs = [d for d in dirs if d.name == f"{split}_images"]
        sdirs = [d for d in dirs if d.name == f"{split}_segmentations"]
        if not idirs or not sdirs:
            if split == "train":
                raise LayoutError(f"lip: cannot find train_images/ and train_segmentations/ under {root}. "
                                  f"Get {INSTRUCTIONS}; set data.source to the archive or folder.")
            continue
        labels = {p.stem: p for p in sdirs[0].glob("*.png")}
        samples += pair_by_stem(split, images_in(idirs[0]), labels, problems)
    return Listing(samples, human_decoder("LIP"), problems=problems)


DATASET = DatasetSpec(
    name="lip",
    classes=CLASSES,
    description="Look Into Person, 20 classes",
    instructions=INSTRUCTIONS,
    gated=True,
    lister=_list,
)
