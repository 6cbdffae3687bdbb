"""Group ``ray_cpu`` (issue #26) - which processes take the CPU while a train stage trains.

A throw-away project (the default synthetic data, the baseline only, one seed, one rank) runs the real
train stage, ``python -m pipeline.train``, with its own local Ray instance. Every 0.25 s the CPU times
(user + system) of every process descended from the stage are read: the stage's driver, Ray's
services (GCS, raylet, dashboard, its agents, the log monitor) and the job's actors (the Train
controller, the training worker, the MLflow store actor). Reported per kind of process: the CPU
seconds spent from the end of the first epoch to the end of the last (steady training: warm-up and
start-up excluded), as a share of that wall time and against the training worker's own CPU.
On a 2-core machine every CPU-second that is not the worker's is taken from the steps.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

from pipeline.scratch import make_project, pipeline_env

WORKER = "training worker (RayTrainWorker)"
KINDS = [  # (kind, pattern in the command line Ray sets with setproctitle), first match wins
    # the services by their executable first: the raylet's arguments name the agents
    ("GCS server", r"^\S*gcs_server( |$)"),
    ("raylet", r"^\S*/raylet( |$)"),
    (WORKER, r"ray::RayTrainWorker|ray::_RayTrainWorker"),
    ("Train controller", r"ray::TrainController"),
    ("MLflow store actor", r"ray::StoreActor"),
    ("dashboard agent", r"ray::DashboardAgent|dashboard/agent\.py"),
    ("runtime env agent", r"ray::RuntimeEnvAgent|runtime_env/agent"),
    ("idle Ray workers", r"ray::IDLE"),
    ("other actors", r"^ray::"),
    ("dashboard", r"dashboard/dashboard\.py"),
    ("dashboard's head modules", r"^ray-dashboard-"),
    ("autoscaler monitor", r"autoscaler/_private/monitor"),
    ("log monitor", r"log_monitor\.py"),
    ("Ray worker starting", r"default_worker\.py"),
    ("stage driver (python -m pipeline.train)", r"pipeline\.train"),
]


def _kind(cmdline: str) -> str:
    for kind, pattern in KINDS:
        if re.search(pattern, cmdline):
            return kind
    return "other"


def run(opts) -> dict:
    import psutil

    epochs = 4 if opts.quick else 12
    base = Path(tempfile.mkdtemp(prefix="ctxseg-bench-raycpu-"))
    try:
        project = make_project(base / "project", {"seeds": [0], "train": {"epochs": epochs},
                                                  "scaling": {"num_workers": 1}})
        prep = subprocess.run([sys.executable, "-m", "dvc", "repro", "preprocess"], cwd=project, env=pipeline_env(),
                              capture_output=True, text=True)
        if prep.returncode != 0:
            raise RuntimeError(prep.stderr[-1500:])
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.train", "--model", "fcn"], cwd=project,
                                env=pipeline_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        done_epochs: list[tuple[int, float]] = []

        def read() -> None:
            for line in proc.stdout:
                found = re.search(r"epoch (\d+)/\d+ done", line)
                if found:
                    done_epochs.append((int(found.group(1)), time.monotonic()))

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        samples: dict[int, list] = {}  # pid -> [kind, [(time, cpu seconds)]]
        unknown: set[str] = set()  # command lines of the processes counted as "other"
        root = psutil.Process(proc.pid)
        services: dict[int, psutil.Process] = {}  # GCS / raylet started after the stage (not always its descendants)
        stage_started, last_scan = root.create_time(), 0.0
        while proc.poll() is None:
            now = time.monotonic()
            if now - last_scan > 2.0:  # a full process scan is not free: every 2 s
                last_scan = now
                for p in psutil.process_iter(["name", "create_time"]):
                    if p.info["name"] in ("raylet", "gcs_server") and (p.info["create_time"] or 0) >= stage_started:
                        services.setdefault(p.pid, p)
            try:
                family = {p.pid: p for p in [root] + root.children(recursive=True)}
            except psutil.NoSuchProcess:
                break
            family.update({pid: p for pid, p in services.items() if pid not in family})
            for p in family.values():
                try:
                    cpu = p.cpu_times()
                    entry = samples.setdefault(p.pid, [None, []])
                    title = " ".join(p.cmdline())
                    entry[0] = _kind(title)  # the last title wins: a worker is renamed once it runs
                    if entry[0] == "other":
                        unknown.add(title[:100])
                    entry[1].append((now, cpu.user + cpu.system))
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    pass
            time.sleep(0.25)
        reader.join(timeout=10)
        if proc.returncode != 0 or len(done_epochs) < 2:
            raise RuntimeError(f"the train stage failed (exit {proc.returncode}) or logged {len(done_epochs)} epochs")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    start, end = done_epochs[0][1], done_epochs[-1][1]
    wall = end - start
    per_kind: dict[str, float] = defaultdict(float)
    for kind, points in samples.values():
        inside = [cpu for t, cpu in points if start <= t <= end]
        before = [cpu for t, cpu in points if t < start]
        if inside:
            per_kind[kind] += inside[-1] - (before[-1] if before else inside[0])
    worker = per_kind.get(WORKER, 0.0)
    rows = [{"process": kind, "cpu_s": round(cpu, 2), "of wall %": round(100 * cpu / wall, 1),
             "vs worker %": round(100 * cpu / worker, 1) if worker else None}
            for kind, cpu in sorted(per_kind.items(), key=lambda kv: -kv[1])]
    others = sum(cpu for kind, cpu in per_kind.items() if kind != WORKER)
    rows.append({"process": "everything but the worker", "cpu_s": round(others, 2),
                 "of wall %": round(100 * others / wall, 1), "vs worker %": round(100 * others / worker, 1) if worker else None})
    return {"rows": rows, "targets": [], "window_s": wall, "epochs_in_window": len(done_epochs) - 1,
            "note": f"epochs 2..{epochs} of a {epochs}-epoch stage, {wall:.1f} s wall", "other": sorted(unknown)}
