"""The best model goes to the MLflow Model Registry (idempotently, by the register stage); predict loads it
back by run id and by the registry alias, from the weights-only run artifact ``model/model.pt``; a
tampered artifact is refused without being unpickled."""
from __future__ import annotations

import json
import logging

import numpy as np
from PIL import Image

from ctxseg.checkpoint import write_model_file
from ctxseg.config import parse_params
from ctxseg.models import ModelConfig, build_segmentor
from pipeline import common
from pipeline.mlflow_tracking import mlflow_store

CLASSES = ["sea", "lake", "ship", "swan"]


def log_model_artifact(client, run_id: str, staging, payload: bytes = b""):
    """What the train stage logs: the weights-only model file as run artifact ``model/model.pt``
    (``payload`` replaces the file's bytes, to tamper with it)."""
    staging.mkdir(parents=True, exist_ok=True)
    model = build_segmentor(ModelConfig(context="mcibi", channels=16), num_classes=len(CLASSES)).eval()
    path = staging / "model.pt"
    write_model_file(path, weights=model.state_dict(), model_config=model.cfg.model_dump(mode="json"),
                     num_classes=len(CLASSES), class_names=CLASSES, dataset="synthetic", model_name="fcn_mcibi")
    if payload:
        path.write_bytes(payload)
    client.log_artifact(run_id, str(path), artifact_path="model")
    return model


def test_register_best_model_then_predict_from_mlflow(tmp_path, monkeypatch):
    import mlflow

    from pipeline.predict import run_predict
    from pipeline.register import register_best_model

    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    params = parse_params({"mlflow": {"tracking_uri": uri, "artifact_root": str(tmp_path / "mlartifacts")}})
    paths = common.Paths(params, root=tmp_path)
    experiment_id = mlflow_store.experiment_id(params, tmp_path)
    client = mlflow.MlflowClient(uri)
    runs = {name: client.create_run(experiment_id, tags={"dataset": "synthetic"}).info.run_id
            for name in ("fcn", "fcn_mcibi")}
    records = [{"name": name, "metrics": {"mIoU": miou}, "run": {"experiment_id": experiment_id},
                "run_id": runs[name]} for name, miou in (("fcn", 0.40), ("fcn_mcibi", 0.45))]

    # the best run logged no model: said so, nothing registered
    out = register_best_model(params, paths, records)
    assert out["status"] == "skipped" and "logged no model" in out["reason"] and out["model"] == "fcn_mcibi"

    log_model_artifact(client, runs["fcn_mcibi"], tmp_path / "staging")

    out = register_best_model(params, paths, records)
    assert out["status"] == "registered", out
    assert out["registered_model"] == "ctxseg-synthetic" and out["uri"] == "models:/ctxseg-synthetic@best"
    # the record holds no path of this clone: it stays true when the repo is copied or moved
    assert out["source"] == f"runs:/{runs['fcn_mcibi']}/model" and str(tmp_path) not in json.dumps(out)
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
    sources = ((runs["fcn_mcibi"], "by_run"), (f"runs:/{runs['fcn_mcibi']}/model", "by_uri"),
               ("models:/ctxseg-synthetic@best", "by_alias"))
    for source, out_dir in sources:
        written = run_predict(source, folder, tmp_path / out_dir, params_file=params_file)
        assert written[0]["size"] == [23, 31]
        with Image.open(tmp_path / out_dir / "x_mask.png") as mask:
            assert mask.size == (31, 23) and int(np.asarray(mask).max()) < 4
        # class names travel in the model file
        assert json.loads((tmp_path / out_dir / "predictions.json").read_text())["class_names"] == CLASSES
    assert (tmp_path / "by_run" / "x_mask.png").read_bytes() == (tmp_path / "by_alias" / "x_mask.png").read_bytes()


class _CreatesAFile:
    """Unpickling this creates ``path``: what a tampered model artifact would do."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_tampered_mlflow_artifact_is_refused_without_unpickling(tmp_path, monkeypatch, capsys):
    import pickle

    import mlflow

    from pipeline.predict import main
    from pipeline.register import register_best_model

    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    # handlers an earlier test's stage left on a closed capture stream would print "Logging error" tracebacks
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    params = parse_params({"mlflow": {"tracking_uri": uri, "artifact_root": str(tmp_path / "mlartifacts")}})
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(mlflow_store.experiment_id(params, tmp_path)).info.run_id
    marker = tmp_path / "pwned.txt"
    evil = pickle.dumps(_CreatesAFile(marker))
    pickle.loads(pickle.dumps(_CreatesAFile(tmp_path / "control.txt"))).close()  # what an unsafe load does
    assert (tmp_path / "control.txt").exists()
    log_model_artifact(client, run_id, tmp_path / "staging", payload=evil)
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "x.png")
    params_file = tmp_path / "params.yaml"
    params_file.write_text(f"mlflow:\n  tracking_uri: {uri}\n")
    for source in (run_id, f"runs:/{run_id}/model"):
        rc = main(["--model", source, "--input", str(folder), "--output", str(tmp_path / "out"),
                   "--params", str(params_file)])
        err = capsys.readouterr().err
        assert rc == 2, err
        assert "refused: it holds objects other than weights" in err and source in err and "Traceback" not in err
        assert not marker.exists() and not (tmp_path / "out").exists()
    # the register stage checks the artifact the same way and refuses to register it
    records = [{"name": "fcn", "metrics": {"mIoU": 0.4}, "run": {}, "run_id": run_id}]
    out = register_best_model(params, common.Paths(params, root=tmp_path), records)
    assert out["status"] == "failed" and "ModelFileError" in out["reason"] and not marker.exists()
    assert not client.search_registered_models()


def test_registry_disabled_or_without_runs(tmp_path):
    from pipeline.register import register_best_model

    params = parse_params({"report": {"register_model": False}})
    paths = common.Paths(params, root=tmp_path)
    records = [{"name": "fcn", "metrics": {"mIoU": 0.4}, "run": {}, "run_id": None}]
    assert "register_model` is false" in register_best_model(params, paths, records)["reason"]
    params = parse_params({})
    out = register_best_model(params, paths, records)
    assert out["status"] == "skipped" and "no MLflow run" in out["reason"]
    assert register_best_model(params, paths, [{**records[0], "metrics": {"mIoU": float("nan")}}])["status"] == "skipped"


def test_report_is_written_when_the_tracking_server_is_unreachable(tmp_path):
    from test_report import fabricate

    from pipeline.report import write_report

    from pipeline.register import register

    params, paths = fabricate(tmp_path, sweep=False, complexity=False, register_model=True)
    params.mlflow.tracking_uri = "http://127.0.0.1:9"  # nothing listens on the discard port
    for run_file in paths.models.glob("*/seeds/*/run.json"):
        run = json.loads(run_file.read_text())
        run.update(run_id="0" * 32, experiment_id="1")
        run_file.write_text(json.dumps(run))
    for details in paths.metrics.glob("*.details.json"):  # what the evaluate stage records of each seed's run
        record = json.loads(details.read_text())
        for seed in record["seeds"]:
            seed["run_id"] = "0" * 32
        details.write_text(json.dumps(record))
    assert register(params, paths)["status"] == "failed"  # the register stage records it in registry/best.json
    assert json.loads((tmp_path / "registry" / "best.json").read_text())["model"] == "pspnet"
    md = write_report(params, paths).read_text()
    assert "not registered in the Model Registry: the MLflow tracking store cannot be reached" in md
    assert str(tmp_path) not in json.dumps(json.loads((tmp_path / "registry" / "best.json").read_text()))
    assert (paths.reports / "figures" / "training_curves.png").is_file()  # from run.json's history instead
