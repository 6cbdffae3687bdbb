"""DVC stage ``source`` (always run): the fast identity of ``data.source`` -> ``data/source/<dataset>.json``.

A folder outside the repository is invisible to DVC; this stage records its names, sizes and
modification times (:mod:`ctxseg.data.fingerprint`, one ``stat`` per file, no reads) so that the
``download`` stage, which depends on the file, re-runs when the folder changes, and with it
``preprocess``. The file is rewritten only when the fingerprint differs. It reads ``params.yaml``
with the YAML parser alone (no validation, no torch): the ``download`` stage validates everything.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional

import yaml

from ctxseg.data.fingerprint import source_fingerprint
from ctxseg.io import write_json

log = logging.getLogger("ctxseg.source")


def fingerprint_path(root: Path, dataset: str) -> Path:
    return root / "data" / "source" / f"{dataset}.json"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="path of params.yaml (default: %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    root = Path(os.environ.get("CTXSEG_ROOT") or os.getcwd()).resolve()
    try:
        data = (yaml.safe_load(Path(args.params).read_text(encoding="utf-8")) or {}).get("data") or {}
    except (OSError, yaml.YAMLError) as err:  # the download stage reports a bad params file in full
        data = {"error": f"{type(err).__name__}"}
    name = str(data.get("name", "synthetic"))
    source = data.get("source")
    fp = source_fingerprint(str(source) if source else None)
    out = fingerprint_path(root, name)
    old = None
    if out.is_file():
        try:
            old = json.loads(out.read_text(encoding="utf-8"))
        except ValueError:
            old = None
    if old != fp:
        write_json(out, fp)
        log.info("data.source fingerprint of %s: %s (%s files) -> %s", name, fp.get("digest", "none"),
                 fp.get("files", 0), out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
