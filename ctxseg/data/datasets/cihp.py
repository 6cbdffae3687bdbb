"""Crowd Instance-level Human Parsing: ``{Training,Validation}/{Images,Category_ids}``."""
from __future__ import annotations

from pathlib import Path
from typing import Any, List

from ctxseg.data.datasets import DatasetSpec
from ctxseg.data.datasets._human import CLASSES, human_decoder
from ctxseg.data.layout import Listing, find_dir, images_in, pair_by_stem
from ctxseg.data.types import Sample

INSTRUCTIONS = ("instance-level_human_parsing.tar.gz (CIHP, folders Training/ and Validation/ with Images/ and "
                "Category_ids/) from https://www.sysu-hcp.net/lip/ (Google Drive, login required)")


def _list(cfg: Any, root: Path) -> Listing:
    d = find_dir(root, ["Training/Images", "Training/Category_ids"], "instance-level_human_parsing", "cihp",
                 INSTRUCTIONS)
    samples: List[Sample] = []
    problems: list = []
    for split, sub in (("train", "Training"), ("val", "Validation")):
        if not (d / sub / "Images").is_dir():
            continue
        labels = {p.stem: p for p in (d / sub / "Category_ids").glob("*.png")}
        samples += pair_by_stem(split, images_in(d / sub / "Images"), labels, problems)
    return Listing(samples, human_decoder("CIHP"), problems=problems)


DATASET = DatasetSpec(
    name="cihp",
    classes=CLASSES,
    description="Crowd Instance-level Human Parsing, 20 classes",
    instructions=INSTRUCTIONS,
    gated=True,
    lister=_list,
)
