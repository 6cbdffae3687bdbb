"""Compare the params keys each DVC stage read (recorded by :mod:`ctxseg.param_reads`) with the params
the stage depends on according to ``dvc.lock`` (DVC's own resolution of ``dvc.yaml``, ``foreach``
included). Used by the end-to-end test, which runs the real ``dvc repro`` with the recording on."""
from __future__ import annotations

from pathlib import Path

import yaml

from ctxseg.config import RUN_SETTINGS
from ctxseg.param_reads import read_keys


def declared_params(lock_file: Path) -> dict[str, set[str]]:
    """``{stage: {declared dotted keys}}`` from dvc.lock (params of params.yaml only)."""
    lock = yaml.safe_load(Path(lock_file).read_text())
    return {stage: set((entry.get("params") or {}).get("params.yaml", {}) or {})
            for stage, entry in lock["stages"].items()}


def covered(key: str, declared: set[str]) -> bool:
    """Declaring a block (``train``) declares every key inside it (``train.amp``)."""
    parts = key.split(".")
    return any(".".join(parts[:n]) in declared for n in range(1, len(parts) + 1))


def undeclared_reads(lock_file: Path, reads_folder: Path) -> dict[str, list[str]]:
    """Every stage's keys read but not declared (``{}`` when dvc.yaml is complete). A stage that read
    params but is missing from dvc.lock is reported with all its keys. The run settings
    (:data:`ctxseg.config.RUN_SETTINGS`: where a stage runs and logs) are declared by no stage."""
    declared = declared_params(lock_file)
    missing = {}
    for stage, keys in read_keys(reads_folder).items():
        bad = sorted(k for k in keys if not covered(k, declared.get(stage, set()) | set(RUN_SETTINGS)))
        if bad:
            missing[stage] = bad
    return missing
