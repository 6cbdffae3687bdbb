"""Ray for one stage: a loopback-only local instance or the user's cluster, with the code shipped to it.

Nothing here changes the process environment: the code reaches every node through the job's
``runtime_env`` (``working_dir`` = this checkout, minus data, models, stores and caches), and Ray Train's
settings travel in ``runtime_env["env_vars"]``, which Ray hands to every worker and actor of the job.
"""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Iterator, Optional

from ctxseg.config import Params

log = logging.getLogger("ctxseg.ray")

LOOPBACK = "127.0.0.1"
# What the working_dir upload leaves out (gitignore syntax, relative to the repo root): everything
# that is not code. The upload is ~0.3 MB (README "Scaling out").
# Top-level names are anchored ("/data", not "data": that would also drop ctxseg/data and ctxseg/models).
UPLOAD_EXCLUDES = [
    "/.git", "/.venv", "/.dvc/cache", "/.dvc/tmp", "/data", "/models", "/metrics", "/plots", "/reports", "/tune",
    "/registry", "/mlartifacts", "/mlruns", "/mlflow.db*", "/bench/results", "/tests", "__pycache__", "*.egg-info",
    "/.pytest_cache",
]
# Ray Train V2 hands every ray.train.report to its controller through a one-slot queue polled every
# health-check interval (default 2 s): each epoch's report waited ~1.8 s. 0.2 s measured 0.18 s.
JOB_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "RAY_TRAIN_V2_ENABLED": "1"}
# A local machine is never preempted: no PreemptionWatcher actor (one process fewer at start-up).
LOCAL_JOB_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def runtime_env(root: Path, local: bool, address: Optional[str] = None) -> dict:
    """The job's runtime_env: this checkout as ``working_dir`` and Ray Train's settings.

    ``address`` (a cluster's ``host:port``) is handed to every actor of the job as ``RAY_ADDRESS``:
    Ray Train's PlacementGroupCleaner looks its cluster up by address, and without one it guesses from
    the processes and files of the machine it runs on (wrong with two Ray instances on one machine, or
    a head started with another ``--temp-dir``)."""
    env = {**JOB_ENV, **(LOCAL_JOB_ENV if local else {})}
    if address and address != "auto" and not address.startswith("ray://"):
        env["RAY_ADDRESS"] = address
    return {"working_dir": str(root), "excludes": list(UPLOAD_EXCLUDES), "env_vars": env}


@contextlib.contextmanager
def _loopback_only() -> Iterator[None]:
    """Let ``_node_ip_address="127.0.0.1"`` stand: Ray 2.60 replaces a loopback node address by the
    machine's routable one, and its servers then listen on every interface. With the loopback address
    kept, GCS, raylet, workers and agents all listen on 127.0.0.1 (checked by a test)."""
    from ray._private import services

    original = services.resolve_ip_for_localhost
    services.resolve_ip_for_localhost = lambda host: host
    try:
        yield
    finally:
        services.resolve_ip_for_localhost = original


def init_ray(params: Params, root: Path, num_cpus: Optional[int] = None) -> str:
    """Join the cluster named by params or ``$RAY_ADDRESS``, else start a loopback-only local instance
    sized ``num_cpus`` (default: this machine's CPUs); return ``"cluster"``, ``"local"`` or ``"existing"``."""
    import ray

    if ray.is_initialized():
        return "existing"
    address = params.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True, runtime_env=runtime_env(root, local=False, address=address))
        return "cluster"
    record = _local_ray_record(root)
    reap_orphaned_local_ray(record)
    with _loopback_only():
        # The dashboard stays on: Ray Train V2 polls the state API it serves.
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), log_to_driver=True,
                 _node_ip_address=LOOPBACK, dashboard_host=LOOPBACK, runtime_env=runtime_env(root, local=True))
    _record_local_ray(record)
    return "local"


def _local_ray_record(root: Path) -> Path:
    """Where a stage of this checkout records the local Ray processes it started."""
    import hashlib
    import tempfile

    key = hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"ctxseg-local-ray-{key}.json"


def _record_local_ray(record: Path) -> None:
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


@contextlib.contextmanager
def scoped_environ(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables a Ray library reads in this process, for one call only."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def alive_nodes() -> list[dict]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def resolve_use_gpu(params: Params) -> bool:
    import ray

    if params.scaling.use_gpu != "auto":
        return bool(params.scaling.use_gpu)
    return ray.cluster_resources().get("GPU", 0) >= 1


def count_rank_nodes(world: int) -> int:
    """How many distinct Ray nodes the DDP ranks of this worker group run on (call on every rank)."""
    import ray
    import torch.distributed as dist

    node = ray.get_runtime_context().get_node_id()
    if world == 1 or not (dist.is_available() and dist.is_initialized()):
        return 1
    nodes: list = [None] * world
    dist.all_gather_object(nodes, node)
    return len(set(nodes))


def quiet_ray_report_log() -> None:
    """Ray Train V2 logs every report with all its metrics at INFO from a logger named after its
    source file (so LoggingConfig does not reach it); our epoch line already says it once."""
    try:
        from ray.train.v2._internal.execution import context as ray_context

        logging.getLogger(ray_context.__file__).setLevel(logging.WARNING)
    except ImportError:  # another Ray layout: keep its logs
        pass
