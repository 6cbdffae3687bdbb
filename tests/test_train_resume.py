"""Interrupt-and-rerun: a train stage stopped mid-run continues from its checkpoint when run again."""
from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest

from conftest import make_project, pipeline_env, run

pytestmark = pytest.mark.slow


def test_interrupted_training_resumes_from_checkpoint(tmp_path, tiny_overrides):
    epochs = 40  # long enough (~20 s) to be interrupted part-way
    tiny_overrides["train"]["epochs"] = epochs
    project = make_project(tmp_path / "study", tiny_overrides)
    prep = run(["dvc", "repro", "preprocess"], project)
    assert prep.returncode == 0, prep.stderr[-3000:]

    log_file = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen(["python", "-m", "pipeline.train", "--model", "fcn"], cwd=project,
                            env=pipeline_env(), stdout=log_file, stderr=subprocess.STDOUT,
                            start_new_session=True)
    ray_dir = project / "models" / "fcn" / "ray"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if len(list(ray_dir.glob("run-*/checkpoint_*"))) >= 2:
            break
        time.sleep(0.5)
    assert proc.poll() is None, "training ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)  # what Ctrl-C on `dvc repro` sends
    proc.wait(timeout=120)
    log_file.close()
    run_record = json.loads((project / "models" / "fcn" / "run.json").read_text())
    assert run_record["status"] == "running", "the interrupted run is left resumable"
    assert not (project / "models" / "fcn" / "model.pt").exists()

    second = run(["python", "-m", "pipeline.train", "--model", "fcn"], project)
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-4000:]
    assert "resuming interrupted run" in out
    resumed = [line for line in out.splitlines() if "resumed from checkpoint at epoch" in line]
    assert resumed and not resumed[0].rstrip().endswith("epoch 0, iteration 0"), resumed
    final = json.loads((project / "models" / "fcn" / "run.json").read_text())
    assert final["status"] == "finished" and final["run_id"] == run_record["run_id"]
    assert [h["epoch"] for h in final["history"]] == list(range(1, epochs + 1))

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    exp = client.get_experiment_by_name("ctxseg")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED", "no duplicate or orphaned MLflow run"
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "val_mIoU")]
    assert len(steps) == len(set(steps)) == epochs, "one point per epoch, none replayed twice"
