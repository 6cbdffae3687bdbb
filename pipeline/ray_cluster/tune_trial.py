"""What runs inside Ray Tune for the ``tune`` stage: one trial, the search space, the searcher and the
ASHA scheduler, the trial results read back as plain rows (:mod:`ctxseg.sweep`), and the sweep's MLflow
parent run.

A trial runs the train stage's own rank code (:func:`pipeline.ray_cluster.ray_train.run_rank`). With one
rank (``tune.workers_per_trial: 1``) it trains in the trial's own process, which Tune reuses for the next
trial (no Ray Train controller and worker to start and stop per trial: bench/RESULTS.md); with several
ranks the trial fits a Ray Train ``TorchTrainer`` (DDP), the train stage's trainer.

A trial may run on any node: it reaches MLflow through the head's store actor
(:class:`pipeline.mlflow_tracking.tracking.RemoteClient`), the dataset through the published handle
(:mod:`pipeline.storage.dataset_access`) and keeps its checkpoints under the sweep's storage
(``ray.storage_path`` on a cluster).
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from ctxseg import sweep as sweeps
from ctxseg.config import Params, SweepConfig, flatten, params_to_dict, parse_params
from ctxseg.sweep import trial_params, trial_status
from pipeline import common
from pipeline.mlflow_tracking import tracking
from pipeline.ray_cluster import ray_env
from pipeline.ray_cluster.ray_train import (TuneTrialRank, fatal_error_of, make_trainer, rank_config, run_rank,
                                            workers_not_started)

log = logging.getLogger("ctxseg.tune")

REPEAT_KEY = "_repeat"  # a repeat trial's config: {"overrides", "epochs", "seed", "of"}


def search_space(sweep: SweepConfig) -> dict[str, Any]:
    """Ray Tune domains for the sweep's keys (grid dimensions become choices outside grid search)."""
    from ray import tune

    space = {}
    for key, dim in sweep.space.items():
        values = getattr(dim, dim.kind)
        if dim.kind in ("grid", "choice"):
            space[key] = tune.grid_search(list(values)) if sweep.search == "grid" else tune.choice(list(values))
        elif dim.kind == "uniform":
            space[key] = tune.uniform(*values)
        elif dim.kind == "loguniform":
            space[key] = tune.loguniform(*values)
        else:
            space[key] = tune.randint(*values)
    return space


def searcher(sweep: SweepConfig, seed: int, metric: str, max_concurrent: int):
    if sweep.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(metric=metric, mode="max", seed=seed)
    if sweep.search == "random":
        from ray.tune.search.basic_variant import BasicVariantGenerator

        return BasicVariantGenerator(random_state=seed, max_concurrent=max_concurrent)
    return None


def scheduler(params: Params):
    t = params.tune
    if t.scheduler == "fifo":
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr="epoch", max_t=t.epochs, grace_period=min(t.grace_period, t.epochs),
                         reduction_factor=t.reduction_factor)


TRIAL_DRIVER_MEMORY = 64 * 1024**2  # bytes reserved for the process of a trial that starts a TorchTrainer


def trains_in_trial_process(params: Params) -> bool:
    """A trial of one rank (``tune.workers_per_trial: 1``) trains in its own, reused process; several ranks
    need a Ray Train worker group."""
    return params.tune.workers_per_trial == 1


def trial_resources(params: Params) -> dict:
    """What Tune reserves for each trial's own process."""
    t = params.tune
    if trains_in_trial_process(params):  # the process is the worker
        return {"cpu": t.cpus_per_worker, **({"gpu": t.gpus_per_worker} if t.gpus_per_worker > 0 else {})}
    # it only waits on its TorchTrainer: no CPU (a small memory reservation keeps its bundle non-empty),
    # so the workers get every CPU the sweep asks for
    return {"cpu": 0, "memory": TRIAL_DRIVER_MEMORY}


class TrialsCannotStart(common.StageFailed):
    """No trial of a sweep could start for longer than a worker group may take to start."""


def start_watchdog(params: Params):
    """A Tune callback that ends the sweep when trials wait for resources while none runs, for longer
    than a Ray Train worker group may take to start (``ray.worker_start_attempts`` ×
    ``ray.worker_start_timeout_s``): Tune itself would wait forever. The error says what was short."""
    import time

    from ray import tune
    from ray.tune.experiment import Trial

    limit = params.ray.worker_start_attempts * params.ray.worker_start_timeout_s
    per_trial = {k.upper(): v for k, v in trial_resources(params).items() if k != "memory"}

    class StartWatchdog(tune.Callback):
        def __init__(self):
            self.waiting_since = None

        def on_step_end(self, iteration: int, trials: list, **info) -> None:
            if any(t.status == Trial.RUNNING for t in trials) or not any(t.status == Trial.PENDING for t in trials):
                self.waiting_since = None
                return
            now = time.monotonic()
            self.waiting_since = self.waiting_since or now
            if now - self.waiting_since > limit:
                raise TrialsCannotStart(
                    f"Tune trials did not start: none could get its resources for {limit:g} s "
                    f"(ray.worker_start_attempts x ray.worker_start_timeout_s): "
                    f"{ray_env.explain_start_failure(1, per_trial)}")

    return StartWatchdog()


def run_trial(config: dict, *, context: dict) -> None:
    """A Tune function trainable: trains this trial's config, in this process (one rank) or with the
    train stage's TorchTrainer (several ranks).

    ``context``: plain data and Ray handles only (base params, sweep name, parent run id, the store
    actor, the dataset handle, the sweep's storage), so the trial runs on any node."""
    from ray import tune
    from ray.train.v2.api.exceptions import ControllerError
    from ray.tune.integration.ray_train import TuneReportCallback

    common.setup_logging()
    base = context["base"]
    params = parse_params(base)
    sweep_name = context["sweep"]
    sweep = params.tune.sweeps[sweep_name]
    repeat = config.get(REPEAT_KEY)
    overrides = dict(repeat["overrides"]) if repeat else {k: config[k] for k in sweep.space}
    tp = trial_params(base, params, sweep, overrides, epochs=repeat and repeat["epochs"],
                      seed=repeat and repeat["seed"])
    trial_id = tune.get_context().get_trial_id()
    client = tracking.RemoteClient(context["store"])
    parent_id = context["parent_run_id"]
    existing = client.search_runs([context["experiment_id"]], filter_string=(
        f"tags.`mlflow.parentRunId` = '{parent_id}' and tags.trial_id = '{trial_id}'"))
    if existing:  # a restored trial re-attaches to its own run
        run_id = existing[0].info.run_id
        client.update_run(run_id, status="RUNNING")
    else:
        # The trial id first: the UI cuts long names at the end.
        label = f"{sweep_name}/{trial_id}" + (f" seed repeat of {repeat['of']}" if repeat else "")
        tags = {"stage": "tune", "sweep": sweep_name, "trial_id": trial_id, "mlflow.parentRunId": parent_id,
                **({"repeat_of": repeat["of"]} if repeat else {})}
        run_id = tracking.create_run(client, context["experiment_id"], tp, sweep.model, context["origin"],
                                     f"{label} · {tracking.run_name(tp, sweep.model)}{context['label']}", tags)
    # Logged on re-attach too: the interruption may have come between creating the run and its params.
    tracking.log_run_params(client, run_id, tp, sweep.model,
                            {"seed": tp.seed, **{f"tune.{k}": v for k, v in overrides.items()}})
    where = dict(dataset=context["dataset"], store=context["store"], run_id=run_id,
                 storage=f"{context['storage']}/trials", name=trial_id)
    trainer = None
    try:
        if trains_in_trial_process(params):
            run_rank(rank_config(tp, sweep.model, **where), TuneTrialRank(use_gpu=bool(tp.scaling.use_gpu)))
        else:
            trainer = make_trainer(tp, sweep.model, callbacks=[TuneReportCallback()], **where)
            trainer.fit()
        fatal = fatal_error_of(context["store"], run_id, sweep.model)
        if fatal is not None:
            raise fatal
    except ControllerError as err:  # its workers never started: one line that says what was short
        client.set_terminated(run_id, status="FAILED")
        raise common.StageFailed(f"trial {trial_id}: {workers_not_started(trainer, err)}") from None
    except Exception:
        client.set_terminated(run_id, status="FAILED")
        raise
    # Ended by the scheduler (ASHA), the trial stops at its next report without reaching here: its run
    # is closed by reconcile_children, from Tune's own status.
    client.set_terminated(run_id, status="FINISHED")


def result_rows(grid, params: Params, sweep: SweepConfig, name: str) -> list[dict]:
    """One plain row per trial of a finished Tuner (see :data:`ctxseg.sweep.RESULT_COLUMNS`)."""
    metric = params.tune.metric
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        frame = result.metrics_dataframe
        # The best of every reported epoch and the last report: a trial restored by Tuner.restore and
        # then stopped may hold no metric in its dataframe, but its last report still has one.
        seen = (list(frame[metric]) if frame is not None and metric in frame else []) + [metrics.get(metric)]
        best = max((float(v) for v in seen if sweeps.finite(v)), default=float("nan"))
        epochs = int(metrics.get("epoch", 0) or 0)
        repeat = result.config.get(REPEAT_KEY)
        planned = repeat["epochs"] if repeat else params.tune.epochs
        row = {"sweep": name, "trial_id": metrics.get("trial_id") or trial_id_of_folder(Path(result.path).name),
               "model": sweep.model,
               "status": trial_status(epochs, planned, result.error is not None), "epochs": epochs,
               "iterations": int(metrics.get("iteration", 0) or 0),
               "final_mIoU": float(metrics.get(metric, float("nan"))), "best_mIoU": best, "mlflow_run_id": "",
               "seed": repeat["seed"] if repeat else params.seed, "repeat_of": repeat["of"] if repeat else ""}
        for key in sweep.space:
            row[key] = (repeat["overrides"] if repeat else result.config).get(key)
        if result.error is not None:  # kept for the stage's message, not written to results.csv
            row["error"] = (str(result.error).strip().splitlines() or [type(result.error).__name__])[-1][:500]
        rows.append(row)
    return sorted(rows, key=lambda r: r["trial_id"])


def trial_id_of_folder(folder: str) -> str:
    """The Tune trial id (``<5 hex>_<5 digits>``) in a trial folder's name, e.g. ``457b1_00000`` in
    ``run_trial_457b1_00000_0_acf_heads=1_2026-12-07_14-27-03``; the name itself if it holds none (a
    trial that errored before its first report has no ``trial_id`` metric)."""
    found = re.search(r"(?:^|_)([0-9a-f]{5}_\d{5})(?:_|$)", folder)
    return found.group(1) if found else folder


def reconcile_children(client, experiment_id: str, parent_id: str, rows: list[dict]) -> None:
    """Make each trial's MLflow run state tell Tune's truth, tag Tune's status, link run ids to rows.

    A trial ASHA stopped, or one that completed while its process was being torn down, is FINISHED
    (tag ``tune_status``: STOPPED / COMPLETED); only an errored trial is FAILED. A child whose trial Tune
    no longer knows (an attempt interrupted before Tune's first snapshot, started afresh on resume) is
    KILLED, tagged ``tune_status: DISCARDED`` and deleted (MLflow's soft delete: restorable, hidden)."""
    children = client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")
    by_trial = {run.data.tags.get("trial_id"): run for run in children}
    known = {row["trial_id"] for row in rows}
    for trial_id, run in by_trial.items():
        if trial_id not in known:
            client.set_tag(run.info.run_id, "tune_status", "DISCARDED")
            if run.info.status == "RUNNING":
                client.set_terminated(run.info.run_id, status="KILLED")
            client.delete_run(run.info.run_id)
            log.info("MLflow run %s of trial %s, which no resumed Tuner knows, marked DISCARDED and deleted",
                     run.info.run_id, trial_id)
    for row in rows:
        run = by_trial.get(row["trial_id"])
        if run is None:
            continue
        row["mlflow_run_id"] = run.info.run_id
        client.set_tag(run.info.run_id, "tune_status", row["status"])
        client.set_tag(run.info.run_id, "tune_epochs", str(row["epochs"]))
        state = "FAILED" if row["status"] == "ERROR" else "FINISHED"
        if run.info.status != state:
            client.set_terminated(run.info.run_id, status=state)


def close_parent_run(client, parent_id: str, params: Params, sweep, rows: list[dict]) -> None:
    """Finish a sweep's MLflow parent run: the best trial, the noise level, results.csv."""
    grid = [r for r in sweeps.grid_rows(rows) if sweeps.finite(r["best_mIoU"])]
    if grid:
        best = max(grid, key=lambda r: r["best_mIoU"])
        client.log_metric(parent_id, f"best_{params.tune.metric}", float(best["best_mIoU"]))
        for key in sweep.space:
            client.set_tag(parent_id, f"best.{key}", str(best[key]))
    noise = sweeps.noise_level(rows)
    if noise is not None:
        client.log_metric(parent_id, "grid_spread", noise["grid_spread"])
        client.log_metric(parent_id, "seed_spread", noise["seed_spread"])
    client.log_text(parent_id, sweeps.results_csv(rows, list(sweep.space)), "results.csv")
    client.set_terminated(parent_id, status="FINISHED")


def log_sweep_params(client, parent_id: str, params: Params, name: str) -> None:
    """The sweep's settings and search space on its parent run (idempotent, so a resume calls it again)."""
    t = params_to_dict(params)["tune"]
    settings = {k: v for k, v in t.items() if k != "sweeps"}
    tracking.log_params(client, parent_id, flatten({"tune": settings, "sweep": t["sweeps"][name]}))


__all__ = ["search_space", "searcher", "scheduler", "run_trial", "trial_resources", "trains_in_trial_process",
           "start_watchdog", "TrialsCannotStart", "result_rows", "reconcile_children",
           "close_parent_run", "log_sweep_params"]
