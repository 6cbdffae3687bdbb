"""``make mlflow-ui``: the MLflow UI on the study's tracking store, opened on ctxseg's saved view.

Starts ``mlflow ui`` on 127.0.0.1 (``--port``, ``make mlflow-ui PORT=...``) for the store the stages log to
(the default SQLite store is relocated first when the repo moved), prints the experiment's URL with the
saved runs-table view (:data:`pipeline.mlflow_tracking.mlflow_store.EXPERIMENT_TAGS`), and on Ctrl-C or SIGTERM stops every
process it started: the server and its ``huey_consumer`` workers, which outlive a signal to the server's
process group, are collected while they run and stopped by PID.
"""
from __future__ import annotations

import argparse
import logging
import signal
import socket
import subprocess
import sys
import time
from typing import Optional

from ctxseg.errors import UserError
from pipeline import common
from pipeline.mlflow_tracking import mlflow_store

log = logging.getLogger("ctxseg.mlflow_ui")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def stop_tree(processes) -> None:
    """SIGTERM every process, then SIGKILL what is still alive after 5 s."""
    import psutil

    for p in processes:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(processes, timeout=5)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)


@common.stage
def main(argv: Optional[list[str]] = None) -> None:
    import psutil

    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=5000, help="port on 127.0.0.1 (default: %(default)s)")
    args = parser.parse_args(argv)
    if not _port_free(args.port):
        raise UserError(f"port {args.port} on 127.0.0.1 is in use: pick another with `make mlflow-ui PORT=<port>`")
    params = common.load_stage_params(args.params)
    root = common.project_root()
    uri = mlflow_store.tracking_uri(params, root)
    experiment = mlflow_store.experiment_id(params, root)
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host",
                               "127.0.0.1", "--port", str(args.port)], start_new_session=True)
    started = {server.pid: psutil.Process(server.pid)}
    stopping = []

    def on_signal(signum, _frame):
        stopping.append(signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    log.info("MLflow UI on %s: http://127.0.0.1:%d%s (Ctrl-C stops it)", uri, args.port,
             mlflow_store.experiment_view_path(experiment))
    try:
        while not stopping and server.poll() is None:
            try:  # remember every descendant while it runs: orphaned workers are reparented away from us
                for child in started[server.pid].children(recursive=True):
                    started.setdefault(child.pid, child)
            except psutil.NoSuchProcess:
                pass
            time.sleep(0.5)
    finally:
        stop_tree([p for p in started.values() if p.is_running()])
    if server.returncode not in (None, 0, -signal.SIGTERM, -signal.SIGKILL) and not stopping:
        raise common.StageFailed(f"mlflow ui exited with code {server.returncode}")
    log.info("MLflow UI stopped (%d process(es))", len(started))


if __name__ == "__main__":
    raise SystemExit(main())
