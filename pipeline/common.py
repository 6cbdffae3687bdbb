"""What every stage shares: the project root and contract paths, params loading, logging, a clean
error exit, MLflow setup and Ray start-up."""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Optional

from ctxseg.config import ConfigError, Params, load_params
from ctxseg.engine import NonFiniteLossError

log = logging.getLogger("ctxseg.pipeline")

# Errors that mean "the input is wrong": shown as one clear message, no traceback, exit code 2.
USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, FileNotFoundError, NonFiniteLossError)


def project_root() -> Path:
    """The repo root: $CTXSEG_ROOT, else the current directory (DVC runs stages from the root)."""
    return Path(os.environ.get("CTXSEG_ROOT") or os.getcwd()).resolve()


class Paths:
    """Contract paths of the DAG (see DESIGN.md), all absolute (Ray workers change directory)."""

    def __init__(self, params: Params, root: Optional[Path] = None):
        self.root = (root or project_root()).resolve()
        self.dataset = params.data.name
        self.raw = self.root / "data" / "raw" / self.dataset
        self.prepared = self.root / "data" / "prepared" / self.dataset
        self.models = self.root / "models"
        self.metrics = self.root / "metrics"
        self.plots = self.root / "plots"
        self.reports = self.root / "reports"
        self.tune = self.root / "tune"

    def model_dir(self, name: str) -> Path:
        return self.models / name

    def metrics_file(self, name: str) -> Path:
        return self.metrics / f"{name}.json"


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )
    for noisy in ("urllib3", "filelock", "alembic", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default="params.yaml", help="path of params.yaml (default: %(default)s)")
    return parser


def load_stage_params(path: str) -> Params:
    params = load_params(Path(path))
    log.info("params %s validated", path)
    return params


def stage(fn: Callable[..., Any]) -> Callable[..., int]:
    """Wrap a stage ``main``: logging set up, user errors printed as one message, exit code 2."""

    @functools.wraps(fn)
    def wrapper(argv: Optional[list[str]] = None) -> int:
        setup_logging()
        try:
            fn(argv)
        except USER_ERRORS as err:
            log.error("%s", err)
            return 2
        except KeyboardInterrupt:
            log.error("interrupted; re-run the same command to resume")
            return 130
        return 0

    return wrapper


def read_json(path: Path, what: str, fix: str) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} not found. {fix}")
    return json.loads(path.read_text(encoding="utf-8"))


def dataset_meta(paths: Paths) -> dict:
    return read_json(paths.prepared / "meta.json", "prepared dataset", "Run `dvc repro preprocess` first.")


def fingerprint(obj: Any) -> str:
    """A short stable hash of plain data."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def git_commit(root: Path) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ---------------------------------------------------------------------------------------------
# MLflow


def mlflow_tracking_uri(params: Params, root: Path) -> str:
    """params > $MLFLOW_TRACKING_URI > sqlite:///<root>/mlflow.db (contract)."""
    return params.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlflow.db'}"


def mlflow_experiment(params: Params, root: Path) -> str:
    """Create (or get) the experiment from the driver, with an explicit artifact location; return its id."""
    import mlflow

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    uri = mlflow_tracking_uri(params, root)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    name = params.mlflow.experiment
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    artifact_root = params.mlflow.artifact_root or (root / "mlartifacts").as_uri()
    if "://" not in artifact_root:
        artifact_root = Path(artifact_root).resolve().as_uri()
    return client.create_experiment(name, artifact_location=f"{artifact_root.rstrip('/')}/{name}")


MLFLOW_PARAM_CHARS = 6000  # MLflow's limit on one param value
MLFLOW_BATCH_PARAMS = 100  # MLflow's limit on params per log_batch


def log_params(client, run_id: str, flat: dict) -> None:
    """Log flat ``{key: value}`` params to an MLflow run in batches (``None`` as "null", long values cut).

    Idempotent: MLflow accepts a param logged again with the same value, so a run whose set-up was
    interrupted part-way is completed by calling this again on resume."""
    from mlflow.entities import Param

    items = [Param(k, ("null" if v is None else str(v))[:MLFLOW_PARAM_CHARS]) for k, v in sorted(flat.items())]
    for i in range(0, len(items), MLFLOW_BATCH_PARAMS):
        client.log_batch(run_id, params=items[i:i + MLFLOW_BATCH_PARAMS])


def close_superseded_run(client, record: dict, run_key: str, what: str) -> None:
    """Close as KILLED the MLflow run of an interrupted stage that will not be resumed (its params changed).

    ``record`` is the stage's state file (``status`` "running" while interrupted, the run id under
    ``run_key``). A run killed hard stays RUNNING in MLflow forever otherwise; FAILED / FINISHED runs
    are left as they are."""
    run_id = record.get(run_key)
    if record.get("status") != "running" or not run_id:
        return
    try:
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, status="KILLED")
            log.info("%s params changed: interrupted MLflow run %s closed as KILLED, starting afresh", what, run_id)
    except Exception as err:  # the run may live in a tracking store no longer configured
        log.warning("%s could not close the superseded MLflow run %s: %s", what, run_id, err)


# ---------------------------------------------------------------------------------------------
# Ray


def init_ray(params: Params) -> str:
    """Join the cluster named by params or $RAY_ADDRESS, else start a local instance; return the mode."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    # Train V2 workers hand each ray.train.report to the controller through a one-slot queue that
    # the controller polls every health-check interval (default 2 s): every report (one per epoch)
    # waited ~1.8 s. 0.2 s measured 0.18 s per report and cut a TorchTrainer.fit's fixed cost from
    # ~32 s to ~12 s here. Local Ray inherits this; on a cluster export it before `ray start`.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    if ray.is_initialized():
        return "existing"
    address = params.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
        return "cluster"
    # No preemption on a local machine: skip Train's PreemptionWatcher actor (one process fewer at
    # start-up, and no "constructor arguments in the object store" error line on every run).
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    # Local workers inherit this environment: make them import this checkout's code.
    root = str(project_root())
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    # The dashboard stays on: Ray Train V2 polls the state API it serves.
    ray.init(address="local", num_cpus=os.cpu_count(), log_to_driver=True)
    return "local"
