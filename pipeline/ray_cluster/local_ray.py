"""The local Ray processes a stage starts, recorded so that the next stage of the same checkout can stop
them if the stage was killed hard (``kill -9``: its Ray outlives it). Processes are matched by PID and
start time, never by name (other Ray instances on the machine are never touched)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

log = logging.getLogger("ctxseg.ray")


def local_ray_record(root: Path) -> Path:
    """Where a stage of this checkout records the local Ray processes it started."""
    import hashlib
    import tempfile

    key = hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"ctxseg-local-ray-{key}.json"


def record_local_ray(record: Path) -> None:
    import json

    import psutil

    me = psutil.Process()
    children = []
    for proc in me.children(recursive=True):
        try:
            if "ray" in " ".join(proc.cmdline()).lower():  # gcs_server, raylet, dashboard, agents, workers
                children.append((proc.pid, proc.create_time()))
        except psutil.Error:
            pass
    record.write_text(json.dumps({"owner": [me.pid, me.create_time()], "processes": children}))


def reap_orphaned_local_ray(record: Path) -> int:
    """Stop the local Ray processes a previous stage of this checkout started, if that stage is gone
    (killed hard: its Ray outlives it). Processes are matched by PID *and* start time, so a PID reused
    by an unrelated process is never touched. Returns how many were stopped."""
    import json

    import psutil

    def alive(pid: int, started: float) -> Optional[psutil.Process]:
        try:
            proc = psutil.Process(pid)
            return proc if abs(proc.create_time() - started) < 1e-3 else None
        except psutil.Error:
            return None

    try:
        data = json.loads(record.read_text())
    except (OSError, ValueError):
        return 0
    if alive(*data["owner"]):
        return 0  # its stage still runs (another `dvc repro` of this checkout): leave it
    orphans = [p for p in (alive(pid, started) for pid, started in data["processes"]) if p is not None]
    for proc in orphans:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(orphans, timeout=10)
    if orphans:
        log.warning("stopped %d Ray process(es) left behind by a stage that was killed (pid %d)",
                    len(orphans), data["owner"][0])
    record.unlink(missing_ok=True)
    return len(orphans)
