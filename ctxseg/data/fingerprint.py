"""A fast identity of ``data.source``: names, sizes and modification times, never the contents.

The ``download`` stage records it with what it extracted or linked (``data/raw/<dataset>/source.json``,
which ``preprocess`` depends on), so the raw folder says which state of the user's folder it came from.
Whether ``download`` runs again is DVC's decision: it depends on ``data/source/<dataset>``, a link to
``data.source`` that DVC follows (``pipeline/source.py``). Cost: one ``stat`` per file, no reads.

This module imports only the standard library.
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
