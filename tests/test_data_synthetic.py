"""The synthetic co-occurrence benchmark: determinism and the measured co-occurrence property."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from ctxseg.data import DataConfig, SyntheticConfig, download_dataset, get_dataset_info
from ctxseg.data.synthetic import (
    AMBIGUOUS,
    CUE_OF,
    GROUPS,
    SYNTHETIC_CLASSES,
    generate_scene,
)


def _tree_bytes(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _small(seed: int = 0, **kw) -> DataConfig:
    return DataConfig(synthetic=SyntheticConfig(num_train=6, num_val=3, seed=seed, **kw))


def test_same_seed_byte_identical_other_seed_differs(tmp_path):
    a = download_dataset(_small(seed=3), tmp_path / "a")
    b = download_dataset(_small(seed=3), tmp_path / "b")
    c = download_dataset(_small(seed=4), tmp_path / "c")
    ta, tb, tc = _tree_bytes(a), _tree_bytes(b), _tree_bytes(c)
    pngs = [k for k in ta if k.endswith(".png")]
    assert len(pngs) == 2 * (6 + 3)
    assert ta == tb  # every PNG, manifest and synthetic.json byte-identical
    assert set(tc) == set(ta)
    differing = [k for k in pngs if ta[k] != tc[k]]
    assert len(differing) == len(pngs)  # another seed changes every image and label


def test_adding_images_keeps_existing_ones(tmp_path):
    a = download_dataset(_small(seed=1), tmp_path / "a")
    big = DataConfig(synthetic=SyntheticConfig(num_train=9, num_val=3, seed=1))
    b = download_dataset(big, tmp_path / "b")
    for p in (a / "images" / "train").glob("*.png"):
        assert p.read_bytes() == (b / "images" / "train" / p.name).read_bytes()


def test_generated_layout_and_records(tmp_path):
    raw = download_dataset(_small(), tmp_path / "raw")
    design = json.loads((raw / "synthetic.json").read_text())
    assert design["min_cue_distance"] == 64
    # the cue lies beyond the default model's local receptive field (measured by ctxseg.models)
    assert 0 < design["backbone_receptive_field"] <= design["min_cue_distance"]
    ids = (raw / "train.txt").read_text().split()
    assert len(ids) == 6
    rec = {r["id"]: r for r in design["records"]}
    for i in ids:
        lbl = np.asarray(Image.open(raw / "labels" / "train" / f"{i}.png"))
        img = Image.open(raw / "images" / "train" / f"{i}.png")
        assert img.mode == "RGB" and img.size == (128, 128) and lbl.dtype == np.uint8
        present = {SYNTHETIC_CLASSES[v] for v in np.unique(lbl) if v != 255}
        assert rec[i]["ambiguous_class"] in present and rec[i]["cue_class"] in present
        assert (lbl == 255).any()  # ignore rings around things
    info = get_dataset_info("synthetic")
    assert info.num_classes == 13 and len(info.palette) == 13


def _boundary(m: np.ndarray) -> np.ndarray:
    """Pixels of m with a neighbour (8-connectivity, image border counts) outside m."""
    p = np.pad(m, 1)
    interior = np.ones_like(m)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            interior &= p[1 + dy:1 + dy + m.shape[0], 1 + dx:1 + dx + m.shape[1]]
    return m & ~interior


def _chebyshev_min(a: np.ndarray, b: np.ndarray) -> int:
    """Exact minimum Chebyshev distance between two pixel sets (attained on their 8-boundaries)."""
    pa = np.argwhere(_boundary(a))
    pb = np.argwhere(_boundary(b))
    return int(np.abs(pa[:, None, :] - pb[None, :, :]).max(-1).min())


def test_chebyshev_helper_is_exact():
    rng = np.random.default_rng(0)
    for _ in range(5):
        a = rng.random((20, 20)) < 0.1
        b = rng.random((20, 20)) < 0.05
        b[0, 0] = True
        brute = int(np.abs(np.argwhere(a)[:, None] - np.argwhere(b)[None]).max(-1).min())
        assert _chebyshev_min(a, b) == brute


def _features(img: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Local appearance statistics of a region: mean/std colour and mean gradient magnitudes."""
    f = img.astype(np.float64)
    inner = mask.copy()
    inner[1:-1, 1:-1] &= mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
    gy = np.abs(np.diff(f, axis=0, append=f[-1:])).sum(-1)
    gx = np.abs(np.diff(f, axis=1, append=f[:, -1:])).sum(-1)
    px = f[inner]
    return np.concatenate([px.mean(0), px.std(0), [gy[inner].mean() + gx[inner].mean()]])


def _nearest_centroid_accuracy(x: np.ndarray, y: np.ndarray) -> float:
    """Two-fold nearest-centroid accuracy on standardised features."""
    x = (x - x.mean(0)) / (x.std(0) + 1e-9)
    idx = np.arange(len(y))
    fold_of = np.random.default_rng(0).permutation(len(y)) % 2
    correct = 0
    for fold in (0, 1):
        tr, te = idx[fold_of != fold], idx[fold_of == fold]
        cents = {c: x[tr][y[tr] == c].mean(0) for c in np.unique(y[tr])}
        for i in te:
            pred = min(cents, key=lambda c: np.linalg.norm(x[i] - cents[c]))
            correct += pred == y[i]
    return correct / len(y)


def test_cooccurrence_property_is_measured():
    cfg = SyntheticConfig(seed=11)
    feats, amb_cls = [], []
    for i in range(160):
        img, lbl, rec = generate_scene(cfg, "train", i)
        present = set(np.unique(lbl).tolist()) - {255}
        amb = [c for c in AMBIGUOUS if c in present]
        assert len(amb) == 1, f"image {i}: exactly one ambiguous class expected, got {amb}"
        a = amb[0]
        cue = CUE_OF[a]
        sibling = next(s for g in GROUPS.values() if a in g for s in g if s != a)
        # co-occurrence: own cue always present, sibling's cue (and every other cue) never
        assert cue in present
        assert not (set(CUE_OF.values()) - {cue}) & present
        assert CUE_OF[sibling] not in present
        # distance: every cue pixel >= min_cue_distance (Chebyshev) from every ambiguous pixel
        dist = _chebyshev_min(lbl == a, lbl == cue)
        assert dist >= cfg.min_cue_distance, f"image {i}: cue at {dist} px < {cfg.min_cue_distance}"
        feats.append(_features(img, lbl == a))
        amb_cls.append(a)
    x, y = np.array(feats), np.array(amb_cls)
    # balanced classes
    counts = np.bincount(y, minlength=len(SYNTHETIC_CLASSES))[AMBIGUOUS]
    assert counts.min() == counts.max() == 40
    # local appearance separates the groups perfectly ...
    group_of = np.array([0 if c in GROUPS["water"] else 1 for c in y])
    assert _nearest_centroid_accuracy(x, group_of) >= 0.97
    # ... but is at chance within a group (the cue is the only evidence)
    for members in GROUPS.values():
        sel = np.isin(y, members)
        acc = _nearest_centroid_accuracy(x[sel], y[sel])
        assert acc < 0.68, f"classes {members} are locally separable (acc {acc:.2f})"


def test_config_rejects_impossible_geometry_and_typos():
    with pytest.raises(ValidationError, match="too small for min_cue_distance"):
        SyntheticConfig(image_size=96, min_cue_distance=64)
    with pytest.raises(ValidationError, match="extra"):
        SyntheticConfig(num_trian=3)
    with pytest.raises(ValidationError):
        DataConfig(name="imagenet")
