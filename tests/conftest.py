"""Shared test helpers: a disposable copy of the project in which the real pipeline runs."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PROJECT_FILES = ("ctxseg", "pipeline", "dvc.yaml", "params.yaml", ".dvc/config", ".dvcignore", "pyproject.toml")


def pipeline_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update({"DVC_NO_ANALYTICS": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "RAY_USAGE_STATS_ENABLED": "0",
                "PYTHONUNBUFFERED": "1"})
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    env.update(extra or {})
    return env


def make_project(dest: Path, overrides: dict, replace: dict | None = None) -> Path:
    """Copy the project into ``dest`` (a fresh git + DVC repo) with ``overrides`` merged into params.yaml.

    ``replace`` maps dotted keys to values that replace (not merge into) the shipped ones; by default
    the study trains only ``fcn`` and runs no sweep.
    """
    from ctxseg.config import deep_merge

    if replace is None:
        replace = {"models": {"fcn": {"context": "none"}}, "tune.sweeps": {}}

    dest.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for rel in PROJECT_FILES:
        src = ROOT / rel
        if src.is_dir():
            shutil.copytree(src, dest / rel, ignore=ignore)
        elif src.exists():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    params = deep_merge(yaml.safe_load((ROOT / "params.yaml").read_text()), overrides)
    for dotted, value in replace.items():
        *parents, leaf = dotted.split(".")
        node = params
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git = ["git", "-c", "user.name=ctxseg-test", "-c", "user.email=test@ctxseg.invalid"]
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run(git + ["add", "-A"], cwd=dest, check=True)
    subprocess.run(git + ["commit", "-q", "-m", "test project"], cwd=dest, check=True)
    return dest


def run(cmd: list[str], cwd: Path, env_extra: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=pipeline_env(env_extra), capture_output=True, text=True, timeout=timeout)


# A study small enough for a test, large enough to exercise every stage for real.
TINY = {
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
