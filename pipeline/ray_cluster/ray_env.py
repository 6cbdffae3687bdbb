"""Ray for one stage: a loopback-only local instance or the user's cluster, with the code shipped to it.

Nothing here changes the process environment: the code reaches every node through the job's
``runtime_env`` (``working_dir`` = this checkout, minus data, models, stores and caches), and Ray Train's
settings travel in ``runtime_env["env_vars"]``, which Ray hands to every worker and actor of the job.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Iterator, Optional

from ctxseg.config import Params
from ctxseg.errors import UserError
from pipeline.ray_cluster.local_ray import local_ray_record, reap_orphaned_local_ray, record_local_ray

log = logging.getLogger("ctxseg.ray")

LOOPBACK = "127.0.0.1"
# What the working_dir upload leaves out (gitignore syntax, relative to the repo root): everything
# that is not code. The upload is ~0.3 MB (docs/cluster.md).
# Top-level names are anchored ("/data", not "data": that would also drop ctxseg/data and ctxseg/models).
UPLOAD_EXCLUDES = [
    "/.git", "/.venv", "/.dvc/cache", "/.dvc/tmp", "/data", "/models", "/metrics", "/plots", "/reports", "/tune",
    "/registry", "/mlartifacts", "/mlruns", "/mlflow.db*", "/bench/results", "/tests", "__pycache__", "*.egg-info",
    "/.pytest_cache",
]
# Ray Train V2 hands every ray.train.report to its controller through a one-slot queue polled every
# health-check interval (default 2 s): each epoch's report waited ~1.8 s. 0.2 s measured 0.18 s.
JOB_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "RAY_TRAIN_V2_ENABLED": "1"}
# A local machine is never preempted: no PreemptionWatcher actor (one process fewer at start-up); and
# nobody scrapes a local instance's Prometheus metrics: Ray Train's metrics callbacks off.
LOCAL_JOB_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_METRICS_ENABLED": "0"}
# ... nor Ray's own: its processes stop collecting and exporting them (CPU taken from the steps, #26)
LOCAL_SYSTEM_CONFIG = {"enable_metrics_collection": False}


def runtime_env(root: Path, local: bool, address: Optional[str] = None, start_timeout_s: float = 120) -> dict:
    """The job's runtime_env: this checkout as ``working_dir`` and Ray Train's settings.

    ``address`` (``host:port`` of the cluster, or of the stage's own local instance) is handed to every
    actor of the job as ``RAY_ADDRESS``: Ray Train's PlacementGroupCleaner looks its cluster up by
    address, and without one it guesses from the processes and files of the machine it runs on ("Found
    multiple active Ray instances" with two stages or two `dvc queue` workers on one machine).
    ``start_timeout_s``: how long Ray Train waits for a worker group (``ray.worker_start_timeout_s``)."""
    env = {**JOB_ENV, **(LOCAL_JOB_ENV if local else {}),
           "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": str(float(start_timeout_s))}
    if address and address != "auto" and not address.startswith("ray://"):
        env["RAY_ADDRESS"] = address
    return {"working_dir": str(root), "excludes": list(UPLOAD_EXCLUDES), "env_vars": env}


def _free_loopback_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


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


class ClusterUnreachableError(UserError):
    """The Ray cluster address of params or the environment does not answer."""


def require_answer(address: str, key: str = "ray.address") -> None:
    """Raise :class:`ClusterUnreachableError` within seconds when nothing accepts a connection at a
    ``host:port`` or ``ray://host:port`` address (``ray.init`` itself retries such an address for more
    than ten minutes). ``auto`` is left to Ray, which looks the address up on this machine."""
    from pipeline.common import connection_refused

    if address == "auto" or address == "local":
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterUnreachableError(f"{key} = {address!r} is not an address: write host:port (the head's GCS "
                                      "port, 6379 by default), ray://host:10001 or auto")
    err = connection_refused(host, int(port))
    if err is not None:
        raise ClusterUnreachableError(
            f"{key} = {address}: no Ray cluster answers there ({err.__class__.__name__}: {err.strerror or err}); "
            f"start its head (`ray start --head`), or fix {key}") from None


def check_cluster(params: Params) -> None:
    """:func:`require_answer` for the cluster a stage will join (``ray.address``, else ``$RAY_ADDRESS``);
    nothing to check for a local instance, or when this process is already connected (as
    :func:`init_ray` then joins nothing). A stage calls it before it opens any run."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return
    address = params.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        require_answer(address, "ray.address" if params.ray.address else "RAY_ADDRESS")


def init_ray(params: Params, root: Path, num_cpus: Optional[int] = None) -> str:
    """Join the cluster named by params or ``$RAY_ADDRESS``, else start a loopback-only local instance
    sized ``num_cpus`` (default: this machine's CPUs); return ``"cluster"``, ``"local"`` or ``"existing"``.

    The local instance's GCS port is chosen here, so its address is known before it starts and every
    Ray client of the stage is pinned to it: the job's actors through ``runtime_env`` and this process
    through ``$RAY_ADDRESS`` (two stages on one machine never find each other's instance)."""
    import ray

    if ray.is_initialized():
        return "existing"
    timeout = params.ray.worker_start_timeout_s
    address = params.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        check_cluster(params)
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True,
                 runtime_env=runtime_env(root, local=False, address=address, start_timeout_s=timeout))
        return "cluster"
    record = local_ray_record(root)
    reap_orphaned_local_ray(record)
    address = f"{LOOPBACK}:{_free_loopback_port()}"
    cpus = num_cpus or os.cpu_count()
    with _loopback_only(), scoped_environ({"RAY_GCS_SERVER_PORT": address.rsplit(":", 1)[1]}):
        # The dashboard stays on: Ray Train V2's placement group cleaner polls the state API it serves.
        ray.init(address="local", num_cpus=cpus, log_to_driver=True, _node_ip_address=LOOPBACK,
                 dashboard_host=LOOPBACK, include_dashboard=True, _system_config=LOCAL_SYSTEM_CONFIG,
                 runtime_env=runtime_env(root, local=True, address=address, start_timeout_s=timeout))
    os.environ["RAY_ADDRESS"] = address
    record_local_ray(record)
    log.info("local Ray at %s with %d CPU(s) (ray.num_cpus)", address, cpus)
    return "local"


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


def explain_start_failure(workers: int, per_worker: dict) -> str:
    """Why a worker group could not start: what it asked for against what the Ray instance has free,
    placement groups still holding resources, and other Ray instances on this machine."""
    import ray

    total, free = ray.cluster_resources(), ray.available_resources()
    asked = ", ".join(f"{workers} x {amount:g} {name}" for name, amount in per_worker.items())
    have = ", ".join(f"{free.get(name, 0):g} of {total.get(name, 0):g} {name}" for name in per_worker)
    parts = [f"it asked for {asked}; the Ray instance has {have} free"]
    short = [name for name, amount in per_worker.items() if total.get(name, 0) < amount * workers]
    if short:
        parts.append(f"{'/'.join(short)} short for good: lower scaling.num_workers or *_per_worker, or raise "
                     "ray.num_cpus (or join a larger cluster with ray.address)")
    try:
        held = [pg for pg in ray.util.placement_group_table().values() if pg.get("state") in ("CREATED", "PENDING")]
    except Exception:  # an older or newer state layout: say nothing rather than guess
        held = []
    if held:
        parts.append(f"{len(held)} placement group(s) hold or wait for resources (another run or trial, or "
                     "one leaked by a killed run: `ray list placement-groups`)")
    others = _other_local_ray_instances()
    if others:
        parts.append(f"{others} other Ray instance(s) run on this machine and share its CPUs: give each stage "
                     "its share with ray.num_cpus")
    return "; ".join(parts)


def _other_local_ray_instances() -> int:
    """GCS servers on this machine other than the one this process is connected to."""
    import psutil
    import ray

    own_port = ray.get_runtime_context().gcs_address.rsplit(":", 1)[-1]
    count = 0
    for proc in psutil.process_iter(["name", "cmdline"]):
        if proc.info["name"] == "gcs_server" and f"--gcs_server_port={own_port}" not in (proc.info["cmdline"] or []):
            count += 1
    return count
