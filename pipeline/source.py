"""DVC stage ``source``: ``data/source/<dataset>``, a link to ``data.source`` that DVC can see.

A folder or archive outside the repository is invisible to DVC unless something in the repository
points at it. This stage (re-run only when ``data.name`` or ``data.source`` change) makes
``data/source/<dataset>`` a symbolic link to ``data.source``; the ``download`` stage depends on the link,
and DVC follows it: it hashes the files behind it once and afterwards, through its own state cache (keyed
on inode, size and modification time), costs one ``stat`` per file. An added, removed or changed file
makes ``download`` (and with it ``preprocess``) run again; an unchanged folder leaves ``dvc status`` with
nothing to do. When DVC re-runs this stage it removes the link, never what it points at.

Without ``data.source`` (a generated or downloaded dataset) the path is a small folder saying so. The
stage reads ``params.yaml`` with the YAML parser alone (no validation, no torch): the ``download`` stage
validates everything; a ``data.source`` that does not exist is reported here, in one line, exit 2.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Optional

import yaml

from ctxseg.errors import EXIT_USER_ERROR

log = logging.getLogger("ctxseg.source")

NO_SOURCE = "NO_SOURCE"  # the file inside data/source/<dataset>/ when data.source is null


def source_link(root: Path, dataset: str) -> Path:
    return root / "data" / "source" / dataset


def point_at(link: Path, source: Optional[Path]) -> None:
    """Make ``link`` a symbolic link to ``source``, or (None) a folder holding :data:`NO_SOURCE`; what was there
    before is removed first, a link never followed."""
    if link.is_symlink() or link.is_file():
        link.unlink()
    elif link.is_dir():
        shutil.rmtree(link)
    link.parent.mkdir(parents=True, exist_ok=True)
    if source is None:
        link.mkdir()
        (link / NO_SOURCE).write_text("data.source is null: this dataset is generated or downloaded, not read "
                                      "from a local folder or archive.\n", encoding="utf-8")
    else:
        link.symlink_to(source, target_is_directory=source.is_dir())


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="path of params.yaml (default: %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    root = Path(os.environ.get("CTXSEG_ROOT") or os.getcwd()).resolve()
    try:
        data = (yaml.safe_load(Path(args.params).read_text(encoding="utf-8")) or {}).get("data") or {}
    except (OSError, yaml.YAMLError, AttributeError):  # the download stage reports a bad params file in full
        data = {}
    name = str(data.get("name", "synthetic"))
    source = data.get("source")
    target = Path(str(source)).expanduser().resolve() if source else None
    if target is not None and not target.exists():
        log.error("data.source=%s: no such folder or archive (resolved to %s). Fix data.source in %s.", source,
                  target, args.params)
        return EXIT_USER_ERROR
    link = source_link(root, name)
    point_at(link, target)
    log.info("%s -> %s", link.relative_to(root), target or "no data.source")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
