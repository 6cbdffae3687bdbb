"""Pascal Context, 59 classes (background -> ignore): the archives and lister of
:mod:`ctxseg.data.datasets.pascal_context` with the 459 -> 59 mapping."""
from __future__ import annotations

from ctxseg.data.datasets import DatasetSpec
from ctxseg.data.datasets.pascal_context import CLASSES, INSTRUCTIONS, RESOURCES, list_pascal_context
from ctxseg.data.types import voc_colormap

DATASET = DatasetSpec(
    name="pascal_context59",
    classes=CLASSES[1:],
    palette=voc_colormap(60)[1:],
    description="Pascal Context, 59 classes, background -> ignore",
    resources=RESOURCES,
    instructions=INSTRUCTIONS,
    lister=lambda cfg, root: list_pascal_context(cfg, root, 59),
)
