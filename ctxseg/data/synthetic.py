"""The embedded synthetic co-occurrence benchmark (design: docs/datasets.md, "The embedded synthetic dataset").

Every image is generated from its own ``numpy.random.Generator`` seeded with
``(seed, split code, image index)``, so the set is byte-identical for the same seed whatever the
order or parallelism of generation, and different for another seed.

Scene (built in a canonical frame, then rotated by a random multiple of 90 degrees):

* rows ``[0, a)`` hold the *ambiguous band*: one stuff region of class ``sea``/``lake`` (identical
  "water" appearance) or ``desert``/``beach`` (identical "sand" appearance), with a wavy edge;
* rows ``[a, a + min_cue_distance)`` are the *gap*: context-free stuff (grass / road / forest) and
  optional distractor things (person, ball) and a void blob (label 255);
* rows ``[a + min_cue_distance, S)`` are the *cue zone*: exactly one cue thing, which alone decides
  the ambiguous class: ship -> sea, swan -> lake, camel -> desert, parasol -> beach.

Every cue pixel is therefore at Chebyshev distance >= ``min_cue_distance`` from every ambiguous
pixel. The whole image then gets a per-image colour cast, brightness offset and illumination ramp.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
from PIL import Image
from tqdm import tqdm

from ctxseg.data.config import SyntheticConfig

log = logging.getLogger(__name__)

IGNORE = 255

SYNTHETIC_CLASSES: List[str] = [
    "grass", "road", "forest",            # context-free stuff
    "sea", "lake",                        # ambiguous group "water": identical appearance
    "desert", "beach",                    # ambiguous group "sand": identical appearance
    "ship", "swan", "camel", "parasol",   # cue things (one per ambiguous class)
    "person", "ball",                     # context-free distractor things
]
SYNTHETIC_PALETTE: List[Tuple[int, int, int]] = [
    (70, 150, 60), (128, 128, 128), (20, 90, 40),
    (0, 70, 200), (80, 170, 255),
    (230, 200, 90), (255, 150, 70),
    (140, 60, 20), (255, 255, 255), (170, 110, 200), (220, 30, 60),
    (255, 180, 160), (255, 120, 0),
]
C = {name: i for i, name in enumerate(SYNTHETIC_CLASSES)}
STUFF = [C["grass"], C["road"], C["forest"]]
DISTRACTORS = [C["person"], C["ball"]]
#: ambiguous class -> the cue thing that co-occurs with it (and only with it)
CUE_OF: Dict[int, int] = {C["sea"]: C["ship"], C["lake"]: C["swan"], C["desert"]: C["camel"],
                          C["beach"]: C["parasol"]}
#: ambiguity groups (classes in a group share one appearance model)
GROUPS: Dict[str, List[int]] = {"water": [C["sea"], C["lake"]], "sand": [C["desert"], C["beach"]]}
AMBIGUOUS: List[int] = [C["sea"], C["desert"], C["lake"], C["beach"]]
SPLIT_CODE = {"train": 0, "val": 1, "test": 2}

# ------------------------------------------------------------------------------------ appearance

#: appearance model shared by the classes of a group (identical local statistics)
_APPEARANCE_OF: Dict[int, str] = {
    C["grass"]: "grass", C["road"]: "road", C["forest"]: "forest",
    C["sea"]: "water", C["lake"]: "water", C["desert"]: "sand", C["beach"]: "sand",
    C["ship"]: "ship", C["swan"]: "swan", C["camel"]: "camel", C["parasol"]: "parasol",
    C["person"]: "person", C["ball"]: "ball",
}


def _texture(kind: str, yy: np.ndarray, xx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A HxWx3 float texture of one appearance model; random phases come from ``rng``."""
    h, w = yy.shape
    ph = rng.uniform(0, 2 * np.pi, size=4)
    noise = rng.normal(0.0, 1.0, size=(h, w, 1))
    if kind == "water":  # blue, horizontal ripples
        base = np.array([40.0, 95.0, 175.0])
        wave = np.sin(2 * np.pi * (yy / 6.0 + 0.15 * np.sin(2 * np.pi * xx / 23.0 + ph[0])) + ph[1])
        return base + 28.0 * wave[..., None] * np.array([0.6, 0.8, 1.0]) + 6.0 * noise
    if kind == "sand":  # beige, speckled
        base = np.array([205.0, 180.0, 120.0])
        speck = (rng.random((h, w)) < 0.06)[..., None] * -60.0
        return base + 14.0 * noise + speck
    if kind == "grass":  # green, vertical stripes
        base = np.array([70.0, 150.0, 60.0])
        return base + 18.0 * np.sin(2 * np.pi * xx / 4.0 + ph[0])[..., None] + 6.0 * noise
    if kind == "road":  # grey, fine noise
        return np.array([112.0, 112.0, 118.0]) + 10.0 * noise
    if kind == "forest":  # dark green, low-frequency blotches
        base = np.array([35.0, 85.0, 45.0])
        blot = np.sin(xx / 5.0 + ph[0]) * np.sin(yy / 7.0 + ph[1]) + 0.5 * np.sin((xx + yy) / 3.0 + ph[2])
        return base + 22.0 * blot[..., None] + 5.0 * noise
    # things: saturated, well-separated hues and distinct patterns, so they are learnt quickly
    if kind == "ship":  # red hull with dark planks
        return np.array([225.0, 35.0, 35.0]) - 50.0 * (np.floor(yy / 3.0) % 2)[..., None] + 5.0 * noise
    if kind == "swan":  # white, smooth
        return np.array([245.0, 245.0, 240.0]) + 4.0 * noise
    if kind == "camel":  # purple, dotted
        dots = ((np.sin(xx * 1.3 + ph[0]) * np.sin(yy * 1.3 + ph[1])) > 0.6)[..., None]
        return np.array([150.0, 50.0, 200.0]) - 60.0 * dots + 5.0 * noise
    if kind == "parasol":  # yellow / black diagonal stripes
        stripe = (np.floor((xx + yy) / 4.0) % 2)[..., None]
        return np.array([250.0, 225.0, 0.0]) * (1 - stripe) + np.array([25.0, 25.0, 25.0]) * stripe + 4.0 * noise
    if kind == "person":  # cyan
        return np.array([30.0, 215.0, 215.0]) + 5.0 * noise
    if kind == "ball":  # orange
        return np.array([250.0, 140.0, 10.0]) + 5.0 * noise
    if kind == "void":  # random clutter
        return rng.uniform(0, 255, size=(h, w, 3))
    raise ValueError(kind)


# ------------------------------------------------------------------------------------- shapes


def _shape_mask(kind: str, h: int, w: int) -> np.ndarray:
    """Boolean h x w mask of a thing drawn in its bounding box (u: 0 top -> 1 bottom, v: 0 -> 1)."""
    u = (np.arange(h)[:, None] + 0.5) / h
    v = (np.arange(w)[None, :] + 0.5) / w
    u, v = np.broadcast_arrays(u, v)
    if kind == "ship":  # hull (trapezoid, lower half) + mast + triangular sail
        hull = (u > 0.6) & (np.abs(v - 0.5) < 0.5 - 0.35 * (u - 0.6) / 0.4)
        mast = (u <= 0.6) & (np.abs(v - 0.5) < 0.04)
        sail = (u > 0.1) & (u <= 0.58) & (v > 0.52) & (v < 0.52 + 0.4 * (u - 0.1) / 0.48)
        return hull | mast | sail
    if kind == "swan":  # body ellipse + neck + head
        body = ((u - 0.72) / 0.26) ** 2 + ((v - 0.55) / 0.42) ** 2 < 1
        neck = (u > 0.2) & (u < 0.72) & (np.abs(v - 0.22) < 0.06)
        head = ((u - 0.18) / 0.12) ** 2 + ((v - 0.27) / 0.14) ** 2 < 1
        return body | neck | head
    if kind == "camel":  # body + two humps + four legs
        body = ((u - 0.45) / 0.18) ** 2 + ((v - 0.5) / 0.42) ** 2 < 1
        humps = (((u - 0.3) / 0.18) ** 2 + ((v - 0.35) / 0.12) ** 2 < 1) | (
            ((u - 0.3) / 0.18) ** 2 + ((v - 0.65) / 0.12) ** 2 < 1)
        legs = (u > 0.5) & np.any([np.abs(v - c) < 0.04 for c in (0.18, 0.32, 0.68, 0.82)], axis=0)
        return body | humps | legs
    if kind == "parasol":  # half disk + pole
        canopy = (u < 0.45) & (((u - 0.45) / 0.42) ** 2 + ((v - 0.5) / 0.5) ** 2 < 1)
        pole = (u >= 0.4) & (np.abs(v - 0.5) < 0.05)
        return canopy | pole
    if kind == "person":  # head + body + legs
        head = ((u - 0.13) / 0.12) ** 2 + ((v - 0.5) / 0.2) ** 2 < 1
        body = (u > 0.25) & (u < 0.65) & (np.abs(v - 0.5) < 0.3)
        legs = (u >= 0.65) & ((np.abs(v - 0.35) < 0.1) | (np.abs(v - 0.65) < 0.1))
        return head | body | legs
    if kind == "ball":
        return (u - 0.5) ** 2 + (v - 0.5) ** 2 < 0.25
    if kind == "void":  # irregular blob
        return ((u - 0.5) / 0.5) ** 2 + ((v - 0.5) / 0.5) ** 2 + 0.3 * np.sin(7 * u) * np.cos(5 * v) < 1
    raise ValueError(kind)


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    """Binary dilation with a (2r+1)^2 square (separable max filter)."""
    if r <= 0:
        return mask.copy()
    out = mask.copy()
    for axis in (0, 1):
        acc = out.copy()
        for s in range(1, r + 1):
            fwd = np.zeros_like(out)
            bwd = np.zeros_like(out)
            if axis == 0:
                fwd[s:] = out[:-s]
                bwd[:-s] = out[s:]
            else:
                fwd[:, s:] = out[:, :-s]
                bwd[:, :-s] = out[:, s:]
            acc |= fwd | bwd
        out = acc
    return out


# -------------------------------------------------------------------------------------- scene


@dataclass
class SceneRecord:
    """What was generated (stored in ``synthetic.json`` for tests and the report)."""

    id: str
    split: str
    group: str
    ambiguous_class: str
    cue_class: str
    rotation: int
    band_depth: int
    cue_gap: int  # rows between the last possible ambiguous row and the first cue row (canonical frame)


def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of one image: independent of generation order and parallelism."""
    return np.random.default_rng([int(seed), SPLIT_CODE[split], int(index)])


def _place(zone_rows: Tuple[int, int], size: int, h: int, w: int, rng: np.random.Generator) -> Tuple[int, int]:
    r0 = int(rng.integers(zone_rows[0], max(zone_rows[0], zone_rows[1] - h) + 1))
    c0 = int(rng.integers(0, max(0, size - w) + 1))
    return r0, c0


def generate_scene(cfg: SyntheticConfig, split: str, index: int) -> Tuple[np.ndarray, np.ndarray, SceneRecord]:
    """Generate one (image HxWx3 uint8, label HxW uint8, record)."""
    rng = image_rng(cfg.seed, split, index)
    S = cfg.image_size
    d = cfg.min_cue_distance
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float64)
    label = np.empty((S, S), dtype=np.uint8)

    # ambiguous class: balanced round-robin over the four classes, offset per split and seed
    offset = int(np.random.default_rng([int(cfg.seed), SPLIT_CODE[split]]).integers(0, len(AMBIGUOUS)))
    amb = AMBIGUOUS[(index + offset) % len(AMBIGUOUS)]
    cue = CUE_OF[amb]
    group = next(g for g, members in GROUPS.items() if amb in members)

    # --- context-free stuff background: one or two stuff classes split by a wavy line
    k = int(rng.integers(1, 3))
    stuff = rng.choice(STUFF, size=k, replace=False)
    label[:] = stuff[0]
    if k == 2:
        if rng.random() < 0.5:
            split_line = rng.uniform(0.3, 0.7) * S + 6 * np.sin(2 * np.pi * yy / rng.uniform(20, 60) + rng.uniform(0, 6.3))
            label[xx > split_line] = stuff[1]
        else:
            split_line = rng.uniform(0.45, 0.85) * S + 6 * np.sin(2 * np.pi * xx / rng.uniform(20, 60) + rng.uniform(0, 6.3))
            label[yy > split_line] = stuff[1]

    # --- ambiguous band (rows < a), wavy edge
    lo, hi = cfg.ambiguous_fraction
    a = int(round(rng.uniform(lo, hi) * S))
    amp = rng.uniform(0, a / 3.0)
    edge = a - amp * (0.5 + 0.5 * np.sin(2 * np.pi * xx[0] / rng.uniform(24, 64) + rng.uniform(0, 6.3)))
    band = yy < edge[None, :]
    label[band] = amb

    things: List[Tuple[int, np.ndarray]] = []  # (class id, or 255 for the void blob; full-size mask)

    def add_thing(kind: str, cls: int, zone: Tuple[int, int], size_range: Tuple[float, float]) -> np.ndarray:
        max_h = zone[1] - zone[0]
        h = int(min(max_h, round(rng.uniform(*size_range) * S)))
        w = int(min(S, round(rng.uniform(0.8, 1.4) * h)))
        h, w = max(h, 6), max(w, 6)
        r0, c0 = _place(zone, S, h, w, rng)
        m = np.zeros((S, S), dtype=bool)
        m[r0:r0 + h, c0:c0 + w] = _shape_mask(kind, h, w)[: S - r0, : S - c0]
        things.append((cls, m))
        return m

    # --- void blob and distractors in the gap between band and cue zone (context-free)
    gap = (a, a + d)
    if rng.random() < cfg.void_prob:
        add_thing("void", IGNORE, gap, (0.08, 0.15))
    for _ in range(int(rng.integers(0, cfg.max_distractors + 1))):
        dcls = int(rng.choice(DISTRACTORS))
        add_thing(SYNTHETIC_CLASSES[dcls], dcls, gap, (0.12, 0.22))

    # --- the cue: rows >= a + d, so Chebyshev distance to the band is >= d; several instances side by
    # side, each in its own slot of the width, filling most of the cue zone's depth
    zone_h = S - (a + d)
    n_cue = int(rng.integers(cfg.cue_instances[0], cfg.cue_instances[1] + 1))
    slot = S // n_cue
    for j in range(n_cue):
        h = int(round(rng.uniform(0.75, 1.0) * zone_h))
        w = int(round(min(slot, rng.uniform(0.9, 1.5) * h)))
        h, w = max(h, 6), max(min(w, slot), 6)
        r0 = int(rng.integers(a + d, S - h + 1))
        c0 = j * slot + int(rng.integers(0, slot - w + 1))
        m = np.zeros((S, S), dtype=bool)
        m[r0:r0 + h, c0:c0 + w] = _shape_mask(SYNTHETIC_CLASSES[cue], h, w)
        things.append((cue, m))

    # --- paint labels (later things occlude earlier ones) and the ignore rings
    for cls, m in things:
        label[m] = cls
    if cfg.ignore_width > 0:
        for cls, m in things:
            if cls == IGNORE:
                continue
            ring = _dilate(m, cfg.ignore_width) & ~m & ~np.isin(label, [cue])
            label[ring] = IGNORE
    cue_mask = label == cue
    if not cue_mask.any():  # cannot happen: the cue is drawn last and is >= 6 px
        raise RuntimeError(f"synthetic scene {split}/{index}: cue vanished")

    # --- render appearance
    img = np.zeros((S, S, 3), dtype=np.float64)
    painted = np.zeros((S, S), dtype=bool)
    for cls in sorted(set(np.unique(label).tolist()) - {IGNORE}):
        m = label == cls
        img[m] = _texture(_APPEARANCE_OF[cls], yy, xx, rng)[m]
        painted |= m
    # ignore pixels: void blob pixels get clutter, ring pixels get the nearest painted appearance
    void_mask = np.zeros((S, S), dtype=bool)
    for cls, m in things:
        if cls == IGNORE:
            void_mask |= m & (label == IGNORE)
    if void_mask.any():
        img[void_mask] = _texture("void", yy, xx, rng)[void_mask]
        painted |= void_mask
    rest = ~painted
    if rest.any():  # rings: blend of a local box average of painted pixels
        img[rest] = _fill_from_neighbours(img, painted)[rest]

    # --- per-image appearance shift: colour cast, brightness, illumination ramp
    s = cfg.appearance_shift
    gain = 1.0 + s * rng.uniform(-1, 1, size=3)
    bias = s * rng.uniform(-60, 60)
    theta = rng.uniform(0, 2 * np.pi)
    ramp = ((np.cos(theta) * (xx - S / 2) + np.sin(theta) * (yy - S / 2)) / (S / 2))[..., None]
    img = img * gain * (1.0 + 0.5 * s * ramp) + bias
    if cfg.noise_std > 0:
        img = img + rng.normal(0.0, cfg.noise_std, size=img.shape)
    img = np.clip(np.rint(img), 0, 255).astype(np.uint8)

    # --- random orientation of the whole scene (preserves Chebyshev distances)
    rot = int(rng.integers(0, 4))
    img = np.ascontiguousarray(np.rot90(img, rot))
    label = np.ascontiguousarray(np.rot90(label, rot))
    rec = SceneRecord(
        id=f"{split}_{index:05d}", split=split, group=group,
        ambiguous_class=SYNTHETIC_CLASSES[amb], cue_class=SYNTHETIC_CLASSES[cue], rotation=rot,
        band_depth=a, cue_gap=d,
    )
    return img, label, rec


def _fill_from_neighbours(img: np.ndarray, painted: np.ndarray, r: int = 2) -> np.ndarray:
    """Average of painted pixels in a (2r+1)^2 window (used to give ignore rings a plausible colour)."""
    w = painted.astype(np.float64)
    num = np.zeros_like(img)
    den = np.zeros_like(w)
    S0, S1 = w.shape
    pad_i = np.pad(img * w[..., None], ((r, r), (r, r), (0, 0)))
    pad_w = np.pad(w, r)
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            num += pad_i[dy:dy + S0, dx:dx + S1]
            den += pad_w[dy:dy + S0, dx:dx + S1]
    return num / np.maximum(den, 1e-6)[..., None]


# ----------------------------------------------------------------------------------- writing


def save_png(array: np.ndarray, path: Path) -> None:
    """Write a PNG with fixed settings (byte-identical output for identical arrays)."""
    mode = "RGB" if array.ndim == 3 else "L"
    Image.fromarray(array, mode=mode).save(path, format="PNG", compress_level=6, optimize=False)


def split_sizes(cfg: SyntheticConfig) -> Dict[str, int]:
    sizes = {"train": cfg.num_train, "val": cfg.num_val}
    if cfg.num_test > 0:
        sizes["test"] = cfg.num_test
    return sizes


def synthetic_design(cfg: SyntheticConfig, receptive_field: Optional[int] = None) -> Dict[str, object]:
    """Machine-readable description of the benchmark (goes into meta.json)."""
    return {
        "groups": {g: [SYNTHETIC_CLASSES[c] for c in m] for g, m in GROUPS.items()},
        "cue_of": {SYNTHETIC_CLASSES[a]: SYNTHETIC_CLASSES[c] for a, c in CUE_OF.items()},
        "stuff": [SYNTHETIC_CLASSES[c] for c in STUFF + AMBIGUOUS],
        "things": [SYNTHETIC_CLASSES[c] for c in list(CUE_OF.values()) + DISTRACTORS],
        "min_cue_distance": cfg.min_cue_distance,
        "distance_metric": "chebyshev",
        "image_size": cfg.image_size,
        "backbone_receptive_field": receptive_field,
        "config": cfg.model_dump(mode="json"),
    }


def default_receptive_field() -> Optional[int]:
    """Theoretical RF (px) of the default backbone, or None when ctxseg.models cannot tell."""
    try:
        from ctxseg.models import ModelConfig, receptive_field  # type: ignore[attr-defined]

        return int(receptive_field(ModelConfig()))
    except Exception:  # noqa: BLE001 - models package absent or still in progress
        return None


def generate_synthetic(cfg: SyntheticConfig, raw_dir: Path) -> Path:
    """Generate the benchmark into ``raw_dir`` atomically; returns ``raw_dir``.

    Layout: ``images/<split>/<id>.png``, ``labels/<split>/<id>.png``, ``<split>.txt``,
    ``synthetic.json`` (design + one record per image). Skips work if ``raw_dir`` already holds a
    complete set generated from the same config.
    """
    raw_dir = Path(raw_dir)
    stamp = raw_dir / "synthetic.json"
    want = cfg.model_dump(mode="json")
    if stamp.is_file():
        try:
            if json.loads(stamp.read_text())["config"] == want:
                log.info("synthetic dataset in %s is up to date (same config); nothing to do", raw_dir)
                return raw_dir
        except (ValueError, KeyError):
            pass
    rf = default_receptive_field()
    rf_known = rf is not None
    if rf is None:
        log.info("ctxseg.models.receptive_field unavailable; assuming a 64 px receptive field")
        rf = 64
    if cfg.min_cue_distance < rf:
        log.warning(
            "synthetic.min_cue_distance=%d px is below the default model's local receptive field (%d px)%s; "
            "set it >= %d so the cue lies beyond the receptive field of every ambiguous pixel",
            cfg.min_cue_distance, rf,
            " and even within its radius: a local model can see the cue" if 2 * cfg.min_cue_distance <= rf else "",
            rf)
    t0 = time.perf_counter()
    raw_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{raw_dir.name}.", suffix=".tmp", dir=raw_dir.parent))
    try:
        records: List[dict] = []
        sizes = split_sizes(cfg)
        total = sum(sizes.values())
        with tqdm(total=total, desc="generate synthetic", unit="img", disable=None) as bar:
            for split, n in sizes.items():
                (tmp / "images" / split).mkdir(parents=True)
                (tmp / "labels" / split).mkdir(parents=True)
                ids = []
                for i in range(n):
                    img, lbl, rec = generate_scene(cfg, split, i)
                    save_png(img, tmp / "images" / split / f"{rec.id}.png")
                    save_png(lbl, tmp / "labels" / split / f"{rec.id}.png")
                    records.append(rec.__dict__)
                    ids.append(rec.id)
                    bar.update(1)
                (tmp / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
        design = synthetic_design(cfg, rf)
        design["receptive_field_source"] = "ctxseg.models.receptive_field" if rf_known else "assumed (64 px)"
        design["records"] = records
        (tmp / "synthetic.json").write_text(json.dumps(design, indent=1) + "\n")
        if raw_dir.exists():
            trash = tmp.with_name(tmp.name + ".old")
            os.replace(raw_dir, trash)
            os.replace(tmp, raw_dir)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, raw_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("generated %d synthetic images (%s) into %s in %.1f s", total, sizes, raw_dir,
             time.perf_counter() - t0)
    return raw_dir
