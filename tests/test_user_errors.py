"""#14: every user error is one message and exit 2 (no traceback unless ``--debug``); the data's problems
are reported together; ``data.source`` always wins over what an earlier download left behind.

The stage tests run the real entry points (``python -m pipeline.<stage>``) in a scratch folder holding
only a params file and the data the case needs.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import numpy as np
import pytest
from PIL import Image

from ctxseg.config import ConfigError
from ctxseg.data import DataConfig, DataValidationError, download_dataset, prepare_dataset
from ctxseg.data.extract import CorruptArchiveError
from ctxseg.data.types import ChecksumError, DownloadError, LayoutError, UnsafeArchiveError
from ctxseg.errors import EXIT_USER_ERROR, UserError
from tests.conftest import ROOT, pipeline_env


def test_every_user_error_class_is_a_user_error():
    from ctxseg.checkpoint import ModelFileError
    from ctxseg.prediction import PredictError

    for cls in (ConfigError, DataValidationError, LayoutError, DownloadError, ChecksumError, UnsafeArchiveError,
                CorruptArchiveError, ModelFileError, PredictError):
        assert issubclass(cls, UserError), cls
    assert EXIT_USER_ERROR == 2


# --------------------------------------------------------------------------------------- raw data


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def camvid_folder(root: Path, problems: Tuple[str, ...] = ()) -> Path:
    """A CamVid folder in the SegNet layout with two good pairs and the requested problems:
    missing_label, unpaired_label, corrupt_image, out_of_range, newline_name, leading_space."""
    src = root / "CamVid"
    image = np.full((8, 8, 3), 90, np.uint8)
    label = np.zeros((8, 8), np.uint8)
    label[:, 4:] = 3

    def pair(split: str, stem: str, img=True, lbl=True, lbl_array=label):
        if img:
            _png(src / split / f"{stem}.png", image)
        if lbl:
            _png(src / f"{split}annot" / f"{stem}.png", lbl_array)

    pair("train", "good_a")
    pair("val", "good_b")
    for p in problems:
        if p == "missing_label":
            pair("train", "no_label", lbl=False)
        elif p == "unpaired_label":
            pair("val", "no_image", img=False)
        elif p == "corrupt_image":
            pair("train", "corrupt")
            (src / "train" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
        elif p == "out_of_range":
            pair("train", "range", lbl_array=np.full((8, 8), 50, np.uint8))
        elif p == "newline_name":
            pair("train", "new\nline")
        elif p == "leading_space":
            pair("val", " lead")
        else:  # pragma: no cover
            raise ValueError(p)
    return src


ALL_PROBLEMS = ("missing_label", "unpaired_label", "corrupt_image", "out_of_range", "newline_name", "leading_space")
PROBLEM_FILES = {
    "missing_label": "train/no_label.png",
    "unpaired_label": "valannot/no_image.png",
    "corrupt_image": "train/corrupt.png",
    "out_of_range": "trainannot/range.png",
    "newline_name": "train/new\nline.png",
    "leading_space": "val/ lead.png",
}


def _tree(root: Path) -> Dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------- problems reported together


def test_preprocess_reports_every_problem_in_one_pass(tmp_path, caplog):
    src = camvid_folder(tmp_path, ALL_PROBLEMS)
    cfg = DataConfig(name="camvid", source=str(src))
    raw = tmp_path / "data" / "raw" / "camvid"
    with caplog.at_level(logging.WARNING, logger="ctxseg.data.download"):
        download_dataset(cfg, raw)  # the download stage does not stop at the first missing label ...
    warned = "\n".join(r.getMessage() for r in caplog.records)
    # ... it lists every problem it can see without decoding (pairs and names) in one warning
    for p in ("missing_label", "unpaired_label", "newline_name", "leading_space"):
        assert PROBLEM_FILES[p].split("/")[-1].replace("\n", "\\n") in warned, (p, warned)
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1

    out = tmp_path / "data" / "prepared" / "camvid"
    with pytest.raises(DataValidationError) as info:
        prepare_dataset(cfg, raw, out)
    err = info.value
    reported = {str(Path(f).relative_to(src)) for f, _ in err.problems}
    assert set(PROBLEM_FILES.values()) <= reported, reported
    msg = str(err)
    assert "6 invalid image/label pair(s)" in msg and "nothing was written" in msg
    assert "label values [50]" in msg or "raw label values [50]" in msg
    # a newline in a file name cannot break (or forge) a line of the listing
    assert repr(str(src / "train" / "new\nline.png")) in msg
    assert all(line.startswith(("  ", "6 invalid")) for line in msg.splitlines()), msg
    assert not out.exists()


def test_clean_data_after_the_fix_prepares(tmp_path):
    src = camvid_folder(tmp_path)
    cfg = DataConfig(name="camvid", source=str(src))
    raw = download_dataset(cfg, tmp_path / "data" / "raw" / "camvid")
    meta = prepare_dataset(cfg, raw, tmp_path / "data" / "prepared" / "camvid")
    assert meta["splits"] == {"train": 1, "val": 1}


# ------------------------------------------------------------------- data.source always wins


def _prepared_from(tmp_path: Path, name: str) -> Tuple[DataConfig, Path, Path]:
    src = camvid_folder(tmp_path / name)
    cfg = DataConfig(name="camvid", source=str(src))
    raw = download_dataset(cfg, tmp_path / "repo" / "data" / "raw" / "camvid")
    out = tmp_path / "repo" / "data" / "prepared" / "camvid"
    prepare_dataset(cfg, raw, out)
    return cfg, raw, out


def test_a_changed_source_wins_over_a_stale_source_json(tmp_path):
    cfg_a, raw, out = _prepared_from(tmp_path, "a")
    assert (raw / "source.json").is_file()
    before = _tree(out)
    src_b = camvid_folder(tmp_path / "b", ("missing_label",))
    cfg_b = DataConfig(name="camvid", source=str(src_b))
    # preprocess before the download stage ran with the new source: refused, prepared data untouched
    with pytest.raises(DataValidationError) as info:
        prepare_dataset(cfg_b, raw, out)
    msg = str(info.value)
    assert "refusing to prepare" in msg and str(src_b) in msg and "download" in msg
    assert _tree(out) == before
    # the download stage with the new source replaces the stale record
    download_dataset(cfg_b, raw)
    assert json.loads((raw / "source.json").read_text())["path"] == str(src_b.resolve())
    assert json.loads((raw / "download.json").read_text())["source"] == str(src_b.resolve())
    with pytest.raises(DataValidationError, match="no_label.png"):  # now B's own problems are reported
        prepare_dataset(cfg_b, raw, out)
    # no source at all (the official download) is not the linked folder either
    with pytest.raises(DataValidationError, match="refusing to prepare"):
        prepare_dataset(DataConfig(name="camvid"), raw, out)


def test_a_failed_download_keeps_the_previous_data_and_preprocess_refuses(tmp_path):
    cfg_a, raw, out = _prepared_from(tmp_path, "a")
    raw_before, out_before = _tree(raw), _tree(out)
    bad = tmp_path / "camvid-bad.tgz"
    bad.write_bytes(b"\x1f\x8b\x08\x00 this is not a whole gzip file")
    cfg_bad = DataConfig(name="camvid", source=str(bad), verify_checksums=False)
    with pytest.raises(CorruptArchiveError, match="camvid-bad.tgz"):
        download_dataset(cfg_bad, raw)
    assert _tree(raw) == raw_before and _tree(out) == out_before
    with pytest.raises(DataValidationError) as info:
        prepare_dataset(cfg_bad, raw, out)
    assert "refusing to prepare" in str(info.value) and str(bad) in str(info.value)
    assert _tree(out) == out_before
    # the same params as before still prepare (nothing was damaged)
    prepare_dataset(cfg_a, raw, out)


# ------------------------------------------------------------------------------------ stage CLIs


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _hostile_tgz(tmp_path: Path) -> Path:
    import io
    import tarfile

    arc = tmp_path / "camvid-hostile.tgz"
    with tarfile.open(arc, "w:gz") as tf:
        ti = tarfile.TarInfo("camvid/images/x.png")
        ti.type, ti.linkname = tarfile.LNKTYPE, "../../outside.txt"
        tf.addfile(ti)
        data = b"overwrite"
        ti = tarfile.TarInfo("camvid/codes.txt")
        ti.size = len(data)
        tf.addfile(ti, io.BytesIO(data))
    return arc


def _good_tgz(tmp_path: Path) -> Path:
    import tarfile

    src = camvid_folder(tmp_path / "staged")
    arc = tmp_path / "camvid.tgz"
    with tarfile.open(arc, "w:gz") as tf:
        tf.add(src, arcname="CamVid")
    return arc


def _raw_from(repo: Path, cfg: DataConfig) -> None:
    download_dataset(cfg, repo / "data" / "raw" / "camvid")


Case = Callable[[Path, Path], Tuple[str, object, List[str], List[str]]]


def _params_case(text: str, stage: str = "download", extra: Tuple[str, ...] = ()):
    def case(tmp: Path, repo: Path):
        return stage, text, list(extra), []
    return case


def case_unsafe_archive(tmp, repo):
    arc = _hostile_tgz(tmp)
    return "download", {"data": {"name": "camvid", "source": str(arc), "verify_checksums": False}}, [], \
        ["refusing to extract", "camvid/images/x.png", "hard link"]


def case_corrupt_archive(tmp, repo):
    arc = _good_tgz(tmp)
    arc.write_bytes(arc.read_bytes()[:200])
    cut = arc.with_name("camvid-cut.tgz")
    arc.rename(cut)
    return "download", {"data": {"name": "camvid", "source": str(cut)}}, [], ["camvid-cut.tgz", "truncated"]


def case_checksum(tmp, repo):
    arc = _good_tgz(tmp)
    return "download", {"data": {"name": "camvid", "source": str(arc),
                                 "checksums": {"camvid.tgz": "sha256:" + "0" * 64}}}, [], \
        ["checksum mismatch", "override checksum failed", "data.checksums['camvid.tgz']"]


def case_published_checksum(tmp, repo):
    arc = _good_tgz(tmp)
    return "download", {"data": {"name": "camvid", "source": str(arc)}}, [], \
        ["published checksum failed", "648371e4f3a833682afb39b08a3ce2aa"]


def case_download_failure(tmp, repo):
    return "download", {"data": {"name": "camvid", "mirror": f"http://127.0.0.1:{_closed_port()}",
                                 "download_retries": 0, "download_timeout": 5}}, [], \
        ["camvid.tgz", "failed after 1 attempts", "data.source"]


def case_corrupt_image(tmp, repo):
    cfg = DataConfig(name="camvid", source=str(camvid_folder(tmp, ("corrupt_image",))))
    _raw_from(repo, cfg)
    return "preprocess", {"data": {"name": "camvid", "source": cfg.source}}, [], ["corrupt.png", "cannot be read"]


def case_label_out_of_range(tmp, repo):
    cfg = DataConfig(name="camvid", source=str(camvid_folder(tmp, ("out_of_range",))))
    _raw_from(repo, cfg)
    return "preprocess", {"data": {"name": "camvid", "source": cfg.source}}, [], ["range.png", "[50]"]


def case_stale_source(tmp, repo):
    cfg = DataConfig(name="camvid", source=str(camvid_folder(tmp / "a")))
    _raw_from(repo, cfg)
    other = camvid_folder(tmp / "b")
    return "preprocess", {"data": {"name": "camvid", "source": str(other)}}, [], ["refusing to prepare", str(other)]


def case_tampered_model_file(tmp, repo):
    class Boom:
        def __reduce__(self):
            return (os.system, (f"touch {tmp / 'pwned'}",))

    model = tmp / "model.pt"
    model.write_bytes(pickle.dumps({"model": Boom(), "model_config": {}, "num_classes": 2}))
    _png(tmp / "in.png", np.zeros((8, 8, 3), np.uint8))
    return "predict", {"data": {"name": "camvid"}}, \
        ["--model", str(model), "--input", str(tmp / "in.png"), "--output", str(tmp / "out")], \
        ["model.pt", "refused: it holds objects other than weights", "nothing in it ran"]


CASES: Dict[str, Case] = {
    "params_typo": _params_case("data:\n  nmae: camvid\n"),
    "params_typo_train": _params_case("train:\n  epcohs: 3\n", "train", ("--model", "fcn")),
    "params_typo_evaluate": _params_case("evaluate:\n  splt: val\n", "evaluate", ("--model", "fcn")),
    "params_typo_tune": _params_case("tune:\n  epoch: 3\n", "tune"),
    "params_typo_report": _params_case("report:\n  sweep: true\n", "report"),
    "params_typo_register": _params_case("mlflow:\n  experimnt: x\n", "register"),
    "params_empty": _params_case(""),
    "params_duplicate_key": _params_case("seed: 1\ntrain: {epochs: 2}\nseed: 2\n"),
    "params_model_name_newline": _params_case(json.dumps({"models": {"fcn\n": {}}}), "train", ("--model", "fcn")),
    "params_experiment_escape": _params_case("mlflow:\n  experiment: ../../x\n", "report"),
    "params_bad_mirror": _params_case("data:\n  name: camvid\n  mirror: not a url\n"),
    "unsafe_archive": case_unsafe_archive,
    "corrupt_archive": case_corrupt_archive,
    "override_checksum": case_checksum,
    "published_checksum": case_published_checksum,
    "download_failure": case_download_failure,
    "corrupt_image": case_corrupt_image,
    "label_out_of_range": case_label_out_of_range,
    "stale_source": case_stale_source,
    "tampered_model_file": case_tampered_model_file,
}
EXPECT_PARAMS = {
    "params_typo": ["`data.nmae`: unknown key", "Did you mean `data.name`?"],
    "params_typo_train": ["`train.epcohs`: unknown key"],
    "params_typo_evaluate": ["`evaluate.splt`: unknown key"],
    "params_typo_tune": ["`tune.epoch`: unknown key"],
    "params_typo_report": ["`report.sweep`: unknown key"],
    "params_typo_register": ["`mlflow.experimnt`: unknown key"],
    "params_empty": ["params.yaml: the file is empty"],
    "params_duplicate_key": ["line 3: key 'seed' is given twice", "first on line 1"],
    "params_model_name_newline": ["model name 'fcn\\n' must start with a letter or digit"],
    "params_experiment_escape": ["`mlflow.experiment`", "'../../x'", "must not leave the artifact root"],
    "params_bad_mirror": ["`data.mirror`", "not a URL"],
}


def run_stage(repo: Path, stage: str, params, extra: List[str], debug: bool = False) -> subprocess.CompletedProcess:
    text = params if isinstance(params, str) else json.dumps(params)
    (repo / "params.yaml").write_text(text)
    cmd = [sys.executable, "-m", f"pipeline.{stage}", "--params", "params.yaml", *extra] + (["--debug"] if debug else [])
    return subprocess.run(cmd, cwd=repo, env=pipeline_env({"PYTHONPATH": str(ROOT)}), capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("name", list(CASES))
def test_user_error_exits_2_with_one_message_and_no_traceback(tmp_path, name):
    repo = tmp_path / "repo"
    repo.mkdir()
    stage, params, extra, expect = CASES[name](tmp_path, repo)
    expect = expect or EXPECT_PARAMS[name]
    proc = run_stage(repo, stage, params, extra)
    err = proc.stderr
    assert proc.returncode == 2, f"exit {proc.returncode}\n{err}"
    assert "Traceback" not in err, err
    errors = [ln for ln in err.splitlines() if " ERROR " in ln]
    assert len(errors) == 1, err  # one message (it may span lines: a listing)
    for text in expect:
        assert text in err, f"{text!r} not in:\n{err}"
    assert not (tmp_path / "pwned").exists(), "a pickled payload ran"


def test_debug_shows_the_traceback_of_a_user_error(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    proc = run_stage(repo, "download", "data:\n  nmae: camvid\n", [], debug=True)
    assert proc.returncode == 2 and "Traceback" in proc.stderr and "`data.nmae`: unknown key" in proc.stderr


def test_bad_archive_via_the_recording_path_is_a_corrupt_archive(tmp_path):
    """No published checksum (another file name) + a truncated archive: it is neither recorded as
    trusted nor extracted, and the error is a user error naming the file."""
    arc = _good_tgz(tmp_path)
    cut = tmp_path / "camvid-local.tgz"
    cut.write_bytes(arc.read_bytes()[:300])
    cfg = DataConfig(name="camvid", source=str(cut))
    with pytest.raises(CorruptArchiveError, match="camvid-local.tgz"):
        download_dataset(cfg, tmp_path / "data" / "raw" / "camvid")
    book = tmp_path / "data" / "raw" / "_downloads" / "checksums.json"
    assert not book.exists() or "camvid-local.tgz" not in json.loads(book.read_text())


def test_checksum_of_the_hostile_archive_is_what_failed(tmp_path):
    """Sanity: the override in case_checksum is wrong only in the digest; the real one passes."""
    arc = _good_tgz(tmp_path)
    digest = "sha256:" + hashlib.sha256(arc.read_bytes()).hexdigest()
    cfg = DataConfig(name="camvid", source=str(arc), checksums={"camvid.tgz": digest})
    download_dataset(cfg, tmp_path / "data" / "raw" / "camvid")


def test_malformed_recorded_checksum_and_url_are_user_errors(tmp_path):
    from ctxseg.data.download import ChecksumBook, http_download, verify_file

    f = tmp_path / "x.bin"
    f.write_bytes(b"data")
    book = ChecksumBook(tmp_path / "checksums.json")
    book.path.write_text(json.dumps({"x.bin": "sha256"}))  # hand-edited, no digest
    with pytest.raises(ChecksumError, match=r"bad checksum spec 'sha256'.*checksums.json \(recorded for x.bin\)"):
        verify_file(f, None, book)
    book.path.write_text("[1, 2]")  # not a mapping: ignored with a warning, a fresh sha256 is recorded
    assert verify_file(f, None, book).startswith("sha256:")
    with pytest.raises(DownloadError, match="check data.mirror"):
        http_download("not a url/x.bin", tmp_path / "x2.bin", retries=0)
