"""A throw-away copy of the project in which the real pipeline runs (used by the tests and benchmarks).

:func:`make_project` copies the code, ``dvc.yaml`` and ``params.yaml`` into a fresh git + DVC repo with
params overrides applied; :func:`pipeline_env` is the environment to run ``dvc`` / stages in it.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

import yaml

from ctxseg.config import deep_merge

ROOT = Path(__file__).resolve().parents[1]
PROJECT_FILES = ("ctxseg", "pipeline", "dvc.yaml", "params.yaml", ".dvc/config", ".dvc/offline_plots.html", ".dvcignore",
                 ".gitignore", "pyproject.toml")
# By default a scratch study trains only the baseline and runs no sweep.
SMALL_STUDY = {"models": {"fcn": {"context": "none"}}, "tune.sweeps": {}}


def pipeline_env(extra: Optional[dict] = None) -> dict:
    """This interpreter's bin first on PATH, telemetry off, and no inherited MLflow / Ray / root target."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update({"DVC_NO_ANALYTICS": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "RAY_USAGE_STATS_ENABLED": "0",
                "PYTHONUNBUFFERED": "1"})
    for key in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "CTXSEG_ROOT"):
        env.pop(key, None)
    env.update(extra or {})
    return env


def make_project(dest: Path, overrides: dict, replace: Optional[dict] = None) -> Path:
    """Copy the project into ``dest`` (a fresh git + DVC repo) with ``overrides`` merged into params.yaml.

    ``replace`` maps dotted keys to values that replace (not merge into) the shipped ones; the default
    is :data:`SMALL_STUDY`.
    """
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
    for dotted, value in (SMALL_STUDY if replace is None else replace).items():
        *parents, leaf = dotted.split(".")
        node = params
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git = ["git", "-c", "user.name=ctxseg-scratch", "-c", "user.email=scratch@ctxseg.invalid"]
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run(git + ["add", "-A"], cwd=dest, check=True)
    subprocess.run(git + ["commit", "-q", "-m", "scratch project"], cwd=dest, check=True)
    return dest
