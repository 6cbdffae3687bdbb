"""The tune stage: a small Ray Tune sweep with ASHA, nested MLflow runs, valid best.yaml, resume."""
from __future__ import annotations

import csv
import shutil
import signal
import subprocess
import time

import pytest
import yaml

from conftest import make_project, pipeline_env, run
from ctxseg import sweep as sweeps
from ctxseg.config import deep_merge, load_params, parse_params

pytestmark = pytest.mark.slow

SWEEP = {
    "enabled": True, "epochs": 3, "grace_period": 1, "reduction_factor": 2, "max_concurrent_trials": 2,
    "workers_per_trial": 1, "cpus_per_worker": 1, "scheduler": "asha",
}
SPACE = {"acf.mixtures": {"grid": [1, 2]}, "acf.heads": {"grid": [1, 2]}}


def test_sweep_interrupted_then_resumed_asha_mlflow_best_yaml(tmp_path, tiny_overrides):
    project = make_project(tmp_path / "study", tiny_overrides, replace={
        "models": {"fcn_acf": {"context": "acf"}},
        "tune": dict(SWEEP, sweeps={"kxh": {"model": "fcn_acf", "search": "grid", "space": SPACE}}),
    })
    assert run(["dvc", "repro", "preprocess"], project).returncode == 0

    # 1. start the sweep and interrupt it once a trial has reported its first epoch
    log_file = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen(["python", "-m", "pipeline.tune"], cwd=project, env=pipeline_env(),
                            stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    state = project / "tune" / "ray" / "kxh" / "tuner"
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None:
        # a report's checkpoint is written to the storage at once (result.json only at Tune's next sync)
        if any(state.glob("*/checkpoint_*")):
            break
        time.sleep(0.1)
    assert proc.poll() is None, "the sweep ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=180)
    log_file.close()
    assert not (project / "tune" / "results.csv").exists()
    assert not (state.parent / "repeats").exists(), "interrupted in the grid, not after it"
    # as if the interrupt had come just as the seed-repeat Tuner was built: Tune wrote its tuner.pkl
    # (which has no param space) but no experiment snapshot; the resume must start it afresh
    (state.parent / "repeats").mkdir()
    shutil.copy(state / "tuner.pkl", state.parent / "repeats" / "tuner.pkl")

    # 2. re-run: the sweep resumes
    second = run(["python", "-m", "pipeline.tune"], project)
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-5000:]
    assert "resuming interrupted sweep" in out

    every_row = list(csv.DictReader((project / "tune" / "results.csv").open()))
    rows = [r for r in every_row if not r["repeat_of"]]
    repeats = [r for r in every_row if r["repeat_of"]]
    assert len(rows) == 4
    # the best and the worst trial trained again with seed + 1 for the same number of epochs
    by_id = {r["trial_id"]: r for r in rows}
    longest = max(int(r["epochs"]) for r in rows)
    full = [r for r in rows if int(r["epochs"]) == longest]  # like for like: the trials that ran every epoch
    ranked = sorted(full, key=lambda r: float(r["best_mIoU"]))
    # (ASHA decides how many ran every epoch: with fewer than two there is nothing to compare, no repeat)
    targets = [ranked[0]["trial_id"], ranked[-1]["trial_id"]] if len(full) >= 2 else []
    assert sorted(r["repeat_of"] for r in repeats) == sorted(targets)
    for r in repeats:
        original = by_id[r["repeat_of"]]
        assert r["seed"] == "1" and original["seed"] == "0"
        assert r["epochs"] == original["epochs"] and r["status"] == "COMPLETED"
        assert (r["acf.mixtures"], r["acf.heads"]) == (original["acf.mixtures"], original["acf.heads"])
    assert {(r["acf.mixtures"], r["acf.heads"]) for r in rows} == {("1", "1"), ("1", "2"), ("2", "1"), ("2", "2")}
    assert all(0.0 <= float(r["best_mIoU"]) <= 1.0 for r in rows)
    assert {r["status"] for r in rows} <= {"COMPLETED", "STOPPED"}
    assert any(r["status"] == "COMPLETED" and r["epochs"] == "3" for r in rows)
    for r in rows:  # ASHA (grace 1, factor 2, max_t 3) decides at epochs 1 and 2 only
        assert r["status"] == "COMPLETED" or r["epochs"] in ("1", "2")

    # MLflow: one parent, one child per trial (no duplicates from the resume), none left running
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    exp = client.get_experiment_by_name("ctxseg")
    parents = client.search_runs([exp.experiment_id], filter_string="tags.stage = 'tune' and tags.sweep = 'kxh' "
                                 "and attributes.run_name LIKE '%sweep kxh'")
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED" and "best_val_mIoU" in parent.data.metrics
    children = client.search_runs([exp.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(c.data.tags["trial_id"] for c in children) == sorted(r["trial_id"] for r in every_row)
    # run states tell Tune's truth: completed and ASHA-stopped trials are FINISHED, with Tune's status as a tag
    status_of = {r["trial_id"]: r["status"] for r in every_row}
    for child in children:
        assert child.info.status == "FINISHED", (child.info.run_name, child.data.tags.get("tune_status"))
        assert child.data.tags["tune_status"] == status_of[child.data.tags["trial_id"]]
        assert child.info.run_name.startswith(f"kxh/{child.data.tags['trial_id']}"), "names lead with the trial id"
    if targets:  # the noise level of the sweep, from its seed repeats
        assert {"grid_spread", "seed_spread"} <= set(parent.data.metrics)
    else:
        assert not {"grid_spread", "seed_spread"} & set(parent.data.metrics)
    for child in children:
        assert child.data.params["tune.acf.mixtures"] == child.data.params["model.acf.mixtures"]
        repeat_of = child.data.tags.get("repeat_of")
        assert child.data.params["train.epochs"] == (by_id[repeat_of]["epochs"] if repeat_of else "3")
        assert child.data.params["seed"] == ("1" if repeat_of else "0")
        assert "val_mIoU" in child.data.metrics and "loss" in child.data.metrics  # same names as train
    assert {r["mlflow_run_id"] for r in every_row} == {c.info.run_id for c in children}

    # best.yaml is params vocabulary: it validates, and merged into params.yaml it picks the best trial
    best_text = (project / "tune" / "best.yaml").read_text()
    if targets:
        assert "seed noise from" in best_text and ("not distinguishable" in best_text or "more than seed noise" in best_text)
    else:
        assert "No seed repeats ran" in best_text and "NOT A RECOMMENDATION" in best_text
    best = yaml.safe_load(best_text)
    parse_params(best)
    merged = parse_params(deep_merge(yaml.safe_load((project / "params.yaml").read_text()), best))
    top = max(rows, key=lambda r: float(r["best_mIoU"]))
    assert merged.models["fcn_acf"].acf.mixtures == int(top["acf.mixtures"])
    assert merged.models["fcn_acf"].acf.heads == int(top["acf.heads"])
    command = run(["python", "-m", "pipeline.tune", "--best-command"], project)
    assert command.returncode == 0
    supported = sweeps.best_is_distinguishable(sweeps.noise_level([dict(r, best_mIoU=float(r["best_mIoU"]),
                                                                        epochs=float(r["epochs"])) for r in rows]))
    lines = command.stdout.strip().splitlines()
    if supported:
        assert lines == [lines[0]] and lines[0].startswith("dvc exp run")
        printed = lines[0]
    else:  # what the evidence does not support is printed as shell comments, never as a bare command
        assert lines[0].startswith("# NOT A RECOMMENDATION: in sweep(s) ") and "not distinguishable" in lines[0]
        assert lines[1].startswith("# highest score only: dvc exp run")
        printed = lines[1].split(": ", 1)[1]
        assert "NOT A RECOMMENDATION" in best_text
    assert all(arg.startswith("'++models.fcn_acf.acf.") for arg in printed.split(" -S ")[1:])
    # the printed command works as printed: DVC applies every -S to params.yaml (a dry run of one stage)
    dry = run(["bash", "-c", printed.replace("dvc exp run", "dvc exp run --dry --single-item", 1) + " source"], project)
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert printed in best_text, "best.yaml prints the same command"


def test_shipped_sweeps_validate_and_bad_sweep_is_rejected():
    from pathlib import Path

    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    grid = params.tune.sweeps["acf_kxh"]
    assert grid.space["acf.mixtures"].grid == [1, 2, 4] and grid.space["acf.heads"].grid == [1, 2, 4]
    raw = {"models": {"a": {"context": "acf", "channels": 18}},  # 18 channels split into 1 head, not 4
           "tune": {"sweeps": {"s": {"model": "a", "space": {"acf.mixtures": {"grid": [1, 4]},
                                                             "acf.heads": {"grid": [1, 4]}}}}}}
    from ctxseg.config import ConfigError

    with pytest.raises(ConfigError, match=r"acf.mixtures=1, acf.heads=4 makes model 'a' invalid"):
        parse_params(raw)
    raw["tune"]["sweeps"]["s"]["model"] = "nope"
    with pytest.raises(ConfigError, match=r"tune.sweeps.s.model = 'nope' is not a key of `models`"):
        parse_params(raw)


def test_asha_stops_a_clearly_worse_trial_early(tmp_path):
    """The sweep's ASHA scheduler, on scripted trials run one after the other: the weak trial is cut
    at the first rung while the strong one runs all epochs."""
    import ray
    from ray import tune

    from pipeline.ray_cluster.tune_trial import scheduler as _scheduler

    params = parse_params({"tune": dict(SWEEP, epochs=4, max_concurrent_trials=1)})

    def scripted(config):
        for epoch in range(1, 5):
            tune.report({"epoch": epoch, "val_mIoU": config["quality"] * epoch / 4})

    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        grid = tune.Tuner(
            tune.with_resources(scripted, {"cpu": 0.5}),
            param_space={"quality": tune.grid_search([0.9, 0.1])},
            tune_config=tune.TuneConfig(metric="val_mIoU", mode="max", scheduler=_scheduler(params),
                                        max_concurrent_trials=1),
            run_config=tune.RunConfig(name="asha", storage_path=str(tmp_path)),
        ).fit()
    finally:
        ray.shutdown()
    epochs = {r.config["quality"]: r.metrics["epoch"] for r in grid}
    assert epochs == {0.9: 4, 0.1: 1}


def test_resumed_trial_and_sweep_runs_get_the_params_an_interruption_cut_off(tmp_path):
    """A sweep interrupted between creating a trial's MLflow run and logging its params resumes with a
    complete run: ``log_run_params`` fills in what is missing and accepts what is already there."""
    from mlflow import MlflowClient

    from pipeline.mlflow_tracking.tracking import log_run_params

    params = load_params("params.yaml")
    model = next(iter(params.models))
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = client.create_run(client.create_experiment("x")).info.run_id
    client.log_param(run_id, "model_name", model)  # the part logged before the interruption

    log_run_params(client, run_id, params, model, {"tune.acf.mixtures": 2})
    logged = client.get_run(run_id).data.params
    assert logged["tune.acf.mixtures"] == "2"
    assert logged["model_name"] == model
    assert logged["train.epochs"] == str(params.train.epochs)

    log_run_params(client, run_id, params, model, {"tune.acf.mixtures": 2})  # resume again: no conflict
    assert client.get_run(run_id).data.params == logged

    # the sweep's parent run likewise
    from pipeline.ray_cluster.tune_trial import log_sweep_params as _log_sweep_params

    sweep = next(iter(params.tune.sweeps))
    parent = client.create_run(client.get_experiment_by_name("x").experiment_id).info.run_id
    client.log_param(parent, "tune.epochs", params.tune.epochs)
    for _ in range(2):
        _log_sweep_params(client, parent, params, sweep)
    logged = client.get_run(parent).data.params
    assert logged["sweep.model"] == params.tune.sweeps[sweep].model
    assert logged["tune.metric"] == params.tune.metric


def test_trial_of_several_ranks_trains_as_a_ray_train_run(tmp_path, tiny_overrides):
    """``tune.workers_per_trial: 2``: the trial fits the train stage's TorchTrainer (two DDP ranks), its
    checkpoints under the sweep's ``trials/<trial id>/``, its metrics in its MLflow run."""
    from mlflow import MlflowClient

    project = make_project(tmp_path / "study", tiny_overrides, replace={
        "models": {"fcn_acf": {"context": "acf"}},
        "tune": dict(SWEEP, epochs=1, scheduler="fifo", seed_repeats=False, workers_per_trial=2, max_concurrent_trials=1,
                     sweeps={"kxh": {"model": "fcn_acf", "search": "grid", "space": {"acf.heads": {"grid": [2]}}}}),
    })
    assert run(["dvc", "repro", "preprocess"], project).returncode == 0
    done = run(["python", "-m", "pipeline.tune"], project)
    assert done.returncode == 0, (done.stdout + done.stderr)[-5000:]
    [row] = list(csv.DictReader((project / "tune" / "results.csv").open()))
    assert row["status"] == "COMPLETED" and row["epochs"] == "1"
    assert (project / "tune" / "ray" / "kxh" / "trials" / row["trial_id"] / "checkpoint_epoch_0001").is_dir()
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    trial_run = client.get_run(row["mlflow_run_id"])
    assert trial_run.info.status == "FINISHED" and "val_mIoU" in trial_run.data.metrics
