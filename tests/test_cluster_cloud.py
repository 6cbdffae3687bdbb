"""The study on a cluster whose nodes share only a network with the head, as on a cloud.

Worker nodes run in their own mount namespaces (tests/isolated_cluster.py): they see neither the
repository nor /tmp, nor any folder of the head. Beside them, on loopback, the servers a cloud team
has (pipeline/local_cloud.py): an S3 endpoint holding ``ray.storage_path`` (checkpoints, Tune state),
``ray.data_path`` (the published dataset), the MLflow artifacts and the DVC remote; an MLflow tracking
server backed by PostgreSQL with artifacts proxied to the bucket. The head offers no CPU, so every DDP
rank and every Tune trial runs on an isolated node; evaluate, register and report run on the head.
The bucket's credentials reach each node through its environment (as an instance role would), MLflow
clients need only the server's URL.
"""
from __future__ import annotations

import csv
import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import TINY, make_project, pipeline_env
from isolated_cluster import IsolatedCluster, unshare_problem, wait_for
from pipeline.local_cloud import LocalCloud, postgres_problem

pytestmark = pytest.mark.slow

EPOCHS = 4
ITERS_PER_EPOCH = 8 // 4  # 8 training images, global batch 4
PREFIX = "study"
TOKEN = "ctxseg-token-7f3a9c"  # MLFLOW_TRACKING_TOKEN: sent to the server, must never be written down


@pytest.fixture(scope="module")
def cloud():
    for problem in (unshare_problem(), postgres_problem()):
        if problem:
            pytest.skip(f"the network-only cluster needs it: {problem}")
    with LocalCloud() as c:
        yield c


@pytest.fixture(scope="module")
def cluster(cloud):
    c = IsolatedCluster(hidden=[cloud.workdir, cloud.postgres.workdir], workers=2, cpus_per_node=1, head_cpus=0, env=cloud.env()).start()
    yield c
    c.stop()


OUTPUTS: list[str] = []  # every stage's output, searched for secrets at the end


def run(cmd: list[str], cwd: Path, cloud: LocalCloud, timeout: int = 600) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=cwd, env=stage_env(cloud), capture_output=True, text=True, timeout=timeout)
    OUTPUTS.append(done.stdout + done.stderr)
    return done


def stage_env(cloud: LocalCloud) -> dict:
    return pipeline_env({"RAY_AUTH_MODE": "disabled", "MLFLOW_TRACKING_TOKEN": TOKEN, **cloud.env()})


def own_lines(out: str) -> str:
    """The stage's own output, without the log lines Ray forwards from its actors (``(Name pid=N) ...``)."""
    return "\n".join(line for line in out.splitlines() if not re.match(r"\s*(\x1b\[[0-9;]*m)*\(\w+ pid=", line))


def write_params(project: Path, name: str, overrides: dict) -> str:
    from ctxseg.config import deep_merge

    raw = deep_merge(yaml.safe_load((project / "params.yaml").read_text()), overrides)
    (project / name).write_text(yaml.safe_dump(raw, sort_keys=False))
    return name


def weights(project: Path, model: str) -> dict:
    return torch.load(project / "models" / model / "seeds" / "0" / "model.pt", weights_only=True)["model"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def study(cloud, cluster, tmp_path_factory):
    """`dvc repro` of a one-model study on the cluster (2 ranks, one per isolated node), one seed."""
    from ctxseg.config import deep_merge

    overrides = deep_merge(TINY, {
        "seeds": [0],
        "train": {"epochs": EPOCHS, "max_failures": 1, "checkpoints_to_keep": 1},
        "scaling": {"num_workers": 2, "cpus_per_worker": 1},
        "ray": {"address": cluster.address},
        "report": {"complexity": False, "feature_space": False},
    })
    project = make_project(tmp_path_factory.mktemp("cloud") / "study", deep_merge(overrides, cloud.params(PREFIX)))
    done = run(["dvc", "repro"], project, cloud, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    return project


def test_study_on_nodes_that_share_only_a_network(study, cloud):
    """Ranks on two isolated nodes train from the bucket's dataset and checkpoint to the bucket; runs,
    metrics, models and the registry entry are on the tracking server, in PostgreSQL."""
    import psycopg
    from mlflow import MlflowClient

    record = json.loads((study / "models" / "fcn" / "seeds" / "0" / "run.json").read_text())
    assert record["status"] == "finished" and record["iterations"] == EPOCHS * ITERS_PER_EPOCH
    assert all(h["num_nodes"] == 2 for h in record["history"]), "the two ranks ran on two isolated nodes"
    assert record["ray_run"].startswith(f"s3://{cloud.s3.bucket}/{PREFIX}/ray/fcn/seed0/run-")
    keys = cloud.s3.keys(f"{PREFIX}/")
    assert any(re.fullmatch(rf"{PREFIX}/data/synthetic-\w+/_COMPLETE", k) for k in keys), "dataset published"
    assert any(k.endswith(f"/checkpoint_epoch_{EPOCHS:04d}/state.pt") for k in keys if "/ray/fcn/seed0/" in k)
    assert not list(study.glob("mlartifacts")) and not (study / "mlflow.db").exists(), "nothing in a local store"

    client = MlflowClient(cloud.mlflow.url)
    run = client.get_run(record["run_id"])
    assert run.info.status == "FINISHED" and run.data.params["scaling.num_workers"] == "2"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert sorted(steps) == list(range(1, EPOCHS * ITERS_PER_EPOCH + 1)), "one point per step, logged from a node"
    assert "model/model.pt" in {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    artifacts = cloud.s3.keys("mlartifacts/")
    assert any(k.endswith(f"{run.info.run_id}/artifacts/model/model.pt") for k in artifacts), "proxied to the bucket"
    parent = client.get_run(run.data.tags["mlflow.parentRunId"])
    assert 0.0 <= parent.data.metrics["eval_mIoU"] <= 1.0, "evaluate logged the mean to the model's run"
    best = json.loads((study / "registry" / "best.json").read_text())
    assert best["status"] == "registered", best
    assert client.get_model_version(best["registered_model"], best["version"]).run_id == record["run_id"]
    assert "| fcn |" in (study / "reports" / "report.md").read_text()
    with psycopg.connect(cloud.postgres.uri) as db:  # the server keeps them in PostgreSQL
        assert db.execute("SELECT count(*) FROM runs WHERE run_uuid = %s", (record["run_id"],)).fetchone() == (1,)


def test_killed_rank_then_storage_away_resume_from_the_bucket_to_the_same_weights(study, cloud, cluster):
    """Two faults in one run, each after a checkpoint reached the bucket: a DDP rank's process killed by
    PID on an isolated node (Ray restarts the group from the bucket's newest checkpoint), then the S3
    endpoint refusing every connection for 10 s (the next checkpoint's upload retries until it is back).
    The run finishes with the uninterrupted run's weights, tensor for tensor."""
    model = "fcn_faults"
    params = write_params(study, f"params_{model}.yaml", {"models": {model: {"context": "none"}}})
    proc = subprocess.Popen(["python", "-m", "pipeline.train", "--model", model, "--params", params],
                            cwd=study, env=stage_env(cloud), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def checkpoint_in_bucket(epoch: int):
        done = lambda: any(k.endswith(f"checkpoint_epoch_{epoch:04d}/state.pt") for k in cloud.s3.keys(f"{PREFIX}/ray/{model}/"))
        wait_for(lambda: done() or proc.poll() is not None, 300, f"checkpoint {epoch} in the bucket", poll=0.1)
        assert proc.poll() is None, f"training ended before checkpoint {epoch}'s fault could be made"

    checkpoint_in_bucket(1)
    victims = cluster.worker_processes("RayTrainWorker")
    assert victims, "no Ray Train worker process on the isolated nodes"
    victims[0].send_signal(signal.SIGKILL)
    checkpoint_in_bucket(2)
    with cloud.s3.outage():
        time.sleep(10)
        stopped = proc.poll() is not None
    out, _ = proc.communicate(timeout=600)
    OUTPUTS.append(out)
    assert not stopped and proc.returncode == 0, out[-8000:]
    assert "resumed from checkpoint at epoch" in out, out[-5000:]
    record = json.loads((study / "models" / model / "seeds" / "0" / "run.json").read_text())
    assert record["status"] == "finished" and len(record["history"]) == EPOCHS
    assert_same_weights(weights(study, model), weights(study, "fcn"))


def test_dataset_missing_on_a_node_fails_before_training_naming_node_and_path(study, cloud):
    params = write_params(study, "params_nodata.yaml", {"models": {"fcn_nodata": {"context": "none"}},
                                                        "ray": {"data_path": None}})
    done = run(["python", "-m", "pipeline.train", "--model", "fcn_nodata", "--params", params], study, cloud)
    out = done.stdout + done.stderr
    assert done.returncode == 2, out[-4000:]
    assert "cannot read the prepared dataset at" in out and str(study / "data" / "prepared" / "synthetic") in out
    assert re.search(r"node [\d.]+ \([0-9a-f]{12}\) cannot read", out) and "ray.data_path" in out
    assert "epoch 1/" not in out, "no training step ran"
    assert "Traceback" not in own_lines(out), own_lines(out)[-3000:]


def test_sweep_on_isolated_nodes_survives_a_tracking_server_restart(study, cloud):
    """Tune trials run on the isolated nodes with their state in the bucket; the tracking server is
    stopped and started again while they log; every trial and its MLflow run completes."""
    from mlflow import MlflowClient

    params = write_params(study, "params_tune.yaml", {
        "models": {"fcn_acf": {"context": "acf"}},
        "tune": {"enabled": True, "epochs": 2, "scheduler": "fifo", "max_concurrent_trials": 2, "workers_per_trial": 1,
                 "cpus_per_worker": 1, "seed_repeats": False, "sweeps": {"kxh": {
                     "model": "fcn_acf", "search": "grid", "space": {"acf.mixtures": {"grid": [1, 2]}}}}},
    })
    proc = subprocess.Popen(["python", "-m", "pipeline.tune", "--params", params], cwd=study, env=stage_env(cloud),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    client = MlflowClient(cloud.mlflow.url)
    experiment = client.get_experiment_by_name("ctxseg")

    def trial_logging() -> bool:
        runs = client.search_runs([experiment.experiment_id], "tags.sweep = 'kxh'")
        return any("loss" in r.data.metrics for r in runs)

    wait_for(lambda: trial_logging() or proc.poll() is not None, 300, "a trial's first logged step", poll=0.5)
    assert proc.poll() is None, "the sweep ended before the server could be restarted"
    cloud.mlflow.restart(down_s=2)
    out, _ = proc.communicate(timeout=900)
    OUTPUTS.append(out)
    assert proc.returncode == 0, out[-6000:]
    rows = list(csv.DictReader((study / "tune" / "results.csv").open()))
    assert [r["status"] for r in rows] == ["COMPLETED", "COMPLETED"]
    trial_keys = cloud.s3.keys(f"{PREFIX}/ray/tune/kxh/")
    for r in rows:
        assert any(r["trial_id"] in k and "/checkpoint_" in k for k in trial_keys), "trial checkpoints live in the bucket"
        trial_run = client.get_run(r["mlflow_run_id"])
        assert trial_run.info.status == "FINISHED" and trial_run.data.params["tune.acf.mixtures"] == r["acf.mixtures"]
        assert len(client.get_metric_history(trial_run.info.run_id, "val_mIoU")) == 2


def test_dvc_remote_on_the_bucket_brings_a_study_to_a_fresh_clone(study, cloud, tmp_path):
    """`dvc push` to the bucket; a fresh clone with its own credentials `dvc pull`s the models and
    metrics; `dvc repro --allow-missing` there runs nothing, and a plain `dvc repro` trains nothing."""
    # the tests above ran stages by hand (e.g. the sweep wrote tune/): a user's `dvc repro` first
    settle = run(["dvc", "repro"], study, cloud)
    assert settle.returncode == 0, settle.stdout + settle.stderr
    assert "Running stage 'train@fcn'" not in settle.stdout, settle.stdout
    cloud.dvc_remote(study, PREFIX)
    push = run(["dvc", "push"], study, cloud)
    assert push.returncode == 0, push.stdout + push.stderr
    assert any(k.startswith(f"{PREFIX}/dvc/files/md5/") for k in cloud.s3.keys(f"{PREFIX}/dvc/"))
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t.invalid"]
    subprocess.run(git + ["add", "-A"], cwd=study, check=True)
    subprocess.run(git + ["commit", "-qm", "study"], cwd=study, check=True)
    assert "secret_access_key" not in (study / ".dvc" / "config").read_text(), "credentials stay in config.local"

    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(study), str(clone)], check=True)
    cloud.dvc_remote(clone, PREFIX)
    pull = run(["dvc", "pull"], clone, cloud)
    assert pull.returncode == 0, pull.stdout + pull.stderr
    assert_same_weights(weights(clone, "fcn"), weights(study, "fcn"))
    assert json.loads((clone / "metrics" / "fcn.json").read_text()) == json.loads((study / "metrics" / "fcn.json").read_text())
    # the prepared dataset is no DVC-cached output (a second copy of every image, by design): nothing
    # runs while it is allowed to be missing, and a plain repro rebuilds it from its source, trains nothing
    idle = run(["dvc", "repro", "--allow-missing"], clone, cloud)
    assert idle.returncode == 0 and "Running stage" not in idle.stdout, idle.stdout + idle.stderr
    repro = run(["dvc", "repro"], clone, cloud)
    assert repro.returncode == 0, repro.stdout + repro.stderr
    ran = set(re.findall(r"Running stage '([^']+)'", repro.stdout))
    assert ran <= {"source", "download", "preprocess"}, repro.stdout
    status = run(["dvc", "status"], clone, cloud)
    assert "up to date" in status.stdout, status.stdout


def test_no_secret_is_written_down(study, cloud):
    """The bucket's secret key and the tracking token appear in no MLflow param or tag, no stage output,
    no file under version control (run last: it searches what the tests above produced)."""
    from mlflow import MlflowClient

    secrets = [cloud.s3.credentials["AWS_SECRET_ACCESS_KEY"], TOKEN]
    client = MlflowClient(cloud.mlflow.url)
    experiments = client.search_experiments()
    runs = client.search_runs([e.experiment_id for e in experiments], max_results=1000)
    assert len(runs) >= 5
    for r in runs:
        text = json.dumps({"params": r.data.params, "tags": r.data.tags})
        assert not any(s in text for s in secrets), f"a secret in run {r.info.run_id}'s params or tags"
    assert len(OUTPUTS) >= 5
    for out in OUTPUTS:
        assert not any(s in out for s in secrets), "a secret in a stage's output"
    tracked = subprocess.run(["git", "ls-files"], cwd=study, capture_output=True, text=True, check=True).stdout.split()
    assert ".dvc/config" in tracked and "dvc.lock" in tracked
    for rel in tracked:
        data = (study / rel).read_bytes() if (study / rel).is_file() else b""
        assert not any(s.encode() in data for s in secrets), f"a secret in {rel}"
