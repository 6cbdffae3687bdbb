"""Data at real scale (#16): images keep their original bytes (hard links), labels are written only
where a mapping changes them, the source folder's fingerprint changes with its files, and the
preprocess workers follow the CPUs available."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import ctxseg.data.prepare as prep
from ctxseg.data import DataConfig, SegmentationDataset, download_dataset, prepare_dataset
from ctxseg.data.fingerprint import source_fingerprint


def _photo(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A smooth photo-like image (so JPEG compresses it like a photo)."""
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([np.sin(xx / (7 + 3 * c) + rng.uniform(0, 6)) * np.cos(yy / (11 + c)) for c in range(3)], -1)
    img = 127 + 90 * base + rng.normal(0, 8, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def make_ade_folder(root: Path, n_train: int = 4, n_val: int = 2, seed: int = 0) -> Path:
    """An ADEChallengeData2016-shaped folder: JPEG images, label PNGs with raw ids 0..150."""
    rng = np.random.default_rng(seed)
    d = root / "ADEChallengeData2016"
    for split, sub, n in (("train", "training", n_train), ("val", "validation", n_val)):
        (d / "images" / sub).mkdir(parents=True, exist_ok=True)
        (d / "annotations" / sub).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            stem = f"ADE_{sub}_{i:08d}"
            add_ade_pair(d, sub, stem, rng)
    return root


def add_ade_pair(d: Path, sub: str, stem: str, rng: np.random.Generator, h: int = 48, w: int = 64) -> None:
    Image.fromarray(_photo(rng, h, w)).save(d / "images" / sub / f"{stem}.jpg", quality=90)
    lbl = rng.integers(0, 151, (h, w)).astype(np.uint8)
    Image.fromarray(lbl, mode="L").save(d / "annotations" / sub / f"{stem}.png")


@pytest.fixture
def ade(tmp_path):
    src = make_ade_folder(tmp_path / "src")
    cfg = DataConfig(name="ade20k", source=str(src))
    raw = download_dataset(cfg, tmp_path / "data" / "raw" / "ade20k")
    return cfg, src, raw


def test_jpeg_images_are_hard_linked_and_labels_remapped(ade, tmp_path):
    cfg, src, raw = ade
    out = tmp_path / "data" / "prepared" / "ade20k"
    meta = prepare_dataset(cfg, raw, out)
    assert meta["image_suffix"] == {"train": ".jpg", "val": ".jpg"} and "image_suffix_by_id" not in meta
    d = src / "ADEChallengeData2016"
    for split, sub in (("train", "training"), ("val", "validation")):
        ids = (out / f"{split}.txt").read_text().split()
        assert len(ids) == meta["splits"][split]
        for i in ids:
            source_img = d / "images" / sub / f"{i}.jpg"
            prepared_img = out / "images" / split / f"{i}.jpg"
            # the original file itself, not a re-encoded copy
            assert os.stat(prepared_img).st_ino == os.stat(source_img).st_ino
            assert prepared_img.read_bytes() == source_img.read_bytes()
            # labels: reduce-zero-label, checked against a direct reference
            raw_ids = np.asarray(Image.open(d / "annotations" / sub / f"{i}.png")).astype(np.int64)
            want = np.where(raw_ids == 0, 255, raw_ids - 1)
            assert np.array_equal(np.asarray(Image.open(out / "labels" / split / f"{i}.png")), want)
            assert not (out / "images" / split / f"{i}.png").exists()
    # the loader reads the original JPEG
    ds = SegmentationDataset(out, "train")
    img, lbl = ds.load(0)
    source_img = d / "images" / "training" / f"{ds.ids[0]}.jpg"
    assert ds.image_path(0).suffix == ".jpg" and os.path.samefile(ds.image_path(0), source_img)
    assert np.array_equal(img, np.asarray(Image.open(source_img).convert("RGB")))
    # the source files are untouched: same bytes, still writable
    assert os.access(source_img, os.W_OK)


def test_copy_of_the_original_bytes_where_links_fail(ade, tmp_path, monkeypatch):
    cfg, src, raw = ade

    def no_link(a, b):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(prep.os, "link", no_link)
    out = tmp_path / "prepared"
    prepare_dataset(cfg, raw, out)
    i = (out / "train.txt").read_text().split()[0]
    prepared_img = out / "images" / "train" / f"{i}.jpg"
    source_img = src / "ADEChallengeData2016" / "images" / "training" / f"{i}.jpg"
    assert os.stat(prepared_img).st_ino != os.stat(source_img).st_ino
    assert prepared_img.read_bytes() == source_img.read_bytes()  # a copy of the bytes, never a re-encode


def test_identity_labels_and_png_images_are_linked(tmp_path):
    """The synthetic set's labels already are train ids: nothing is written but labels and manifests."""
    from ctxseg.data import SyntheticConfig

    cfg = DataConfig(synthetic=SyntheticConfig(num_train=4, num_val=2))
    raw = download_dataset(cfg, tmp_path / "raw")
    out = tmp_path / "prepared"
    meta = prepare_dataset(cfg, raw, out)
    assert meta["image_suffix"]["train"] == ".png"
    for split in ("train", "val"):
        for i in (out / f"{split}.txt").read_text().split():
            for kind in ("images", "labels"):
                assert os.path.samefile(out / kind / split / f"{i}.png", raw / kind / split / f"{i}.png")


def test_mixed_formats_and_reencoded_fallback(tmp_path):
    """A split with PNG and JPEG images records the odd suffixes; a format other than JPEG/PNG is
    re-encoded as PNG (the one case where bytes change)."""
    from ctxseg.data.decoders import LutDecoder
    from ctxseg.data.info import get_dataset_info
    from ctxseg.data.types import Sample

    rng = np.random.default_rng(1)
    src = tmp_path / "src"
    src.mkdir()
    samples = []
    for i, fmt in enumerate(["JPEG", "JPEG", "PNG", "BMP"]):
        ext = {"JPEG": ".jpg", "PNG": ".png", "BMP": ".png"}[fmt]  # a BMP misnamed .png
        img = _photo(rng, 40, 40)
        Image.fromarray(img).save(src / f"im{i}{ext}", format=fmt)
        Image.fromarray(rng.integers(0, 5, (40, 40)).astype(np.uint8)).save(src / f"lb{i}.png")
        samples.append(Sample("train", f"s{i}", src / f"im{i}{ext}", src / f"lb{i}.png"))
    info = get_dataset_info("synthetic")
    meta = prep.convert_samples(samples, LutDecoder(), info, tmp_path / "out", workers=1)
    assert meta["image_suffix"] == {"train": ".jpg"}
    assert meta["image_suffix_by_id"] == {"train": {"s2": ".png", "s3": ".png"}}
    ds = SegmentationDataset(tmp_path / "out", "train")
    for k in range(4):
        img, _ = ds.load(k)
        assert np.array_equal(img, np.asarray(Image.open(samples[k].image).convert("RGB")))
    assert os.path.samefile(ds.image_path(2), src / "im2.png")
    assert not os.path.samefile(ds.image_path(3), src / "im3.png")  # BMP: re-encoded
    assert Image.open(ds.image_path(3)).format == "PNG"


def test_source_fingerprint_changes_with_the_folder(ade, tmp_path):
    cfg, src, raw = ade
    before = source_fingerprint(str(src))
    assert before["kind"] == "folder" and before["files"] == 12
    assert source_fingerprint(str(src)) == before  # stable
    link = json.loads((raw / "source.json").read_text())
    assert link["fingerprint"] == before
    d = src / "ADEChallengeData2016"
    add_ade_pair(d, "training", "ADE_training_00000099", np.random.default_rng(5))
    after = source_fingerprint(str(src))
    assert after["digest"] != before["digest"] and after["files"] == 14
    # the download stage's output (a dependency of preprocess) changes with it
    download_dataset(cfg, raw)
    assert json.loads((raw / "source.json").read_text())["fingerprint"] == after
    # a rewritten file with the same name and size changes it too (mtime)
    img = d / "images" / "training" / "ADE_training_00000000.jpg"
    st = img.stat()
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert source_fingerprint(str(src))["digest"] != after["digest"]
    assert source_fingerprint(None)["kind"] == "none"


def test_source_stage_links_data_source_and_never_touches_it(ade, tmp_path, monkeypatch, caplog):
    """data/source/<dataset> is a link DVC follows (download depends on it); re-pointing it, or DVC removing
    it before a re-run, leaves the user's folder as it was; no data.source is a folder saying so; a
    data.source that does not exist is one line, exit 2."""
    from pipeline import source as stage

    cfg, src, raw = ade
    params = tmp_path / "params.yaml"
    params.write_text(f"data:\n  name: ade20k\n  source: {src}\n")
    monkeypatch.setenv("CTXSEG_ROOT", str(tmp_path))
    before = sorted(p.relative_to(src) for p in src.rglob("*"))
    link = tmp_path / "data" / "source" / "ade20k"
    assert stage.main(["--params", str(params)]) == 0
    assert link.is_symlink() and link.resolve() == src.resolve()
    assert stage.main(["--params", str(params)]) == 0 and link.resolve() == src.resolve()
    params.write_text("data:\n  name: ade20k\n  source: null\n")
    assert stage.main(["--params", str(params)]) == 0
    assert not link.is_symlink() and (link / stage.NO_SOURCE).is_file()
    assert sorted(p.relative_to(src) for p in src.rglob("*")) == before, "the user's folder is untouched"
    params.write_text(f"data:\n  name: ade20k\n  source: {tmp_path / 'nowhere'}\n")
    assert stage.main(["--params", str(params)]) == 2
    assert "data.source=" in caplog.text and "nowhere: no such folder or archive" in caplog.text


def test_workers_default_to_the_available_cpus(monkeypatch):
    assert DataConfig().preprocess_workers is None
    monkeypatch.setattr(prep.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert prep.available_cpus() == 16
    assert prep._effective_workers(None, 100_000) == 16
    assert prep._effective_workers(4, 100_000) == 4
    assert prep._effective_workers(None, 600) == 2  # a process per 256 pairs at least
    assert prep._effective_workers(64, 100_000) == 16  # capped by the CPUs


# ------------------------------------------------------------------------- data.name: folder


def make_user_folder(root: Path, classes_yaml: str, raw_values=(0, 1, 2), n=(3, 2), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for split, count in zip(("train", "val"), n):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.fromarray(_photo(rng, 40, 56)).save(root / "images" / split / f"{split}_{i}.jpg", quality=90)
            lbl = rng.choice(np.asarray(raw_values, np.uint8), (40, 56))
            Image.fromarray(lbl, mode="L").save(root / "labels" / split / f"{split}_{i}.png")
    (root / "classes.yaml").write_text(classes_yaml)
    return root


def _prepare_folder(tmp_path, src):
    cfg = DataConfig(name="folder", source=str(src))
    raw = download_dataset(cfg, tmp_path / "data" / "raw" / "folder")
    return prepare_dataset(cfg, raw, tmp_path / "data" / "prepared" / "folder"), tmp_path / "data" / "prepared" / "folder"


def test_folder_dataset_with_an_id_map(tmp_path):
    src = make_user_folder(tmp_path / "mine", "names: [road, car]\npalette: [[128, 64, 128], [0, 0, 142]]\n"
                                              "ignore_index: 0\nid_to_train_id: {7: 0, 26: 1}\n", raw_values=(0, 7, 26))
    meta, out = _prepare_folder(tmp_path, src)
    assert meta["dataset"] == "folder" and meta["class_names"] == ["road", "car"] and meta["num_classes"] == 2
    assert meta["palette"] == [[128, 64, 128], [0, 0, 142]] and meta["splits"] == {"train": 3, "val": 2}
    ref = np.full(256, 99, np.int64)
    ref[[0, 7, 26]] = [255, 0, 1]
    for split in ("train", "val"):
        for i in (out / f"{split}.txt").read_text().split():
            raw_lbl = np.asarray(Image.open(src / "labels" / split / f"{i}.png"))
            assert np.array_equal(np.asarray(Image.open(out / "labels" / split / f"{i}.png")), ref[raw_lbl])
            assert os.path.samefile(out / "images" / split / f"{i}.jpg", src / "images" / split / f"{i}.jpg")
    image, label = SegmentationDataset(out, "val").load(0)
    assert image.shape == (40, 56, 3) and set(np.unique(label)) <= {0, 1, 255}


def test_folder_dataset_identity_labels_are_linked(tmp_path):
    src = make_user_folder(tmp_path / "mine", "names: [a, b, c]\n", raw_values=(0, 1, 2, 255))
    meta, out = _prepare_folder(tmp_path, src)
    assert meta["palette"][1] == [128, 0, 0]  # the VOC colour map by default
    i = (out / "train.txt").read_text().split()[0]
    assert os.path.samefile(out / "labels" / "train" / f"{i}.png", src / "labels" / "train" / f"{i}.png")


@pytest.mark.parametrize("yaml_text, key", [
    ("names: []\n", "names"),
    ("names: [a, b]\ncolours: [[0, 0, 0]]\n", "colours"),
    ("names: [a, b]\npalette: [[0, 0, 0]]\n", "palette"),
    ("names: [a, b]\nignore_index: 1\n", "ignore_index"),
    ("names: [a, b]\nid_to_train_id: {3: 5}\n", "id_to_train_id[3]"),
])
def test_folder_classes_yaml_errors_name_file_and_key(tmp_path, yaml_text, key):
    from ctxseg.errors import UserError

    src = make_user_folder(tmp_path / "mine", yaml_text, raw_values=(0, 1))
    with pytest.raises(UserError) as ei:
        _prepare_folder(tmp_path, src)
    assert str(src / "classes.yaml") in str(ei.value) and f"`{key}`" in str(ei.value)


def test_folder_bad_values_and_missing_split_are_reported(tmp_path):
    from ctxseg.data import DataValidationError

    src = make_user_folder(tmp_path / "mine", "names: [a, b]\n", raw_values=(0, 1, 5))
    with pytest.raises(DataValidationError) as ei:
        _prepare_folder(tmp_path, src)
    assert "labels/train/train_0.png" in str(ei.value) and "[5]" in str(ei.value)
    import shutil

    shutil.rmtree(src / "images" / "val")
    with pytest.raises(DataValidationError, match="images/val"):
        _prepare_folder(tmp_path / "again", src)


@pytest.mark.slow
def test_a_folder_of_own_images_trains_end_to_end_and_a_change_reruns_preprocess(tmp_path):
    """`data.name: folder` through the real `dvc repro`: train, evaluate and report on the user's own
    JPEGs; adding a pair to the folder re-runs download and preprocess (and only then)."""
    import subprocess

    from conftest import TINY, make_project, pipeline_env

    src = make_user_folder(tmp_path / "mine", "names: [ground, thing, sky]\nignore_index: 255\n",
                           raw_values=(0, 1, 2, 255), n=(8, 4))
    overrides = {**{k: v for k, v in TINY.items() if k != "data"},
                 "data": {"name": "folder", "source": str(src), "augment": {"crop_size": [40, 40]}},
                 "train": {**TINY["train"], "epochs": 1},
                 "evaluate": {**TINY["evaluate"], "multi_scale": False},
                 "report": {"complexity": False, "feature_space": False}}
    project = make_project(tmp_path / "study", overrides)

    def repro() -> str:
        done = subprocess.run(["dvc", "repro"], cwd=project, env=pipeline_env(), capture_output=True, text=True,
                              timeout=900)
        assert done.returncode == 0, (done.stdout + done.stderr)[-5000:]
        return done.stdout

    repro()
    metrics = json.loads((project / "metrics" / "fcn.details.json").read_text())
    assert len(metrics["per_class_iou"]) == 3 and 0.0 <= metrics["mIoU"] <= 1.0
    prepared = project / "data" / "prepared" / "folder"
    assert os.path.samefile(prepared / "images" / "train" / "train_0.jpg", src / "images" / "train" / "train_0.jpg")
    assert "| fcn |" in (project / "reports" / "report.md").read_text()
    again = repro()
    assert "Running stage" not in again, again
    status = subprocess.run(["dvc", "status"], cwd=project, env=pipeline_env(), capture_output=True, text=True)
    assert "Data and pipelines are up to date" in status.stdout, status.stdout
    make_user_folder(tmp_path / "extra", "names: [ground, thing, sky]\n", raw_values=(0, 1, 2), n=(1, 0), seed=9)
    for kind, suffix in (("images", "jpg"), ("labels", "png")):
        os.replace(tmp_path / "extra" / kind / "train" / f"train_0.{suffix}", src / kind / "train" / f"added.{suffix}")
    status = subprocess.run(["dvc", "status"], cwd=project, env=pipeline_env(), capture_output=True, text=True)
    assert "download:" in status.stdout and "data/source/folder" in status.stdout, status.stdout
    changed = subprocess.run(["dvc", "repro", "preprocess"], cwd=project, env=pipeline_env(), capture_output=True,
                             text=True, timeout=900)
    assert changed.returncode == 0, changed.stdout + changed.stderr
    assert "Running stage 'preprocess'" in changed.stdout
    assert "added" in (prepared / "train.txt").read_text().split()
