"""DVC experiments carry the study: two queued variants run at once on this machine, each logs into the
main repository's MLflow store with its experiment's name, and ``dvc exp apply`` brings back the
weights that match the experiment's metrics."""
from __future__ import annotations

import json
import time

import pytest
import torch

from conftest import make_project, run
from ctxseg.checkpoint import read_model_file
from ctxseg.config import deep_merge, load_params

pytestmark = pytest.mark.slow

QUICK = {"train": {"epochs": 1}, "ray": {"num_cpus": 1},
         "evaluate": {"multi_scale": False, "num_visualisations": 1, "feature_images": 4},
         "report": {"complexity": False, "feature_space": False, "qualitative_images": 1}}


def queue_rows(project) -> dict[str, str]:
    """experiment name -> status, from `dvc queue status`."""
    out = run(["dvc", "queue", "status"], project).stdout
    rows = {}
    for line in out.splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 4 and parts[-1] in ("Queued", "Running", "Success", "Failed"):
            rows[parts[1]] = parts[-1]
    return rows


def test_two_queued_experiments_at_once_then_apply_the_winner(tmp_path, tiny_overrides):
    project = make_project(tmp_path / "study", deep_merge(tiny_overrides, QUICK),
                           replace={"models": {"fcn_acf": {"context": "acf"}}, "tune.sweeps": {}})
    for heads in (4, 1):  # the form the project prints: `++` adds models.fcn_acf.acf, absent from params.yaml
        queued = run(["dvc", "exp", "run", "--queue", "-n", f"heads{heads}",
                      "-S", f"++models.fcn_acf.acf.heads={heads}"], project)
        assert queued.returncode == 0, queued.stderr[-3000:]
    started = run(["dvc", "queue", "start", "-j", "2"], project)
    assert started.returncode == 0, started.stderr[-3000:]
    deadline, rows = time.time() + 900, {}
    while time.time() < deadline:
        rows = queue_rows(project)
        if rows and all(s in ("Success", "Failed") for s in rows.values()):
            break
        time.sleep(1)
    logs = {name: run(["dvc", "queue", "logs", name], project).stdout for name in ("heads4", "heads1")}
    assert rows == {"heads4": "Success", "heads1": "Success"}, f"{rows}\n" + "\n".join(
        f"--- {name}\n{text[-4000:]}" for name, text in logs.items())
    for name, text in logs.items():
        assert "multiple active Ray instances" not in text, text[-3000:]
        assert "Found multiple" not in text

    # both runs live in the main repository's store, tagged with their experiment
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("ctxseg")
    train_runs = {}
    for name, heads in (("heads4", "4"), ("heads1", "1")):
        found = client.search_runs([experiment.experiment_id],
                                   filter_string=f"tags.`dvc.experiment` = '{name}' and tags.stage = 'train' "
                                                 "and tags.seed = '0'")
        assert len(found) == 1, name
        mlrun = found[0]
        assert mlrun.info.status == "FINISHED" and mlrun.data.params["model.acf.heads"] == heads
        assert mlrun.data.tags["git_commit"] == mlrun.data.tags["dvc.baseline_rev"]
        assert mlrun.info.run_name.endswith(f"(exp {name})")
        assert "eval_mIoU" in mlrun.data.metrics, "evaluate logged into the same run"
        train_runs[name] = mlrun
    assert not list((project / ".dvc" / "tmp").rglob("mlflow.db")), "no store inside DVC's temporary copies"

    # dvc exp show lists both with their metrics
    shown = run(["dvc", "exp", "show", "--json"], project)
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert {"heads4", "heads1"} <= set(shown.stdout.replace('"', " ").split())

    # apply the winner: params, metrics and weights are the experiment's
    applied = run(["dvc", "exp", "apply", "heads4"], project)
    assert applied.returncode == 0, applied.stderr[-3000:]
    assert load_params(project / "params.yaml").models["fcn_acf"].acf.heads == 4
    record = json.loads((project / "models" / "fcn_acf" / "seeds" / "0" / "run.json").read_text())
    assert record["run_id"] == train_runs["heads4"].info.run_id
    from pipeline.mlflow_tracking.model_store import download_model_file

    logged = download_model_file(f"runs:/{record['run_id']}/model", f"sqlite:///{project / 'mlflow.db'}")
    weights = read_model_file(project / "models" / "fcn_acf" / "seeds" / "0" / "model.pt").weights
    assert logged.weights.keys() == weights.keys()
    for key, tensor in weights.items():
        assert torch.equal(tensor, logged.weights[key]), key
    metrics = json.loads((project / "metrics" / "fcn_acf.json").read_text())
    assert metrics["mIoU"] == pytest.approx(train_runs["heads4"].data.metrics["eval_mIoU"])
