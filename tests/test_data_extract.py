"""Hostile archives (#14): every one is refused with a message naming the member, and nothing outside the
destination changes -- not a byte, not a mode, not a link -- and no partial output is left.

Every archive is built here, in the test. The world each test attacks is ``tmp_path``:

    tmp_path/outside/...        files an attacker wants to read, overwrite or add to
    tmp_path/outside/target.txt the file a hard link (or a file written through a link) would overwrite
    tmp_path/flag               what CVE-2025-4517's chain reaches (the destination's parent)
    tmp_path/dest               the destination (must not exist after a refusal)
    tmp_path/arcs/              the archives

and the whole of ``tmp_path`` is hashed before and after (names, types, modes, bytes, link targets).
The guarantees must not rest on ``tarfile``'s extraction filters (bypassable on unpatched 3.11.x):
:func:`test_extraction_never_uses_tarfile_extraction` checks that the module never calls them.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import struct
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path
from typing import Callable, Dict, Tuple

import pytest

from ctxseg.data import DataConfig, download_dataset
from ctxseg.data import extract as extract_mod
from ctxseg.data.extract import CorruptArchiveError, ExtractLimits, check_archive, safe_extract
from ctxseg.data.types import DownloadError, UnsafeArchiveError
from ctxseg.errors import UserError
from tests.conftest import ROOT, pipeline_env

REFUSED = (UnsafeArchiveError, CorruptArchiveError)


# ------------------------------------------------------------------------------------------ world


def tree_state(root: Path) -> Dict[str, Tuple]:
    """Everything observable below ``root``: type, permission bits and content hash / link target."""
    out: Dict[str, Tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode))
            else:
                out[rel] = ("file", stat.S_IMODE(st.st_mode), st.st_nlink,
                            hashlib.sha256(p.read_bytes()).hexdigest())
    return out


class World:
    def __init__(self, root: Path):
        self.root = root
        self.outside = root / "outside"
        (self.outside / "sub").mkdir(parents=True)
        (self.outside / "secret.txt").write_bytes(b"secret\n")
        (self.outside / "sub" / "notes.txt").write_bytes(b"notes\n")
        self.target = self.outside / "target.txt"
        self.target.write_bytes(b"original target\n")
        (root / "flag").write_bytes(b"flag\n")
        self.arcs = root / "arcs"
        self.arcs.mkdir()
        self.dest = root / "dest"

    def refused(self, archive: Path, member: str, *, limits: ExtractLimits | None = None,
                errors=REFUSED, reason: str = "") -> str:
        """Extract ``archive``; assert it is refused naming ``member`` and that nothing changed."""
        before = tree_state(self.root)
        with pytest.raises(errors) as info:
            safe_extract(archive, self.dest, limits)
        err = info.value
        assert isinstance(err, UserError), type(err)
        msg = str(err)
        assert repr(member) in msg, f"{member!r} not named in: {msg}"
        assert reason in msg, msg
        assert tree_state(self.root) == before, "something outside the destination changed"
        assert not self.dest.exists() and not os.path.lexists(self.dest)
        assert not [p for p in self.root.iterdir() if p.name.startswith(".dest")], "temporary output left behind"
        return msg


@pytest.fixture
def world(tmp_path) -> World:
    return World(tmp_path)


def _file(tf: tarfile.TarFile, name: str, data: bytes = b"x", mode: int = 0o644) -> None:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mode = len(data), mode
    tf.addfile(ti, io.BytesIO(data))


def _dir(tf: tarfile.TarFile, name: str) -> None:
    ti = tarfile.TarInfo(name)
    ti.type, ti.mode = tarfile.DIRTYPE, 0o777
    tf.addfile(ti)


def _symlink(tf: tarfile.TarFile, name: str, target: str) -> None:
    ti = tarfile.TarInfo(name)
    ti.type, ti.linkname = tarfile.SYMTYPE, target
    tf.addfile(ti)


def _hardlink(tf: tarfile.TarFile, name: str, target: str) -> None:
    ti = tarfile.TarInfo(name)
    ti.type, ti.linkname = tarfile.LNKTYPE, target
    tf.addfile(ti)


def make_tar(world: World, build: Callable[[tarfile.TarFile], None], name: str = "evil.tar",
             mode: str = "w") -> Path:
    path = world.arcs / name
    with tarfile.open(path, mode, format=tarfile.PAX_FORMAT) as tf:
        _file(tf, "data/ok.txt", b"a benign member first\n")
        build(tf)
    return path


def make_zip(world: World, build: Callable[[zipfile.ZipFile], None], name: str = "evil.zip",
             compression: int = zipfile.ZIP_DEFLATED) -> Path:
    path = world.arcs / name
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        zf.writestr("data/ok.txt", "a benign member first\n")
        build(zf)
    return path


def _zip_special(zf: zipfile.ZipFile, name: str, ftype: int, data: bytes = b"") -> None:
    info = zipfile.ZipInfo(name)
    info.create_system = 3  # unix: external_attr carries the mode
    info.external_attr = (ftype | 0o777) << 16
    zf.writestr(info, data)


# ------------------------------------------------------------------------------ tar: names and links


def test_tar_dotdot_member(world):
    arc = make_tar(world, lambda tf: _file(tf, "data/../../outside/target.txt", b"pwned"))
    world.refused(arc, "data/../../outside/target.txt", reason="'..'")


def test_tar_absolute_member(world):
    name = str(world.target)
    arc = make_tar(world, lambda tf: _file(tf, name, b"pwned"))
    world.refused(arc, name, reason="absolute path")


@pytest.mark.parametrize("kind", ["absolute", "relative"])
def test_tar_symlink_out_then_a_file_written_through_it(world, kind):
    target = str(world.outside) if kind == "absolute" else "../../outside"

    def build(tf):
        _symlink(tf, "data/link", target)
        _file(tf, "data/link/target.txt", b"pwned")
        _file(tf, "data/link/new.txt", b"pwned")

    arc = make_tar(world, build)
    msg = world.refused(arc, "data/link", reason="outside the destination")
    assert "data/link/new.txt" not in os.listdir(world.outside)
    assert "nothing was written" in msg or "unsafe member" in msg


@pytest.mark.parametrize("kind", ["absolute", "relative"])
def test_tar_hardlink_out_then_overwrite(world, kind):
    target = str(world.target) if kind == "absolute" else "../outside/target.txt"

    def build(tf):
        _hardlink(tf, "data/h", target)
        _file(tf, "data/h", b"overwritten through the hard link")

    world.refused(make_tar(world, build), "data/h", reason="hard link")


def test_tar_hardlink_to_a_member_that_is_not_an_earlier_file(world):
    def build(tf):
        _hardlink(tf, "data/h", "data/later.txt")
        _file(tf, "data/later.txt", b"late")

    world.refused(make_tar(world, build), "data/h", reason="not an earlier regular file")


def test_tar_file_written_through_an_inside_symlink_is_refused(world):
    """Even a link that stays inside is never written through: no link can redirect a write."""
    def build(tf):
        _dir(tf, "data/real")
        _symlink(tf, "data/alias", "real")
        _file(tf, "data/alias/x.txt", b"through the link")

    world.refused(make_tar(world, build), "data/alias/x.txt", reason="never written through links")


def test_tar_chain_inside_by_text_but_outside_on_disk(world):
    """``escape -> l1/up/..`` reads as inside, but ``l1 -> d1/d2`` and ``d1/d2/up -> ../..`` make it the
    destination's parent: links are resolved against the disk, not compared as text."""
    def build(tf):
        _dir(tf, "d1")
        _dir(tf, "d1/d2")
        _symlink(tf, "l1", "d1/d2")
        _symlink(tf, "d1/d2/up", "../..")
        _symlink(tf, "escape", "l1/up/..")

    arc = make_tar(world, build)
    assert check_archive(arc) == [], "the header check alone cannot see it; the disk resolution must"
    world.refused(arc, "escape", reason="symlink resolving outside the destination")


def _cve_component(world: World, steps: str) -> str:
    """As CPython's test: the unexpanded path fits in PATH_MAX, the expanded one overflows it.
    (Measured from the temporary folder extraction really writes into, which is a little longer than dest.)"""
    path_max = os.pathconf(world.root, "PC_PATH_MAX")
    dest_len = len(str(world.root / ".dest.xxxxxxxx.tmp")) + 1
    return "d" * ((path_max - dest_len) // (len(steps) + 1))


def _cve_2025_4517(world: World, with_hardlink: bool = True) -> Tuple[Path, str]:
    """The shape of CPython's test_realpath_limit_attack (gh-135034): a chain of symlinks over long
    folder names whose expansion overflows PATH_MAX, a final link climbing back up, ``escape`` pointing
    past the destination, then a hard link to ``escape/flag``, an overwrite through it and a new file."""
    steps = "abcdefghijklmnop"
    component = _cve_component(world, steps)
    linkpath = "/".join(steps) + "/" + "l" * 254

    def build(tf):
        path = ""
        for step in steps:
            _dir(tf, os.path.join(path, component))
            _symlink(tf, os.path.join(path, step), component)
            path = os.path.join(path, component)
        _symlink(tf, linkpath, os.path.join(*[".."] * len(steps)))
        _symlink(tf, "escape", os.path.join(linkpath, ".."))
        if with_hardlink:
            _hardlink(tf, "flaglink", os.path.join("escape", "flag"))
            _file(tf, "flaglink", b"overwrite")
        _file(tf, "escape/newfile", b"new")

    return make_tar(world, build, name="cve-2025-4517.tar"), linkpath


def test_tar_cve_2025_4517_symlink_chain_overflow(world):
    arc, _ = _cve_2025_4517(world)
    world.refused(arc, "flaglink", reason="hard link")
    assert (world.root / "flag").read_bytes() == b"flag\n" and not (world.root / "newfile").exists()


def test_tar_cve_2025_4517_without_the_hard_link(world):
    """Without the hard link the header check has nothing to object to; the writer still refuses to
    write the first member whose folder is a link."""
    arc, linkpath = _cve_2025_4517(world, with_hardlink=False)
    world.refused(arc, linkpath, reason="never written through links")
    assert not (world.root / "newfile").exists()


@pytest.mark.parametrize("size", ["overflowing", "fitting"])
def test_tar_cve_2025_4517_chain_built_from_real_folders(world, size):
    """The same chain with every link placed at a real folder (nothing is written through a link).
    With CPython's long components the final link cannot even be created (its path is over PATH_MAX):
    refused, naming it. With shorter ones everything is created, and ``escape`` (inside by text:
    ``<16 folders>/lll/..``) is refused by resolving it against the disk, where it climbs out."""
    steps = "abcdefghijklmnop"
    component = _cve_component(world, steps) if size == "overflowing" else "d" * 100
    deep = "/".join([component] * len(steps))
    final = f"{deep}/{'l' * 254}"

    def build(tf):
        for i in range(1, len(steps) + 1):
            _dir(tf, "/".join([component] * i))
        _symlink(tf, final, "/".join([".."] * len(steps)))
        _symlink(tf, "escape", f"{final}/..")

    arc = make_tar(world, build, name="cve-real.tar")
    assert check_archive(arc) == []
    if size == "overflowing":
        world.refused(arc, final, reason="File name too long")
    else:
        world.refused(arc, "escape", reason="symlink resolving outside the destination")


# ---------------------------------------------------------------------------- tar: special members


@pytest.mark.parametrize("kind,reason", [(tarfile.CHRTYPE, "device"), (tarfile.BLKTYPE, "device"),
                                         (tarfile.FIFOTYPE, "FIFO"), (b"Z", "unsupported member type")])
def test_tar_devices_fifos_and_unknown_types(world, kind, reason):
    def build(tf):
        ti = tarfile.TarInfo("data/special")
        ti.type = kind
        ti.devmajor, ti.devminor = 1, 3  # /dev/null
        tf.addfile(ti)

    world.refused(make_tar(world, build), "data/special", reason=reason)


def test_tar_overlong_names(world):
    component = "c" * 300
    deep = "/".join(["p" * 200] * 25)  # 5024 bytes

    def build(tf):
        _file(tf, f"data/{component}", b"x")
        _file(tf, f"data/{deep}", b"x")

    arc = make_tar(world, build)
    msg = world.refused(arc, f"data/{component}", reason="longer than 255 bytes")
    assert "longer than 4095 bytes" in msg and repr(f"data/{deep}") in msg


def test_tar_duplicate_member(world):
    def build(tf):
        _file(tf, "data/dup.txt", b"first")
        _file(tf, "data/dup.txt", b"second")

    world.refused(make_tar(world, build), "data/dup.txt", reason="duplicate member")


def test_tar_file_then_folder_of_the_same_name(world):
    def build(tf):
        _file(tf, "data/f", b"a file")
        _file(tf, "data/f/inner.txt", b"under the file")

    world.refused(make_tar(world, build), "data/f/inner.txt", reason="is a file in the archive")


def test_tar_member_count_cap(world):
    def build(tf):
        for i in range(12):
            _file(tf, f"data/{i}.txt", b"x")

    # 13 members (data/ok.txt first); the first one past the cap is named
    world.refused(make_tar(world, build), "data/9.txt", limits=ExtractLimits(max_members=10),
                  reason="data.extract_max_members=10")


def test_member_bomb_is_refused_without_reading_every_header(world):
    def build(tf):
        for i in range(3000):
            _file(tf, f"data/{i}", b"")

    arc = make_tar(world, build, name="many.tar.gz", mode="w:gz")
    with extract_mod._Archive(arc) as a:
        assert len(a.members(10)) == 11
    world.refused(arc, "data/9", limits=ExtractLimits(max_members=10), reason="data.extract_max_members=10")


def test_tar_gz_bomb_declared_size_over_the_budget(world):
    def build(tf):
        _file(tf, "data/big.bin", bytes(5 << 20))

    arc = make_tar(world, build, name="bomb.tar.gz", mode="w:gz")
    assert arc.stat().st_size < 64 << 10
    world.refused(arc, "(all members)", limits=ExtractLimits(max_bytes=1 << 20), reason="data.extract_max_bytes")


@pytest.mark.parametrize("suffix,mode", [("tar", "w"), ("tar.gz", "w:gz"), ("tar.bz2", "w:bz2"), ("tar.xz", "w:xz")])
def test_truncated_tar_is_a_corrupt_archive_not_a_traceback(world, suffix, mode):
    arc = make_tar(world, lambda tf: _file(tf, "data/big.bin", os.urandom(100_000)), name=f"t.{suffix}", mode=mode)
    arc.write_bytes(arc.read_bytes()[: arc.stat().st_size // 2])
    before = tree_state(world.root)
    with pytest.raises(CorruptArchiveError) as info:
        safe_extract(arc, world.dest)
    assert str(arc) in str(info.value) and "truncated" in str(info.value)
    assert tree_state(world.root) == before and not world.dest.exists()


# ----------------------------------------------------------------------------------------------- zip


@pytest.mark.parametrize("name,reason", [
    ("../outside/target.txt", "'..'"),
    ("data/../../outside/target.txt", "'..'"),
    ("..\\outside\\target.txt", "'..'"),
    ("/abs/target.txt", "absolute path"),
    ("C:/target.txt", "absolute path"),
])
def test_zip_slip(world, name, reason):
    arc = make_zip(world, lambda zf: zf.writestr(name, "pwned"))
    world.refused(arc, name, reason=reason)


def test_zip_absolute_path_into_the_world(world):
    name = str(world.target)
    arc = make_zip(world, lambda zf: zf.writestr(name, "pwned"))
    world.refused(arc, name, reason="absolute path")


@pytest.mark.parametrize("target", ["../../outside", "/etc", "../data/../../outside"])
def test_zip_symlink_out_then_a_file_through_it(world, target):
    def build(zf):
        _zip_special(zf, "data/link", stat.S_IFLNK, target.encode())
        zf.writestr("data/link/target.txt", "pwned")

    world.refused(make_zip(world, build), "data/link", reason="outside the destination")


@pytest.mark.parametrize("ftype,reason", [(stat.S_IFCHR, "device"), (stat.S_IFBLK, "device"),
                                          (stat.S_IFIFO, "FIFO"), (stat.S_IFSOCK, "socket")])
def test_zip_devices_and_fifos(world, ftype, reason):
    world.refused(make_zip(world, lambda zf: _zip_special(zf, "data/special", ftype)), "data/special",
                  reason=reason)


def test_zip_bomb_stopped_by_bytes_cap(world):
    arc = make_zip(world, lambda zf: zf.writestr("data/bomb.bin", bytes(8 << 20)))
    assert arc.stat().st_size < 64 << 10
    world.refused(arc, "(all members)", limits=ExtractLimits(max_bytes=1 << 20), reason="data.extract_max_bytes")


def test_zip_bomb_stopped_by_ratio(world, monkeypatch):
    monkeypatch.setattr(extract_mod, "MIN_BUDGET", 0)  # the 64 MiB floor would make this test slow
    arc = make_zip(world, lambda zf: zf.writestr("data/bomb.bin", bytes(8 << 20)))
    world.refused(arc, "(all members)", limits=ExtractLimits(max_ratio=100), reason="data.extract_max_ratio=100")


def test_zip_bomb_of_the_issue_with_default_limits(world):
    """#14's case: a 203 KB zip expanding to 200 MiB, refused by the default limits before a byte is written."""
    arc = world.arcs / "bomb.zip"
    with zipfile.ZipFile(arc, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        with zf.open("bomb.bin", "w", force_zip64=True) as f:
            for _ in range(200):
                f.write(bytes(1 << 20))
    assert arc.stat().st_size < 250_000
    world.refused(arc, "(all members)", reason="data.extract_max_ratio=100")


def _patch_zip_sizes(path: Path, name: str, declared: int) -> None:
    """Make the local and central headers of ``name`` declare ``declared`` uncompressed bytes."""
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(name)
    # local file header: uncompressed size at offset 22
    assert raw[info.header_offset: info.header_offset + 4] == b"PK\x03\x04"
    struct.pack_into("<I", raw, info.header_offset + 22, declared)
    # central directory entry: uncompressed size at offset 24
    pos = raw.find(b"PK\x01\x02")
    while pos != -1:
        n = struct.unpack_from("<H", raw, pos + 28)[0]
        if raw[pos + 46: pos + 46 + n] == name.encode():
            struct.pack_into("<I", raw, pos + 24, declared)
        pos = raw.find(b"PK\x01\x02", pos + 4)
    path.write_bytes(bytes(raw))


def test_zip_whose_headers_lie_about_sizes(world):
    """Headers declare 100 bytes for 8 MiB of data: the declared total passes the cap, but reading stops
    at the declared size and the CRC fails, so it is refused as corrupt, naming the member."""
    arc = make_zip(world, lambda zf: zf.writestr("data/liar.bin", bytes(8 << 20)))
    _patch_zip_sizes(arc, "data/liar.bin", 100)
    with zipfile.ZipFile(arc) as zf:
        assert zf.getinfo("data/liar.bin").file_size == 100
    assert check_archive(arc, ExtractLimits(max_bytes=1 << 20)) == []
    world.refused(arc, "data/liar.bin", limits=ExtractLimits(max_bytes=1 << 20), errors=CorruptArchiveError)


def test_extraction_stops_at_the_byte_budget_while_writing(world, monkeypatch):
    """The running count (not only the declared sizes) stops an extraction: with the header check
    told the sizes are 0, the writer still stops past the budget."""
    real = extract_mod._zip_members

    def lying(zf):
        for m in real(zf):
            m.size = 0
            yield m

    monkeypatch.setattr(extract_mod, "_zip_members", lying)
    arc = make_zip(world, lambda zf: zf.writestr("data/big.bin", bytes(3 << 20)))
    world.refused(arc, "data/big.bin", limits=ExtractLimits(max_bytes=1 << 20), reason="past 1048576 bytes")


def _zip_with_raw_name(world: World, placeholder: str, raw_name: bytes) -> Path:
    arc = make_zip(world, lambda zf: zf.writestr(placeholder, "pwned"), compression=zipfile.ZIP_STORED)
    data = arc.read_bytes()
    assert data.count(placeholder.encode()) == 2  # local + central header
    arc.write_bytes(data.replace(placeholder.encode(), raw_name))
    return arc


def test_zip_nul_in_name(world):
    arc = _zip_with_raw_name(world, "data/aXb.txt", b"data/a\x00b.txt")
    world.refused(arc, "data/a\x00b.txt", reason="NUL")


def test_zip_overlong_names(world):
    name = "data/" + "z" * 300
    world.refused(make_zip(world, lambda zf: zf.writestr(name, "x")), name, reason="longer than 255 bytes")


def test_zip_duplicate_member(world):
    def build(zf):
        zf.writestr("data/dup.txt", "first")
        with pytest.warns(UserWarning, match="Duplicate name"):
            zf.writestr("data/dup.txt", "second")

    world.refused(make_zip(world, build), "data/dup.txt", reason="duplicate member")


def test_not_an_archive_at_all(world):
    arc = world.arcs / "camvid.tgz"
    arc.write_bytes(os.urandom(4096))
    before = tree_state(world.root)
    with pytest.raises(CorruptArchiveError, match="not a readable zip or tar archive"):
        safe_extract(arc, world.dest)
    assert tree_state(world.root) == before


def test_encrypted_zip_member_is_a_corrupt_archive(world):
    """zipfile raises a bare RuntimeError for an encrypted member; it is wrapped, naming the member."""
    arc = make_zip(world, lambda zf: zf.writestr("data/secret.bin", b"s" * 100), compression=zipfile.ZIP_STORED)
    raw = bytearray(arc.read_bytes())
    with zipfile.ZipFile(arc) as zf:
        info = zf.getinfo("data/secret.bin")
    raw[info.header_offset + 6] |= 0x1  # local header: general purpose flag, bit 0 = encrypted
    pos = raw.find(b"PK\x01\x02")
    while pos != -1:
        n = struct.unpack_from("<H", raw, pos + 28)[0]
        if raw[pos + 46: pos + 46 + n] == b"data/secret.bin":
            raw[pos + 8] |= 0x1  # central header flag
        pos = raw.find(b"PK\x01\x02", pos + 4)
    arc.write_bytes(bytes(raw))
    world.refused(arc, "data/secret.bin", errors=CorruptArchiveError, reason="encrypted")


def test_zip_truncated_is_a_corrupt_archive(world):
    arc = make_zip(world, lambda zf: zf.writestr("data/x.bin", os.urandom(50_000)))
    arc.write_bytes(arc.read_bytes()[:-30])  # the end-of-central-directory record is cut
    before = tree_state(world.root)
    with pytest.raises(CorruptArchiveError, match="evil.zip"):
        safe_extract(arc, world.dest)
    assert tree_state(world.root) == before


# ----------------------------------------------------------------------------------- what still works


def test_benign_archives_with_internal_symlinks_and_hardlinks_extract(world):
    arc = world.arcs / "good.tar.gz"
    with tarfile.open(arc, "w:gz") as tf:
        _dir(tf, "pkg")
        _file(tf, "pkg/a/file.txt", b"hello", mode=0o4755)  # set-uid is dropped
        _symlink(tf, "pkg/b/link.txt", "../a/file.txt")
        _symlink(tf, "pkg/adir", "a")
        _symlink(tf, "pkg/self", ".")
        _symlink(tf, "pkg/dangling", "not-there")
        _hardlink(tf, "pkg/hard.txt", "pkg/a/file.txt")
    out = safe_extract(arc, world.dest)
    assert (out / "pkg/a/file.txt").read_bytes() == b"hello"
    assert stat.S_IMODE(os.stat(out / "pkg/a/file.txt").st_mode) == 0o755
    assert (out / "pkg/b/link.txt").read_bytes() == b"hello" and os.path.islink(out / "pkg/b/link.txt")
    assert (out / "pkg/adir/file.txt").read_bytes() == b"hello"
    assert (out / "pkg/hard.txt").read_bytes() == b"hello"
    assert os.path.islink(out / "pkg/dangling")
    assert not [p for p in world.root.iterdir() if p.name.startswith(".dest")]

    zarc = world.arcs / "good.zip"
    with zipfile.ZipFile(zarc, "w") as zf:
        zf.writestr("z/a.txt", "zip hello")
        _zip_special(zf, "z/link", stat.S_IFLNK, b"a.txt")
    zout = safe_extract(zarc, world.root / "zdest")
    assert (zout / "z/link").read_bytes() == b"zip hello" and os.path.islink(zout / "z/link")


def test_extraction_never_uses_tarfile_extraction(world, monkeypatch):
    """The guarantees hold on an unpatched 3.11: tarfile's own extraction (and its filters) is never
    called, so its patch level cannot matter."""
    def forbidden(*a, **k):
        raise AssertionError("tarfile extraction must not be used")

    for name in ("extractall", "extract", "_extract_member", "_get_filter_function"):
        monkeypatch.setattr(tarfile.TarFile, name, forbidden, raising=False)
    monkeypatch.setattr(tarfile, "data_filter", forbidden, raising=False)
    arc, _ = _cve_2025_4517(world)
    world.refused(arc, "flaglink")
    good = make_tar(world, lambda tf: _symlink(tf, "data/l", "ok.txt"), name="good.tar")
    out = safe_extract(good, world.root / "good")
    assert (out / "data/l").read_bytes() == b"a benign member first\n"
    assert "filter=" not in Path(extract_mod.__file__).read_text().replace("filter=None", "")


# --------------------------------------------------------------------------- through the user's path


def _camvid_style_tgz(world: World, name: str = "camvid.tgz", hostile: bool = True) -> Path:
    """fastai's camvid.tgz layout (images/, labels/, codes.txt) with a hostile member inside."""
    def build(tf):
        _file(tf, "camvid/codes.txt", b"Sky\nVoid\n")
        _file(tf, "camvid/valid.txt", b"")
        if hostile:
            _hardlink(tf, "camvid/images/x.png", str(world.target))
            _file(tf, "camvid/images/x.png", b"overwrite")

    return make_tar(world, build, name=name, mode="w:gz")


def _sha256(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def test_download_dataset_refuses_a_hostile_source_and_keeps_the_previous_raw_data(world):
    arc = _camvid_style_tgz(world)
    raw = world.root / "repo" / "data" / "raw" / "camvid"
    raw.mkdir(parents=True)
    (raw / "download.json").write_text(json.dumps({"dataset": "camvid", "source": "previous"}))
    before = tree_state(world.root)
    cfg = DataConfig(name="camvid", source=str(arc), checksums={"camvid.tgz": _sha256(arc)})
    with pytest.raises(UnsafeArchiveError) as info:
        download_dataset(cfg, raw)
    assert repr("camvid/images/x.png") in str(info.value)
    after = tree_state(world.root)
    # only the download folder's checksum record may appear (data/raw/_downloads); nothing else changed
    assert {k: v for k, v in after.items() if "_downloads" not in k} == before
    assert world.target.read_bytes() == b"original target\n"


def test_download_dataset_refuses_a_hostile_archive_from_the_mirror(world):
    import http.server
    import threading

    arc = _camvid_style_tgz(world)
    body = arc.read_bytes()

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    th = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    th.start()
    try:
        raw = world.root / "repo" / "data" / "raw" / "camvid"
        before = tree_state(world.outside)
        cfg = DataConfig(name="camvid", mirror=f"http://127.0.0.1:{srv.server_address[1]}",
                         checksums={"camvid.tgz": _sha256(arc)}, download_retries=0)
        with pytest.raises(UnsafeArchiveError, match="camvid/images/x.png"):
            download_dataset(cfg, raw)
    finally:
        srv.shutdown()
        srv.server_close()
    assert tree_state(world.outside) == before and not raw.exists()
    assert (world.root / "flag").read_bytes() == b"flag\n"


def test_download_dataset_zip_bomb_capped_by_params(world):
    arc = make_zip(world, lambda zf: zf.writestr("camvid/bomb.bin", bytes(4 << 20)), name="camvid-bomb.zip")
    raw = world.root / "repo" / "data" / "raw" / "camvid"
    cfg = DataConfig(name="camvid", source=str(arc), extract_max_bytes=1 << 20, verify_checksums=False)
    with pytest.raises(UnsafeArchiveError, match="data.extract_max_bytes=1048576"):
        download_dataset(cfg, raw)
    assert not raw.exists()


@pytest.mark.parametrize("which", ["hardlink", "cve"])
def test_download_stage_cli_refuses_with_exit_2_and_no_traceback(world, which):
    if which == "hardlink":
        arc, member = _camvid_style_tgz(world), "camvid/images/x.png"
    else:
        arc, member = _cve_2025_4517(world)[0], "flaglink"
    repo = world.root / "repo"
    repo.mkdir()
    (repo / "params.yaml").write_text(json.dumps(
        {"data": {"name": "camvid", "source": str(arc), "verify_checksums": False}}))
    before = tree_state(world.root)
    proc = subprocess.run([sys.executable, "-m", "pipeline.download", "--params", "params.yaml"], cwd=repo,
                          env=pipeline_env({"PYTHONPATH": str(ROOT)}), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and member in proc.stderr, proc.stderr
    assert "refusing to extract" in proc.stderr
    after = tree_state(world.root)
    assert {k: v for k, v in after.items() if k not in ("repo/data", "repo/data/raw")} == before
    assert not (repo / "data" / "raw" / "camvid").exists() and os.listdir(repo / "data" / "raw") == []


def test_every_refusal_is_a_user_error():
    for cls in (UnsafeArchiveError, CorruptArchiveError, DownloadError):
        assert issubclass(cls, UserError)


def test_a_refused_archive_leaves_an_existing_destination_as_it_was(world):
    (world.dest / "old").mkdir(parents=True)
    (world.dest / "old" / "keep.txt").write_bytes(b"previous extraction")
    arc, _ = _cve_2025_4517(world, with_hardlink=False)
    before = tree_state(world.root)
    with pytest.raises(UnsafeArchiveError):
        safe_extract(arc, world.dest)
    assert tree_state(world.root) == before
