"""The preprocess stage: canonical layout, validation errors, atomicity, parallel conversion."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import ctxseg.data.prepare as prep
from ctxseg.data import (
    DataConfig,
    DataValidationError,
    SyntheticConfig,
    download_dataset,
    example_grid,
    prepare_dataset,
)


@pytest.fixture
def data_raw(tmp_path) -> tuple[DataConfig, Path]:
    cfg = DataConfig(synthetic=SyntheticConfig(num_train=6, num_val=3, num_test=2))
    raw = download_dataset(cfg, tmp_path / "raw" / "synthetic")
    return cfg, raw


def _leftovers(parent: Path) -> list:
    return [p.name for p in parent.iterdir() if p.name.startswith(".")] if parent.exists() else []


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_canonical_layout_and_meta(data_raw, tmp_path):
    cfg, raw = data_raw
    out = tmp_path / "prepared" / "synthetic"
    meta = prepare_dataset(cfg, raw, out)
    assert json.loads((out / "meta.json").read_text()) == meta
    assert meta["dataset"] == "synthetic" and meta["num_classes"] == 13 and meta["ignore_index"] == 255
    assert meta["splits"] == {"train": 6, "val": 3, "test": 2}
    assert len(meta["class_names"]) == len(meta["palette"]) == 13
    assert meta["synthetic"]["min_cue_distance"] == 64 and "records" not in meta["synthetic"]
    for split, n in meta["splits"].items():
        ids = (out / f"{split}.txt").read_text().split()
        assert len(ids) == n
        counts = np.zeros(13, dtype=np.int64)
        for i in ids:
            img = Image.open(out / "images" / split / f"{i}.png")
            lbl = Image.open(out / "labels" / split / f"{i}.png")
            assert img.mode == "RGB" and lbl.mode == "L" and img.size == lbl.size
            a = np.asarray(lbl)
            counts += np.bincount(a[a != 255], minlength=13)
        assert meta["class_pixel_count"][split] == counts.tolist()
        assert abs(sum(meta["class_pixel_frequency"][split]) - 1.0) < 1e-6
    assert _leftovers(out.parent) == []


def test_corrupt_image_is_named(data_raw, tmp_path):
    cfg, raw = data_raw
    bad = raw / "images" / "train" / "train_00001.png"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])  # truncated PNG
    bad2 = raw / "images" / "val" / "val_00000.png"
    bad2.write_bytes(b"this is not an image")
    out = tmp_path / "prepared"
    with pytest.raises(DataValidationError) as ei:
        prepare_dataset(cfg, raw, out)
    msg = str(ei.value)
    assert str(bad) in msg and str(bad2) in msg
    assert "corrupt or truncated" in msg and "re-download" in msg
    assert len(ei.value.problems) == 2
    assert not out.exists() and _leftovers(out.parent) == []


def test_out_of_range_label_and_size_mismatch(data_raw, tmp_path):
    cfg, raw = data_raw
    lbl_path = raw / "labels" / "train" / "train_00002.png"
    lbl = np.asarray(Image.open(lbl_path)).copy()
    lbl[0, 0] = 20
    lbl[0, 1] = 254
    Image.fromarray(lbl).save(lbl_path)
    small = raw / "labels" / "val" / "val_00001.png"
    Image.fromarray(np.zeros((10, 12), dtype=np.uint8)).save(small)
    out = tmp_path / "prepared"
    with pytest.raises(DataValidationError) as ei:
        prepare_dataset(cfg, raw, out)
    msg = str(ei.value)
    assert f"{lbl_path}: label values [20, 254] are out of range: allowed are 0..12 and 255" in msg
    assert str(small) in msg and "size mismatch" in msg and "12x10" in msg
    assert not out.exists()


def test_missing_label_file_is_named(data_raw, tmp_path):
    cfg, raw = data_raw
    (raw / "labels" / "train" / "train_00003.png").unlink()
    with pytest.raises(DataValidationError, match="train_00003.png: label file is missing"):
        prepare_dataset(cfg, raw, tmp_path / "prepared")


def test_interrupted_preprocess_leaves_no_partial_output(data_raw, tmp_path, monkeypatch):
    cfg, raw = data_raw
    out = tmp_path / "prepared" / "synthetic"
    real = prep.convert_one
    calls = {"n": 0}

    def flaky(job):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of the conversion
        return real(job)

    monkeypatch.setattr(prep, "convert_one", flaky)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(cfg, raw, out)
    assert calls["n"] == 4
    assert not out.exists() and _leftovers(out.parent) == []

    # a complete earlier output survives an interrupted re-run untouched
    monkeypatch.setattr(prep, "convert_one", real)
    prepare_dataset(cfg, raw, out)
    before = _tree(out)
    calls["n"] = 0
    monkeypatch.setattr(prep, "convert_one", flaky)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(cfg, raw, out)
    assert _tree(out) == before and _leftovers(out.parent) == []


def test_process_pool_matches_serial(data_raw, tmp_path, monkeypatch):
    cfg, raw = data_raw
    serial = tmp_path / "serial"
    pooled = tmp_path / "pooled"
    prepare_dataset(cfg, raw, serial)
    monkeypatch.setattr(prep, "MIN_PAIRS_PER_WORKER", 1)
    assert prep._effective_workers(2, 11) == min(2, __import__("os").cpu_count() or 1)
    prepare_dataset(cfg.model_copy(update={"preprocess_workers": 2}), raw, pooled)
    assert _tree(serial) == _tree(pooled)


def test_example_grid(data_raw, tmp_path):
    cfg, raw = data_raw
    out = tmp_path / "prepared"
    meta = prepare_dataset(cfg, raw, out)
    grid = example_grid(out, "val", n=3, columns=2, gap=2)
    # two rows x two cells of (128 image + 2 gap + 128 label + 2 pad)
    assert grid.shape == (2 * 130, 2 * 260, 3) and grid.dtype == np.uint8
    first_label = np.asarray(Image.open(out / "labels" / "val" / "val_00000.png"))
    v = int(first_label[64, 64])
    expected = (0, 0, 0) if v == 255 else tuple(meta["palette"][v])
    assert tuple(grid[64, 130 + 64]) == expected
