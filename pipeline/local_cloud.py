"""A cloud on loopback: an S3 endpoint, PostgreSQL and an MLflow tracking server, as a team's cluster
would have them (a bucket and a tracking server instead of a shared mount), for the tests, the
benchmarks and ``make local-cloud`` (try the cloud recipe of docs/cluster.md by hand).

- **S3**: moto's server mode (what Ray's own storage tests use), behind a small TCP gateway so that a
  test can take the endpoint away for a while (:meth:`S3Endpoint.outage`) without losing the bucket.
- **PostgreSQL**: ``initdb`` + ``pg_ctl`` in a temporary folder (Debian's ``postgresql`` package; run
  as the ``postgres`` user when this process is root, as ``initdb`` refuses root).
- **MLflow**: ``mlflow server`` with the database as backend store and artifacts proxied to
  ``s3://<bucket>/mlartifacts``: clients need the server's URL only, no S3 credentials.

Clients find the bucket the usual AWS way: ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` /
``AWS_DEFAULT_REGION`` and ``AWS_ENDPOINT_URL`` (read by pyarrow, boto3 and s3fs alike). Every server
listens on 127.0.0.1 only and is stopped by PID. Nothing here is used by a stage.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator, Optional

log = logging.getLogger("ctxseg.local_cloud")

LOOPBACK = "127.0.0.1"
BUCKET = "ctxseg-study"
PG_BIN = Path("/usr/lib/postgresql")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def _wait(predicate, timeout: float, what: str, proc: Optional[subprocess.Popen] = None, logfile=None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.2)
    tail = Path(logfile).read_text()[-2000:] if logfile and Path(logfile).is_file() else ""
    raise RuntimeError(f"{what} did not come up within {timeout:.0f} s\n{tail}")


def _answers(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((LOOPBACK, port)) == 0


def _stop(proc: Optional[subprocess.Popen], sig: int = signal.SIGTERM) -> None:
    """Stop a process this module started, and its children, by PID."""
    if proc is None or proc.poll() is not None:
        return
    import psutil

    try:
        family = psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)]
    except psutil.NoSuchProcess:
        return
    for p in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(sig)
    _, alive = psutil.wait_procs(family, timeout=10)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


class Gateway:
    """A TCP forwarder ``127.0.0.1:port`` -> ``127.0.0.1:upstream`` that can be taken down: while down,
    connections are refused and open ones are cut, as when the server behind it stops."""

    def __init__(self, upstream: int, port: Optional[int] = None):
        self.upstream, self.port = upstream, port or free_port()
        self._listener: Optional[socket.socket] = None
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()

    def up(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((LOOPBACK, self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            for conn in list(self._open):
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
                conn.close()
            self._open.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection((LOOPBACK, self.upstream), timeout=5)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open.update((client, server))
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
            with self._lock:
                self._open.discard(source)
                self._open.discard(sink)


class S3Endpoint:
    """moto's S3 server on loopback with one bucket, reached through a :class:`Gateway`."""

    def __init__(self, workdir: Path, bucket: str = BUCKET):
        self.workdir, self.bucket = workdir, bucket
        self.proc: Optional[subprocess.Popen] = None
        self.gateway: Optional[Gateway] = None
        self.server_port = free_port()
        # dummy credentials (moto accepts any); a unique secret lets a test look for leaks
        self.credentials = {"AWS_ACCESS_KEY_ID": "ctxseg-local", "AWS_SECRET_ACCESS_KEY": f"ctxseg-secret-{secrets.token_hex(8)}",
                            "AWS_DEFAULT_REGION": "us-east-1"}

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.gateway.port}"

    @property
    def direct_url(self) -> str:
        """The server itself, without the gateway (for benchmarks)."""
        return f"http://{LOOPBACK}:{self.server_port}"

    def env(self) -> dict[str, str]:
        return {**self.credentials, "AWS_ENDPOINT_URL": self.url}

    def start(self) -> "S3Endpoint":
        logfile = self.workdir / "s3.log"
        self.proc = subprocess.Popen([_bin("moto_server"), "-H", LOOPBACK, "-p", str(self.server_port)],
                                     stdout=logfile.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
        _wait(lambda: _answers(self.server_port), 60, "the S3 endpoint (moto_server)", self.proc, logfile)
        self.gateway = Gateway(self.server_port)
        self.gateway.up()
        self._client().create_bucket(Bucket=self.bucket)
        return self

    @functools.cache
    def _client(self):
        """A boto3 client of the server itself (made once: the tests poll :meth:`keys`)."""
        import boto3

        return boto3.client("s3", endpoint_url=self.direct_url, region_name="us-east-1",
                            aws_access_key_id=self.credentials["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=self.credentials["AWS_SECRET_ACCESS_KEY"])

    def keys(self, prefix: str = "") -> list[str]:
        """Every object key under ``prefix`` in the bucket."""
        found = []
        for page in self._client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            found += [o["Key"] for o in page.get("Contents", [])]
        return found

    @contextlib.contextmanager
    def outage(self) -> Iterator[None]:
        """The endpoint refuses every connection inside the block (the bucket's contents are kept)."""
        self.gateway.down()
        try:
            yield
        finally:
            self.gateway.up()

    def stop(self) -> None:
        if self.gateway is not None:
            self.gateway.down()
        _stop(self.proc)


def postgres_problem() -> Optional[str]:
    """Why a PostgreSQL server cannot be started here, or None."""
    if not list(PG_BIN.glob("*/bin/pg_ctl")):
        return f"PostgreSQL is not installed (no {PG_BIN}/*/bin/pg_ctl; `apt-get install postgresql`)"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root without `runuser` (initdb refuses root)"
    return None


class Postgres:
    """A throw-away PostgreSQL cluster on loopback with a database ``mlflow`` (trust auth, loopback only),
    in a folder of its own under /var/tmp (the server runs as ``postgres`` when this process is root,
    and must reach its folder: a folder inside another user's private temporary folder would not do)."""

    def __init__(self):
        self.workdir = Path(tempfile.mkdtemp(prefix="ctxseg-pg-", dir="/var/tmp"))
        self.port = free_port()
        self.bin = sorted(PG_BIN.glob("*/bin"))[-1] if list(PG_BIN.glob("*/bin")) else None

    @property
    def uri(self) -> str:
        return f"postgresql://mlflow@{LOOPBACK}:{self.port}/mlflow"

    def _run(self, *args: str) -> subprocess.CompletedProcess:
        cmd = [str(self.bin / args[0]), *args[1:]]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, cwd=self.workdir)

    def start(self) -> "Postgres":
        problem = postgres_problem()
        if problem:
            raise RuntimeError(problem)
        if os.geteuid() == 0:
            shutil.chown(self.workdir, "postgres")
        for args in (("initdb", "-D", "data", "-U", "mlflow", "--auth=trust", "-E", "UTF8"),
                     ("pg_ctl", "-D", "data", "-l", "server.log", "-w", "-t", "60", "-o",
                      f"-p {self.port} -k {self.workdir} -c listen_addresses={LOOPBACK}", "start"),
                     ("createdb", "-h", LOOPBACK, "-p", str(self.port), "-U", "mlflow", "mlflow")):
            done = self._run(*args)
            if done.returncode != 0:
                raise RuntimeError(f"PostgreSQL `{args[0]}` failed: {(done.stdout + done.stderr)[-1500:]}")
        return self

    def stop(self) -> None:
        if self.bin is not None and (self.workdir / "data" / "postmaster.pid").is_file():
            # "fast" ends every session; "immediate" if that has not finished within 20 s
            if self._run("pg_ctl", "-D", "data", "-m", "fast", "-w", "-t", "20", "stop").returncode != 0:
                self._run("pg_ctl", "-D", "data", "-m", "immediate", "-w", "-t", "20", "stop")
        shutil.rmtree(self.workdir, ignore_errors=True)


class TrackingServer:
    """``mlflow server`` on loopback: runs in PostgreSQL, artifacts proxied to ``s3://<bucket>/mlartifacts``."""

    def __init__(self, workdir: Path, backend_uri: str, s3: S3Endpoint):
        self.workdir, self.backend_uri, self.s3 = workdir, backend_uri, s3
        self.port = free_port()
        self.proc: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self, timeout: float = 120) -> "TrackingServer":
        logfile = self.workdir / "mlflow-server.log"
        env = {**os.environ, **self.s3.env(), "MLFLOW_S3_ENDPOINT_URL": self.s3.url,
               "MLFLOW_DISABLE_TELEMETRY": "true"}
        self.proc = subprocess.Popen(
            [_bin("mlflow"), "server", "--host", LOOPBACK, "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", self.backend_uri, "--artifacts-destination", f"s3://{self.s3.bucket}/mlartifacts"],
            stdout=logfile.open("a"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
        _wait(self._healthy, timeout, f"the MLflow tracking server ({self.url})", self.proc, logfile)
        return self

    def _healthy(self) -> bool:
        import urllib.request

        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as answer:
                return answer.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        _stop(self.proc)
        self.proc = None

    def restart(self, down_s: float = 0.0) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()


class LocalCloud:
    """The three servers together, in a temporary folder; use as a context manager."""

    def __init__(self, workdir: Optional[Path] = None):
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="ctxseg-cloud-", dir="/var/tmp"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.s3 = S3Endpoint(self.workdir)
        self.postgres = Postgres()
        self.mlflow: Optional[TrackingServer] = None

    def start(self) -> "LocalCloud":
        try:
            self.s3.start()
            self.postgres.start()
            self.mlflow = TrackingServer(self.workdir, self.postgres.uri, self.s3).start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for name, server in (("the MLflow tracking server", self.mlflow), ("PostgreSQL", self.postgres), ("the S3 endpoint", self.s3)):
            if server is not None:
                started = time.monotonic()
                server.stop()
                log.info("stopped %s in %.1f s", name, time.monotonic() - started)

    def __enter__(self) -> "LocalCloud":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def env(self) -> dict[str, str]:
        """What every node's environment holds: the bucket's credentials and endpoint (never params)."""
        return self.s3.env()

    def params(self, prefix: str = "study") -> dict:
        """params.yaml overrides that put a study on this cloud."""
        bucket = f"s3://{self.s3.bucket}/{prefix}"
        return {"ray": {"storage_path": f"{bucket}/ray", "data_path": f"{bucket}/data"},
                "mlflow": {"tracking_uri": self.mlflow.url}}

    def dvc_remote(self, project: Path, prefix: str = "study") -> None:
        """Make ``s3://<bucket>/<prefix>/dvc`` the project's default DVC remote; the endpoint and
        credentials go to ``.dvc/config.local`` (git-ignored), the remote's URL to ``.dvc/config``."""
        url = f"s3://{self.s3.bucket}/{prefix}/dvc"
        dvc = [_bin("dvc"), "remote"]
        for cmd in (["add", "--default", "--force", "bucket", url],
                    ["modify", "--local", "bucket", "endpointurl", self.s3.url],
                    ["modify", "--local", "bucket", "access_key_id", self.s3.credentials["AWS_ACCESS_KEY_ID"]],
                    ["modify", "--local", "bucket", "secret_access_key", self.s3.credentials["AWS_SECRET_ACCESS_KEY"]]):
            subprocess.run(dvc + cmd, cwd=project, check=True, capture_output=True, text=True)


def main() -> int:
    """``make local-cloud``: start the three servers, print how to point a study at them, wait for Ctrl-C."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    problem = postgres_problem()
    if problem:
        log.error("cannot start the local cloud: %s", problem)
        return 2
    # A parent may hand down SIGINT / SIGTERM blocked (a test runner, after a library blocked them in its
    # main thread): the servers started below and this process's wait need them delivered.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    cloud = LocalCloud()
    with cloud:
        params = cloud.params()
        log.info("S3 endpoint %s (bucket %s), PostgreSQL %s, MLflow tracking server %s",
                 cloud.s3.url, cloud.s3.bucket, cloud.postgres.uri, cloud.mlflow.url)
        log.info("\n# 1. in every shell that runs a stage or a Ray node:")
        for key, value in cloud.env().items():
            log.info("export %s=%s", key, value)
        log.info("\n# 2. in params.yaml (or `dvc exp run -S ...`):")
        log.info("ray:\n  storage_path: %s\n  data_path: %s\nmlflow:\n  tracking_uri: %s",
                 params["ray"]["storage_path"], params["ray"]["data_path"], params["mlflow"]["tracking_uri"])
        log.info("\n# 3. a DVC remote on the bucket:\ndvc remote add -d bucket s3://%s/study/dvc\n"
                 "dvc remote modify --local bucket endpointurl %s", cloud.s3.bucket, cloud.s3.url)
        # Ctrl-C / SIGTERM: the handler only records the signal (no lock to deadlock on, unlike an Event's
        # set()); Python runs it in this thread whichever thread the kernel delivered the signal to, and
        # installing it also undoes a SIG_IGN inherited from a background shell
        received: list[int] = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda signum, _frame: received.append(signum))
        log.info("\nCtrl-C stops every server (the bucket and the database are thrown away).")
        while not received:
            time.sleep(0.2)
        log.info("%s: stopping the servers", signal.Signals(received[0]).name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
