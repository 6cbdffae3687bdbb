"""The train stage on Ray Train: DDP with the MCIBI memory, fault recovery, non-finite loss, resume.

These run the real ``pipeline.train.train_model`` against a local Ray instance shared by the module.
"""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from conftest import TINY
from ctxseg.config import deep_merge, parse_params
from ctxseg.engine import NonFiniteLossError
from pipeline import common
from faults import CrashAlwaysAt, CrashOnceAt, ship_by_value
from pipeline.train import train_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(address="local", num_cpus=2, log_to_driver=True)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def prepared_root(tmp_path_factory) -> Path:
    """A project root holding the prepared tiny synthetic dataset."""
    from ctxseg.data import download_dataset, prepare_dataset

    root = tmp_path_factory.mktemp("study")
    params = parse_params(copy.deepcopy(TINY))
    paths = common.Paths(params, root)
    download_dataset(params.data, paths.raw)
    prepare_dataset(params.data, paths.raw, paths.prepared)
    return root


def study(overrides: dict):
    params = parse_params(deep_merge(copy.deepcopy(TINY), overrides))
    return params


def runs_of(root: Path, model: str):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("ctxseg")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.model = '{model}'")
    return client, [r for r in runs if "seed" in r.data.tags]  # the seeds' runs, not the model's parent run


def test_ddp_two_workers_mcibi_memory_identical_and_fault_recovered(prepared_root, local_ray, monkeypatch):
    """2 gloo ranks train +MCIBI; rank 0 crashes once in epoch 2; Ray restarts from the epoch-1
    checkpoint; every epoch ends with the memory identical on both ranks."""
    params = study({
        "models": {"ddp_mcibi": {"context": "mcibi"}},
        "scaling": {"num_workers": 2, "cpus_per_worker": 1},
        "train": {"epochs": 2, "batch_size": 4, "max_failures": 1},
    })
    iters_per_epoch = 8 // 4  # 8 training images, global batch 4
    ship_by_value()
    [summary] = train_model(params, "ddp_mcibi", common.Paths(params, prepared_root),
                            worker_callbacks=[CrashOnceAt(iters_per_epoch + 1, marker=str(prepared_root / "fault"))])

    model_dir = prepared_root / "models" / "ddp_mcibi"
    client, runs = runs_of(prepared_root, "ddp_mcibi")
    assert (prepared_root / "fault").exists(), "the fault was injected (mid epoch 2)"
    assert summary["epochs"] == 2 and summary["iterations"] == 2 * iters_per_epoch
    assert [h["epoch"] for h in summary["history"]] == [1, 2]
    for h in summary["history"]:
        assert h["memory_rank_spread"] == 0.0
    # the restart resumed from the checkpoint: epoch 1 was not trained (or logged) twice
    assert len(runs) == 1
    history = client.get_metric_history(runs[0].info.run_id, "val_mIoU")
    assert sorted(m.step for m in history) == [iters_per_epoch, 2 * iters_per_epoch]
    assert {"loss_w", "loss_m", "memory_momentum"} <= set(runs[0].data.metrics)
    payload = torch.load(model_dir / "seeds" / "0" / "model.pt", weights_only=True)
    assert any(k.endswith("memory") for k in payload["model"])


def test_retries_used_up_say_so_in_one_line_naming_the_last_checkpoint(prepared_root, local_ray):
    params = study({"models": {"doomed": {"context": "none"}}, "train": {"epochs": 3, "max_failures": 1}})
    ship_by_value()
    with pytest.raises(common.StageFailed) as info:  # iteration 3 is in epoch 2: one checkpoint exists
        train_model(params, "doomed", common.Paths(params, prepared_root), worker_callbacks=[CrashAlwaysAt(3)])
    msg = str(info.value)
    assert "[doomed seed 0] training failed after train.max_failures=1 worker restarts" in msg
    assert "injected fault at iteration 3" in msg
    assert "Last checkpoint: " in msg and msg.split("Last checkpoint: ")[1].split(";")[0].endswith(
        "checkpoint_epoch_0001")
    assert "run `dvc repro` to continue from it" in msg and "\n" not in msg
    _, runs = runs_of(prepared_root, "doomed")
    assert [r.info.status for r in runs] == ["FAILED"]


def test_non_finite_loss_stops_with_clear_error_and_keeps_checkpoint(prepared_root, local_ray):
    params = study({
        "models": {"exploding": {"context": "none"}},
        "train": {"epochs": 3, "lr": 1.0e12, "max_failures": 0},
    })
    with pytest.raises(NonFiniteLossError) as info:
        train_model(params, "exploding", common.Paths(params, prepared_root))
    msg = str(info.value)
    assert "[exploding] non-finite loss at iteration" in msg
    assert "loss_o=" in msg and "Lower train.lr" in msg
    assert not (prepared_root / "models" / "exploding" / "seeds" / "0" / "model.pt").exists()
    _, runs = runs_of(prepared_root, "exploding")
    assert [r.info.status for r in runs] == ["FAILED"]


def test_a_finished_seed_is_reused_only_with_the_same_config_and_code(tmp_path, monkeypatch):
    """The rule behind skipping a finished seed when DVC re-runs the stage (the e2e test runs it for real:
    a forced `dvc repro train@fcn` trains nothing and rebuilds the same weights): same training config,
    status finished and the same code; a changed config or code trains again, from scratch."""
    import json

    import pipeline.train as train_stage

    params = study({"seeds": [0, 1], "models": {"m": {"context": "none"}}})
    paths = common.Paths(params, tmp_path)
    run = train_stage.SeedRun(params.for_seed(1), "m", paths)
    assert run.seed == 1 and run.resume_file == tmp_path / "models" / "m" / "ray" / "seed1" / "resume.json"
    assert run.storage == str(tmp_path / "models" / "m" / "ray" / "seed1") and not (run.finished or run.resumable)
    record = {"fingerprint": run.fingerprint, "status": "finished", "code": train_stage.code_fingerprint()}
    run.resume_file.parent.mkdir(parents=True)
    run.resume_file.write_text(json.dumps(record))
    assert train_stage.SeedRun(params.for_seed(1), "m", paths).finished
    litter = Path(train_stage.__file__).parent / ".#train_litter.py"  # an editor's lock file is not code
    litter.write_text("x")
    try:
        assert train_stage.code_fingerprint() == record["code"]
    finally:
        litter.unlink()
    assert not train_stage.SeedRun(params.for_seed(0), "m", paths).finished, "another seed, another record"
    other = study({"seeds": [0, 1], "models": {"m": {"context": "none"}}, "train": {"lr": 0.02}})
    assert not train_stage.SeedRun(other.for_seed(1), "m", paths).finished, "changed config"
    monkeypatch.setattr(train_stage, "code_fingerprint", lambda: "changed")
    assert not train_stage.SeedRun(params.for_seed(1), "m", paths).finished, "changed code"
    # seeds change the fingerprint (and so the Ray run name), the rest of the config does not depend on it
    assert run.fingerprint != train_stage.SeedRun(params.for_seed(0), "m", paths).fingerprint


def test_crashed_run_superseded_by_new_params_is_closed_not_left_running(tmp_path):
    """A run killed hard (left RUNNING in MLflow) whose params then change is closed as KILLED when the
    stage trains afresh; finished or failed runs are left as they are."""
    from mlflow import MlflowClient

    from pipeline.mlflow_tracking.tracking import close_superseded_run

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("x")
    crashed, failed = client.create_run(exp).info.run_id, client.create_run(exp).info.run_id
    client.set_terminated(failed, status="FAILED")

    close_superseded_run(client, {"status": "running", "run_id": crashed}, "run_id", "[fcn]")
    close_superseded_run(client, {"status": "running", "run_id": failed}, "run_id", "[fcn]")
    assert client.get_run(crashed).info.status == "KILLED"
    assert client.get_run(failed).info.status == "FAILED"

    alive = client.create_run(exp).info.run_id
    close_superseded_run(client, {"status": "finished", "run_id": alive}, "run_id", "[fcn]")  # not interrupted
    assert client.get_run(alive).info.status == "RUNNING"
    close_superseded_run(client, {"status": "running", "parent_run_id": alive}, "parent_run_id", "[sweep]")
    assert client.get_run(alive).info.status == "KILLED"  # the tune stage's record names its parent run
