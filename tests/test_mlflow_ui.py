"""`make mlflow-ui` (pipeline.mlflow_tracking.mlflow_ui): serves the store on the asked port, opens ctxseg's saved view, and
stops every process it started, huey workers included, on SIGTERM or Ctrl-C."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import psutil
import pytest

from conftest import make_project, pipeline_env

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mlflow_ui_serves_then_stops_everything_it_started(tmp_path, tiny_overrides):
    """SIGTERM to the whole process group (what a terminal's Ctrl-C sends as SIGINT goes the same way)."""
    project = make_project(tmp_path / "study", tiny_overrides)
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.mlflow_tracking.mlflow_ui", "--port", str(port)], cwd=project,
                            env=pipeline_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    seen: dict[int, psutil.Process] = {}
    try:
        deadline, page = time.time() + 120, None
        while time.time() < deadline and page is None:
            for child in psutil.Process(proc.pid).children(recursive=True):
                seen.setdefault(child.pid, child)
            try:
                page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2).read()
            except OSError:
                time.sleep(0.5)
        assert page is not None and b"<html" in page.lower(), "the UI answered on the asked port"
        for child in psutil.Process(proc.pid).children(recursive=True):
            seen.setdefault(child.pid, child)
        assert len(seen) >= 2, "the server and its workers"
        os.killpg(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-2000:]
    assert f"http://127.0.0.1:{port}/#/experiments/" in out and "viewStateShareKey=ctxseg" in out
    time.sleep(1)
    alive = [p for p in seen.values() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, [(p.pid, p.cmdline()) for p in alive]
    # the port is free again, and a busy port is a one-line user error
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        busy = subprocess.run([sys.executable, "-m", "pipeline.mlflow_tracking.mlflow_ui", "--port", str(port)], cwd=project,
                              env=pipeline_env(), capture_output=True, text=True, timeout=60)
    assert busy.returncode == 2 and f"port {port} on 127.0.0.1 is in use" in busy.stderr
