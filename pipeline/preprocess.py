"""DVC stage ``preprocess``: write the canonical layout (RGB images, train-id label PNGs with ignore 255,
split manifests, class statistics) to ``data/prepared/<dataset>/``."""
from __future__ import annotations

import logging
from typing import Optional

from ctxseg.data import prepare_dataset
from pipeline import common

log = logging.getLogger("ctxseg.preprocess")


@common.stage
def main(argv: Optional[list[str]] = None) -> None:
    args = common.base_parser(__doc__.splitlines()[0]).parse_args(argv)
    params = common.load_stage_params(args.params)
    paths = common.Paths(params)
    if not paths.raw.exists():
        raise FileNotFoundError(f"{paths.raw}: raw dataset not found. Run `dvc repro download` first.")
    meta = prepare_dataset(params.data, paths.raw, paths.prepared)
    log.info("prepared %s: %s", params.data.name, meta.get("splits"))


if __name__ == "__main__":
    raise SystemExit(main())
