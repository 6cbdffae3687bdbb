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


def full_length(rows: list[dict]) -> list[dict]:
    """The grid's finished trials that ran the most epochs: the like-for-like set (ASHA stops weak trials
    early, and a score after 2 epochs is no comparison for one after 4)."""
    done = [r for r in grid_rows(rows) if finite(r["best_mIoU"]) and finite(r.get("epochs"))]
    longest = max((r["epochs"] for r in done), default=None)
    return [r for r in done if r["epochs"] == longest]


def repeat_targets(rows: list[dict]) -> list[dict]:
    """The best and the worst full-length trial of one sweep (by best mIoU), to be trained again with
    another seed for as many epochs; empty with fewer than two such trials."""
    done = sorted(full_length(rows), key=lambda r: r["best_mIoU"])
    return [done[-1], done[0]] if len(done) >= 2 else []


def noise_level(rows: list[dict]) -> Optional[dict]:
    """How one sweep's differences compare with seed noise, like for like; None without repeats.

    Over the full-length trials (:func:`full_length`): ``grid_spread`` = max - min best mIoU and
    ``best_lead`` = best - runner-up. From the seed repeats of those trials (each at equal epochs):
    ``seed_sd`` = sqrt(mean(d^2) / 2), d = repeat - original, the seed-to-seed standard deviation of one
    trial's score, and ``half_width`` = t(0.975, df = pairs) * sqrt(2) * seed_sd, the 95% half-width of
    the difference of two configurations' single-seed scores. ``seed_spread`` = the largest |d|."""
    grid = full_length(rows)
    by_id = {r["trial_id"]: r for r in grid}
    pairs = [(by_id[r["repeat_of"]], r) for r in rows
             if r.get("repeat_of") in by_id and finite(r["best_mIoU"]) and r.get("epochs") == by_id[r["repeat_of"]]["epochs"]]
    if len(grid) < 2 or not pairs:
        return None
    from scipy.stats import t

    values = sorted((r["best_mIoU"] for r in grid), reverse=True)
    diffs = [rep["best_mIoU"] - orig["best_mIoU"] for orig, rep in pairs]
    seed_sd = math.sqrt(sum(d * d for d in diffs) / len(diffs) / 2)
    return {"epochs": grid[0]["epochs"], "trials": len(grid), "grid_spread": values[0] - values[-1],
            "best_lead": values[0] - values[1], "seed_spread": max(abs(d) for d in diffs), "seed_sd": seed_sd,
            "half_width": float(t.ppf(0.975, len(diffs))) * math.sqrt(2) * seed_sd,
            "pairs": [(orig["trial_id"], orig["best_mIoU"], rep["best_mIoU"]) for orig, rep in pairs]}


def best_is_distinguishable(noise: Optional[dict]) -> bool:
    """True when the best configuration leads the runner-up by more than the 95% half-width of seed noise."""
    return noise is not None and noise["best_lead"] > noise["half_width"]


def noise_verdict(noise: Optional[dict]) -> str:
    """One sentence on whether the grid's differences exceed what a change of seed alone gives."""
    if noise is None:
        return ("No seed repeats ran (tune.seed_repeats is off or fewer than two trials ran every epoch): the "
                "grid's differences cannot be told apart from seed noise.")
    grid, lead, band = 100 * noise["grid_spread"], 100 * noise["best_lead"], 100 * noise["half_width"]
    head = (f"Among the {noise['trials']} trials that ran all {int(noise['epochs'])} epochs the grid spans {grid:.2f} "
            f"mIoU points and the best leads the next by {lead:.2f}; seed noise from {len(noise['pairs'])} repeat(s) at "
            f"equal epochs: sd {100 * noise['seed_sd']:.2f} points per trial, so two configurations must differ by "
            f"more than ±{band:.2f} points (95%, Welch/t) to be told apart.")
    if grid <= band:
        return head + " The configurations are not distinguishable at this budget."
    if lead <= band:
        return head + (" The grid spans more than seed noise, but the best configuration is not distinguishable from "
                       "the next: no single best configuration at this budget.")
    return head + " The best configuration's lead is more than seed noise."


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
    if not params.tune.enabled:
        return ("# Sweeps are off (tune.enabled: false): no trial ran. Switch them on with\n"
                "#   dvc exp run -S tune.enabled=true\n")
    best, overrides = best_configs(params, rows)
    parse_params(best, source="tune/best.yaml")  # valid params vocabulary by construction
    supported = {name: best_is_distinguishable(noise_level([r for r in rows if r["sweep"] == name]))
                 for name in params.tune.sweeps}
    header = ["# Highest-scoring configuration per swept model (params.yaml vocabulary), written by the tune stage.",
              f"# Metric: {params.tune.metric} (best epoch of each trial)."]
    if not overrides:
        header.append("# (no finished trial)")
    elif all(supported.values()):
        header += ["# Train the final models with these values:", f"#   {best_command(overrides)}"]
    else:
        weak = ", ".join(n for n, ok in supported.items() if not ok)
        header += [f"# NOT A RECOMMENDATION for sweep(s) {weak}: their best configuration is not distinguishable from",
                   "# the next at this budget (see the verdicts below); these values only scored highest once.",
                   f"#   highest score only: {best_command(overrides)}"]
    for model, chosen in overrides.items():
        row = max((r for r in grid_rows(rows) if r["model"] == model and finite(r["best_mIoU"])),
                  key=lambda r: r["best_mIoU"])
        header.append(f"# {model}: {params.tune.metric} {row['best_mIoU']:.4f} (trial {row['trial_id']}) with "
                      + ", ".join(f"{k}={v}" for k, v in chosen.items()))
    for name in params.tune.sweeps:
        header.append(f"# {name}: {noise_verdict(noise_level([r for r in rows if r['sweep'] == name]))}")
    return "\n".join(header) + "\n" + yaml.safe_dump(best, sort_keys=False)
