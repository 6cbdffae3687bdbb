"""Shared test helpers: a disposable copy of the project in which the real pipeline runs."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from pipeline.scratch import ROOT, make_project, pipeline_env  # noqa: F401  (tests import them from here)


def run(cmd: list[str], cwd: Path, env_extra: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=pipeline_env(env_extra), capture_output=True, text=True, timeout=timeout)


# A study small enough for a test, large enough to exercise every stage for real.
TINY = {
    "seeds": [0],
    "data": {"synthetic": {"num_train": 8, "num_val": 4, "image_size": 96, "min_cue_distance": 32},
             "augment": {"crop_size": [96, 96]}},
    "train": {"epochs": 2, "batch_size": 4, "log_every": 1, "val_every": 1},
    "scaling": {"num_workers": 1, "cpus_per_worker": 1},
    "mlflow": {"system_metrics": False},
    "evaluate": {"scales": [0.75, 1.0], "num_visualisations": 2},
}


@pytest.fixture(autouse=True)
def _no_inherited_mlflow_uri(monkeypatch):
    """mlflow.set_tracking_uri() exports MLFLOW_TRACKING_URI; one test's store must not leak into the next."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture
def tiny_overrides() -> dict:
    import copy

    return copy.deepcopy(TINY)


# ------------------------------------------------------------------------------------------------------
# The suite never writes study state into the checkout it runs from: a user's finished study (data,
# models, metrics, MLflow store, dvc.lock, ...) must be exactly as it was after `make test`. Every test
# works in its own temporary copy; this guard proves it for the whole session.
STUDY_STATE = ("data", "models", "metrics", "plots", "reports", "tune", "registry", "dvc_plots", "mlartifacts",
               "mlruns", "mlflow.db", "dvc.lock", ".dvc/cache", ".dvc/tmp/exps")


def guarded_checkout() -> Path:
    """The checkout the guard watches: this one (``$CTXSEG_GUARDED_CHECKOUT`` only for the guard's own test)."""
    return Path(os.environ.get("CTXSEG_GUARDED_CHECKOUT") or ROOT)


def study_state(root: Path) -> dict[str, tuple]:
    """Every file under the study-state paths of ``root`` with its size and mtime (byte code and pytest's
    cache are not study state and are not listed)."""
    state = {}
    for rel in STUDY_STATE:
        top = root / rel
        paths = [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file()) if top.is_dir() else []
        for p in paths:
            st = p.stat()
            state[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return state


def pytest_sessionstart(session):
    session.config._study_state_before = study_state(guarded_checkout())


def pytest_sessionfinish(session, exitstatus):
    before = getattr(session.config, "_study_state_before", None)
    if before is None:
        return
    root = guarded_checkout()
    after = study_state(root)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    if changed:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        message = (f"the test suite wrote study state into the checkout {root}: {', '.join(changed[:10])}"
                   + (f" and {len(changed) - 10} more" if len(changed) > 10 else ""))
        if reporter is not None:
            reporter.write_line(f"ERROR: {message}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
