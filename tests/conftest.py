"""Shared test helpers: a disposable copy of the project in which the real pipeline runs."""
from __future__ import annotations

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
