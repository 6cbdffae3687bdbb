"""What every stage shares: the project root and contract paths, params loading, logging and a clean
error exit (where the MLflow store is: :mod:`pipeline.mlflow_tracking.mlflow_store`)."""
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

from ctxseg.config import Params, load_params
from ctxseg.engine import NonFiniteLossError
from ctxseg.errors import EXIT_INTERRUPTED, EXIT_USER_ERROR, UserError

log = logging.getLogger("ctxseg.pipeline")

# Errors that mean "the input is wrong": shown as one clear message, no traceback, exit code 2.
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, FileNotFoundError, NonFiniteLossError)


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

    def seed_dir(self, name: str, seed: int) -> Path:
        """One seed's model file and run record: ``models/<model>/seeds/<seed>/`` (the train stage's output)."""
        return self.models / name / "seeds" / str(seed)

    def metrics_file(self, name: str) -> Path:
        return self.metrics / f"{name}.json"


PROBE_TIMEOUT_S = 5.0


def connection_refused(host: str, port: int, timeout: float = PROBE_TIMEOUT_S) -> Optional[OSError]:
    """Why nothing accepts a TCP connection at ``host:port`` within ``timeout`` seconds, or None if
    something does (the start-of-stage check of a server the params name)."""
    import socket

    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as err:
        return err


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
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    return parser


def load_stage_params(path: str) -> Params:
    params = load_params(Path(path))
    log.info("params %s validated", path)
    return params


class StageFailed(Exception):
    """The stage could not finish for a reason its message explains in full (no traceback, exit 1)."""


def stage(fn: Callable[..., Any]) -> Callable[..., int]:
    """Wrap a stage ``main``: logging set up; user errors as one message and exit 2, an explained
    failure as one message and exit 1, Ctrl-C as a resume hint and exit 130. ``--debug`` keeps tracebacks."""

    @functools.wraps(fn)
    def wrapper(argv: Optional[list[str]] = None) -> int:
        setup_logging()
        argv = list(sys.argv[1:] if argv is None else argv)
        debug = "--debug" in argv
        try:
            fn(argv)
        except USER_ERRORS as err:
            log.error("%s", err, exc_info=debug)
            return EXIT_USER_ERROR
        except StageFailed as err:
            log.error("%s", err, exc_info=debug)
            return 1
        except KeyboardInterrupt:
            log.error("interrupted: nothing finished is lost. Run the same command (or `dvc repro`) again to "
                      "resume from the last checkpoint.")
            return EXIT_INTERRUPTED
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


def repo_relative(location: str, root: Path) -> str:
    """``location`` relative to the repo root when it lies inside it (records stay true when the repo is
    moved or copied), else unchanged (a URI, or a shared mount outside the repo)."""
    if "://" in location:
        return location
    path = Path(location)
    return str(path.relative_to(root)) if path.is_absolute() and path.is_relative_to(root) else location
