"""Safe extraction of zip and tar archives: nothing outside the destination is ever created or modified.

The guarantees do not depend on the Python patch release: ``tarfile``'s extraction (and its ``data``
filter, bypassable on 3.11.7 by a symlink chain that overflows path resolution, CVE-2025-4517) is never
used. Every member is written by this module, and each decision is taken against what is on disk:

* **Before anything is written**, every member is checked by its header (:func:`check_archive`):
  empty, absolute (``/x``, ``C:x``), ``..``, NUL-containing and overlong names (a component over 255
  bytes, a path over 4095), devices, FIFOs, sockets and unknown member types, symlinks whose target is
  absolute or leaves the destination, hard links that are not to an earlier regular-file member, more
  members than ``data.extract_max_members``, declared sizes over the byte budget. All of them are listed
  in one :class:`UnsafeArchiveError`.
* **While extracting** into a private temporary folder: every parent folder of a member must be a
  real folder on disk (``lstat``) -- a member is never written *through* a symlink, even one pointing
  inside, so no link, however chained, can redirect a write; files are created with
  ``O_CREAT | O_EXCL | O_NOFOLLOW`` (an existing path is never opened or replaced: a duplicate member is
  refused); hard links are made only to regular files this extraction wrote; modes are reduced to
  rw-r--r-- / rwxr-xr-x (no set-uid, no ownership). The bytes actually written are counted and
  extraction stops past the budget (``data.extract_max_bytes``, else ``data.extract_max_ratio`` x the
  archive's size with a 64 MiB floor, and never more than the free disk space), so a zip bomb whose
  headers lie is stopped too.
* **After extracting**, every symlink is resolved component by component against the disk (at most
  40 hops; a loop, an over-long path or any resolution error counts as escaping) and must stay inside
  the destination; only then is the folder renamed into place.

Symlinks that stay inside are kept (datasets ship a few); anything else is refused with the member's
name. A corrupt or truncated archive raises :class:`CorruptArchiveError` naming the archive (and the
member where reading failed), never a raw ``tarfile`` / ``zipfile`` / ``EOFError`` / ``OSError``.
"""
from __future__ import annotations

import errno
import logging
import lzma
import os
import shutil
import stat
import tarfile
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Dict, Iterator, List, Optional, Sequence, Tuple

from tqdm import tqdm

from ctxseg.data.types import DownloadError, UnsafeArchiveError

__all__ = [
    "ARCHIVE_SUFFIXES", "ExtractLimits", "CorruptArchiveError", "is_archive", "archive_stem", "check_archive",
    "list_archive", "safe_extract",
]

log = logging.getLogger(__name__)

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
CHUNK = 1 << 20
NAME_MAX = 255  # bytes per path component (ext4, xfs, btrfs)
PATH_MAX = 4095  # bytes of a member name
MAX_LINK_HOPS = 40  # as the kernel's ELOOP limit
MIN_BUDGET = 64 << 20  # the byte budget of a small archive is never below this
MAX_LINK_TARGET = 4096

#: what reading a damaged archive can raise
READ_ERRORS: Tuple[type, ...] = (tarfile.TarError, zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, zlib.error,
                                 lzma.LZMAError, OSError, RuntimeError, NotImplementedError, UnicodeDecodeError,
                                 ValueError)


class CorruptArchiveError(DownloadError):
    """An archive cannot be read to the end (truncated, damaged, encrypted or an unsupported format)."""


@dataclass(frozen=True)
class ExtractLimits:
    """Caps of one extraction (``data.extract_*`` in params.yaml)."""

    max_ratio: float = 100.0
    max_bytes: Optional[int] = None  # replaces the ratio rule when set
    max_members: int = 1_000_000

    @classmethod
    def from_config(cls, cfg: Any) -> "ExtractLimits":
        return cls(max_ratio=cfg.extract_max_ratio, max_bytes=cfg.extract_max_bytes,
                   max_members=cfg.extract_max_members)

    def budget(self, archive: Path, dest_parent: Path) -> Tuple[int, str]:
        """``(bytes, why)``: how much one extraction of ``archive`` may write."""
        if self.max_bytes is not None:
            budget, why = int(self.max_bytes), f"data.extract_max_bytes={self.max_bytes}"
        else:
            size = archive.stat().st_size
            budget = max(int(self.max_ratio * size), MIN_BUDGET)
            why = (f"data.extract_max_ratio={self.max_ratio:g} x the archive's {size} bytes"
                   + (f" (at least {MIN_BUDGET} bytes)" if budget == MIN_BUDGET else ""))
        try:
            free = shutil.disk_usage(dest_parent).free
        except OSError:
            free = None
        if free is not None and free < budget:
            budget, why = free, f"the free disk space under {dest_parent}"
        return budget, why


# --------------------------------------------------------------------------------------- names


def is_archive(path: Path) -> bool:
    n = path.name.lower()
    return path.is_file() and any(n.endswith(s) for s in ARCHIVE_SUFFIXES)


def archive_stem(path: Path) -> str:
    n = path.name
    for s in sorted(ARCHIVE_SUFFIXES, key=len, reverse=True):
        if n.lower().endswith(s):
            return n[: -len(s)]
    return path.stem


def _name_problem(name: str) -> Optional[str]:
    if not name:
        return "empty member name"
    if "\x00" in name:
        return "NUL character in the member name"
    norm = name.replace("\\", "/")
    if norm.startswith("/") or (len(norm) > 1 and norm[1] == ":"):
        return "absolute path"
    parts = norm.split("/")
    if ".." in parts:
        return "'..' path component"
    if len(norm.encode("utf-8", "surrogateescape")) > PATH_MAX:
        return f"member name longer than {PATH_MAX} bytes"
    if any(len(p.encode("utf-8", "surrogateescape")) > NAME_MAX for p in parts):
        return f"a path component longer than {NAME_MAX} bytes"
    if not [p for p in parts if p not in ("", ".")]:
        return "member name has no path component"
    return None


def _parts(name: str) -> Tuple[str, ...]:
    return tuple(p for p in name.replace("\\", "/").split("/") if p not in ("", "."))


def _lexically_inside(parent: Sequence[str], target: str) -> bool:
    """Does relative link ``target``, read from folder ``parent`` (parts below the root), stay inside?"""
    stack = list(parent)
    for p in target.replace("\\", "/").split("/"):
        if p in ("", "."):
            continue
        if p == "..":
            if not stack:
                return False
            stack.pop()
        else:
            stack.append(p)
    return True


def _link_problem(name: str, target: str, hard: bool, files: Dict[Tuple[str, ...], bool]) -> Optional[str]:
    kind = "hard link" if hard else "symlink"
    if not target:
        return f"{kind} with an empty target"
    if "\x00" in target:
        return f"{kind} target contains a NUL character"
    if len(target.encode("utf-8", "surrogateescape")) > MAX_LINK_TARGET:
        return f"{kind} target longer than {MAX_LINK_TARGET} bytes"
    norm = target.replace("\\", "/")
    if norm.startswith("/") or (len(norm) > 1 and norm[1] == ":"):
        return f"{kind} pointing outside the destination ({target}: absolute)"
    if hard:
        # tar hard links name an earlier member, relative to the archive root
        if not _lexically_inside((), target) or ".." in norm.split("/"):
            return f"hard link pointing outside the destination ({target})"
        if not files.get(_parts(target)):
            return f"hard link to {target!r}, which is not an earlier regular file of the archive"
        return None
    if not _lexically_inside(_parts(name)[:-1], target):
        return f"symlink pointing outside the destination ({target})"
    return None


# ------------------------------------------------------------------------------------- members


@dataclass
class _Member:
    name: str
    kind: str  # file | dir | symlink | hardlink | other
    size: int = 0
    mode: int = 0o644
    target: str = ""
    what: str = ""  # for kind == other
    handle: Any = None  # TarInfo or ZipInfo


def _zip_members(zf: zipfile.ZipFile) -> Iterator[_Member]:
    for info in zf.infolist():
        name = info.orig_filename if "\x00" in info.orig_filename else info.filename
        mode = info.external_attr >> 16
        ftype = stat.S_IFMT(mode) if mode else 0
        if info.is_dir() or ftype == stat.S_IFDIR:
            yield _Member(name, "dir", handle=info)
        elif ftype == stat.S_IFLNK:
            if info.file_size > MAX_LINK_TARGET:
                yield _Member(name, "other", what=f"symlink target longer than {MAX_LINK_TARGET} bytes", handle=info)
                continue
            target = zf.read(info).decode("utf-8", "surrogateescape")
            yield _Member(name, "symlink", target=target, handle=info)
        elif ftype in (0, stat.S_IFREG):
            yield _Member(name, "file", size=info.file_size, mode=mode, handle=info)
        elif ftype in (stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK):
            yield _Member(name, "other", what="device, FIFO or socket member", handle=info)
        else:
            yield _Member(name, "other", what=f"unsupported member type (mode {oct(mode)})", handle=info)


def _tar_member(m: tarfile.TarInfo) -> _Member:
    if m.isreg():
        return _Member(m.name, "file", size=m.size, mode=m.mode, handle=m)
    if m.isdir():
        return _Member(m.name, "dir", handle=m)
    if m.issym():
        return _Member(m.name, "symlink", target=m.linkname, handle=m)
    if m.islnk():
        return _Member(m.name, "hardlink", target=m.linkname, handle=m)
    if m.ischr() or m.isblk():
        return _Member(m.name, "other", what="device member", handle=m)
    if m.isfifo():
        return _Member(m.name, "other", what="FIFO member", handle=m)
    return _Member(m.name, "other", what=f"unsupported member type {m.type!r}", handle=m)


class _Archive:
    """A zip or tar opened for reading, with every read error turned into :class:`CorruptArchiveError`."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.zip: Optional[zipfile.ZipFile] = None
        self.tar: Optional[tarfile.TarFile] = None
        try:
            if zipfile.is_zipfile(self.path):
                self.zip = zipfile.ZipFile(self.path)
            else:
                self.tar = tarfile.open(self.path, "r:*")
        except READ_ERRORS as e:
            raise self.corrupt(e) from None

    def corrupt(self, e: BaseException, member: Optional[str] = None) -> CorruptArchiveError:
        at = f" at member {member!r}" if member else ""
        return CorruptArchiveError(
            f"{self.path} is not a readable zip or tar archive, or is truncated or damaged{at} "
            f"({type(e).__name__}: {e}). Delete it and get it again (re-download, or copy the complete file "
            f"to data.source).")

    def members(self, limit: Optional[int] = None) -> List[_Member]:
        """Every member (reading a tar to the end detects truncation); with ``limit``, reading stops
        at ``limit + 1`` members, so an archive of millions of empty members is refused without
        holding them all in memory."""
        try:
            members: Iterator[_Member]
            if self.zip is not None:
                members = _zip_members(self.zip)
            else:
                assert self.tar is not None
                members = (_tar_member(m) for m in self.tar)
            out: List[_Member] = []
            for m in members:
                out.append(m)
                if limit is not None and len(out) > limit:
                    break
            return out
        except READ_ERRORS as e:
            raise self.corrupt(e) from None

    def open(self, m: _Member) -> IO[bytes]:
        try:
            if self.zip is not None:
                return self.zip.open(m.handle)
            assert self.tar is not None
            f = self.tar.extractfile(m.handle)
            if f is None:  # pragma: no cover - only for non-regular members
                raise tarfile.ReadError("no data")
            return f
        except READ_ERRORS as e:
            raise self.corrupt(e, m.name) from None

    def close(self) -> None:
        for f in (self.zip, self.tar):
            if f is not None:
                f.close()

    def __enter__(self) -> "_Archive":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ---------------------------------------------------------------------------------------- check


def _check_members(members: Sequence[_Member], limits: ExtractLimits, budget: Optional[Tuple[int, str]]
                   ) -> List[Tuple[str, str]]:
    bad: List[Tuple[str, str]] = []
    files: Dict[Tuple[str, ...], bool] = {}  # parts -> is a regular file (for hard links)
    declared = 0
    for m in members:
        why = _name_problem(m.name)
        if why is None:
            if m.kind == "other":
                why = m.what
            elif m.kind in ("symlink", "hardlink"):
                why = _link_problem(m.name, m.target, m.kind == "hardlink", files)
        if why:
            bad.append((m.name, why))
            continue
        files[_parts(m.name)] = m.kind == "file"
        declared += m.size
    if len(members) > limits.max_members:
        bad.append((members[limits.max_members].name,
                    f"the archive has more members than data.extract_max_members={limits.max_members} (this is "
                    f"member {limits.max_members + 1}); raise it if the archive is genuine"))
    if budget is not None and declared > budget[0]:
        bad.append(("(all members)", f"the members declare {declared} bytes, more than the extraction budget of "
                                     f"{budget[0]} bytes ({budget[1]}); if the archive is genuine, set "
                                     f"data.extract_max_bytes"))
    return bad


def check_archive(archive: Path, limits: Optional[ExtractLimits] = None) -> List[Tuple[str, str]]:
    """Every member of ``archive`` refused by its header, as ``(member, reason)`` (empty = none).

    Raises :class:`CorruptArchiveError` if the archive cannot be listed to the end."""
    limits = limits or ExtractLimits()
    archive = Path(archive)
    with _Archive(archive) as arc:
        return _check_members(arc.members(limits.max_members), limits, None)


def list_archive(archive: Path) -> int:
    """Read ``archive`` completely (every tar header; every zip member's data and CRC); return the
    member count. Raises :class:`CorruptArchiveError` for a truncated or damaged file."""
    with _Archive(archive) as arc:
        members = arc.members()
        if arc.zip is not None:
            try:
                bad = arc.zip.testzip()
            except READ_ERRORS as e:
                raise arc.corrupt(e) from None
            if bad is not None:
                raise arc.corrupt(zipfile.BadZipFile("CRC mismatch"), bad)
        return len(members)


# ------------------------------------------------------------------------------------ extraction


def _refuse(archive: Path, member: str, why: str) -> UnsafeArchiveError:
    return UnsafeArchiveError(
        f"refusing to extract {archive}: member {member!r}: {why}. The archive is corrupt or malicious; "
        f"nothing was written outside the temporary folder (removed). Delete it and get it again from the "
        f"official source.")


class _Writer:
    """Writes members below ``root`` (a private, empty folder) without ever following a link."""

    def __init__(self, archive: Path, root: Path, budget: Tuple[int, str]):
        self.archive = archive
        self.root = root
        self.budget, self.budget_why = budget
        self.written = 0
        self.symlinks: List[Tuple[str, Tuple[str, ...]]] = []

    def _kind(self, st: os.stat_result) -> str:
        if stat.S_ISLNK(st.st_mode):
            return "symlink"
        if stat.S_ISDIR(st.st_mode):
            return "folder"
        return "file" if stat.S_ISREG(st.st_mode) else "special file"

    def parent(self, m: _Member, parts: Tuple[str, ...]) -> Path:
        """The member's folder, created as real folders; refuses to pass through anything else."""
        cur = self.root
        for i, comp in enumerate(parts[:-1]):
            cur = cur / comp
            try:
                st = os.lstat(cur)
            except FileNotFoundError:
                os.mkdir(cur, 0o755)
                continue
            if not stat.S_ISDIR(st.st_mode):
                raise _refuse(self.archive, m.name, f"its folder {'/'.join(parts[: i + 1])!r} is a "
                                                    f"{self._kind(st)} in the archive; members are never written "
                                                    f"through links")
        return cur

    def _fresh(self, m: _Member, target: Path) -> None:
        try:
            st = os.lstat(target)
        except FileNotFoundError:
            return
        raise _refuse(self.archive, m.name, f"a {self._kind(st)} of that name was already extracted (duplicate "
                                            f"member); existing paths are never replaced")

    def write(self, m: _Member, arc: _Archive) -> None:
        parts = _parts(m.name)
        target = self.parent(m, parts) / parts[-1]
        if m.kind == "dir":
            try:
                st = os.lstat(target)
            except FileNotFoundError:
                os.mkdir(target, 0o755)
                return
            if not stat.S_ISDIR(st.st_mode):
                raise _refuse(self.archive, m.name, f"a {self._kind(st)} of that name was already extracted")
            return
        self._fresh(m, target)
        if m.kind == "symlink":
            os.symlink(m.target, target)
            self.symlinks.append((m.name, parts))
        elif m.kind == "hardlink":
            self._hardlink(m, target)
        elif m.kind == "file":
            self._file(m, arc, target)
        else:  # pragma: no cover - refused by the header check
            raise _refuse(self.archive, m.name, m.what or "unsupported member")

    def _file(self, m: _Member, arc: _Archive, target: Path) -> None:
        mode = 0o755 if m.mode & 0o100 else 0o644
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(target, flags, mode)
        with os.fdopen(fd, "wb") as out, arc.open(m) as src:
            while True:
                try:
                    buf = src.read(CHUNK)
                except READ_ERRORS as e:
                    raise arc.corrupt(e, m.name) from None
                if not buf:
                    break
                self._count(m, len(buf))
                out.write(buf)

    def _count(self, m: _Member, n: int) -> None:
        self.written += n
        if self.written > self.budget:
            raise _refuse(self.archive, m.name,
                          f"extracting it takes the archive past {self.budget} bytes ({self.budget_why}): a zip "
                          f"bomb, or a genuine archive larger than the limit; if you trust it, set "
                          f"data.extract_max_bytes (bytes) or data.extract_max_ratio")

    def _hardlink(self, m: _Member, target: Path) -> None:
        src = self.root
        tparts = _parts(m.target)
        for i, comp in enumerate(tparts):
            src = src / comp
            st = os.lstat(src)
            last = i == len(tparts) - 1
            if (not last and not stat.S_ISDIR(st.st_mode)) or (last and not stat.S_ISREG(st.st_mode)):
                raise _refuse(self.archive, m.name, f"hard link to {m.target!r}, which is not a regular file "
                                                    f"extracted from this archive")
        try:
            os.link(src, target, follow_symlinks=False)
        except OSError:  # file system without hard links: copy (counted against the budget)
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
            with open(src, "rb") as f, os.fdopen(os.open(target, flags, 0o644), "wb") as out:
                while buf := f.read(CHUNK):
                    self._count(m, len(buf))
                    out.write(buf)

    def resolves_inside(self, parts: Tuple[str, ...]) -> bool:
        """Resolve ``parts`` (below the root) against the disk, following symlinks; inside the root?"""
        todo = list(parts)[::-1]
        cur: List[str] = []
        hops = 0
        while todo:
            comp = todo.pop()
            if comp in ("", "."):
                continue
            if comp == "..":
                if not cur:
                    return False
                cur.pop()
                continue
            path = self.root.joinpath(*cur, comp)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                cur.append(comp)  # dangling: nothing more can be created, so it stays as it reads
                continue
            except OSError:  # ENAMETOOLONG, ELOOP, ...: cannot be decided, so it is refused
                return False
            if not stat.S_ISLNK(st.st_mode):
                cur.append(comp)
                continue
            hops += 1
            if hops > MAX_LINK_HOPS:
                return False
            target = os.readlink(path)
            if target.startswith("/"):
                return False
            todo.extend(target.split("/")[::-1])
        return True


def safe_extract(archive: Path, dest: Path, limits: Optional[ExtractLimits] = None) -> Path:
    """Extract ``archive`` into ``dest`` (created atomically: temporary folder + rename).

    Raises :class:`UnsafeArchiveError` (naming the member) for anything refused, listing every member
    refused by its header before anything is written; :class:`CorruptArchiveError` for an unreadable
    archive. In every case nothing outside ``dest``'s temporary sibling is created or modified, and
    the temporary folder is removed."""
    archive, dest = Path(archive), Path(dest)
    limits = limits or ExtractLimits()
    dest.parent.mkdir(parents=True, exist_ok=True)
    budget = limits.budget(archive, dest.parent)
    with _Archive(archive) as arc:
        members = arc.members(limits.max_members)
        bad = _check_members(members, limits, budget)
        if bad:
            listing = "\n".join(f"  {n!r}: {why}" for n, why in bad[:20])
            more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
            raise UnsafeArchiveError(
                f"refusing to extract {archive}: {len(bad)} unsafe member(s) (absolute paths, '..', links "
                f"outside the destination, device files or over a limit):\n{listing}{more}\nThe archive is "
                f"corrupt or malicious; delete it and get it again from the official source.")
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
        try:
            writer = _Writer(archive, tmp, budget)
            for m in tqdm(members, desc=f"extract {archive.name}", unit="file", disable=None):
                try:
                    writer.write(m, arc)
                except (UnsafeArchiveError, CorruptArchiveError):
                    raise
                except OSError as e:
                    if e.errno == errno.ENOSPC:
                        raise DownloadError(f"no space left extracting {archive} (member {m.name!r}) into "
                                            f"{dest.parent}; free some disk space or set data.download_dir / "
                                            f"move data/ to a larger disk") from None
                    raise _refuse(archive, m.name, f"cannot be extracted ({type(e).__name__}: {e})") from None
            for name, parts in writer.symlinks:
                if not writer.resolves_inside(parts):
                    raise _refuse(archive, name, "symlink resolving outside the destination (through other links, "
                                                 "a loop or a path too long to resolve)")
            if dest.exists() or dest.is_symlink():
                if dest.is_dir() and not dest.is_symlink():
                    shutil.rmtree(dest)
                else:
                    dest.unlink()
            os.replace(tmp, dest)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    log.info("extracted %s (%d members, %d bytes) into %s", archive.name, len(members), writer.written, dest)
    return dest
