"""The study on Ray nodes that share no disk with the head (tests/isolated_cluster.py).

The head offers no CPU, so every DDP rank and every Tune trial runs on an isolated node, which sees
neither the repository, nor /tmp (the project, its data, MLflow store and the head's Ray session),
only the Python environment and one "shared mount" (checkpoints: ``ray.storage_path``; the prepared
dataset: ``ray.data_path``). Code reaches the nodes through ``runtime_env``, MLflow through the head's
store actor.
"""
from __future__ import annotations

import csv
import json
import re
import signal
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from conftest import TINY, make_project, pipeline_env
from isolated_cluster import IsolatedCluster, unshare_problem, wait_for

pytestmark = pytest.mark.slow

EPOCHS = 4
ITERS_PER_EPOCH = 8 // 4  # 8 training images, global batch 4


@pytest.fixture(scope="module")
def cluster():
    problem = unshare_problem()
    if problem:
        pytest.skip(f"isolated Ray nodes need mount namespaces: {problem}")
    c = IsolatedCluster(hidden=[], workers=2, cpus_per_node=1, head_cpus=0).start()
    yield c
    c.stop()


def env() -> dict:
    return pipeline_env({"RAY_AUTH_MODE": "disabled"})


def sh(cmd: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)


def own_lines(out: str) -> str:
    """The stage's own output, without the log lines Ray forwards from its actors (``(Name pid=N) ...``:
    Ray Train's controller may print its own shutdown traceback there, which the stage cannot silence)."""
    return "\n".join(line for line in out.splitlines() if not re.match(r"\s*(\x1b\[[0-9;]*m)*\(\w+ pid=", line))


def write_params(project: Path, name: str, overrides: dict) -> str:
    from ctxseg.config import deep_merge

    raw = deep_merge(yaml.safe_load((project / "params.yaml").read_text()), overrides)
    (project / name).write_text(yaml.safe_dump(raw, sort_keys=False))
    return name


@pytest.fixture(scope="module")
def study(cluster, tmp_path_factory):
    """`dvc repro` of a one-model study on the isolated cluster (2 ranks, one per isolated node)."""
    from ctxseg.config import deep_merge

    overrides = deep_merge(TINY, {
        "train": {"epochs": EPOCHS, "max_failures": 1, "checkpoints_to_keep": 1},
        "scaling": {"num_workers": 2, "cpus_per_worker": 1},
        "ray": {"address": cluster.address, "storage_path": str(cluster.shared / "ray"),
                "data_path": str(cluster.shared / "data")},
    })
    project = make_project(tmp_path_factory.mktemp("cluster") / "study", overrides)
    done = sh(["dvc", "repro"], project, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    return project


def test_train_evaluate_report_with_ranks_on_isolated_nodes(study, cluster):
    from mlflow import MlflowClient

    record = json.loads((study / "models" / "fcn" / "seeds" / "0" / "run.json").read_text())
    assert record["status"] == "finished" and record["iterations"] == EPOCHS * ITERS_PER_EPOCH
    assert all(h["num_nodes"] == 2 for h in record["history"]), "the two ranks ran on two isolated nodes"
    assert record["ray_run"].startswith(str(cluster.shared / "ray" / "fcn" / "seed0"))
    assert list((cluster.shared / "data").glob("synthetic-*/_COMPLETE")), "the dataset was published"
    client = MlflowClient(f"sqlite:///{study / 'mlflow.db'}")
    run = client.get_run(record["run_id"])
    assert run.info.status == "FINISHED" and run.data.params["scaling.num_workers"] == "2"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert sorted(steps) == list(range(1, EPOCHS * ITERS_PER_EPOCH + 1)), "one point per step, logged from a node"
    assert len(client.get_metric_history(run.info.run_id, "val_mIoU")) == EPOCHS
    assert "checkpoint/state.pt" in {a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")}
    assert "model/model.pt" in {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    # evaluate and report ran on the head
    assert 0.0 <= json.loads((study / "metrics" / "fcn.json").read_text())["mIoU"] <= 1.0
    assert "| fcn |" in (study / "reports" / "report.md").read_text()


def test_worker_killed_on_an_isolated_node_resumes_to_the_same_result(study, cluster):
    """A DDP rank's process on an isolated node is killed by PID after the first checkpoint; Ray
    restarts the group from the newest checkpoint and the result equals the uninterrupted run's."""
    params = write_params(study, "params_kill.yaml", {"models": {"fcn_kill": {"context": "none"}}})
    proc = subprocess.Popen(["python", "-m", "pipeline.train", "--model", "fcn_kill", "--params", params],
                            cwd=study, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ray_dir = cluster.shared / "ray" / "fcn_kill" / "seed0"
    wait_for(lambda: list(ray_dir.glob("run-*/checkpoint_epoch_0001")) or proc.poll() is not None, 300,
             "the first checkpoint", poll=0.1)
    assert proc.poll() is None, "training ended before a worker could be killed"
    victims = cluster.worker_processes("RayTrainWorker")
    assert victims, "no Ray Train worker process on the isolated nodes"
    victims[0].send_signal(signal.SIGKILL)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-5000:]
    assert "resumed from checkpoint at epoch" in out
    killed = json.loads((study / "models" / "fcn_kill" / "seeds" / "0" / "run.json").read_text())
    clean = json.loads((study / "models" / "fcn" / "seeds" / "0" / "run.json").read_text())
    assert [h["val_mIoU"] for h in killed["history"]] == [h["val_mIoU"] for h in clean["history"]]
    a = torch.load(study / "models" / "fcn_kill" / "seeds" / "0" / "model.pt", weights_only=True)["model"]
    b = torch.load(study / "models" / "fcn" / "seeds" / "0" / "model.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_dataset_missing_on_a_node_fails_before_training_naming_node_and_path(study):
    params = write_params(study, "params_nodata.yaml", {"models": {"fcn_nodata": {"context": "none"}},
                                                        "ray": {"data_path": None}})
    done = sh(["python", "-m", "pipeline.train", "--model", "fcn_nodata", "--params", params], study)
    out = done.stdout + done.stderr
    assert done.returncode == 2, out[-4000:]
    assert "cannot read the prepared dataset at" in out and str(study / "data" / "prepared" / "synthetic") in out
    assert re.search(r"node [\d.]+ \([0-9a-f]{12}\) cannot read", out) and "ray.data_path" in out
    assert "epoch 1/" not in out, "no training step ran"
    assert "Traceback" not in own_lines(out), own_lines(out)[-3000:]


def test_non_finite_loss_on_an_isolated_rank_zero_fails_naming_the_iteration(study):
    params = write_params(study, "params_nan.yaml", {"models": {"fcn_nan": {"context": "none"}},
                                                     "train": {"lr": 1.0e12, "max_failures": 0}})
    done = sh(["python", "-m", "pipeline.train", "--model", "fcn_nan", "--params", params], study)
    out = done.stdout + done.stderr
    assert done.returncode == 2, out[-4000:]
    assert "[fcn_nan] non-finite loss at iteration" in out and "Traceback" not in own_lines(out)


def test_tune_trials_run_on_isolated_nodes(study, cluster):
    from mlflow import MlflowClient

    params = write_params(study, "params_tune.yaml", {
        "models": {"fcn_acf": {"context": "acf"}},
        "tune": {"enabled": True, "epochs": 1, "scheduler": "fifo", "max_concurrent_trials": 2, "workers_per_trial": 1,
                 "cpus_per_worker": 1, "seed_repeats": False, "sweeps": {"kxh": {
                     "model": "fcn_acf", "search": "grid", "space": {"acf.mixtures": {"grid": [1, 2]}}}}},
    })
    done = sh(["python", "-m", "pipeline.tune", "--params", params], study, timeout=900)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-6000:]
    rows = list(csv.DictReader((study / "tune" / "results.csv").open()))
    assert [r["status"] for r in rows] == ["COMPLETED", "COMPLETED"]
    assert sorted(p.name for p in (cluster.shared / "ray" / "tune" / "kxh" / "trials").iterdir()) == \
        sorted(r["trial_id"] for r in rows), "trial checkpoints live in ray.storage_path"
    client = MlflowClient(f"sqlite:///{study / 'mlflow.db'}")
    for r in rows:
        run = client.get_run(r["mlflow_run_id"])
        assert run.data.params["tune.acf.mixtures"] == r["acf.mixtures"] and "val_mIoU" in run.data.metrics
