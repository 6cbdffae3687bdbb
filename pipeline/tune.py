"""DVC stage ``tune``: Ray Tune sweeps over CFNet's K × H and MCIBI's m0, α, β (``tune.sweeps``).

Each trial is a full Ray Train run built by :func:`pipeline.train.make_trainer`, the train stage's own
code path, reporting rank-0 metrics to Tune. Each sweep is one MLflow parent run; each trial a child
run (tag ``mlflow.parentRunId``) with the train stage's params and metric names, so sweeps and training
runs line up in the comparison UI.

Resume: a sweep directory is tied to a fingerprint of its config. Re-running after an interruption
restores the Tuner (``Tuner.restore``, errored trials re-run) and each trial re-attaches to its own
MLflow child run by trial id: no duplicate or orphaned runs.

Writes ``tune/results.csv`` (one row per trial), ``tune/best.yaml`` (the best config per swept model, in
params.yaml vocabulary) and ``tune/ray/<sweep>/`` (Ray Tune state, persisted).

``python -m pipeline.tune --best-command`` prints the ``dvc exp run -S ...`` command that trains the
final models with the best values.
"""
from __future__ import annotations

import csv
import functools
import io
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import yaml

from ctxseg.config import Params, SweepConfig, deep_merge, flatten, params_to_dict, parse_params, unflatten
from ctxseg.io import write_json, write_text
from ctxseg.models import build_segmentor
from pipeline import common

log = logging.getLogger("ctxseg.tune")

TRIAL_DRIVER_MEMORY = 64 * 1024**2  # bytes reserved for each trial's driver function
RESULT_COLUMNS = ["sweep", "trial_id", "model", "status", "epochs", "iterations", "final_mIoU", "best_mIoU",
                  "mlflow_run_id"]


# ---------------------------------------------------------------------------------------------
# search space and trial configs


def search_space(sweep: SweepConfig) -> dict[str, Any]:
    """Ray Tune domains for the sweep's keys (grid dimensions become choices outside grid search)."""
    from ray import tune

    space = {}
    for key, dim in sweep.space.items():
        values = getattr(dim, dim.kind)
        if dim.kind == "grid":
            space[key] = tune.grid_search(list(values)) if sweep.search == "grid" else tune.choice(list(values))
        elif dim.kind == "choice":
            space[key] = tune.grid_search(list(values)) if sweep.search == "grid" else tune.choice(list(values))
        elif dim.kind == "uniform":
            space[key] = tune.uniform(*values)
        elif dim.kind == "loguniform":
            space[key] = tune.loguniform(*values)
        else:
            space[key] = tune.randint(*values)
    return space


def trial_params(base: dict, params: Params, sweep: SweepConfig, overrides: dict) -> Params:
    """The full, validated params of one trial: the swept model's config with ``overrides`` applied,
    ``tune.epochs`` epochs, and the per-trial Ray Train scaling."""
    t = params.tune
    raw = deep_merge(base, {
        "models": {sweep.model: unflatten(overrides)},
        "train": {"epochs": t.epochs, "val_every": 1},  # the scheduler needs the metric every epoch
        "scaling": {"num_workers": t.workers_per_trial, "cpus_per_worker": t.cpus_per_worker,
                    "gpus_per_worker": t.gpus_per_worker if t.gpus_per_worker > 0 else 1,
                    "use_gpu": t.gpus_per_worker > 0},
    })
    return parse_params(raw, source=f"tune trial of {sweep.model} with {overrides}")


def sweep_fingerprint(params: Params, name: str) -> str:
    plain = params_to_dict(params)
    sweep = plain["tune"]["sweeps"][name]
    settings = {k: v for k, v in plain["tune"].items() if k not in ("sweeps", "max_concurrent_trials")}
    return common.fingerprint({"sweep": sweep, "settings": settings, "model": plain["models"][sweep["model"]],
                               "train": plain["train"], "data": plain["data"], "seed": plain["seed"]})


# ---------------------------------------------------------------------------------------------
# one trial (runs inside a Ray Tune actor)


def run_trial(config: dict, *, context: dict) -> None:
    """A Tune function trainable: builds the train stage's TorchTrainer for this trial and fits it."""
    import mlflow
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipeline.train import create_run, log_run_params, make_trainer, run_name

    common.setup_logging()
    base = context["base"]
    params = parse_params(base)
    sweep = params.tune.sweeps[context["sweep"]]
    overrides = {k: config[k] for k in sweep.space}
    tp = trial_params(base, params, sweep, overrides)
    paths = common.Paths(tp, Path(context["root"]))
    trial_id = tune.get_context().get_trial_id()
    client = mlflow.MlflowClient(context["tracking_uri"])
    existing = client.search_runs(
        [context["experiment_id"]],
        filter_string=f"tags.`mlflow.parentRunId` = '{context['parent_run_id']}' and tags.trial_id = '{trial_id}'",
    )
    if existing:  # a restored trial re-attaches to its own run
        run_id = existing[0].info.run_id
        client.update_run(run_id, status="RUNNING")
    else:
        run_id = create_run(client, context["experiment_id"], tp, sweep.model, paths.root,
                            f"{run_name(tp, sweep.model)} · {context['sweep']}/{trial_id}",
                            {"stage": "tune", "sweep": context["sweep"], "trial_id": trial_id,
                             "mlflow.parentRunId": context["parent_run_id"]})
    # Logged on re-attach too: the interruption may have come between creating the run (found again by
    # its trial_id tag) and logging its params.
    log_run_params(client, run_id, tp, sweep.model, {f"tune.{key}": value for key, value in overrides.items()})
    trial_dir = Path(context["sweep_dir"]) / "trials" / trial_id
    trial_dir.mkdir(parents=True, exist_ok=True)
    trainer = make_trainer(tp, sweep.model, paths, run_dir=trial_dir, run_id=run_id,
                           storage=str(trial_dir), name="train", callbacks=[TuneReportCallback()])
    try:
        trainer.fit()
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")


# ---------------------------------------------------------------------------------------------
# the driver


def _searcher(sweep: SweepConfig, seed: int, metric: str, max_concurrent: int):
    if sweep.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(metric=metric, mode="max", seed=seed)
    if sweep.search == "random":
        from ray.tune.search.basic_variant import BasicVariantGenerator

        return BasicVariantGenerator(random_state=seed, max_concurrent=max_concurrent)
    return None


def _scheduler(params: Params):
    t = params.tune
    if t.scheduler == "fifo":
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr="epoch", max_t=t.epochs, grace_period=min(t.grace_period, t.epochs),
                         reduction_factor=t.reduction_factor)


def run_sweep(params: Params, name: str, paths: common.Paths) -> list[dict]:
    """Run (or resume) sweep ``name``; return one result row per trial."""
    import mlflow
    from ray import tune

    sweep = params.tune.sweeps[name]
    sweep_dir = paths.tune / "ray" / name
    record_file = sweep_dir / "sweep.json"
    fp = sweep_fingerprint(params, name)
    record = common.read_json(record_file, "", "") if record_file.is_file() else {}
    tuner_dir = sweep_dir / "tuner"
    resumable = (record.get("fingerprint") == fp and record.get("status") == "running"
                 and tune.Tuner.can_restore(str(tuner_dir)))
    root = paths.root
    experiment_id = common.mlflow_experiment(params, root)
    tracking_uri = common.mlflow_tracking_uri(params, root)
    client = mlflow.MlflowClient(tracking_uri)
    if resumable:
        parent_id = record["parent_run_id"]
        client.update_run(parent_id, status="RUNNING")
        log.info("[%s] resuming interrupted sweep (MLflow parent run %s)", name, parent_id)
    else:
        common.close_superseded_run(client, record, "parent_run_id", f"[{name}]")
        shutil.rmtree(sweep_dir, ignore_errors=True)
        parent = client.create_run(experiment_id, run_name=f"{params.data.name}/sweep {name}", tags={
            "stage": "tune", "sweep": name, "model": sweep.model, "dataset": params.data.name,
            "git_commit": common.git_commit(root)})
        parent_id = parent.info.run_id
    sweep_dir.mkdir(parents=True, exist_ok=True)
    write_json(record_file, {"sweep": name, "fingerprint": fp, "status": "running",
                                           "parent_run_id": parent_id})
    # After sweep.json names the parent: a sweep interrupted while logging them completes them on resume.
    _log_sweep_params(client, parent_id, params, name)

    context = {"base": params_to_dict(params), "sweep": name, "parent_run_id": parent_id,
               "experiment_id": experiment_id, "tracking_uri": tracking_uri, "root": str(root),
               "sweep_dir": str(sweep_dir)}
    # The trial function only waits on its TorchTrainer: it holds no CPU (a small memory reservation
    # keeps its bundle non-empty), so the workers get every CPU the sweep asks for.
    trainable = tune.with_resources(functools.partial(run_trial, context=context),
                                    {"cpu": 0, "memory": TRIAL_DRIVER_MEMORY})
    metric = params.tune.metric
    if resumable:
        tuner = tune.Tuner.restore(str(tuner_dir), trainable=trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=search_space(sweep),
            tune_config=tune.TuneConfig(
                metric=metric, mode="max", num_samples=sweep.num_samples,
                search_alg=_searcher(sweep, params.tune.seed, metric, params.tune.max_concurrent_trials),
                scheduler=_scheduler(params), max_concurrent_trials=params.tune.max_concurrent_trials,
            ),
            run_config=tune.RunConfig(name="tuner", storage_path=str(sweep_dir),
                                      failure_config=tune.FailureConfig(max_failures=params.train.max_failures)),
        )
    # Tune's own Ctrl-C handler ends fit() *normally*, which would record a cut-short sweep as done.
    # Without it, Ctrl-C raises KeyboardInterrupt here: nothing is written, the sweep stays resumable
    # from Tune's periodic experiment snapshot.
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    try:
        grid = tuner.fit()
    except KeyboardInterrupt:
        client.set_terminated(parent_id, status="KILLED")
        raise
    except BaseException:
        client.set_terminated(parent_id, status="FAILED")
        raise
    rows = _rows(grid, params, sweep, name)
    _reconcile_children(client, experiment_id, parent_id, rows)
    best = max((r for r in rows if _finite(r["best_mIoU"])), key=lambda r: r["best_mIoU"], default=None)
    if best is not None:
        client.log_metric(parent_id, f"best_{metric}", float(best["best_mIoU"]))
        for key in sweep.space:
            client.set_tag(parent_id, f"best.{key}", str(best[key]))
    client.log_text(parent_id, _csv(rows, list(sweep.space)), "results.csv")
    client.set_terminated(parent_id, status="FINISHED")
    write_json(record_file, {"sweep": name, "fingerprint": fp, "status": "finished",
                                           "parent_run_id": parent_id})
    n_err = sum(r["status"] == "ERROR" for r in rows)
    log.info("[%s] %d trials (%d stopped early, %d errored); best %s = %s", name, len(rows),
             sum(r["status"] == "STOPPED" for r in rows), n_err, metric,
             f"{best['best_mIoU']:.4f} with " + ", ".join(f"{k}={best[k]}" for k in sweep.space) if best else "n/a")
    return rows


def _log_sweep_params(client, parent_id: str, params: Params, name: str) -> None:
    """The sweep's settings and search space on its parent run (idempotent, so a resume calls it again)."""
    t = params_to_dict(params)["tune"]
    settings = {k: v for k, v in t.items() if k != "sweeps"}
    common.log_params(client, parent_id, flatten({"tune": settings, "sweep": t["sweeps"][name]}))


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _rows(grid, params: Params, sweep: SweepConfig, name: str) -> list[dict]:
    metric = params.tune.metric
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        frame = result.metrics_dataframe
        best = float(frame[metric].max()) if frame is not None and metric in frame else float("nan")
        epochs = int(metrics.get("epoch", 0) or 0)
        if result.error is not None:
            status = "ERROR"
        elif epochs < params.tune.epochs:
            status = "STOPPED"
        else:
            status = "COMPLETED"
        row = {"sweep": name, "trial_id": metrics.get("trial_id") or Path(result.path).name, "model": sweep.model,
               "status": status, "epochs": epochs, "iterations": int(metrics.get("iteration", 0) or 0),
               "final_mIoU": float(metrics.get(metric, float("nan"))), "best_mIoU": best, "mlflow_run_id": ""}
        for key in sweep.space:
            row[key] = result.config.get(key)
        rows.append(row)
    return sorted(rows, key=lambda r: r["trial_id"])


def _reconcile_children(client, experiment_id: str, parent_id: str, rows: list[dict]) -> None:
    """Close child runs that ASHA stopped (their actor was ended mid-run) and link run ids to rows."""
    children = client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")
    by_trial = {run.data.tags.get("trial_id"): run for run in children}
    for row in rows:
        run = by_trial.get(row["trial_id"])
        if run is None:
            continue
        row["mlflow_run_id"] = run.info.run_id
        client.set_tag(run.info.run_id, "tune_status", row["status"])
        if run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, status="FAILED" if row["status"] == "ERROR" else "FINISHED")


def _csv(rows: list[dict], keys: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=RESULT_COLUMNS + keys, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in RESULT_COLUMNS + keys})
    return buf.getvalue()


def best_configs(params: Params, rows: list[dict]) -> tuple[dict, dict[str, dict]]:
    """(best.yaml content, swept overrides per model) from all sweeps' rows."""
    best_per_model: dict[str, dict] = {}
    for row in rows:
        if not _finite(row["best_mIoU"]):
            continue
        current = best_per_model.get(row["model"])
        if current is None or row["best_mIoU"] > current["best_mIoU"]:
            best_per_model[row["model"]] = row
    models, overrides = {}, {}
    plain = params_to_dict(params)["models"]
    for model, row in best_per_model.items():
        keys = params.tune.sweeps[row["sweep"]].space
        chosen = {k: row[k] for k in keys}
        overrides[model] = chosen
        models[model] = deep_merge(plain[model], unflatten(chosen))
    return ({"models": models} if models else {}), overrides


def best_command(overrides: dict[str, dict]) -> str:
    sets = " ".join(f"-S 'models.{m}.{k}={v}'" for m, chosen in overrides.items() for k, v in chosen.items())
    return f"dvc exp run {sets}".strip()


def write_outputs(params: Params, paths: common.Paths, rows: list[dict]) -> None:
    keys: list[str] = []
    for sweep in params.tune.sweeps.values():
        keys += [k for k in sweep.space if k not in keys]
    write_text(paths.tune / "results.csv", _csv(rows, keys))
    best, overrides = best_configs(params, rows)
    parse_params(best, source="tune/best.yaml")  # best.yaml is valid params vocabulary by construction
    header = ["# Best configuration per swept model (params.yaml vocabulary), written by the tune stage.",
              f"# Metric: {params.tune.metric} (best epoch of each trial).",
              "# Train the final models with these values:",
              f"#   {best_command(overrides) if overrides else '(no finished trial)'}"]
    for model, chosen in overrides.items():
        row = max((r for r in rows if r["model"] == model and _finite(r["best_mIoU"])), key=lambda r: r["best_mIoU"])
        header.append(f"# {model}: {params.tune.metric} {row['best_mIoU']:.4f} (trial {row['trial_id']}) with "
                      + ", ".join(f"{k}={v}" for k, v in chosen.items()))
    write_text(paths.tune / "best.yaml", "\n".join(header) + "\n" + yaml.safe_dump(best, sort_keys=False))


def run_all(params: Params, paths: common.Paths) -> list[dict]:
    meta = common.dataset_meta(paths)
    for sweep in params.tune.sweeps.values():  # fail on a bad architecture before Ray starts
        build_segmentor(params.model_config_of(sweep.model), int(meta["num_classes"]))
    (paths.tune / "ray").mkdir(parents=True, exist_ok=True)  # a DVC output even when no sweep is listed
    rows: list[dict] = []
    if params.tune.sweeps:
        common.init_ray(params)
    for name in params.tune.sweeps:
        rows += run_sweep(params, name, paths)
    write_outputs(params, paths, rows)
    return rows


@common.stage
def main(argv: Optional[list[str]] = None) -> None:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--best-command", action="store_true",
                        help="print the `dvc exp run -S ...` command that trains with tune/best.yaml, then exit")
    args = parser.parse_args(argv)
    params = common.load_stage_params(args.params)
    paths = common.Paths(params)
    if args.best_command:
        best_file = paths.tune / "best.yaml"
        if not best_file.is_file():
            raise FileNotFoundError(f"{best_file}: no sweep results yet. Run `dvc repro tune` first.")
        best = yaml.safe_load(best_file.read_text()) or {}
        current = params_to_dict(params)["models"]
        overrides = {m: {k: v for k, v in flatten(cfg).items() if flatten(current.get(m, {})).get(k) != v}
                     for m, cfg in best.get("models", {}).items()}
        print(best_command(overrides))
        return
    run_all(params, paths)


if __name__ == "__main__":
    raise SystemExit(main())
