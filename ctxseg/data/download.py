"""The download stage: fetch, verify and safely extract a dataset, or generate the synthetic one.

* Resumable HTTP download (``Range`` requests) into ``<file>.part`` with a tqdm bar, retried on
  connection errors; the finished file is moved into place with ``os.replace``.
* Checksums: the published md5/sha1 of the archive (or ``data.checksums``), otherwise a sha256
  recorded on first download in ``<download_dir>/checksums.json`` and verified on every later use.
* Safe extraction of zip and tar archives: absolute paths, ``..`` components, links pointing outside
  the destination and device/FIFO members are rejected before anything is written; extraction goes
  to a temporary folder that is renamed into place.
* ``data.source``: an already-downloaded archive, a folder of archives, or an extracted folder.
  Login-gated datasets (Cityscapes, LIP, CIHP) need it; offline machines too.
* When neither a URL nor ``source`` can serve, :class:`DownloadError` says what to get and where to
  put it.

Archives and partial downloads live in ``data.download_dir`` (default ``<raw_dir>/../_downloads``),
outside the stage output, so a re-run resumes instead of starting over.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import shutil
import socket
import stat
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath
from typing import Dict, List, Optional, Tuple

from tqdm import tqdm

from ctxseg.data import sources
from ctxseg.data.config import DataConfig
from ctxseg.data.datasets import get_dataset
from ctxseg.io import atomic_path, write_json
from ctxseg.data.layout import check_sample_ids
from ctxseg.data.types import ChecksumError, DownloadError, UnsafeArchiveError

log = logging.getLogger(__name__)

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
CHUNK = 1 << 20
USER_AGENT = "ctxseg-data/0.1"


__all__ = ["download_dataset", "http_download", "safe_extract", "check_archive", "verify_file",
           "DownloadError", "ChecksumError", "UnsafeArchiveError"]


# ----------------------------------------------------------------------------------- checksums


def parse_checksum(spec: str) -> Tuple[str, str]:
    algo, _, digest = spec.partition(":")
    if algo not in ("md5", "sha1", "sha256") or not digest:
        raise ValueError(f"bad checksum spec {spec!r}; expected 'md5:<hex>', 'sha1:<hex>' or 'sha256:<hex>'")
    return algo, digest.lower()


def file_digest(path: Path, algo: str = "sha256", progress: bool = True) -> str:
    h = hashlib.new(algo)
    size = path.stat().st_size
    with open(path, "rb") as f, tqdm(total=size, unit="B", unit_scale=True, desc=f"{algo} {path.name}",
                                     disable=None if progress else True, leave=False) as bar:
        while True:
            buf = f.read(CHUNK)
            if not buf:
                break
            h.update(buf)
            bar.update(len(buf))
    return h.hexdigest()


class ChecksumBook:
    """sha256 digests recorded on first download (``checksums.json``), verified afterwards."""

    def __init__(self, path: Path):
        self.path = path

    def load(self) -> Dict[str, str]:
        if self.path.is_file():
            try:
                return dict(json.loads(self.path.read_text()))
            except ValueError:
                log.warning("ignoring unreadable checksum record %s", self.path)
        return {}

    def get(self, name: str) -> Optional[str]:
        return self.load().get(name)

    def record(self, name: str, spec: str) -> None:
        from ctxseg.io import write_json

        book = self.load()
        book[name] = spec
        write_json(self.path, dict(sorted(book.items())))
        log.info("recorded %s for %s in %s (verified on every later use)", spec, name, self.path)


def verify_file(path: Path, expected: Optional[str], book: Optional[ChecksumBook], source_hint: str = "") -> str:
    """Check ``path`` against ``expected`` (published/override) or the recorded sha256; record one if
    neither exists. Returns the checksum spec that holds. Raises :class:`ChecksumError`."""
    name = path.name
    recorded = book.get(name) if book is not None else None
    spec = expected or recorded
    if spec is None:
        digest = file_digest(path, "sha256")
        spec = f"sha256:{digest}"
        if book is not None:
            book.record(name, spec)
        return spec
    algo, want = parse_checksum(spec)
    got = file_digest(path, algo)
    if got != want:
        origin = "published" if expected else f"recorded in {book.path if book else '?'} on first download"
        raise ChecksumError(
            f"checksum mismatch for {path}: {algo} is {got}, expected {want} ({origin}). The file is corrupt, "
            f"truncated or a different version. Delete it and run the download stage again{source_hint}; if you "
            f"trust this file, put its checksum in data.checksums[{name!r}] or set data.verify_checksums: false.")
    return spec


# ------------------------------------------------------------------------------------ download


def http_download(url: str, dest: Path, expected: Optional[str] = None, book: Optional[ChecksumBook] = None,
                  retries: int = 3, timeout: float = 60.0, backoff: float = 1.0) -> Path:
    """Download ``url`` to ``dest`` resumably; verify; atomically rename ``dest.part`` -> ``dest``."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    attempt = 0
    while True:
        offset = part.stat().st_size if part.exists() else 0
        req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
        if offset:
            req.add_header("Range", f"bytes={offset}-")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                status = resp.status
                if offset and status == 206:
                    cr = resp.headers.get("Content-Range", "")
                    start = int(cr.split()[1].split("-")[0]) if cr.startswith("bytes ") else -1
                    if start != offset:
                        raise DownloadError(f"server answered Range {offset}- with {cr!r} for {url}")
                    mode = "ab"
                    log.info("resuming %s at byte %d", dest.name, offset)
                else:
                    if offset:
                        log.info("server ignored the Range request for %s; restarting from byte 0", url)
                    offset = 0
                    mode = "wb"
                length = resp.headers.get("Content-Length")
                total = offset + int(length) if length is not None else None
                with open(part, mode) as f, tqdm(total=total, initial=offset, unit="B", unit_scale=True,
                                                 desc=f"download {dest.name}", disable=None) as bar:
                    got = 0
                    while True:
                        buf = resp.read(CHUNK)
                        if not buf:
                            break
                        f.write(buf)
                        got += len(buf)
                        bar.update(len(buf))
                if length is not None and got < int(length):
                    raise http.client.IncompleteRead(b"", int(length) - got)
            break
        except urllib.error.HTTPError as e:
            if e.code == 416 and offset:  # range beyond the end: the .part file is already complete
                break
            if e.code in (401, 403, 404, 410):
                raise DownloadError(f"{url} answered HTTP {e.code} {e.reason}") from e
            err: Exception = e
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError, socket.timeout, TimeoutError) as e:
            err = e
        attempt += 1
        if attempt > retries:
            raise DownloadError(f"downloading {url} failed after {retries + 1} attempts: {err}; "
                                f"{part.stat().st_size if part.exists() else 0} bytes kept in {part} for resuming")
        log.warning("download of %s interrupted (%s); retrying (%d/%d)", url, err, attempt, retries)
        time.sleep(backoff * attempt)
    try:
        verify_file(part, expected, None, f" (from {url})")
    except ChecksumError as e:
        part.unlink(missing_ok=True)
        raise ChecksumError(str(e).replace(str(part), f"{dest} (downloaded from {url}, deleted)")) from None
    if expected is None and book is not None:
        existing = book.get(dest.name)
        if existing is not None:
            try:
                verify_file(part, existing, None)
            except ChecksumError as e:
                part.unlink(missing_ok=True)
                raise ChecksumError(f"{e} (recorded earlier in {book.path})") from None
        else:
            book.record(dest.name, f"sha256:{file_digest(part, 'sha256')}")
    os.replace(part, dest)
    return dest


# ----------------------------------------------------------------------------------- extraction


def is_archive(path: Path) -> bool:
    n = path.name.lower()
    return path.is_file() and any(n.endswith(s) for s in ARCHIVE_SUFFIXES)


def archive_stem(path: Path) -> str:
    n = path.name
    for s in sorted(ARCHIVE_SUFFIXES, key=len, reverse=True):
        if n.lower().endswith(s):
            return n[: -len(s)]
    return path.stem


def _unsafe_name(name: str) -> Optional[str]:
    if not name:
        return "empty member name"
    norm = name.replace("\\", "/")
    if norm.startswith("/") or (len(norm) > 1 and norm[1] == ":"):
        return "absolute path"
    if ".." in PurePosixPath(norm).parts:
        return "'..' path component"
    return None


def _inside(base: PurePosixPath, target: str) -> bool:
    """Does ``target`` (relative to the archive root) stay inside it after normalisation?"""
    parts: List[str] = []
    for p in (base / target).parts:
        if p in ("", "."):
            continue
        if p == "..":
            if not parts:
                return False
            parts.pop()
        else:
            parts.append(p)
    return True


def check_archive(archive: Path) -> List[Tuple[str, str]]:
    """Every unsafe member of ``archive`` as ``(member, reason)`` (empty list = safe)."""
    bad: List[Tuple[str, str]] = []
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                why = _unsafe_name(info.filename)
                mode = info.external_attr >> 16
                if why is None and mode:
                    if stat.S_ISLNK(mode):
                        target = zf.read(info).decode("utf-8", "replace")
                        if target.startswith("/") or not _inside(PurePosixPath(info.filename).parent, target):
                            why = f"link pointing outside the destination ({target})"
                    elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
                        why = "device, FIFO or socket member"
                if why:
                    bad.append((info.filename, why))
        return bad
    try:
        tf = tarfile.open(archive, "r:*")
    except tarfile.TarError as e:
        raise UnsafeArchiveError(f"{archive} is not a readable zip or tar archive ({e}); re-download it") from e
    with tf:
        for m in tf.getmembers():
            why = _unsafe_name(m.name)
            if why is None:
                if m.issym():
                    if m.linkname.startswith("/") or not _inside(PurePosixPath(m.name).parent, m.linkname):
                        why = f"symlink pointing outside the destination ({m.linkname})"
                elif m.islnk():
                    if m.linkname.startswith("/") or not _inside(PurePosixPath("."), m.linkname):
                        why = f"hard link pointing outside the destination ({m.linkname})"
                elif m.ischr() or m.isblk() or m.isfifo() or m.isdev():
                    why = "device or FIFO member"
                elif not (m.isfile() or m.isdir() or m.issym() or m.islnk()):
                    why = "unsupported member type"
            if why:
                bad.append((m.name, why))
    return bad


def safe_extract(archive: Path, dest: Path) -> Path:
    """Extract ``archive`` into ``dest`` (created atomically: temp folder + rename).

    Raises :class:`UnsafeArchiveError` listing every unsafe member before anything is written."""
    archive, dest = Path(archive), Path(dest)
    bad = check_archive(archive)
    if bad:
        listing = "\n".join(f"  {n!r}: {why}" for n, why in bad[:20])
        more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
        raise UnsafeArchiveError(
            f"refusing to extract {archive}: {len(bad)} unsafe member(s) (absolute paths, '..', links "
            f"outside the destination or device files):\n{listing}{more}\nThe archive is corrupt or "
            f"malicious; delete it and get it again from the official source.")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                for info in tqdm(zf.infolist(), desc=f"extract {archive.name}", unit="file", disable=None):
                    zf.extract(info, tmp)
        else:
            with tarfile.open(archive, "r:*") as tf:
                members = tf.getmembers()
                for m in tqdm(members, desc=f"extract {archive.name}", unit="file", disable=None):
                    if hasattr(tarfile, "data_filter"):
                        tf.extract(m, tmp, filter="data")
                    else:  # pragma: no cover - python < 3.11.4
                        tf.extract(m, tmp)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


# ------------------------------------------------------------------------------------ the stage


def _download_dir(cfg: DataConfig, raw_dir: Path) -> Path:
    return Path(cfg.download_dir).expanduser() if cfg.download_dir else raw_dir.parent / "_downloads"


def _expected(cfg: DataConfig, res) -> Optional[str]:
    if not cfg.verify_checksums:
        return None
    return cfg.checksums.get(res.filename) or res.checksum


def _what_to_get(spec, raw_dir: Path, dl_dir: Path) -> str:
    return (f"Get {spec.instructions}, then either set data.source to the archive, a folder holding the "
            f"archive(s), or the extracted folder, or put the archive(s) in {dl_dir}/ and run the download "
            f"stage again (raw output: {raw_dir}).")


def _warn_listing_problems(name: str, problems: List[Tuple[str, str]], limit: int = 20) -> None:
    """Pair problems do not stop the download: the preprocess stage reports them with every other
    problem of the data (corrupt files, out-of-range values) in one message."""
    if not problems:
        return
    lines = "\n".join(f"  {f}: {m}" for f, m in problems[:limit])
    more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
    log.warning("%s: %d problem(s) in the raw data; the preprocess stage will refuse it until they are fixed:\n%s%s",
                name, len(problems), lines, more)


def download_dataset(cfg: DataConfig, raw_dir: Path) -> Path:
    """The download stage for ``cfg.name``; returns ``raw_dir`` (the raw data's home).

    ``synthetic``: generated deterministically from ``cfg.synthetic`` into ``raw_dir``. Real
    datasets: archives from ``cfg.source`` or downloaded (resumable, verified) are extracted safely
    into ``raw_dir/extracted/<archive stem>/``; an extracted ``source`` folder is linked through
    ``raw_dir/source.json`` instead of copied. The result is checked to have the dataset's layout.
    """
    raw_dir = Path(raw_dir)
    spec = get_dataset(cfg.name)
    if spec.generate is not None:  # made locally (the synthetic benchmark), nothing to download
        return spec.generate(cfg, raw_dir)

    dl_dir = _download_dir(cfg, raw_dir)
    book = ChecksumBook(dl_dir / "checksums.json")
    archives: List[Path] = []
    fresh: set = set()  # verified while downloading
    link: Optional[Path] = None

    if cfg.source:
        src = Path(cfg.source).expanduser().resolve()
        if not src.exists():
            raise DownloadError(f"data.source={cfg.source!r} does not exist. " + _what_to_get(spec, raw_dir, dl_dir))
        if src.is_file():
            if not is_archive(src):
                raise DownloadError(f"data.source={cfg.source!r} is a file but not a zip/tar archive. "
                                    + _what_to_get(spec, raw_dir, dl_dir))
            archives.append(src)
        else:
            try:
                sources.list_samples(cfg, src)
                link = src
            except sources.LayoutError:
                archives.extend(sorted(p for p in src.iterdir() if is_archive(p)))
                if not archives:
                    raise
    # resources not provided by `source`: use a file already in download_dir, else download
    provided = {a.name for a in archives}
    if link is None:
        for res in spec.resources:
            if res.filename in provided:
                continue
            local = dl_dir / res.filename
            if local.is_file():
                archives.append(local)
                continue
            if cfg.source:  # the user chose their own files; do not mix in downloads silently
                continue
            url = f"{cfg.mirror.rstrip('/')}/{res.filename}" if cfg.mirror else res.url
            if url is None:
                raise DownloadError(f"{cfg.name} is login-gated: {res.filename} cannot be downloaded "
                                    f"automatically. " + _what_to_get(spec, raw_dir, dl_dir))
            try:
                archives.append(http_download(url, local, _expected(cfg, res),
                                              book if cfg.verify_checksums else None,
                                              retries=cfg.download_retries, timeout=cfg.download_timeout))
                fresh.add(local)
            except ChecksumError:
                raise
            except DownloadError as e:
                raise DownloadError(f"{e}. " + _what_to_get(spec, raw_dir, dl_dir)) from e
        if not archives:
            raise DownloadError(f"no data for {cfg.name}: data.source is not set and nothing can be downloaded. "
                                + _what_to_get(spec, raw_dir, dl_dir))

    # verify every archive we are about to use (downloads were verified while fetching)
    known = {r.filename: r for r in spec.resources}
    verified: Dict[str, Optional[str]] = {}
    for a in archives:
        res = known.get(a.name)
        expected = cfg.checksums.get(a.name) or (res.checksum if res else None)
        if not cfg.verify_checksums:
            verified[a.name] = None
        elif a in fresh:
            verified[a.name] = expected or book.get(a.name)
        else:
            verified[a.name] = verify_file(a, expected, book, "")
    stamp = {"dataset": cfg.name, "archives": verified, "linked_source": str(link) if link else None}
    done = raw_dir / "download.json"
    if done.is_file():
        try:
            old = json.loads(done.read_text())
            if {k: old.get(k) for k in stamp} == stamp and cfg.verify_checksums:
                log.info("%s raw data in %s is up to date (same verified archives); nothing to do", cfg.name, raw_dir)
                return raw_dir
        except ValueError:
            pass

    with atomic_path(raw_dir) as tmp:
        tmp.mkdir(parents=True)
        if link is not None:
            write_json(tmp / sources.SOURCE_LINK, {"path": str(link)})
        for a in archives:
            safe_extract(a, tmp / sources.EXTRACTED / archive_stem(a))
        root = link if link is not None else tmp / sources.EXTRACTED
        try:
            listing = sources.list_samples(cfg, root)
        except sources.LayoutError as e:
            raise DownloadError(f"{e}\n" + _what_to_get(spec, raw_dir, dl_dir)) from e
        samples = listing.samples
        _warn_listing_problems(cfg.name, listing.problems + check_sample_ids(samples))
        write_json(tmp / "download.json", {**stamp, "pairs_found": len(samples)})
    if not cfg.keep_archives:  # only our own downloads, never the user's `source` files
        for a in archives:
            if a.parent == dl_dir:
                a.unlink(missing_ok=True)
    log.info("%s raw data ready in %s (%d pairs found)", cfg.name, raw_dir, len(samples))
    return raw_dir
