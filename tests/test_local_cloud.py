"""``make local-cloud`` (``python -m pipeline.local_cloud``): the three servers answer at what it prints,
and Ctrl-C stops every one of them, whatever signal state its parent handed down."""
from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import pipeline_env
from pipeline.local_cloud import postgres_problem


def answers(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_local_cloud_prints_working_settings_and_stops_on_ctrl_c():
    problem = postgres_problem()
    if problem:
        pytest.skip(problem)
    def hostile_inheritance() -> None:
        """What a parent may hand down (CI's hang): SIGINT ignored, SIGINT and SIGTERM blocked."""
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})

    proc = subprocess.Popen([sys.executable, "-m", "pipeline.local_cloud"], env=pipeline_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=hostile_inheritance)
    lines = []
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "Ctrl-C stops every server" in line:
                break
        text = "".join(lines)
        assert "Ctrl-C stops every server" in text, text
        exports = dict(re.findall(r"^export (\w+)=(\S+)$", text, re.M))
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL"} <= exports.keys()
        tracking = re.search(r"tracking_uri: (http://127\.0\.0\.1:\d+)", text).group(1)
        storage = re.search(r"storage_path: (s3://[\w./-]+)", text).group(1)
        with urllib.request.urlopen(f"{tracking}/health", timeout=5) as answer:
            assert answer.status == 200
        import boto3

        bucket = storage[len("s3://"):].split("/", 1)[0]
        s3 = boto3.client("s3", endpoint_url=exports["AWS_ENDPOINT_URL"], region_name=exports["AWS_DEFAULT_REGION"],
                          aws_access_key_id=exports["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=exports["AWS_SECRET_ACCESS_KEY"])
        assert bucket in [b["Name"] for b in s3.list_buckets()["Buckets"]]
        ports = [int(p) for p in re.findall(r"127\.0\.0\.1:(\d+)", text)]
        assert len(set(ports)) >= 3 and all(answers(p) for p in set(ports)), text
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            rest, _ = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired as stuck:
            proc.kill()
            rest = (stuck.output or "") + proc.communicate()[0]
            pytest.fail(f"Ctrl-C did not stop make local-cloud within 120 s:\n{text}{rest}")
    assert proc.returncode == 0, text + rest
    assert rest.count("stopped ") == 3, rest
    time.sleep(1)
    assert not [p for p in set(ports) if answers(p)], f"a server outlived Ctrl-C:\n{text}{rest}"
