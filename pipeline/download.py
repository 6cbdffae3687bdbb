"""DVC stage ``download``: fetch, verify and extract the dataset, or generate the embedded synthetic one.

Writes ``data/raw/<dataset>/``.
"""
from __future__ import annotations

import logging
from typing import Optional

from ctxseg.data import download_dataset
from pipeline import common

log = logging.getLogger("ctxseg.download")


@common.stage
def main(argv: Optional[list[str]] = None) -> None:
    args = common.base_parser(__doc__.splitlines()[0]).parse_args(argv)
    params = common.load_stage_params(args.params)
    paths = common.Paths(params)
    out = download_dataset(params.data, paths.raw)
    log.info("dataset %s ready in %s", params.data.name, out)


if __name__ == "__main__":
    raise SystemExit(main())
