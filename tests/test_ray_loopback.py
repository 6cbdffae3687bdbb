"""#14: the local Ray a stage starts listens on loopback only (a laptop on a cafe network exposes nothing).

Every process the local instance started (GCS, raylet, dashboard and its agents, workers: all
descendants of this process) and this process itself (the driver's core-worker server) are asked for
their listening sockets; each must be bound to 127.0.0.1 (or ::1, or the IPv4-mapped
``::ffff:127.0.0.1``), never to ``*`` / ``0.0.0.0`` / ``::`` or a routable address.
"""
from __future__ import annotations

import ipaddress
import os
import time
from pathlib import Path

import psutil
import pytest

from ctxseg.config import parse_params



def _is_loopback(ip: str) -> bool:
    """127.0.0.0/8, ::1, or an IPv4-mapped loopback (``::ffff:127.0.0.1``: an IPv6 socket that accepts
    only 127.0.0.1, which is how gRPC binds "127.0.0.1" on a dual-stack host)."""
    addr = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(addr, "ipv4_mapped", None)
    return addr.is_loopback or (mapped is not None and mapped.is_loopback)


def _listening(proc: psutil.Process) -> list[tuple[int, str, str, int]]:
    try:
        conns = proc.net_connections(kind="inet")
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return []
    out = []
    for c in conns:
        if c.status == psutil.CONN_LISTEN and c.laddr:
            try:
                name = " ".join(proc.cmdline()[:2])[:120]
            except psutil.Error:
                name = "?"
            out.append((proc.pid, name, c.laddr.ip, c.laddr.port))
    return out


def _ray_sockets(before: set) -> list[tuple[int, str, str, int]]:
    me = psutil.Process()
    found = [s for s in _listening(me) if (s[2], s[3]) not in before]
    for child in me.children(recursive=True):
        found += _listening(child)
    return found


@pytest.mark.slow
def test_local_ray_listens_on_loopback_only(monkeypatch):
    import ray

    from pipeline.ray_cluster.ray_env import init_ray

    for var in ("RAY_ADDRESS", "RAY_NODE_IP_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    assert not ray.is_initialized()
    before = {(s[2], s[3]) for s in _listening(psutil.Process())}
    params = parse_params({"ray": {"num_cpus": 1}})
    root = Path(__file__).resolve().parents[1]
    try:
        assert init_ray(params, root, num_cpus=params.ray.num_cpus) == "local"

        @ray.remote(num_cpus=0)
        def where() -> int:
            return os.getpid()

        worker_pid = ray.get(where.remote(), timeout=120)  # a worker process is up and registered
        # agents (dashboard agent, runtime-env agent) open their ports a little after start-up
        deadline = time.monotonic() + 20
        sockets = _ray_sockets(before)
        while time.monotonic() < deadline:
            time.sleep(2)
            now = _ray_sockets(before)
            if len(now) == len(sockets):
                break
            sockets = now
        names = " ".join(s[1] for s in sockets)
        assert "gcs_server" in names and "raylet" in names, sockets  # the check is not vacuous
        assert any(s[0] == worker_pid for s in sockets) or psutil.pid_exists(worker_pid)
        exposed = [s for s in sockets if not _is_loopback(s[2])]
        assert not exposed, "Ray listens beyond loopback:\n" + "\n".join(
            f"  pid {pid} {name}: {ip}:{port}" for pid, name, ip, port in exposed)
    finally:
        ray.shutdown()
