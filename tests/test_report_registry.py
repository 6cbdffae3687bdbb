"""The best model goes to the MLflow Model Registry (idempotently); predict loads it back by run id."""
from __future__ import annotations

import numpy as np
from PIL import Image

from ctxseg.config import parse_params
from ctxseg.models import ModelConfig, build_segmentor
from pipeline import common


def test_register_best_model_then_predict_from_mlflow(tmp_path, monkeypatch):
    import mlflow

    from pipeline.predict import run_predict
    from pipeline.report import register_best_model

    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    params = parse_params({"mlflow": {"tracking_uri": uri, "artifact_root": str(tmp_path / "mlartifacts")}})
    paths = common.Paths(params, root=tmp_path)
    experiment_id = common.mlflow_experiment(params, tmp_path)
    client = mlflow.MlflowClient(uri)
    runs = {name: client.create_run(experiment_id, tags={"dataset": "synthetic"}).info.run_id
            for name in ("fcn", "fcn_mcibi")}
    records = [{"name": name, "metrics": {"mIoU": miou}, "run": {"experiment_id": experiment_id},
                "run_id": runs[name]} for name, miou in (("fcn", 0.40), ("fcn_mcibi", 0.45))]

    # the best run logged no model: said so, nothing registered
    out = register_best_model(params, paths, records)
    assert out["status"] == "skipped" and "logged no model" in out["reason"] and out["model"] == "fcn_mcibi"

    torch_model = build_segmentor(ModelConfig(context="mcibi", channels=16), num_classes=4).eval()
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=runs["fcn_mcibi"]):
        mlflow.pytorch.log_model(torch_model, name="model", serialization_format="pickle")

    out = register_best_model(params, paths, records)
    assert out["status"] == "registered", out
    assert out["registered_model"] == "ctxseg-synthetic" and out["uri"] == "models:/ctxseg-synthetic@best"
    version = client.get_model_version_by_alias("ctxseg-synthetic", "best")
    assert version.run_id == runs["fcn_mcibi"] and version.tags["model"] == "fcn_mcibi"
    # a second report does not pile up versions
    again = register_best_model(params, paths, records)
    assert again["status"] == "reused" and again["version"] == out["version"]
    assert len(client.search_model_versions("name = 'ctxseg-synthetic'")) == 1

    # predict from the run id and from the registry alias
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (23, 31, 3), dtype=np.uint8)).save(folder / "x.png")
    params_file = tmp_path / "params.yaml"
    params_file.write_text(f"mlflow:\n  tracking_uri: {uri}\n")
    for source, out_dir in ((runs["fcn_mcibi"], "by_run"), ("models:/ctxseg-synthetic@best", "by_alias")):
        written = run_predict(source, folder, tmp_path / out_dir, params_file=params_file)
        assert written[0]["size"] == [23, 31]
        with Image.open(tmp_path / out_dir / "x_mask.png") as mask:
            assert mask.size == (31, 23) and int(np.asarray(mask).max()) < 4


def test_registry_disabled_or_without_runs(tmp_path):
    from pipeline.report import register_best_model

    params = parse_params({"report": {"register_model": False}})
    paths = common.Paths(params, root=tmp_path)
    records = [{"name": "fcn", "metrics": {"mIoU": 0.4}, "run": {}, "run_id": None}]
    assert "register_model` is false" in register_best_model(params, paths, records)["reason"]
    params = parse_params({})
    out = register_best_model(params, paths, records)
    assert out["status"] == "skipped" and "no MLflow run" in out["reason"]
    assert register_best_model(params, paths, [{**records[0], "metrics": {"mIoU": float("nan")}}])["status"] == "skipped"


def test_report_is_written_when_the_tracking_server_is_unreachable(tmp_path):
    import json

    from test_report import fabricate

    from pipeline.report import write_report

    params, paths = fabricate(tmp_path, sweep=False, complexity=False, register_model=True)
    params.mlflow.tracking_uri = "http://127.0.0.1:9"  # nothing listens on the discard port
    for run_file in paths.models.glob("*/run.json"):
        run = json.loads(run_file.read_text())
        run.update(run_id="0" * 32, experiment_id="1")
        run_file.write_text(json.dumps(run))
    md = write_report(params, paths).read_text()
    assert "not registered in the Model Registry: the MLflow tracking store cannot be reached" in md
    assert (paths.reports / "figures" / "training_curves.png").is_file()  # from run.json's history instead
