"""Seed spread of one model, trained as the train stage trains it but in a plain process (no Ray, no MLflow):
the same seeding (``seed * 1000`` for rank 0), loaders (:func:`ctxseg.loaders.build_loaders`) and loop
(:func:`ctxseg.engine.fit`), so a seed gives the stage's weights and numbers. For finding where variance
comes from (``--set train.lr=0.01`` and the like) without a ``dvc repro`` per try.

    python scripts/seed_spread.py --model fcn_mcibi --seeds 0 1 2 --set train.lr=0.01
    python scripts/seed_spread.py --model fcn_acf --prepared data/prepared/synthetic --json out.json

Prints each seed's final validation mIoU and the mean ± sd; the seeds run one after another.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

log = logging.getLogger("seed_spread")


def train_one(params, model_name: str, prepared: Path, seed: int) -> dict:
    import torch

    from ctxseg.engine import build_optimizer, fit, seed_everything
    from ctxseg.loaders import build_loaders
    from ctxseg.models import build_segmentor

    params = params.for_seed(seed)
    torch.set_num_threads(max(1, int(params.scaling.cpus_per_worker)))
    seed_everything(params.seed * 1000)
    loaders = build_loaders(params.data, prepared, batch_size=params.train.batch_size, seed=params.seed)
    model = build_segmentor(params.model_config_of(model_name), loaders.num_classes)
    optimizer = build_optimizer(model, params.train)
    started = time.perf_counter()
    state = fit(model, loaders.train, loaders.val, optimizer, params.train, num_classes=loaders.num_classes)
    curve = [(h["epoch"], h["val_mIoU"]) for h in state.history if "val_mIoU" in h]
    return {"seed": seed, "val_mIoU": curve[-1][1], "curve": curve, "seconds": time.perf_counter() - started}


def main() -> int:
    from ctxseg.config import deep_merge, parse_params, unflatten

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--params", default=str(ROOT / "params.yaml"))
    parser.add_argument("--prepared", default=str(ROOT / "data" / "prepared" / "synthetic"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a params key (YAML value), e.g. train.lr=0.01 or models.fcn_acf.acf.heads=4")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    raw = yaml.safe_load(Path(args.params).read_text())
    for item in args.set:
        key, value = item.split("=", 1)
        raw = deep_merge(raw, unflatten({key: yaml.safe_load(value)}))
    params = parse_params(raw, source=f"{args.params} with {args.set}")
    runs = []
    for seed in args.seeds:
        runs.append(train_one(params, args.model, Path(args.prepared), seed))
        log.info("%s seed %d: val mIoU %.2f (%.0f s)", args.model, seed, 100 * runs[-1]["val_mIoU"], runs[-1]["seconds"])
    values = [100 * r["val_mIoU"] for r in runs]
    sd = statistics.stdev(values) if len(values) > 1 else float("nan")
    log.info("%s %s: %s -> mean %.2f ± %.2f (sd)", args.model, " ".join(args.set) or "(params.yaml)",
             ", ".join(f"{v:.2f}" for v in values), statistics.mean(values), sd)
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "set": args.set, "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
