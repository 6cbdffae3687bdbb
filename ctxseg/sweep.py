"""Sweeps without a scheduler: one trial's params, the result table, the best configuration, and how far
to trust a grid.

A sweep varies keys of one model of ``models`` (``tune.sweeps``): CFNet's K x H grid (Table 3) or
MCIBI's m0, alpha, beta. The ``tune`` stage runs the trials (Ray Tune) and hands each one's outcome to
this module as a plain row; everything here is plain data in, plain data out.

How far to trust a grid: a short trial's mIoU moves with the seed. After a sweep, its best and its
worst configuration are trained again with another seed for the same number of epochs (the *repeats*,
``repeat_of`` names the original trial); the largest seed-to-seed change of those two is the sweep's
noise level, and :func:`noise_verdict` words the grid's spread against it.
"""
from __future__ import annotations

import csv
import io
import math
from typing import Any, Optional

import yaml

from ctxseg.config import Params, SweepConfig, deep_merge, flatten, params_to_dict, parse_params, unflatten

RESULT_COLUMNS = ["sweep", "trial_id", "model", "status", "epochs", "iterations", "final_mIoU", "best_mIoU",
                  "seed", "repeat_of", "mlflow_run_id"]
REPEAT_SEED_OFFSET = 1  # a repeat trains with params.seed + 1


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def trial_params(base: dict, params: Params, sweep: SweepConfig, overrides: dict, *,
                 epochs: Optional[int] = None, seed: Optional[int] = None) -> Params:
    """The full, validated params of one trial: the swept model's config with ``overrides`` applied,
    ``tune.epochs`` epochs (or ``epochs``), validation every epoch (a scheduler needs the metric at each
    report), the per-trial scaling and, for a repeat, another ``seed``."""
    t = params.tune
    raw = deep_merge(base, {
        "models": {sweep.model: unflatten(overrides)},
        "train": {"epochs": epochs or t.epochs, "val_every": 1},
        "scaling": {"num_workers": t.workers_per_trial, "cpus_per_worker": t.cpus_per_worker,
                    "gpus_per_worker": t.gpus_per_worker if t.gpus_per_worker > 0 else 1,
                    "use_gpu": t.gpus_per_worker > 0},
    })
    trial = parse_params(raw, source=f"tune trial of {sweep.model} with {overrides}")
    return trial.for_seed(params.seed if seed is None else seed)


def trial_status(epochs: int, max_epochs: int, errored: bool) -> str:
    """``ERROR``, ``STOPPED`` (cut short by the scheduler) or ``COMPLETED``."""
    if errored:
        return "ERROR"
    return "STOPPED" if epochs < max_epochs else "COMPLETED"


def results_csv(rows: list[dict], keys: list[str]) -> str:
    """``tune/results.csv``: one row per trial, the fixed columns then the swept keys."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=RESULT_COLUMNS + keys, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in RESULT_COLUMNS + keys})
    return buf.getvalue()


def grid_rows(rows: list[dict]) -> list[dict]:
    """The sweep's own trials (repeats left out)."""
    return [r for r in rows if not r.get("repeat_of")]


def repeat_targets(rows: list[dict]) -> list[dict]:
    """The best and the worst finished trial of one sweep (by best mIoU), to be trained again with
    another seed; empty with fewer than two finished trials."""
    done = sorted((r for r in grid_rows(rows) if finite(r["best_mIoU"])), key=lambda r: r["best_mIoU"])
    return [done[-1], done[0]] if len(done) >= 2 else []


def noise_level(rows: list[dict]) -> Optional[dict]:
    """The grid's spread and the seed-to-seed spread of one sweep's rows, or None without repeats.

    ``grid_spread`` = max - min best mIoU over the grid's trials; ``seed_spread`` = the largest
    |repeat - original| best mIoU over the repeated configurations (each pair at equal epochs)."""
    grid = [r for r in grid_rows(rows) if finite(r["best_mIoU"])]
    by_id = {r["trial_id"]: r for r in grid}
    pairs = [(by_id[r["repeat_of"]], r) for r in rows
             if r.get("repeat_of") in by_id and finite(r["best_mIoU"])]
    if len(grid) < 2 or not pairs:
        return None
    values = [r["best_mIoU"] for r in grid]
    return {"grid_spread": max(values) - min(values),
            "seed_spread": max(abs(rep["best_mIoU"] - orig["best_mIoU"]) for orig, rep in pairs),
            "pairs": [(orig["trial_id"], orig["best_mIoU"], rep["best_mIoU"]) for orig, rep in pairs]}


def noise_verdict(noise: Optional[dict]) -> str:
    """One sentence on whether the grid's differences exceed what a change of seed alone gives."""
    if noise is None:
        return ("No seed repeats ran (tune.seed_repeats is off or fewer than two trials finished): the grid's "
                "differences cannot be told apart from seed noise.")
    grid, seed = 100 * noise["grid_spread"], 100 * noise["seed_spread"]
    head = f"Grid spread {grid:.2f} mIoU points; seed-to-seed spread of the repeated configurations {seed:.2f}."
    if grid <= 2 * seed:
        return head + " The configurations are not distinguishable at this budget."
    return head + " The grid's spread exceeds twice the seed noise: its ranking is more than seed noise."


def best_configs(params: Params, rows: list[dict]) -> tuple[dict, dict[str, dict]]:
    """(best.yaml content, swept overrides per model) from all sweeps' grid rows."""
    best_per_model: dict[str, dict] = {}
    for row in grid_rows(rows):
        if not finite(row["best_mIoU"]):
            continue
        current = best_per_model.get(row["model"])
        if current is None or row["best_mIoU"] > current["best_mIoU"]:
            best_per_model[row["model"]] = row
    models, overrides = {}, {}
    plain = params_to_dict(params)["models"]
    for model, row in best_per_model.items():
        chosen = {k: row[k] for k in params.tune.sweeps[row["sweep"]].space}
        overrides[model] = chosen
        models[model] = deep_merge(plain[model], unflatten(chosen))
    return ({"models": models} if models else {}), overrides


def best_command(overrides: dict[str, dict]) -> str:
    """The ``dvc exp run -S ...`` command that trains with the chosen values.

    Each key is set with Hydra's ``++`` (add or override): ``models.<m>`` in params.yaml usually holds
    only what differs from ``model``, so ``models.fcn_acf.acf.heads`` does not exist there yet and DVC
    refuses a plain ``-S models.fcn_acf.acf.heads=4`` ("not in struct"); ``++`` works whether it exists."""
    sets = " ".join(f"-S '++models.{m}.{k}={v}'" for m, chosen in overrides.items() for k, v in chosen.items())
    return f"dvc exp run {sets}".strip()


def changed_overrides(params: Params, best: dict) -> dict[str, dict]:
    """The keys of ``best`` (best.yaml content) whose values differ from ``params``, per model."""
    current = params_to_dict(params)["models"]
    return {m: {k: v for k, v in flatten(cfg).items() if flatten(current.get(m, {})).get(k) != v}
            for m, cfg in best.get("models", {}).items()}


def best_yaml_text(params: Params, rows: list[dict]) -> str:
    """``tune/best.yaml``: the best configuration per swept model, in params.yaml vocabulary."""
    best, overrides = best_configs(params, rows)
    parse_params(best, source="tune/best.yaml")  # valid params vocabulary by construction
    header = ["# Best configuration per swept model (params.yaml vocabulary), written by the tune stage.",
              f"# Metric: {params.tune.metric} (best epoch of each trial).",
              "# Train the final models with these values:",
              f"#   {best_command(overrides) if overrides else '(no finished trial)'}"]
    for model, chosen in overrides.items():
        row = max((r for r in grid_rows(rows) if r["model"] == model and finite(r["best_mIoU"])),
                  key=lambda r: r["best_mIoU"])
        header.append(f"# {model}: {params.tune.metric} {row['best_mIoU']:.4f} (trial {row['trial_id']}) with "
                      + ", ".join(f"{k}={v}" for k, v in chosen.items()))
    for name in params.tune.sweeps:
        header.append(f"# {name}: {noise_verdict(noise_level([r for r in rows if r['sweep'] == name]))}")
    return "\n".join(header) + "\n" + yaml.safe_dump(best, sort_keys=False)
