"""End to end: the real `dvc repro` on a tiny study in a throw-away copy of the project."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import make_project, run
from params_declared import undeclared_reads

from ctxseg.param_reads import read_keys

pytestmark = pytest.mark.slow


def test_dvc_repro_end_to_end_then_nothing_to_do(tmp_path, tiny_overrides):
    project = make_project(tmp_path / "study", {**tiny_overrides, "seeds": [0, 1]})
    reads = tmp_path / "param_reads"
    first = run(["dvc", "repro"], project, env_extra={"CTXSEG_PARAM_READS": str(reads)})
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-6000:]

    # every stage declares (in dvc.yaml, as resolved in dvc.lock) every params key it read
    assert {"train@fcn", "evaluate@fcn", "report"} <= set(read_keys(reads)), sorted(read_keys(reads))
    assert undeclared_reads(project / "dvc.lock", reads) == {}

    # the DVC metrics file: the headline numbers only (flat, numbers), fractions: means over the two seeds,
    # their standard deviations and the seed count; `dvc metrics show` shows exactly those columns
    headline = json.loads((project / "metrics" / "fcn.json").read_text())
    assert list(headline) == ["mIoU", "pixAcc", "mAcc", "ms_flip_mIoU", "mIoU_sd", "pixAcc_sd", "mAcc_sd",
                              "ms_flip_mIoU_sd", "seeds"]
    assert headline.pop("seeds") == 2
    assert all(type(v) is float and 0.0 <= v <= 1.0 for v in headline.values()), headline
    headline["seeds"] = 2
    shown = run(["dvc", "metrics", "show", "--json"], project)
    assert shown.returncode == 0, shown.stderr[-3000:]
    declared = {path: entry["data"] for rev in json.loads(shown.stdout).values()
                for path, entry in rev["data"].items()}
    assert declared == {"metrics/fcn.json": headline}, declared
    # everything else the other stages need: the details record and the per-class plot file
    metrics = json.loads((project / "metrics" / "fcn.details.json").read_text())
    assert metrics["mIoU"] == headline["mIoU"] and metrics["ms_flip"]["mIoU"] == headline["ms_flip_mIoU"]
    assert metrics["pixAcc"] == headline["pixAcc"] and metrics["mAcc"] == headline["mAcc"]
    assert len(metrics["per_class_iou"]) >= 2
    assert metrics["ms_flip"]["scales"] == [0.75, 1.0] and len(metrics["ms_flip"]["per_class_iou"]) >= 2
    assert metrics["run_id"] and metrics["model"] == "fcn"
    assert [s["seed"] for s in metrics["seeds"]] == [0, 1]
    assert metrics["mIoU"] == pytest.approx(sum(s["mIoU"] for s in metrics["seeds"]) / 2)
    bars = json.loads((project / "plots" / "fcn" / "per_class_iou.json").read_text())
    assert {b["class"]: b["iou"] for b in bars} == metrics["per_class_iou"]

    # MLflow: the run has params, a per-epoch metric history and a checkpoint artifact
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("ctxseg")
    assert experiment is not None
    assert experiment.artifact_location.startswith((project / "mlartifacts").as_uri())
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 3, "the model's parent run and one nested run per seed"
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    assert parent.info.run_name == "synthetic/fcn+none" and parent.info.status == "FINISHED"
    assert metrics["run_id"] == parent.info.run_id
    assert parent.data.metrics["eval_mIoU"] == pytest.approx(metrics["mIoU"])
    assert parent.data.metrics["eval_mIoU_sd"] == pytest.approx(headline["mIoU_sd"])
    seeds = {r.data.tags["seed"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert sorted(seeds) == ["0", "1"]
    mlrun = seeds["0"]
    assert mlrun.info.status == "FINISHED"
    assert mlrun.info.run_name == "synthetic/fcn+none seed 0"
    assert mlrun.data.params["seed"] == "0" and seeds["1"].data.params["seed"] == "1"
    assert mlrun.data.metrics["eval_mIoU"] == pytest.approx(metrics["seeds"][0]["mIoU"])
    assert mlrun.data.params["train.epochs"] == "2"
    assert mlrun.data.params["model.framework"] == "fcn"
    assert mlrun.data.tags["dataset"] == "synthetic"
    history = client.get_metric_history(mlrun.info.run_id, "val_mIoU")
    assert len(history) == 2, "one validation point per epoch"
    assert len(client.get_metric_history(mlrun.info.run_id, "loss")) >= 2
    artifacts = {a.path for a in client.list_artifacts(mlrun.info.run_id, "checkpoint")}
    assert "checkpoint/state.pt" in artifacts
    import torch

    from ctxseg.checkpoint import load_model
    from pipeline.mlflow_tracking.model_store import MODEL_ARTIFACT, download_model_file

    assert MODEL_ARTIFACT in {a.path for a in client.list_artifacts(mlrun.info.run_id, "model")}
    # the logged model is a weights-only model file: read back without unpickling, runs on its own
    logged = download_model_file(f"runs:/{mlrun.info.run_id}/model", f"sqlite:///{project / 'mlflow.db'}")
    reloaded, _ = load_model(logged)
    with torch.no_grad():
        assert reloaded(torch.zeros(1, 3, 40, 40))["logits"].shape == (1, len(metrics["per_class_iou"]), 40, 40)

    # report names the model and shows its mIoU
    report = (project / "reports" / "report.md").read_text()
    assert "| fcn |" in report
    assert f"{100 * metrics['mIoU']:.2f}" in report
    assert (project / "reports" / "report.html").read_text().startswith("<!doctype html>")

    # the trained model reloads with weights_only=True
    payload = torch.load(project / "models" / "fcn" / "seeds" / "0" / "model.pt", weights_only=True)
    assert payload["num_classes"] == len(metrics["per_class_iou"])

    # a second repro runs nothing, and `dvc status` says there is nothing to do
    second = run(["dvc", "repro"], project)
    assert second.returncode == 0, second.stderr[-3000:]
    out = second.stdout + second.stderr
    assert re.findall(r"Running stage '([^']+)'", out) == [], out
    status = run(["dvc", "status"], project)
    assert status.stdout.strip() == "Data and pipelines are up to date.", status.stdout

    # what a user runs between two repros changes nothing DVC sees: byte code (every module recompiled,
    # plain and optimised, a superset of what the test suite or a notebook writes), the tools, and editor
    # and OS litter (.dvcignore)
    for cmd in (["python", "-m", "compileall", "-f", "-q", "ctxseg", "pipeline"],
                ["python", "-O", "-m", "compileall", "-f", "-q", "ctxseg", "pipeline"],
                ["python", "-m", "ctxseg.models.complexity"],
                ["ctxseg-predict", "--model", "models/fcn", "--input", "data/prepared/synthetic/images/val",
                 "--output", str(tmp_path / "predicted")]):
        done = run(cmd, project)
        assert done.returncode == 0, (cmd, done.stderr[-2000:])
    assert list((project / "ctxseg" / "models").glob("__pycache__/*.opt-1.pyc")), "byte code was written"
    for litter in ("ctxseg/models/acf.py~", "ctxseg/.DS_Store", "ctxseg/.ipynb_checkpoints/x.py", "pipeline/.#train.py"):
        (project / litter).parent.mkdir(parents=True, exist_ok=True)
        (project / litter).write_text("litter")
    assert run(["dvc", "status"], project).stdout == status.stdout

    # DVC re-running the train stage (it deletes the outputs first) trains no finished seed again: each
    # seed's model file is rebuilt from its final checkpoint, same weights, same MLflow runs
    forced = run(["dvc", "repro", "--force", "--single-item", "train@fcn"], project)
    told = forced.stdout + forced.stderr
    assert forced.returncode == 0, told[-3000:]
    assert told.count("had finished: model file rebuilt from its final checkpoint") == 2, told[-3000:]
    assert "Ray Train (" not in told, "nothing was trained"
    rebuilt = torch.load(project / "models" / "fcn" / "seeds" / "0" / "model.pt", weights_only=True)
    assert all(torch.equal(rebuilt["model"][k], payload["model"][k]) for k in payload["model"])
    assert len(client.search_runs([experiment.experiment_id])) == 3, "no new MLflow run"

    # `dvc plots show` renders every declared plot with no network: nothing loaded from another site
    page = tmp_path / "plots_page"
    shown = run(["dvc", "plots", "show", "-o", str(page)], project)
    assert shown.returncode == 0, shown.stderr[-2000:]
    html = (page / "index.html").read_text(encoding="utf-8")
    assert not re.findall(r"""<(?:script|link|img)[^>]+(?:src|href)\s*=\s*["']?(?:https?:)?//""", html, flags=re.I)
    assert "vegaEmbed(" in html and "per_class_iou" in html and "confusion" in html

    # the repo is relocatable: a copy re-runs a stage into its own MLflow store, the original is untouched
    import shutil

    def snapshot(root: Path) -> dict:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    origin_store = {"db": (project / "mlflow.db").read_bytes(), "artifacts": snapshot(project / "mlartifacts")}
    copy = tmp_path / "moved"
    shutil.copytree(project, copy, symlinks=True)
    again = run(["dvc", "repro", "--force", "--single-item", "evaluate@fcn"], copy)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "came from" in again.stderr, "the copy said it relocated its store"
    assert (project / "mlflow.db").read_bytes() == origin_store["db"]
    assert snapshot(project / "mlartifacts") == origin_store["artifacts"]
    copied = MlflowClient(f"sqlite:///{copy / 'mlflow.db'}").get_run(mlrun.info.run_id)
    assert copied.info.artifact_uri.startswith((copy / "mlartifacts").as_uri())
    record = json.loads((copy / "models" / "fcn" / "seeds" / "0" / "run.json").read_text())
    assert not Path(record["ray_run"]).is_absolute(), "run.json holds repo-relative paths"
