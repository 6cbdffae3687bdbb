"""Your own images: ``data.name: folder`` with ``data.source`` set to a folder laid out as

::

    <source>/classes.yaml
    <source>/images/train/<stem>.jpg|.png     (and images/val/, optionally images/test/)
    <source>/labels/train/<stem>.png          single-channel PNG (mode L or P), same stem and size

``classes.yaml``::

    names: [background, road, car]        # required: train ids 0, 1, 2 in this order (at most 255)
    palette: [[0, 0, 0], [128, 64, 128], [0, 0, 142]]   # optional, one [r, g, b] per name
    ignore_index: 255                     # optional: the raw label value that means "not labelled"
    id_to_train_id: {0: 255, 7: 1, 26: 2} # optional: raw label value -> train id (255 = ignore);
                                          # without it the raw values are the train ids

Every label value must be a train id, the ignore index or a key of ``id_to_train_id``; the preprocess
stage reports every file that holds another value. Images keep their bytes (hard links) and labels
whose values need no mapping are linked too (see :mod:`ctxseg.data.prepare`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from ctxseg.data.datasets import DatasetSpec
from ctxseg.data.decoders import StrictLutDecoder, lut_from_pairs
from ctxseg.data.layout import Listing, find_dirs, images_in, pair_by_stem
from ctxseg.data.types import IGNORE_INDEX, DatasetInfo, LayoutError, Sample, voc_colormap

CLASSES_FILE = "classes.yaml"
SPLITS = ("train", "val", "test")
INSTRUCTIONS = (f"a folder holding {CLASSES_FILE} (names, optional palette, ignore_index, id_to_train_id), "
                f"images/{{train,val[,test]}}/ and labels/{{train,val[,test]}}/ with matching file stems "
                f"(docs/datasets.md, \"Your own images\")")


def _root(cfg: Any, root: Optional[Path] = None) -> Path:
    if root is None:
        if not getattr(cfg, "source", None):
            raise LayoutError("data.name: folder needs data.source: the folder with your images, set it in params.yaml "
                              f"(expected: {INSTRUCTIONS})")
        root = Path(cfg.source).expanduser().resolve()
    hits = find_dirs(Path(root), [CLASSES_FILE, "images", "labels"], max_depth=2)
    if not hits:
        raise LayoutError(f"folder: no {CLASSES_FILE} with images/ and labels/ next to it under {root}. Expected "
                          f"{INSTRUCTIONS}; point data.source at that folder.")
    return hits[0]


def _fail(path: Path, key: str, problem: str) -> LayoutError:
    return LayoutError(f"{path}: `{key}` {problem}. Fix {path.name} (docs/datasets.md, \"Your own images\", shows the format) "
                       f"and run the stage again.")


def load_classes(root: Path) -> Tuple[List[str], List[Tuple[int, int, int]], int, Dict[int, int]]:
    """``(names, palette, raw ignore value, id -> train id)`` from ``root/classes.yaml``, validated."""
    import yaml

    path = root / CLASSES_FILE
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise LayoutError(f"{path}: cannot be read as YAML ({type(err).__name__}: {err}); fix the file") from None
    if not isinstance(doc, dict):
        raise _fail(path, "names", "is missing: the file must be a mapping with at least `names: [...]`")
    unknown = sorted(set(doc) - {"names", "palette", "ignore_index", "id_to_train_id"})
    if unknown:
        raise _fail(path, unknown[0], "is not a known key (known: names, palette, ignore_index, id_to_train_id)")
    names = doc.get("names")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n.strip() for n in names):
        raise _fail(path, "names", "must be a non-empty list of class names (strings), train ids 0, 1, ... in order")
    if len(names) > 255 or len(set(names)) != len(names):
        raise _fail(path, "names", f"must hold at most 255 distinct names (found {len(names)}, "
                                   f"{len(names) - len(set(names))} repeated)")
    palette = doc.get("palette")
    if palette is None:
        pal = voc_colormap(len(names))
    else:
        ok = isinstance(palette, list) and len(palette) == len(names) and all(
            isinstance(c, list) and len(c) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in c)
            for c in palette)
        if not ok:
            raise _fail(path, "palette", f"must be one [r, g, b] (0..255) per name: {len(names)} entries")
        pal = [tuple(c) for c in palette]
    ignore = doc.get("ignore_index", IGNORE_INDEX)
    if not isinstance(ignore, int) or not 0 <= ignore <= 255:
        raise _fail(path, "ignore_index", f"must be a label value 0..255, got {ignore!r}")
    mapping_doc = doc.get("id_to_train_id")
    mapping: Dict[int, int] = {}
    if mapping_doc is not None:
        if not isinstance(mapping_doc, dict) or not mapping_doc:
            raise _fail(path, "id_to_train_id", "must be a mapping raw label value -> train id")
        for k, v in mapping_doc.items():
            if not (isinstance(k, int) and 0 <= k <= 255 and isinstance(v, int) and (0 <= v < len(names)
                                                                                    or v == IGNORE_INDEX)):
                raise _fail(path, f"id_to_train_id[{k!r}]", f"must map a label value 0..255 to a train id "
                                                            f"0..{len(names) - 1} or {IGNORE_INDEX} (ignore), got {v!r}")
            mapping[k] = v
    elif ignore < len(names):
        raise _fail(path, "ignore_index", f"is {ignore}, a train id (0..{len(names) - 1}); without id_to_train_id the "
                                          f"raw values are the train ids, so the ignore value must be >= {len(names)}")
    return list(names), pal, ignore, mapping


def _info(cfg: Any) -> DatasetInfo:
    names, pal, _, _ = load_classes(_root(cfg))
    return DatasetInfo(name="folder", num_classes=len(names), class_names=names, palette=pal,
                       description="your own images (data.source)")


def _list(cfg: Any, root: Path) -> Listing:
    d = _root(cfg, root)
    names, _, ignore, mapping = load_classes(d)
    splits = [s for s in SPLITS if (d / "images" / s).is_dir()]
    for needed in ("train", "val"):
        if needed not in splits or not (d / "labels" / needed).is_dir():
            raise LayoutError(f"folder: {d / 'images' / needed} and {d / 'labels' / needed} must both exist "
                              f"(expected {INSTRUCTIONS})")
    samples: List[Sample] = []
    problems: list = []
    for split in splits:
        ldir = d / "labels" / split
        labels = {p.stem: p for p in ldir.glob("*.png")} if ldir.is_dir() else {}
        samples += pair_by_stem(split, images_in(d / "images" / split), labels, problems)
    if mapping:
        pairs = list(mapping.items()) + [(ignore, IGNORE_INDEX)]
        desc = f"classes.yaml id_to_train_id ({len(mapping)} ids), {ignore} -> ignore"
        valid = f"the keys of id_to_train_id in {d / CLASSES_FILE} or the ignore value {ignore}"
    else:
        pairs = [(k, k) for k in range(len(names))] + [(ignore, IGNORE_INDEX)]
        desc = "identity" if ignore == IGNORE_INDEX else f"identity, {ignore} -> ignore"
        valid = f"train ids 0..{len(names) - 1} or the ignore value {ignore} ({d / CLASSES_FILE})"
    lut = lut_from_pairs(256, pairs)
    return Listing(samples, StrictLutDecoder(lut, desc, valid), problems=problems)


DATASET = DatasetSpec(
    name="folder",
    classes=("class",),  # the real list is the folder's classes.yaml (info_for)
    description="your own images: classes.yaml + images/<split>/ + labels/<split>/ (data.source)",
    instructions=INSTRUCTIONS,
    gated=True,
    lister=_list,
    info_for=_info,
)
