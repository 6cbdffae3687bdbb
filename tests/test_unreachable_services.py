"""A server the params name that does not answer (an MLflow tracking server, a Ray cluster, an S3
endpoint): the stage stops within seconds with one line naming the key, the address and the fix, exit 2
(#25). Without the checks: 252 s of MLflow retries then a traceback, and ``ray.init`` retrying for more
than ten minutes."""
from __future__ import annotations

import pickle
import socket
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from conftest import TINY, make_project, pipeline_env
from pipeline.local_cloud import Gateway, S3Endpoint
from pipeline.mlflow_tracking.mlflow_store import TrackingUnreachableError, require_answer
from pipeline.ray_cluster.ray_env import ClusterUnreachableError
from pipeline.ray_cluster.ray_env import require_answer as require_cluster
from pipeline.storage.filesystems import StorageUnreachableError, check_reachable, filesystem


def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    from ctxseg.config import deep_merge

    root = make_project(tmp_path_factory.mktemp("unreachable") / "p", deep_merge(TINY, {"seeds": [0]}))
    done = subprocess.run(["dvc", "repro", "preprocess"], cwd=root, env=pipeline_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    return root


def train_with(project: Path, name: str, overrides: dict, env: dict | None = None):
    from ctxseg.config import deep_merge

    raw = deep_merge(yaml.safe_load((project / "params.yaml").read_text()), overrides)
    (project / f"{name}.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return subprocess.run(["python", "-m", "pipeline.train", "--model", "fcn", "--params", f"{name}.yaml"], cwd=project,
                          env=pipeline_env(env), capture_output=True, text=True, timeout=120)


def one_error_line(done) -> str:
    errors = [line for line in done.stderr.splitlines() if " ERROR " in line]
    assert done.returncode == 2 and len(errors) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    return errors[0]


def test_tracking_server_that_does_not_answer(project):
    port = closed_port()
    done = train_with(project, "p_mlflow", {"mlflow": {"tracking_uri": f"http://127.0.0.1:{port}"}})
    line = one_error_line(done)
    assert f"mlflow.tracking_uri = http://127.0.0.1:{port}" in line and "does not answer" in line
    assert "start the server, or fix mlflow.tracking_uri" in line
    assert not (project / "models" / "fcn" / "seeds").exists(), "nothing trained"


def test_cluster_address_where_nothing_answers(project):
    port = closed_port()
    done = train_with(project, "p_ray", {"ray": {"address": f"127.0.0.1:{port}"}})
    line = one_error_line(done)
    assert f"ray.address = 127.0.0.1:{port}: no Ray cluster answers there" in line and "ray start --head" in line
    done = train_with(project, "p_ray_env", {}, {"RAY_ADDRESS": f"127.0.0.1:{port}"})
    assert "RAY_ADDRESS = " in one_error_line(done), "the line names where the address came from"


def test_object_store_that_does_not_answer(project):
    port = closed_port()
    done = train_with(project, "p_s3", {"ray": {"storage_path": "s3://ctxseg-study/ray"}},
                         {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "k",
                          "AWS_SECRET_ACCESS_KEY": "s", "AWS_DEFAULT_REGION": "us-east-1"})
    line = one_error_line(done)
    assert "ray.storage_path = s3://ctxseg-study/ray" in line and f"endpoint http://127.0.0.1:{port}" in line
    assert "cannot be reached" in line and "AWS_ENDPOINT_URL" in line


def test_probes_name_the_key_and_leave_answering_servers_alone(tmp_path, monkeypatch):
    with socket.socket() as server:  # something that accepts connections
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        require_answer.cache_clear()
        require_answer(f"http://127.0.0.1:{port}")
        require_answer(f"postgresql://u:pw@127.0.0.1:{port}/db")
        require_cluster(f"127.0.0.1:{port}")
        require_cluster(f"ray://127.0.0.1:{port}")
    require_answer("sqlite:///x.db")  # files and "auto" are not probed
    require_cluster("auto")
    dead = closed_port()
    with pytest.raises(TrackingUnreachableError) as err:
        require_answer(f"postgresql://user:hunter2@127.0.0.1:{dead}/mlflow", "MLFLOW_TRACKING_URI")
    assert "hunter2" not in str(err.value) and f"127.0.0.1:{dead}" in str(err.value)
    with pytest.raises(ClusterUnreachableError, match="not an address"):
        require_cluster("headnode")
    check_reachable(str(tmp_path), "ray.storage_path")  # a folder: nothing to probe


def test_s3_endpoint_and_bucket_come_from_the_environment(tmp_path, monkeypatch):
    """AWS's own variables name the endpoint; a missing bucket is named; a write that starts during an
    outage of a few seconds finishes once the endpoint is back (retries), also from a pickled copy of the
    filesystem (pyarrow's own pickle drops the retry strategy: the copy gave up after ~2 s)."""
    import threading

    s3 = S3Endpoint(tmp_path).start()
    try:
        for key, value in s3.env().items():
            monkeypatch.setenv(key, value)
        fs, path = filesystem(f"s3://{s3.bucket}/prefix")
        with fs.open_output_stream(f"{path}/a.txt") as out:
            out.write(b"x")
        assert s3.keys("prefix/") == ["prefix/a.txt"]
        check_reachable(f"s3://{s3.bucket}/prefix", "ray.data_path")
        with pytest.raises(StorageUnreachableError, match="ray.data_path = s3://no-such-bucket/x.*'no-such-bucket' does not exist"):
            check_reachable("s3://no-such-bucket/x", "ray.data_path")

        def outage():
            with s3.outage():
                time.sleep(3)

        # Ray ships the filesystem to its controller and workers pickled: the copy must keep retrying
        import cloudpickle

        shipped = pickle.loads(cloudpickle.dumps(fs))
        away = threading.Thread(target=outage)
        away.start()
        time.sleep(0.3)
        with shipped.open_output_stream(f"{path}/b.txt") as out:
            out.write(b"y")
        away.join()
        assert "prefix/b.txt" in s3.keys("prefix/")
    finally:
        s3.stop()


def test_gateway_refuses_while_down_and_forwards_when_up():
    with socket.socket() as upstream:
        upstream.bind(("127.0.0.1", 0))
        upstream.listen()
        gateway = Gateway(upstream.getsockname()[1])
        gateway.up()
        with socket.create_connection(("127.0.0.1", gateway.port), timeout=2) as client:
            conn, _ = upstream.accept()
            client.sendall(b"ping")
            assert conn.recv(4) == b"ping"
            conn.close()
        gateway.down()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", gateway.port), timeout=2)
        gateway.up()
        socket.create_connection(("127.0.0.1", gateway.port), timeout=2).close()
        gateway.down()
