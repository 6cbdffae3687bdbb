"""DVC stage ``tune``: Ray Tune sweeps over CFNet's K × H and MCIBI's m0, α, β (``tune.sweeps``).

Each trial runs the train stage's own rank code (:mod:`pipeline.ray_cluster.tune_trial`): in the trial's
process, reused from trial to trial, when it has one rank; as a Ray Train run (DDP) when it has several.
Each sweep is one MLflow parent run; each trial a child run (tag ``mlflow.parentRunId``) with the train
stage's params and metric names, so sweeps and training runs line up in the comparison UI.

Resume: a sweep directory is tied to a fingerprint of its config. Re-running after an interruption
restores the Tuner (``Tuner.restore``, errored trials re-run) and each trial re-attaches to its own
MLflow child run by trial id: no duplicate or orphaned runs.

After each sweep its best and worst configuration train again with seed + 1 (``tune.seed_repeats``),
so the report can say whether the grid's spread exceeds seed noise (:mod:`ctxseg.sweep`).

Trials run on any node of the cluster (:mod:`pipeline.ray_cluster.tune_trial`); Tune's state and the trials'
checkpoints live under ``ray.storage_path/tune/<sweep>`` when set, else ``tune/ray/<sweep>``.

Writes ``tune/results.csv`` (one row per trial), ``tune/best.yaml`` (the best config per swept model, in
params.yaml vocabulary); ``tune/ray/<sweep>/`` holds Ray Tune's state, the stage's working state (git-ignored,
not a DVC output: DVC never deletes it, so an interrupted sweep resumes).

``python -m pipeline.tune --best-command`` prints the ``dvc exp run -S ...`` command that trains the
final models with the best values.
"""
from __future__ import annotations

import functools
import logging
import shutil
from typing import Optional

import yaml

from ctxseg.report import read_sweep

from ctxseg import sweep as sweeps
from ctxseg.config import Params, params_to_dict
from ctxseg.io import write_json, write_text
from ctxseg.models import build_segmentor
from pipeline import common
from pipeline.storage import dataset_access
from pipeline.mlflow_tracking import mlflow_store, tracking
from pipeline.ray_cluster import ray_env
from pipeline.storage.filesystems import check_ray_storage, ray_storage
from pipeline.storage.run_storage import clear_storage
from pipeline.ray_cluster.tune_trial import (REPEAT_KEY, close_parent_run, log_sweep_params, reconcile_children,
                                            result_rows, run_trial, scheduler, search_space, searcher,
                                            start_watchdog, trains_in_trial_process, trial_resources)

log = logging.getLogger("ctxseg.tune")


def sweep_fingerprint(params: Params, name: str) -> str:
    plain = params_to_dict(params)
    sweep = plain["tune"]["sweeps"][name]
    settings = {k: v for k, v in plain["tune"].items() if k not in ("sweeps", "max_concurrent_trials")}
    return common.fingerprint({"sweep": sweep, "settings": settings, "model": plain["models"][sweep["model"]],
                               "train": plain["train"], "data": plain["data"], "seed": params.seed})


def sweep_storage(params: Params, paths: common.Paths, name: str) -> str:
    """Where Tune keeps the sweep's state and its trials' checkpoints (shared storage on a cluster)."""
    if params.ray.storage_path:
        return f"{params.ray.storage_path.rstrip('/')}/tune/{name}"
    return str(paths.tune / "ray" / name)


def restorable(path: str, fs) -> bool:
    """Whether Tune wrote an experiment snapshot (``experiment_state-*.json``) at ``path``.

    ``Tuner.can_restore`` only looks for ``tuner.pkl``, which Tune writes when the Tuner is built,
    before any snapshot, and which does not hold the param space. A sweep interrupted in that window
    would "restore" to trials with an empty config; it is started afresh instead."""
    import pyarrow.fs as pafs
    from ray.tune.execution.tune_controller import TuneController

    snapshot_prefix = TuneController.CKPT_FILE_TMPL.split("{}")[0]  # "experiment_state-"
    fs = fs or pafs.LocalFileSystem()
    try:
        listing = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except OSError:
        return False
    names = {info.base_name for info in listing}
    return "tuner.pkl" in names and any(n.startswith(snapshot_prefix) for n in names)


def _fit(tuner_name: str, storage: str, resumable: bool, trainable, space: dict, make_tuner):
    """Restore the named Tuner if the sweep is resumable and Tune snapshotted it, else build it; fit it.

    The restore re-specifies ``space`` (Tune does not keep it). Tune's own Ctrl-C handler ends
    ``fit()`` *normally*, which would record a cut-short sweep as done; it is turned off for this call
    only, so Ctrl-C raises KeyboardInterrupt and the sweep stays resumable from Tune's periodic
    experiment snapshot."""
    from ray import tune

    path, fs = ray_storage(f"{storage}/{tuner_name}")
    with ray_env.scoped_environ({"TUNE_DISABLE_SIGINT_HANDLER": "1"}):
        if resumable and restorable(path, fs):
            return tune.Tuner.restore(path, trainable=trainable, param_space=space, resume_errored=True,
                                      storage_filesystem=fs).fit()
        if resumable:  # what a snapshot-less attempt left (trial folders, checkpoints) goes
            clear_storage(storage, tuner_name)
        return make_tuner().fit()


def run_sweep(params: Params, name: str, paths: common.Paths, store, client, dataset: dict) -> list[dict]:
    """Run (or resume) sweep ``name`` and its seed repeats; return one result row per trial."""
    from ray import tune

    sweep = params.tune.sweeps[name]
    record_dir, storage = paths.tune / "ray" / name, sweep_storage(params, paths, name)
    record_file = record_dir / "sweep.json"
    fp = sweep_fingerprint(params, name)
    record = common.read_json(record_file, "", "") if record_file.is_file() else {}
    resumable = record.get("fingerprint") == fp and record.get("status") == "running"
    experiment_id = mlflow_store.experiment_id(params, paths.root)
    origin, label = mlflow_store.run_tags(common.git_commit(paths.root)), mlflow_store.experiment_label()
    if resumable:
        parent_id = record["parent_run_id"]
        client.update_run(parent_id, status="RUNNING")
        log.info("[%s] resuming interrupted sweep (MLflow parent run %s)", name, parent_id)
    else:
        tracking.close_superseded_run(client, record, "parent_run_id", f"[{name}]")
        shutil.rmtree(record_dir, ignore_errors=True)
        if storage != str(record_dir):  # Tune's state on shared storage (a mount or a bucket) goes too
            clear_storage(*storage.rsplit("/", 1))
        parent_id = client.create_run(experiment_id, run_name=f"{params.data.name}/sweep {name}{label}", tags={
            "stage": "tune", "sweep": name, "model": sweep.model, "dataset": params.data.name, **origin}).info.run_id
    record_dir.mkdir(parents=True, exist_ok=True)
    write_json(record_file, {"sweep": name, "fingerprint": fp, "status": "running", "parent_run_id": parent_id})
    # After sweep.json names the parent: a sweep interrupted while logging them completes them on resume.
    log_sweep_params(client, parent_id, params, name)

    context = {"base": params_to_dict(params), "sweep": name, "parent_run_id": parent_id, "store": store,
               "experiment_id": experiment_id, "origin": origin, "label": label, "dataset": dataset,
               "storage": storage}
    trainable = tune.with_resources(functools.partial(run_trial, context=context), trial_resources(params))
    t, metric = params.tune, params.tune.metric
    ray_path, ray_fs = ray_storage(storage)

    def tuner(space, search_alg, sched, tuner_name, samples):
        return tune.Tuner(trainable, param_space=space, tune_config=tune.TuneConfig(
            metric=metric, mode="max", num_samples=samples, search_alg=search_alg, scheduler=sched,
            max_concurrent_trials=t.max_concurrent_trials,
            # a single-rank trial trains in its own process: the next trial reuses it (imports, warm caches)
            reuse_actors=trains_in_trial_process(params)), run_config=tune.RunConfig(
            name=tuner_name, storage_path=ray_path, storage_filesystem=ray_fs, callbacks=[start_watchdog(params)],
            failure_config=tune.FailureConfig(max_failures=params.train.max_failures)))

    try:
        space = search_space(sweep)
        rows = result_rows(_fit("tuner", storage, resumable, trainable, space, lambda: tuner(
            space, searcher(sweep, t.seed, metric, t.max_concurrent_trials), scheduler(params),
            "tuner", sweep.num_samples)), params, sweep, name)
        targets = sweeps.repeat_targets(rows) if t.seed_repeats else []
        if targets:  # the best and the worst again, another seed, same epochs, never stopped early
            space = {REPEAT_KEY: tune.grid_search([
                {"overrides": {k: r[k] for k in sweep.space}, "epochs": r["epochs"],
                 "seed": params.seed + sweeps.REPEAT_SEED_OFFSET, "of": r["trial_id"]} for r in targets])}
            rows += result_rows(_fit("repeats", storage, resumable, trainable, space,
                                     lambda: tuner(space, None, None, "repeats", 1)), params, sweep, name)
    except KeyboardInterrupt:
        client.set_terminated(parent_id, status="KILLED")
        raise
    except BaseException:
        client.set_terminated(parent_id, status="FAILED")
        raise
    reconcile_children(client, experiment_id, parent_id, rows)
    close_parent_run(client, parent_id, params, sweep, rows)
    # A sweep with errored trials stays resumable: the next run restores it and re-runs only those.
    status = "running" if any(r["status"] == "ERROR" for r in rows) else "finished"
    write_json(record_file, {"sweep": name, "fingerprint": fp, "status": status, "parent_run_id": parent_id})
    grid = sweeps.grid_rows(rows)
    log.info("[%s] %d trials (%d stopped early, %d errored) + %d seed repeats. %s", name, len(grid),
             sum(r["status"] == "STOPPED" for r in grid), sum(r["status"] == "ERROR" for r in grid),
             len(rows) - len(grid), sweeps.noise_verdict(sweeps.noise_level(rows)))
    return rows


def run_all(params: Params, paths: common.Paths) -> list[dict]:
    import mlflow

    meta = common.dataset_meta(paths)
    for sweep in params.tune.sweeps.values():  # fail on a bad architecture before Ray starts
        build_segmentor(params.model_config_of(sweep.model), int(meta["num_classes"]))
    paths.tune.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    if not params.tune.enabled:
        log.info("sweeps are off (tune.enabled: false): nothing to run; switch them on with "
                 "`dvc exp run -S tune.enabled=true` (docs/sweeps.md)")
    elif params.tune.sweeps:
        ray_env.check_cluster(params)
        check_ray_storage(params.ray)
        uri = mlflow_store.open_tracking(params, paths.root)
        ray_env.init_ray(params, paths.root, params.ray.num_cpus)
        dataset = dataset_access.publish(paths.prepared, params.ray.data_path)
        store, client = tracking.start_store_actor(uri), mlflow.MlflowClient(uri)
        for name in params.tune.sweeps:
            rows += run_sweep(params, name, paths, store, client, dataset)
    keys = list(dict.fromkeys(k for s in params.tune.sweeps.values() for k in s.space)) if params.tune.enabled else []
    write_text(paths.tune / "results.csv", sweeps.results_csv(rows, keys))
    write_text(paths.tune / "best.yaml", sweeps.best_yaml_text(params, rows))
    failed = [r for r in rows if r["status"] == "ERROR"]
    if failed:
        raise common.StageFailed(
            f"{len(failed)} of {len(rows)} trials failed (marked ERROR in tune/results.csv and MLflow), e.g. "
            f"{failed[0].get('error') or 'see the log above'}. `dvc repro tune` re-runs only the failed trials.")
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
        command = sweeps.best_command(sweeps.changed_overrides(params, best))
        rows = read_sweep(paths.tune / "results.csv") if (paths.tune / "results.csv").is_file() else []
        weak = [name for name in params.tune.sweeps
                if not sweeps.best_is_distinguishable(sweeps.noise_level([r for r in rows if r.get("sweep") == name]))]
        if weak:  # printed as shell comments: pasting them runs nothing
            print(f"# NOT A RECOMMENDATION: in sweep(s) {', '.join(weak)} the best configuration is not "
                  "distinguishable from the next at this budget (tune/best.yaml, the report's sweep verdicts).")
            print(f"# highest score only: {command}")
        else:
            print(command)
        return
    run_all(params, paths)


if __name__ == "__main__":
    raise SystemExit(main())
