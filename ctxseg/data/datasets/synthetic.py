"""The embedded synthetic co-occurrence benchmark (docs/datasets.md, "The embedded synthetic dataset").

Generated locally by the download stage (:mod:`ctxseg.data.synthetic`) in the canonical layout
(``images/``, ``labels/``, ``<split>.txt``, ``synthetic.json``); labels are already train ids.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional

from ctxseg.data.datasets import DatasetSpec
from ctxseg.data.decoders import LutDecoder
from ctxseg.data.layout import Listing, read_ids
from ctxseg.data.synthetic import SYNTHETIC_CLASSES, SYNTHETIC_PALETTE, generate_synthetic, synthetic_design
from ctxseg.data.types import LayoutError, Sample


def _generate(cfg: Any, raw_dir: Path) -> Path:
    return generate_synthetic(cfg.synthetic, raw_dir)


def _list(cfg: Any, root: Path) -> Listing:
    samples: List[Sample] = []
    for split in ("train", "val", "test"):
        manifest = root / f"{split}.txt"
        if not manifest.is_file():
            continue
        for i in read_ids(manifest):
            samples.append(Sample(split, i, root / "images" / split / f"{i}.png", root / "labels" / split / f"{i}.png"))
    if not samples:
        raise LayoutError(f"synthetic: no generated data in {root}; run the download stage (it generates the "
                          f"synthetic set)")
    extra: Dict[str, Any] = {}
    design = root / "synthetic.json"
    if design.is_file():
        d = json.loads(design.read_text())
        d.pop("records", None)
        extra["synthetic"] = d
    else:
        extra["synthetic"] = synthetic_design(cfg.synthetic)
    return Listing(samples, LutDecoder(name="identity"), extra)


def _check_raw(cfg: Any, raw_dir: Path) -> Optional[str]:
    stamp = raw_dir / "synthetic.json"
    if not stamp.is_file():
        return None
    try:
        made = json.loads(stamp.read_text()).get("config")
    except ValueError:
        return f"{stamp} is unreadable"
    if made != cfg.synthetic.model_dump(mode="json"):
        return "it was generated from other data.synthetic settings than params hold"
    return None


def _augmentation_warning(cfg: Any) -> Optional[str]:
    a = cfg.augment
    if a.scale_range[1] > 1.0 and min(a.crop_size) <= cfg.synthetic.image_size:
        return (f"data.augment.scale_range={list(a.scale_range)} with crop_size={list(a.crop_size)} on the "
                f"synthetic benchmark: crops of up-scaled images often cut the cue off the ambiguous region, so "
                f"context cannot be learnt from them. Use scale_range [0.5, 1.0] (see docs/datasets.md, 'The embedded "
                f"synthetic dataset')")
    return None


DATASET = DatasetSpec(
    name="synthetic",
    classes=SYNTHETIC_CLASSES,
    palette=SYNTHETIC_PALETTE,
    description="embedded synthetic co-occurrence benchmark (see docs/datasets.md)",
    instructions="generated locally from data.synthetic (no download)",
    lister=_list,
    generate=_generate,
    augmentation_warning=_augmentation_warning,
    check_raw=_check_raw,
)
