"""How every training worker reaches the prepared dataset, on nodes that share no disk with the driver.

- ``ray.data_path: null`` — workers read the repo's ``data/prepared/<dataset>``: right on one machine,
  and on a cluster only for ranks on the driver's node (others fail at once, naming node and path).
- ``ray.data_path: /mnt/shared/ctxseg-data`` (a mount every node has) — the driver publishes the
  prepared folder there once per dataset version and workers read it in place.
- ``ray.data_path: s3://bucket/prefix`` (any pyarrow.fs URI) — the driver publishes it there; each
  node copies it once into a node-local cache (``$TMPDIR/ctxseg-data``), shared by its ranks.

A version is named by its identity, the hash of ``meta.json`` and the split lists; a published copy is
complete once its ``_COMPLETE`` marker (written last) exists. Every worker checks the identity of what
it will read before the first step. Shipping through the object store instead would hold the whole
dataset in memory on the head (ADE20K ~1 GB, COCO-Stuff ~20 GB): shared storage scales, Ray does not.
"""
from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from ctxseg.errors import UserError
from pipeline.storage.filesystems import filesystem, is_uri

log = logging.getLogger("ctxseg.data_access")

MARKER = "_COMPLETE"


class DatasetUnavailableError(UserError):
    """A worker cannot read the prepared dataset the driver trains on."""


def identity(prepared: Path) -> str:
    """Hash of ``meta.json`` and the split lists (``*.txt``) of a prepared dataset folder."""
    prepared = Path(prepared)
    digest = hashlib.sha256()
    files = [prepared / "meta.json", *sorted(prepared.glob("*.txt"))]
    for path in files:
        if not path.is_file():
            raise FileNotFoundError(path)
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def publish(prepared: Path, data_path: Optional[str]) -> dict:
    """Make ``prepared`` readable by every worker; return the handle workers resolve (plain data)."""
    prepared = Path(prepared).resolve()
    ident = identity(prepared)
    handle = {"identity": ident, "driver_path": str(prepared), "location": None, "uri": False}
    if not data_path:
        return handle
    import pyarrow.fs as pafs

    name = f"{prepared.name}-{ident}"
    fs, base = filesystem(data_path)
    target = f"{base.rstrip('/')}/{name}"
    if fs.get_file_info(f"{target}/{MARKER}").type != pafs.FileType.File:
        log.info("publishing the prepared dataset to %s/%s", data_path.rstrip("/"), name)
        fs.create_dir(target, recursive=True)
        pafs.copy_files(str(prepared), target, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
        with fs.open_output_stream(f"{target}/{MARKER}") as out:
            out.write(ident.encode())
    handle.update(location=f"{data_path.rstrip('/')}/{name}", uri=is_uri(data_path))
    return handle


def _node_cache(handle: dict) -> Path:
    """Copy a published URI dataset into this node's cache once (ranks of one node share it)."""
    import pyarrow.fs as pafs

    cache_root = Path(tempfile.gettempdir()) / "ctxseg-data"
    cache_root.mkdir(parents=True, exist_ok=True)
    local = cache_root / handle["location"].rstrip("/").rsplit("/", 1)[-1]
    with open(cache_root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (local / MARKER).is_file():
            fs, path = filesystem(handle["location"])
            if fs.get_file_info(f"{path}/{MARKER}").type != pafs.FileType.File:
                raise FileNotFoundError(handle["location"])
            partial = Path(tempfile.mkdtemp(prefix=".partial-", dir=cache_root))
            pafs.copy_files(path, str(partial), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
            shutil.rmtree(local, ignore_errors=True)
            os.replace(partial, local)
    return local


def resolve(handle: dict, node: str) -> Path:
    """The local folder this worker reads, after checking it is the driver's dataset version.

    Raises :class:`DatasetUnavailableError` naming ``node``, the path and the fix."""
    where = handle["location"] or handle["driver_path"]
    try:
        local = _node_cache(handle) if handle["uri"] else Path(where)
        seen = identity(local)
    except (FileNotFoundError, OSError) as err:
        hint = ("set ray.data_path to a shared mount or an s3:// URI every node can read (docs/cluster.md)"
                if handle["location"] is None else "check that this node mounts / can reach it")
        raise DatasetUnavailableError(
            f"node {node} cannot read the prepared dataset at {where} ({err.__class__.__name__}: {err}); {hint}"
        ) from None
    if seen != handle["identity"]:
        raise DatasetUnavailableError(
            f"node {node} reads a different dataset version at {where} (identity {seen}, the driver's is "
            f"{handle['identity']}); re-run `dvc repro preprocess` on the driver, which publishes it again")
    return local
