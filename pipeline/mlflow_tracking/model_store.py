"""MLflow access of ``predict``, ``register`` and ``report``: a client that costs seconds, not minutes,
when the store is down, and the logged model read back as a weights-only model file.

``register`` and ``report`` use MLflow optionally (they write their outputs without it): the store
is probed once per process, and against a remote server retries are limited.
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Optional

from ctxseg.checkpoint import ModelFile, ModelFileError, read_model_file
from ctxseg.config import Params
from pipeline import common
from pipeline.mlflow_tracking import mlflow_store

log = logging.getLogger("ctxseg.pipeline")

_CLIENTS: dict[str, Any] = {}


def reachable_client(params: Params, paths: common.Paths) -> Optional[Any]:
    """An ``MlflowClient`` for ``mlflow_tracking_uri``, or None (logged once) when it cannot be reached."""
    uri = mlflow_store.tracking_uri(params, paths.root)
    if uri in _CLIENTS:
        return _CLIENTS[uri]
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    if uri.startswith(("http://", "https://")):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    import mlflow

    client = mlflow.MlflowClient(uri)
    try:
        client.search_experiments(max_results=1)
    except Exception as err:
        log.warning("MLflow tracking store %s cannot be reached (%s); going on without it", uri, err)
        client = None
    _CLIENTS[uri] = client
    return client


MODEL_ARTIFACT_DIR = "model"                      # the run artifact folder the train stage logs (CONTRACTS.md)
MODEL_ARTIFACT = f"{MODEL_ARTIFACT_DIR}/model.pt"  # ... holding the weights-only model file


def download_model_file(uri: str, tracking_uri: str) -> ModelFile:
    """The model file behind an MLflow URI (``runs:/<id>/model[/model.pt]``, ``models:/<name>@<alias>``).

    The artifact is downloaded into a temporary folder and read by
    :func:`ctxseg.checkpoint.read_model_file` (``weights_only``): nothing is unpickled, whatever the
    artifact holds. Every failure is a :class:`ModelFileError` naming the URI.
    """
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory(prefix="ctxseg-model-") as tmp:
        try:
            source = _registry_source(uri, tracking_uri) if uri.startswith("models:/") else uri
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=tmp,
                                                             tracking_uri=tracking_uri))
        except (MlflowException, OSError) as err:
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ModelFileError(f"{uri}: cannot download it from the MLflow store {tracking_uri} ({first}). Check "
                                 "the run id or registered name, or set MLFLOW_TRACKING_URI / mlflow.tracking_uri.") from None
        model_file = local if local.is_file() else local / "model.pt"
        if not model_file.is_file():
            found = sorted(p.name for p in local.iterdir())[:5] if local.is_dir() else []
            raise ModelFileError(f"{uri}: the MLflow artifact holds no model.pt (found {found}). Runs log the model "
                                 f"as `{MODEL_ARTIFACT}`; re-run `dvc repro train` (and `dvc repro register`).")
        try:
            record = read_model_file(model_file)
        except ModelFileError as err:  # name the URI, not the temporary download
            raise ModelFileError(str(err).replace(str(model_file), f"{uri} (artifact {MODEL_ARTIFACT})")) from None
    record.source = uri
    return record


def _registry_source(uri: str, tracking_uri: str) -> str:
    """Where the version named by ``models:/<name>@<alias>`` or ``models:/<name>/<version>`` lives.

    Resolved with a client bound to this store as tracking *and* registry (no global MLflow state)."""
    import mlflow

    name, sep, alias = uri[len("models:/"):].partition("@")
    client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    if sep:
        version = client.get_model_version_by_alias(name, alias.strip("/"))
    else:
        name, _, number = name.rstrip("/").rpartition("/")
        version = client.get_model_version(name, number)
    return client.get_model_version_download_uri(name, version.version)
