"""Group ``study`` (issue #26) - where the wall time of the default study goes.

A throw-away copy of the project with the shipped ``params.yaml`` (``--quick``: a tiny dataset, one seed,
two epochs) runs ``dvc repro`` once. Each stage's wall time is the time from DVC's ``Running stage`` line
to the next one (or to the end); its *step compute* is the time its own code measured inside training
and evaluation steps:

* ``train@<model>``: every seed's epochs (``train_epoch_seconds``) and validations (``val_seconds``) from
  its ``run.json`` history;
* ``tune``: the same two figures of every trial and seed repeat, from their MLflow runs;
* ``evaluate@<model>``: the model time per image (``seconds_per_image``) x images x seeds;
* every other stage (data, register, report): none.

Everything else (process starts, imports, Ray, MLflow, checkpoints, DVC itself) is the pipeline's own cost.
Reported per stage and in all, with the goal: at least 80% of the study's wall time in steps.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import yaml

from bench import target
from pipeline.scratch import make_project, pipeline_env

QUICK = {"seeds": [0], "train": {"epochs": 2},
         "data": {"synthetic": {"num_train": 16, "num_val": 4, "image_size": 96, "min_cue_distance": 32},
                  "augment": {"crop_size": [96, 96]}},
         "tune": {"epochs": 2}}
STAGE_LINE = re.compile(r"Running stage '([^']+)'")


def repro_timeline(project: Path) -> tuple[OrderedDict, float, str]:
    """Run ``dvc repro``; return each stage's wall seconds (in the order run), the total and the output."""
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "dvc", "repro"], cwd=project, env=pipeline_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    marks: list[tuple[str, float]] = []
    lines = []
    for line in proc.stdout:
        lines.append(line)
        found = STAGE_LINE.search(line)
        if found:
            marks.append((found.group(1), time.perf_counter()))
    proc.wait()
    total = time.perf_counter() - started
    output = "".join(lines)
    if proc.returncode != 0:
        raise RuntimeError(f"dvc repro failed ({proc.returncode}): {output[-3000:]}")
    walls: OrderedDict = OrderedDict()
    for (stage, t0), (_, t1) in zip(marks, marks[1:] + [("end", started + total)]):
        walls[stage] = t1 - t0
    return walls, total, output


def _history_seconds(history: list[dict]) -> float:
    return sum(float(h.get("train_epoch_seconds", 0.0)) + float(h.get("val_seconds", 0.0)) for h in history)


def step_seconds(project: Path, stage: str) -> tuple[float, str]:
    """(seconds inside training / evaluation steps, where the figure comes from) of one stage."""
    if stage.startswith("train@"):
        model = stage.split("@", 1)[1]
        runs = sorted((project / "models" / model / "seeds").glob("*/run.json"))
        return sum(_history_seconds(json.loads(r.read_text())["history"]) for r in runs), f"{len(runs)} seed(s)"
    if stage.startswith("evaluate@"):
        model = stage.split("@", 1)[1]
        details = json.loads((project / "metrics" / f"{model}.details.json").read_text())
        seeds = len(details.get("seeds") or [None])
        return float(details["seconds_per_image"]) * int(details["num_images"]) * seeds, f"{seeds} seed(s)"
    if stage == "tune":
        total, trials = tune_step_seconds(project)
        return total, f"{trials} trial(s)"
    return 0.0, ""


def tune_step_seconds(project: Path, sweep: str = "") -> tuple[float, int]:
    """(seconds in the epochs and validations of every trial of the project's sweeps, or of ``sweep``,
    from their MLflow runs; the number of trials)."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("ctxseg")
    query = "tags.stage = 'tune' and tags.trial_id != ''" + (f" and tags.sweep = '{sweep}'" if sweep else "")
    trials = client.search_runs([experiment.experiment_id], query)
    total = 0.0
    for run in trials:
        for key in ("train_epoch_seconds", "val_seconds"):
            total += sum(m.value for m in client.get_metric_history(run.info.run_id, key))
    return total, len(trials)


def run(opts) -> dict:
    base = Path(tempfile.mkdtemp(prefix="ctxseg-bench-study-"))
    try:
        project = make_project(base / "study", QUICK if opts.quick else {}, replace={})
        shipped = yaml.safe_load((project / "params.yaml").read_text())
        walls, total, _ = repro_timeline(project)
        rows, step_total, detail = [], 0.0, {}
        for stage, wall in walls.items():
            steps, what = step_seconds(project, stage)
            step_total += steps
            detail[stage] = {"wall_s": wall, "step_s": steps}
            rows.append({"stage": stage, "wall_s": round(wall, 1), "step_s": round(steps, 1),
                         "other_s": round(wall - steps, 1), "in steps %": round(100 * steps / wall, 1) if wall else 0,
                         "note": what})
        share = step_total / total if total else 0.0
        rows.append({"stage": "the whole dvc repro", "wall_s": round(total, 1), "step_s": round(step_total, 1),
                     "other_s": round(total - step_total, 1), "in steps %": round(100 * share, 1),
                     "note": f"{len(shipped.get('seeds', [0]))} seed(s), {len(shipped['models'])} models, "
                             f"{shipped['train']['epochs']} epochs"})
        tune = detail.get("tune")
        targets = [target("default study: wall time in training / evaluation steps", ">= 80%",
                          f"{100 * share:.1f}%", share >= 0.8,
                          f"{total:.0f} s in all, {total - step_total:.0f} s outside steps")]
        return {"rows": rows, "targets": targets, "stages": detail, "total_s": total, "quick": opts.quick,
                "tune": tune}
    finally:
        shutil.rmtree(base, ignore_errors=True)
