"""Where the study's MLflow store is, and what ties each run to the code and experiment that made it.

* **One store for every experiment.** DVC runs a queued experiment (``dvc exp run --queue``, ``dvc queue
  start``) in a temporary copy of the workspace and sets ``$DVC_ROOT`` to the repository it came from.
  The default store (``sqlite:///<repo>/mlflow.db``, artifacts in ``<repo>/mlartifacts``) is resolved
  from that root, so a queued run lands in the store the UI shows instead of vanishing with the copy.
* **A moved or copied repo keeps its own store.** MLflow writes absolute artifact locations into
  ``mlflow.db``. When the default store's locations name another folder's ``mlartifacts``, the repo was
  moved or copied (with its ``mlflow.db``): they are rewritten to this repo's before anything is
  logged, so a copy never writes into its origin.
* **Tags**: git revision, DVC experiment name and baseline, DVC stage (:func:`run_tags`).

``python -m pipeline.mlflow_tracking.mlflow_store`` prints the resolved tracking URI (``make mlflow-ui`` uses it).
"""
from __future__ import annotations

import functools
import json
import logging
import os
import sqlite3
import sys
from pathlib import Path
from typing import Optional
from urllib.parse import unquote, urlparse

from ctxseg.config import Params
from ctxseg.errors import UserError

log = logging.getLogger("ctxseg.mlflow")

ARTIFACTS = "mlartifacts"
# Where MLflow keeps absolute locations (tables and columns of its SQL schema, MLflow 2 and 3).
LOCATION_COLUMNS = [("experiments", "artifact_location"), ("runs", "artifact_uri"),
                    ("logged_models", "artifact_location"), ("model_versions", "source"),
                    ("model_versions", "storage_location")]


def store_root(root: Path) -> Path:
    """The repository that owns the default store: ``$DVC_ROOT`` (the original repository, also when a
    queued experiment runs in DVC's temporary copy), else ``root``."""
    dvc_root = os.environ.get("DVC_ROOT")
    if dvc_root and Path(dvc_root).is_dir():
        return Path(dvc_root).resolve()
    return Path(root).resolve()


def is_default_store(params: Params) -> bool:
    return not (params.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))


def tracking_uri(params: Params, root: Path) -> str:
    """params > $MLFLOW_TRACKING_URI > ``sqlite:///<store root>/mlflow.db`` (relocated if the repo moved)."""
    if not is_default_store(params):
        return params.mlflow.tracking_uri or os.environ["MLFLOW_TRACKING_URI"]
    home = store_root(root)
    uri = f"sqlite:///{home / 'mlflow.db'}"
    _prepare(home, uri, relocatable=params.mlflow.artifact_root is None)
    return uri


class TrackingUnreachableError(UserError):
    """The tracking store named by params or the environment does not answer."""


DEFAULT_PORTS = {"http": 80, "https": 443, "postgresql": 5432, "mysql": 3306, "mssql": 1433}


def open_tracking(params: Params, root: Path) -> str:
    """The tracking URI of a stage that must log (train, tune, evaluate), checked to answer first."""
    uri = tracking_uri(params, root)
    require_answer(uri, "mlflow.tracking_uri" if params.mlflow.tracking_uri else "MLFLOW_TRACKING_URI")
    return uri


@functools.lru_cache(maxsize=None)
def require_answer(uri: str, key: str = "mlflow.tracking_uri") -> None:
    """Raise :class:`TrackingUnreachableError` within seconds when a server URI (``http(s)://`` tracking
    server, ``postgresql://`` / ``mysql://`` database) does not accept a connection. MLflow's own client
    retries such a URI for minutes (~250 s) before a traceback; during a run those retries are what
    carries a stage over a server restart, so they are kept there."""
    from pipeline.common import connection_refused

    parsed = urlparse(uri)
    scheme = parsed.scheme.split("+", 1)[0]
    if scheme not in DEFAULT_PORTS or not parsed.hostname:
        return
    port = parsed.port or DEFAULT_PORTS[scheme]
    err = connection_refused(parsed.hostname, port)
    if err is not None:
        shown = parsed._replace(netloc=f"{parsed.hostname}:{port}").geturl()  # never a password
        raise TrackingUnreachableError(
            f"{key} = {shown}: the MLflow tracking store does not answer ({err.__class__.__name__}: "
            f"{err.strerror or err}); start the server, or fix {key}") from None


@functools.lru_cache(maxsize=None)
def _prepare(home: Path, uri: str, relocatable: bool) -> None:
    """Once per process and store: point a moved store at ``home`` and create its schema."""
    if relocatable:
        relocate(home / "mlflow.db", home)
    initialise(home / "mlflow.db", uri)


def initialise(db_file: Path, uri: str) -> None:
    """Create the SQLite store's schema once, under a file lock: two stages that open a new store at
    the same moment (``dvc queue start -j 2``) would otherwise both run MLflow's migrations, and the
    second fails ("Online migration expected to match one row")."""
    if _schema_ready(db_file):
        return
    from filelock import FileLock

    db_file.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(db_file) + ".lock", timeout=300):
        if not _schema_ready(db_file):
            import mlflow

            mlflow.MlflowClient(uri).search_experiments(max_results=1)  # creates and migrates the schema


def _schema_ready(db_file: Path) -> bool:
    if not db_file.is_file():
        return False
    try:
        con = sqlite3.connect(f"file:{db_file}?mode=ro", uri=True, timeout=30)
        try:
            found = [row[0] for row in con.execute("SELECT version_num FROM alembic_version")]
        finally:
            con.close()
    except sqlite3.Error:
        return False
    try:  # a store part-way through its migrations (another stage is creating it) is not ready
        from mlflow.store.db.utils import _get_latest_schema_revision

        return found == [_get_latest_schema_revision()]
    except ImportError:  # another MLflow layout: a versioned schema is as much as can be checked
        return len(found) == 1


def artifact_root_uri(params: Params, root: Path) -> Optional[str]:
    """Where new experiments keep artifacts: ``mlflow.artifact_root``; for the default store
    ``<store root>/mlartifacts``; for a tracking server None (the server's own, e.g. proxied to a bucket)."""
    if params.mlflow.artifact_root is None and not is_default_store(params):
        return None
    artifact_root = params.mlflow.artifact_root or (store_root(root) / ARTIFACTS).as_uri()
    if "://" not in artifact_root:
        artifact_root = Path(artifact_root).resolve().as_uri()
    return artifact_root.rstrip("/")


# How the MLflow UI opens the study's experiment: as a classic ML experiment (not the GenAI view, which is
# what MLflow 3 shows an experiment without this tag), and with a saved view of the runs table that shows the
# headline metrics and the key params. The view is the UI's own shared-view mechanism: an experiment tag
# `mlflow.sharedViewState.<key>` holding the view state as JSON, opened by `?viewStateShareKey=<key>` in
# the experiment's URL (what the UI's "Share" button writes). `make mlflow-ui` prints that URL.
VIEW_KEY = "ctxseg"
VIEW_COLUMNS = ([f"metrics.`{m}`" for m in ("eval_mIoU", "eval_mIoU_sd", "eval_ms_flip_mIoU", "eval_pixAcc",
                                              "eval_mAcc", "val_mIoU")]
                + [f"params.`{p}`" for p in ("model_name", "seed", "model.framework", "model.context",
                                              "model.acf.mixtures", "model.acf.heads", "model.mcibi.momentum",
                                              "model.mcibi.alpha", "model.mcibi.beta", "train.epochs")])
EXPERIMENT_TAGS = {
    "mlflow.experimentKind": "custom_model_development",
    f"mlflow.sharedViewState.{VIEW_KEY}": json.dumps({"selectedColumns": VIEW_COLUMNS, "orderByKey":
                                                      "attributes.start_time", "orderByAsc": False,
                                                      "runsExpanded": {}, "searchFilter": ""}),
}


def experiment_view_path(experiment: str) -> str:
    """The UI route of the experiment with ctxseg's saved view (append it to the server's base URL)."""
    return f"/#/experiments/{experiment}?viewStateShareKey={VIEW_KEY}"


def experiment_id(params: Params, root: Path) -> str:
    """Create (or get) the experiment, with an explicit artifact location and the UI tags of
    :data:`EXPERIMENT_TAGS`; return its id."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri(params, root))
    name = params.mlflow.experiment
    exp = client.get_experiment_by_name(name)
    if exp is None:
        from mlflow.exceptions import MlflowException

        try:
            artifact_root = artifact_root_uri(params, root)
            return client.create_experiment(name, artifact_location=artifact_root and f"{artifact_root}/{name}",
                                            tags=EXPERIMENT_TAGS)
        except MlflowException:  # created by another stage a moment ago (two queued experiments)
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    for key, value in EXPERIMENT_TAGS.items():  # an experiment created before these tags existed
        if exp.tags.get(key) != value:
            client.set_experiment_tag(exp.experiment_id, key, value)
    return exp.experiment_id


def _origin_of(location: str) -> Optional[Path]:
    """The repo folder a default artifact location belongs to: ``file:///old/repo/mlartifacts/x`` -> /old/repo."""
    path = Path(unquote(urlparse(location).path)) if location.startswith("file:") else Path(location)
    parts = path.parts
    if ARTIFACTS not in parts[:-1]:
        return None
    return Path(*parts[:len(parts) - 1 - parts[::-1].index(ARTIFACTS)])


def relocate(db_file: Path, home: Path) -> int:
    """Point a moved default store's absolute locations at ``home``; return how many values changed."""
    if not db_file.is_file():
        return 0
    con = sqlite3.connect(db_file, timeout=30)
    try:
        found = {_origin_of(loc) for (loc,) in con.execute("SELECT artifact_location FROM experiments") if loc}
        origins = {o for o in found if o is not None and o != home}
        if not origins:
            return 0
        changed = 0
        with con:  # one transaction
            for origin in origins:
                for old, new in ((origin.as_uri(), home.as_uri()), (str(origin), str(home))):
                    for table, column in LOCATION_COLUMNS:
                        columns = {row[1] for row in con.execute(f"PRAGMA table_info({table})")}
                        if column in columns:
                            changed += con.execute(
                                f"UPDATE {table} SET {column} = ? || substr({column}, ?) WHERE {column} LIKE ? ESCAPE '\\'",
                                (new + "/", len(old) + 2, _like_prefix(old + "/"))).rowcount
        log.warning("this repo's mlflow.db came from %s: %d artifact location(s) now point into %s, so "
                    "nothing is written into the original", ", ".join(map(str, sorted(origins))), changed, home)
        return changed
    finally:
        con.close()


def _like_prefix(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def run_tags(commit: str) -> dict[str, str]:
    """What produced a run: git revision, and the DVC experiment / baseline / stage when DVC runs it."""
    tags = {"mlflow.source.git.commit": commit, "git_commit": commit}
    for tag, var in (("dvc.experiment", "DVC_EXP_NAME"), ("dvc.baseline_rev", "DVC_EXP_BASELINE_REV"),
                     ("dvc.stage", "DVC_STAGE")):
        if os.environ.get(var):
            tags[tag] = os.environ[var]
    return tags


def experiment_label() -> str:
    """`` (exp <name>)`` inside a DVC experiment, else empty: runs of the same model line up in the UI."""
    name = os.environ.get("DVC_EXP_NAME")
    return f" (exp {name})" if name else ""


if __name__ == "__main__":
    from pipeline import common

    common.setup_logging()
    print(tracking_uri(common.load_stage_params(sys.argv[1] if len(sys.argv) > 1 else "params.yaml"),
                       common.project_root()))
