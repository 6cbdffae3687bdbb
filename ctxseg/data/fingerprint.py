"""A fast identity of ``data.source``: names, sizes and modification times, never the contents.

DVC cannot see a folder outside the repository: the ``source`` stage (``always_changed``) writes
:func:`source_fingerprint` to ``data/source/<dataset>.json``; the ``download`` stage depends on that
file and copies the fingerprint into its output (``data/raw/<dataset>/source.json``), which the
``preprocess`` stage depends on. An added, removed, renamed, resized or re-written file changes the
digest, so ``dvc repro`` re-runs download and preprocess; an unchanged folder rewrites identical
bytes and nothing downstream runs. Cost: one ``stat`` per file (~0.1 s for 20,000 files, no reads).

This module imports only the standard library: the ``source`` stage runs on every ``dvc repro``.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Dict, Optional

__all__ = ["source_fingerprint", "FINGERPRINT_VERSION"]

FINGERPRINT_VERSION = 1


def _walk(root: str, digest: "hashlib._Hash", counts: Dict[str, int]) -> None:
    """Depth first in name order; hidden entries skipped (like the listers); symlinks followed."""
    stack = [""]
    while stack:
        rel = stack.pop()
        try:
            with os.scandir(os.path.join(root, rel) if rel else root) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as err:  # unreadable folder: part of the identity, the listers report it
            digest.update(f"!{rel}\0{type(err).__name__}\n".encode("utf-8", "surrogateescape"))
            continue
        subdirs = []
        for e in entries:
            if e.name.startswith("."):
                continue
            path = f"{rel}/{e.name}" if rel else e.name
            try:
                if e.is_dir():
                    subdirs.append(path)
                    continue
                st = e.stat()
            except OSError:
                digest.update(f"?{path}\n".encode("utf-8", "surrogateescape"))
                continue
            digest.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
            counts["files"] += 1
            counts["bytes"] += st.st_size
        stack.extend(reversed(subdirs))


def source_fingerprint(source: Optional[str]) -> Dict[str, Any]:
    """``{"source", "kind", "files", "bytes", "digest"}`` of ``source`` (a folder, an archive or None).

    ``source`` is resolved like ``data.source`` (``~`` expanded, relative to the working folder).
    A missing path gives ``kind: "missing"`` (the download stage reports it)."""
    if not source:
        return {"version": FINGERPRINT_VERSION, "source": None, "kind": "none"}
    path = Path(source).expanduser().resolve()
    digest = hashlib.sha256()
    counts = {"files": 0, "bytes": 0}
    if path.is_dir():
        kind = "folder"
        _walk(str(path), digest, counts)
    elif path.is_file():
        kind = "file"
        st = path.stat()
        digest.update(f"{path.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
        counts = {"files": 1, "bytes": st.st_size}
    else:
        kind = "missing"
    return {"version": FINGERPRINT_VERSION, "source": str(path), "kind": kind, **counts,
            "digest": digest.hexdigest()[:32]}
