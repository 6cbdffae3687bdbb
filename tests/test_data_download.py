"""Download stage: resumable HTTP from a local 127.0.0.1 server, checksums, safe extraction, errors."""
from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import tarfile
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ctxseg.data import DataConfig, download_dataset, prepare_dataset
from ctxseg.data.download import (
    ChecksumError,
    DownloadError,
    UnsafeArchiveError,
    check_archive,
    http_download,
    safe_extract,
)


class _Handler(http.server.BaseHTTPRequestHandler):
    files: dict = {}
    log: list = []
    drop_after: dict = {}  # name -> bytes to send before dropping the connection (once)
    ignore_range: bool = False

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):
        name = self.path.lstrip("/")
        rng = self.headers.get("Range")
        type(self).log.append((name, rng))
        data = self.files.get(name)
        if data is None:
            self.send_error(404)
            return
        start = 0
        if rng and not self.ignore_range:
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        cut = self.drop_after.pop(name, None)
        if cut is not None:
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture
def data_server():
    handler = type("H", (_Handler,), {"files": {}, "log": [], "drop_after": {}, "ignore_range": False})
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    th = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    th.start()
    yield handler, f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def _payload(n=300_000, seed=0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def test_resume_partial_download_with_range(data_server, tmp_path):
    handler, base = data_server
    data = _payload()
    handler.files["big.bin"] = data
    dest = tmp_path / "big.bin"
    (tmp_path / "big.bin.part").write_bytes(data[:123_456])  # left by an earlier interrupted run
    md5 = hashlib.md5(data).hexdigest()
    http_download(f"{base}/big.bin", dest, expected=f"md5:{md5}", retries=0)
    assert dest.read_bytes() == data
    assert not (tmp_path / "big.bin.part").exists()
    assert handler.log == [("big.bin", "bytes=123456-")]


def test_dropped_connection_is_resumed(data_server, tmp_path):
    handler, base = data_server
    data = _payload(seed=1)
    handler.files["f.bin"] = data
    handler.drop_after["f.bin"] = 100_000
    dest = tmp_path / "f.bin"
    http_download(f"{base}/f.bin", dest, expected=f"sha1:{hashlib.sha1(data).hexdigest()}", retries=2, backoff=0)
    assert dest.read_bytes() == data
    assert handler.log[0] == ("f.bin", None)
    assert handler.log[1] == ("f.bin", "bytes=100000-")


def test_server_ignoring_range_restarts_cleanly(data_server, tmp_path):
    handler, base = data_server
    data = _payload(seed=2)
    handler.files["g.bin"] = data
    handler.ignore_range = True
    (tmp_path / "g.bin.part").write_bytes(b"x" * 5000)
    http_download(f"{base}/g.bin", tmp_path / "g.bin", expected=f"md5:{hashlib.md5(data).hexdigest()}", retries=0)
    assert (tmp_path / "g.bin").read_bytes() == data


def test_checksum_mismatch(data_server, tmp_path):
    handler, base = data_server
    handler.files["a.zip"] = _payload(1000)
    dest = tmp_path / "a.zip"
    with pytest.raises(ChecksumError) as ei:
        http_download(f"{base}/a.zip", dest, expected="md5:" + "0" * 32, retries=0)
    msg = str(ei.value)
    assert "checksum mismatch" in msg and "0" * 32 in msg and hashlib.md5(handler.files["a.zip"]).hexdigest() in msg
    assert str(dest) in msg and "data.checksums" in msg
    assert not dest.exists() and not (tmp_path / "a.zip.part").exists()


# ------------------------------------------------------------------------------ fabricated CamVid


def _png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    tf.addfile(ti, io.BytesIO(data))


def _fastai_camvid_tgz() -> bytes:
    codes = ["Animal", "Archway", "Bicyclist", "Bridge", "Building", "Car", "CartLuggagePram", "Child",
             "Column_Pole", "Fence", "LaneMkgsDriv", "LaneMkgsNonDriv", "Misc_Text", "MotorcycleScooter",
             "OtherMoving", "ParkingBlock", "Pedestrian", "Road", "RoadShoulder", "Sidewalk", "SignSymbol", "Sky",
             "SUVPickupTruck", "TrafficCone", "TrafficLight", "Train", "Tree", "Truck_Bus", "Tunnel",
             "VegetationMisc", "Void", "Wall"]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        _add(tf, "camvid/codes.txt", ("\n".join(codes) + "\n").encode())
        _add(tf, "camvid/valid.txt", b"0016E5_00001.png\n")
        for k, stem in enumerate(["0001TP_006690", "0001TP_006720", "0016E5_00001"]):
            img = np.full((12, 16, 3), 40 * k, dtype=np.uint8)
            lbl = np.zeros((12, 16), dtype=np.uint8)
            lbl[:, :4] = codes.index("Sky")
            lbl[:, 4:8] = codes.index("Wall")  # -> building
            lbl[:, 8:12] = codes.index("Void")  # -> ignore
            lbl[:, 12:] = codes.index("Child")  # -> pedestrian
            _add(tf, f"camvid/images/{stem}.png", _png_bytes(img))
            _add(tf, f"camvid/labels/{stem}_P.png", _png_bytes(lbl))
    return buf.getvalue()


def test_download_dataset_from_local_mirror_then_prepare(data_server, tmp_path):
    handler, base = data_server
    tgz = _fastai_camvid_tgz()
    handler.files["camvid.tgz"] = tgz
    cfg = DataConfig(name="camvid", mirror=base, download_dir=str(tmp_path / "dl"), download_retries=0,
                     checksums={"camvid.tgz": f"sha256:{hashlib.sha256(tgz).hexdigest()}"})
    raw = download_dataset(cfg, tmp_path / "raw" / "camvid")
    assert (tmp_path / "dl" / "camvid.tgz").read_bytes() == tgz
    assert json.loads((raw / "download.json").read_text())["pairs_found"] == 3
    # a second run finds the verified archive and the extracted data: no new request, same output
    n_requests = len(handler.log)
    mtime = (raw / "download.json").stat().st_mtime_ns
    download_dataset(cfg, raw)
    assert len(handler.log) == n_requests and (raw / "download.json").stat().st_mtime_ns == mtime
    meta = prepare_dataset(cfg, raw, tmp_path / "prep")
    assert meta["splits"] == {"train": 2, "val": 1} and meta["num_classes"] == 11
    lbl = np.asarray(Image.open(tmp_path / "prep" / "labels" / "val" / "0016E5_00001.png"))
    assert lbl[0, :4].tolist() == [0] * 4  # sky
    assert lbl[0, 4:8].tolist() == [1] * 4  # wall -> building
    assert lbl[0, 8:12].tolist() == [255] * 4  # void -> ignore
    assert lbl[0, 12:].tolist() == [9] * 4  # child -> pedestrian
    # the published md5 of the real camvid.tgz does not match the fabricated one
    cfg2 = cfg.model_copy(update={"checksums": {}})
    with pytest.raises(ChecksumError, match="648371e4f3a833682afb39b08a3ce2aa"):
        download_dataset(cfg2, tmp_path / "raw2")


def _zip_bytes(files: dict) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def test_recorded_sha256_verified_afterwards(data_server, tmp_path):
    handler, base = data_server
    data = _zip_bytes({"cocostuff-10k-v1.1/readme.txt": b"coco-stuff-10k-archive" * 100})
    handler.files["cocostuff-10k-v1.1.zip"] = data
    cfg = DataConfig(name="coco_stuff10k", mirror=base, download_dir=str(tmp_path / "dl"), download_retries=0)
    # no published checksum: first download records a sha256 of the complete archive, keyed by its own
    # name (the fabricated zip lacks the layout, so the layout check fails afterwards, but the record stays)
    with pytest.raises(DownloadError, match="cannot find cocostuff-10k-v1.1"):
        download_dataset(cfg, tmp_path / "raw")
    book = json.loads((tmp_path / "dl" / "checksums.json").read_text())
    assert book == {"cocostuff-10k-v1.1.zip": f"sha256:{hashlib.sha256(data).hexdigest()}"}
    local = tmp_path / "dl" / "cocostuff-10k-v1.1.zip"
    local.write_bytes(data[:-1] + b"X")  # corrupted later
    with pytest.raises(ChecksumError, match="recorded in") as ei:
        download_dataset(cfg, tmp_path / "raw")
    msg = str(ei.value)
    assert "recorded checksum failed" in msg and "published" not in msg and ".part" not in msg
    assert f"python -m ctxseg.data.download --record {local}" in msg


def test_truncated_first_download_is_not_recorded(data_server, tmp_path):
    """A served file that is itself truncated (consistent Content-Length) lists incompletely: refused,
    deleted, not recorded; the complete file is then accepted and recorded."""
    handler, base = data_server
    good = _zip_bytes({f"cocostuff-10k-v1.1/f{i}.txt": _payload(20_000, seed=i) for i in range(4)})
    handler.files["cocostuff-10k-v1.1.zip"] = good[: len(good) // 2]
    cfg = DataConfig(name="coco_stuff10k", mirror=base, download_dir=str(tmp_path / "dl"), download_retries=0)
    with pytest.raises(DownloadError) as ei:
        download_dataset(cfg, tmp_path / "raw")
    msg = str(ei.value)
    assert "incomplete or damaged" in msg and "not recorded" in msg and "cocostuff-10k-v1.1.zip" in msg
    assert ".part" not in msg.split("(")[0]
    assert not (tmp_path / "dl" / "checksums.json").exists()
    assert not (tmp_path / "dl" / "cocostuff-10k-v1.1.zip").exists()
    assert not (tmp_path / "dl" / "cocostuff-10k-v1.1.zip.part").exists()
    # a connection dropped before Content-Length bytes arrived: kept for resuming, not recorded
    handler.files["cocostuff-10k-v1.1.zip"] = good
    handler.drop_after["cocostuff-10k-v1.1.zip"] = 1000
    with pytest.raises(DownloadError, match="nothing was recorded"):
        download_dataset(cfg, tmp_path / "raw")
    assert not (tmp_path / "dl" / "checksums.json").exists()
    assert (tmp_path / "dl" / "cocostuff-10k-v1.1.zip.part").stat().st_size == 1000
    # the complete file is accepted (resumed) and recorded under the archive's own name
    with pytest.raises(DownloadError, match="cannot find cocostuff-10k-v1.1"):
        download_dataset(cfg, tmp_path / "raw")
    book = json.loads((tmp_path / "dl" / "checksums.json").read_text())
    assert book == {"cocostuff-10k-v1.1.zip": f"sha256:{hashlib.sha256(good).hexdigest()}"}


def test_checksum_messages_name_the_kind(tmp_path):
    arc = tmp_path / "camvid.tgz"
    with tarfile.open(arc, "w:gz") as tf:
        _add(tf, "x/readme.txt", b"x")
    with pytest.raises(ChecksumError, match=r"\(published checksum failed\)"):
        download_dataset(DataConfig(name="camvid", source=str(arc)), tmp_path / "raw")
    with pytest.raises(ChecksumError, match=r"\(override checksum failed\).*your override data.checksums"):
        download_dataset(DataConfig(name="camvid", source=str(arc), checksums={"camvid.tgz": "md5:" + "1" * 32}),
                         tmp_path / "raw")


def test_rerecord_command(tmp_path):
    from ctxseg.data.download import main

    arc = tmp_path / "stuff.zip"
    arc.write_bytes(_zip_bytes({"a.txt": b"a"}))
    book = tmp_path / "checksums.json"
    assert main(["--record", str(arc), "--book", str(book)]) == 0
    assert json.loads(book.read_text()) == {"stuff.zip": f"sha256:{hashlib.sha256(arc.read_bytes()).hexdigest()}"}
    arc.write_bytes(arc.read_bytes()[:30])  # a truncated file is never recorded
    assert main(["--record", str(arc), "--book", str(book)]) == 2
    assert json.loads(book.read_text())["stuff.zip"] != f"sha256:{hashlib.sha256(arc.read_bytes()).hexdigest()}"


def test_no_source_for_gated_dataset_says_what_to_get(tmp_path):
    with pytest.raises(DownloadError) as ei:
        download_dataset(DataConfig(name="cityscapes"), tmp_path / "raw" / "cityscapes")
    msg = str(ei.value)
    assert "login-gated" in msg and "gtFine_trainvaltest.zip" in msg and "data.source" in msg
    with pytest.raises(DownloadError, match="does not exist.*leftImg8bit_trainvaltest.zip"):
        download_dataset(DataConfig(name="cityscapes", source=str(tmp_path / "nope.zip")), tmp_path / "raw")
    with pytest.raises(DownloadError, match="TrainVal_images.zip"):
        download_dataset(DataConfig(name="lip"), tmp_path / "raw" / "lip")


def test_unreachable_url_says_what_to_get(tmp_path):
    cfg = DataConfig(name="ade20k", mirror="http://127.0.0.1:9", download_retries=0, download_timeout=2,
                     download_dir=str(tmp_path / "dl"))
    with pytest.raises(DownloadError) as ei:
        download_dataset(cfg, tmp_path / "raw" / "ade20k")
    msg = str(ei.value)
    assert "ADEChallengeData2016.zip" in msg and "data.source" in msg and str(tmp_path / "dl") in msg
    assert not (tmp_path / "raw" / "ade20k").exists()


# ------------------------------------------------------------------------------- safe extraction


def _tar_with(tmp_path: Path, build) -> Path:
    p = tmp_path / "evil.tar"
    with tarfile.open(p, "w") as tf:
        _add(tf, "ok/readme.txt", b"fine")
        build(tf)
    return p


def _assert_rejected(archive: Path, dest: Path, member: str, reason: str):
    with pytest.raises(UnsafeArchiveError) as ei:
        safe_extract(archive, dest)
    msg = str(ei.value)
    assert member in msg and reason in msg and "refusing to extract" in msg
    assert not dest.exists()
    assert not dest.parent.exists() or [p for p in dest.parent.iterdir() if p.name.startswith(".")] == []


def test_tar_dotdot_member_rejected(tmp_path):
    arc = _tar_with(tmp_path, lambda tf: _add(tf, "ok/../../escaped.txt", b"pwned"))
    _assert_rejected(arc, tmp_path / "out" / "x", "ok/../../escaped.txt", "'..'")
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "out" / "escaped.txt").exists()


def test_tar_absolute_member_rejected(tmp_path):
    target = tmp_path / "abs_target.txt"
    arc = _tar_with(tmp_path, lambda tf: _add(tf, str(target), b"pwned"))
    _assert_rejected(arc, tmp_path / "out" / "x", str(target), "absolute path")
    assert not target.exists()


def test_tar_links_outside_and_devices_rejected(tmp_path):
    def build(tf):
        s = tarfile.TarInfo("ok/passwd")
        s.type = tarfile.SYMTYPE
        s.linkname = "../../../etc/passwd"
        tf.addfile(s)
        h = tarfile.TarInfo("ok/hard")
        h.type = tarfile.LNKTYPE
        h.linkname = "/etc/shadow"
        tf.addfile(h)
        d = tarfile.TarInfo("ok/null")
        d.type = tarfile.CHRTYPE
        d.devmajor, d.devminor = 1, 3
        tf.addfile(d)
        f = tarfile.TarInfo("ok/fifo")
        f.type = tarfile.FIFOTYPE
        tf.addfile(f)

    arc = _tar_with(tmp_path, build)
    bad = dict(check_archive(arc))
    assert set(bad) == {"ok/passwd", "ok/hard", "ok/null", "ok/fifo"}
    assert "symlink pointing outside" in bad["ok/passwd"] and "hard link" in bad["ok/hard"]
    assert "device" in bad["ok/null"] and "FIFO" in bad["ok/fifo"]
    _assert_rejected(arc, tmp_path / "out" / "x", "ok/passwd", "outside the destination")


def test_zip_traversal_rejected_and_safe_archive_extracts(tmp_path):
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("data/ok.txt", "fine")
        zf.writestr("../../zip_escape.txt", "pwned")
        zf.writestr("/abs_zip.txt", "pwned")
    bad = dict(check_archive(evil))
    assert bad == {"../../zip_escape.txt": "'..' path component", "/abs_zip.txt": "absolute path"}
    _assert_rejected(evil, tmp_path / "out" / "z", "zip_escape.txt", "unsafe member")

    good = tmp_path / "good.tar.gz"
    with tarfile.open(good, "w:gz") as tf:
        _add(tf, "pkg/a/file.txt", b"hello")
        s = tarfile.TarInfo("pkg/b/link.txt")
        s.type = tarfile.SYMTYPE
        s.linkname = "../a/file.txt"  # inside the archive: allowed
        tf.addfile(s)
    out = safe_extract(good, tmp_path / "out" / "good")
    assert (out / "pkg" / "a" / "file.txt").read_bytes() == b"hello"
    assert (out / "pkg" / "b" / "link.txt").read_bytes() == b"hello"
    assert os.path.islink(out / "pkg" / "b" / "link.txt")


def test_download_stage_rejects_unsafe_source_archive(tmp_path):
    arc = _tar_with(tmp_path, lambda tf: _add(tf, "../outside.png", b"x"))
    cfg = DataConfig(name="camvid", source=str(arc))
    with pytest.raises(UnsafeArchiveError, match="outside.png"):
        download_dataset(cfg, tmp_path / "raw" / "camvid")
    assert not (tmp_path / "raw" / "camvid").exists()
