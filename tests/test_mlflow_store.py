"""Where the MLflow store is: one store for every DVC experiment, and a copied repo never writes into its origin."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from ctxseg.config import parse_params
from pipeline.mlflow_tracking import mlflow_store


@pytest.fixture
def params():
    return parse_params({"mlflow": {"system_metrics": False}})


def files_under(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def log_run_with_artifact(params, root: Path, text: str) -> str:
    import mlflow

    client = mlflow.MlflowClient(mlflow_store.tracking_uri(params, root))
    run_id = client.create_run(mlflow_store.experiment_id(params, root)).info.run_id
    client.log_text(run_id, text, "note.txt")
    client.set_terminated(run_id)
    return run_id


def test_queued_experiment_logs_into_the_main_repository_store(tmp_path, params, monkeypatch):
    main, temp_copy = tmp_path / "repo", tmp_path / "repo" / ".dvc" / "tmp" / "exps" / "tmp1"
    temp_copy.mkdir(parents=True)
    monkeypatch.setenv("DVC_ROOT", str(main))  # what DVC sets for a queued experiment's stages
    assert mlflow_store.tracking_uri(params, temp_copy) == f"sqlite:///{main / 'mlflow.db'}"
    log_run_with_artifact(params, temp_copy, "from the queue")
    assert (main / "mlflow.db").is_file() and not (temp_copy / "mlflow.db").exists()
    assert [p.read_text() for p in (main / "mlartifacts").rglob("note.txt")] == ["from the queue"]
    monkeypatch.delenv("DVC_ROOT")
    assert mlflow_store.tracking_uri(params, temp_copy) == f"sqlite:///{temp_copy / 'mlflow.db'}"


def test_copied_repo_relocates_its_store_and_never_writes_into_the_origin(tmp_path, params):
    import mlflow

    origin, copy = tmp_path / "origin", tmp_path / "copy"
    origin.mkdir()
    first = log_run_with_artifact(params, origin, "made in origin")
    shutil.copytree(origin, copy)
    before = files_under(origin)

    second = log_run_with_artifact(params, copy, "made in the copy")
    assert files_under(origin) == before, "the copy wrote into its origin"
    client = mlflow.MlflowClient(mlflow_store.tracking_uri(params, copy))
    for run_id in (first, second):
        assert client.get_run(run_id).info.artifact_uri.startswith((copy / "mlartifacts").as_uri() + "/")
    assert client.get_experiment_by_name("ctxseg").artifact_location == (copy / "mlartifacts" / "ctxseg").as_uri()
    copied = [p.read_text() for p in sorted((copy / "mlartifacts").rglob("note.txt"))]
    assert sorted(copied) == ["made in origin", "made in the copy"]
    # the origin is untouched and still reads its own artifacts
    origin_client = mlflow.MlflowClient(mlflow_store.tracking_uri(params, origin))
    assert origin_client.get_run(first).info.artifact_uri.startswith((origin / "mlartifacts").as_uri() + "/")
    # a second look changes nothing
    assert mlflow_store.relocate(copy / "mlflow.db", copy) == 0


def test_a_store_the_user_named_is_never_rewritten(tmp_path, monkeypatch):
    store = tmp_path / "shared.db"
    named = parse_params({"mlflow": {"tracking_uri": f"sqlite:///{store}"}})
    assert mlflow_store.tracking_uri(named, tmp_path / "anywhere") == f"sqlite:///{store}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert mlflow_store.tracking_uri(parse_params({}), tmp_path) == "http://mlflow.example:5000"


def test_origin_of_default_artifact_locations():
    assert mlflow_store._origin_of("file:///old/repo/mlartifacts/ctxseg") == Path("/old/repo")
    assert mlflow_store._origin_of("file:///old/my%20repo/mlartifacts/ctxseg/1/abc/artifacts") == Path("/old/my repo")
    assert mlflow_store._origin_of("/old/repo/mlartifacts/ctxseg") == Path("/old/repo")
    assert mlflow_store._origin_of("s3://bucket/ctxseg") is None
    assert mlflow_store._origin_of("mlflow-artifacts:/0") is None


def test_run_tags_name_the_dvc_experiment_and_revision(monkeypatch):
    for var in ("DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "DVC_STAGE"):
        monkeypatch.delenv(var, raising=False)
    assert mlflow_store.run_tags("abc123") == {"mlflow.source.git.commit": "abc123", "git_commit": "abc123"}
    assert mlflow_store.experiment_label() == ""
    monkeypatch.setenv("DVC_EXP_NAME", "heads4")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "f00d")
    monkeypatch.setenv("DVC_STAGE", "train@fcn_acf")
    assert mlflow_store.run_tags("abc123") == {"mlflow.source.git.commit": "abc123", "git_commit": "abc123",
                                               "dvc.experiment": "heads4", "dvc.baseline_rev": "f00d",
                                               "dvc.stage": "train@fcn_acf"}
    assert mlflow_store.experiment_label() == " (exp heads4)"


def test_experiment_opens_as_classic_ml_with_the_headline_columns(tmp_path, params):
    """The UI shows an experiment tagged custom_model_development in its classic runs view (MLflow 3 opens the
    GenAI view otherwise), and the shared view state (the UI's own `viewStateShareKey` mechanism) selects the
    headline metrics and key params. An experiment created before the tags existed gets them on next use."""
    import json

    import mlflow

    client = mlflow.MlflowClient(mlflow_store.tracking_uri(params, tmp_path))
    exp_id = mlflow_store.experiment_id(params, tmp_path)
    tags = client.get_experiment(exp_id).tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    view = json.loads(tags[f"mlflow.sharedViewState.{mlflow_store.VIEW_KEY}"])
    assert {"metrics.`eval_mIoU`", "metrics.`eval_mIoU_sd`", "params.`model.context`", "params.`seed`"} <= set(
        view["selectedColumns"])
    assert mlflow_store.experiment_view_path(exp_id).endswith(f"?viewStateShareKey={mlflow_store.VIEW_KEY}")
    client.delete_experiment_tag(exp_id, "mlflow.experimentKind")
    assert mlflow_store.experiment_id(params, tmp_path) == exp_id
    assert client.get_experiment(exp_id).tags["mlflow.experimentKind"] == "custom_model_development"


def test_params_logged_again_on_resume_keep_their_first_value(tmp_path):
    """A run interrupted, then resumed with a changed run setting (ray.address fixed after a failed
    start): MLflow refuses to change a param, so the first value stays and the resume goes on."""
    from mlflow import MlflowClient

    from pipeline.mlflow_tracking.tracking import log_params

    client = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    run_id = client.create_run(client.create_experiment("x")).info.run_id
    log_params(client, run_id, {"ray.address": "10.0.0.1:6379", "train.epochs": 4})
    log_params(client, run_id, {"ray.address": None, "train.epochs": 4, "seed": 0})
    assert client.get_run(run_id).data.params == {"ray.address": "10.0.0.1:6379", "train.epochs": "4", "seed": "0"}
