"""A Ray cluster on one machine whose worker nodes share no disk with the head.

The head runs as usual. Each worker node runs inside its own mount namespace
(``unshare --mount --propagation private``) in which a tmpfs hides the repository, ``/tmp`` (where
pytest's folders and the head's Ray session live) and any other folder the test names; only the Python
environment is bound back, so the node can run Ray. The nodes share no folder with the head at all:
every byte of the project's code, data, MLflow runs and checkpoints reaches them through Ray or over
the loopback network (an S3 endpoint and an MLflow server, :mod:`pipeline.local_cloud`), as on a cloud
cluster. ``env`` is what each node's environment adds (e.g. the bucket's credentials, as an instance
role would give them).

Every process is started here and stopped by PID (with its descendants), never by a machine-wide
stop command: other Ray instances may be running.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
START_ATTEMPTS = 2  # per worker node


def unshare_problem() -> Optional[str]:
    """Why isolated nodes cannot be made here, or None."""
    if shutil.which("unshare") is None:
        return "the `unshare` command is not installed"
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                            "mount -t tmpfs tmpfs /mnt && umount /mnt"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"mount namespaces are not permitted here (needs root / CAP_SYS_ADMIN): {probe.stderr.strip()}"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_ports(index: int) -> list[str]:
    """Ports of one node, all distinct from the other nodes' (the nodes share one network namespace;
    Ray's fixed defaults, e.g. the dashboard agent's 52365, would collide)."""
    low = 20000 + 1000 * index
    return [f"--node-manager-port={_free_port()}", f"--object-manager-port={_free_port()}",
            f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
            f"--metrics-export-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}",
            f"--min-worker-port={low}", f"--max-worker-port={low + 999}"]


class IsolatedCluster:
    """A head (``head_cpus`` CPUs, resource ``head``) and ``workers`` isolated nodes with
    ``cpus_per_node`` CPUs each (resources ``isolated`` and ``isolated_<i>``)."""

    def __init__(self, hidden: list[Path], workers: int = 2, cpus_per_node: int = 1, head_cpus: int = 0,
                 env: Optional[dict] = None):
        self.base = Path(tempfile.mkdtemp(prefix="ic", dir="/var/tmp"))  # short: Ray's socket paths
        self.extra_env = dict(env or {})
        self.hidden = [Path(p).resolve() for p in hidden]
        self.workers, self.cpus_per_node, self.head_cpus = workers, cpus_per_node, head_cpus
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.procs: list[subprocess.Popen] = []
        self.worker_procs: list[subprocess.Popen] = []

    def _ray(self) -> str:
        return str(Path(sys.executable).parent / "ray")

    def start(self, timeout: float = 180) -> "IsolatedCluster":
        # loopback-only test cluster: no token authentication (a real cluster keeps it, docs/cluster.md)
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
               "RAY_AUTH_MODE": "disabled", **self.extra_env}
        env.pop("RAY_ADDRESS", None)
        log = (self.base / "head.log").open("w")
        self.procs.append(subprocess.Popen(
            [self._ray(), "start", "--head", "--block", f"--port={self.port}", "--node-ip-address=127.0.0.1",
             f"--num-cpus={self.head_cpus}", "--num-gpus=0", f"--resources={json.dumps({'head': 1})}",
             "--dashboard-host=127.0.0.1", "--disable-usage-stats", f"--temp-dir={self.base / 'head'}",
             *_node_ports(0)],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True))
        self._wait_for_nodes(timeout, 1)
        for i in range(self.workers):  # one at a time: a node starting under load can time out
            for attempt in range(1, START_ATTEMPTS + 1):
                proc = self._start_worker(i, env)
                self.procs.append(proc)
                if self._wait_for_nodes(timeout, i + 2, proc, final=attempt == START_ATTEMPTS):
                    self.worker_procs.append(proc)
                    break
                # Ray's `ray start` gives up when its raylet has not registered within 30 s (hard-coded
                # in ray._private.node), which a loaded 2-core machine can exceed: start the node again
                sys.stderr.write(f"isolated node {i} did not come up (attempt {attempt}); starting it again\n")
                self._stop_group(proc)
        return self

    def _stop_group(self, proc: subprocess.Popen) -> None:
        """Stop a node that failed to start: its process group (started in its own session), by PID."""
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    def _start_worker(self, index: int, env: dict) -> subprocess.Popen:
        venv = Path(sys.prefix).resolve()
        stage = self.base / f"venv{index}"
        stage.mkdir(exist_ok=True)
        script = ["set -e"]
        rebind = venv.is_relative_to(REPO) or any(venv.is_relative_to(h) for h in self.hidden)
        if rebind:  # keep the Python environment: bind it aside, hide the folders, bind it back
            script.append(f"mount --bind {shlex.quote(str(venv))} {shlex.quote(str(stage))}")
        for folder in [REPO, Path("/tmp"), *self.hidden]:
            if folder.is_dir():
                script.append(f"mount -t tmpfs -o size=2g tmpfs {shlex.quote(str(folder))}")
        if rebind:
            script += [f"mkdir -p {shlex.quote(str(venv))}", f"mount --bind {shlex.quote(str(stage))} {shlex.quote(str(venv))}"]
        resources = json.dumps({"isolated": 1, f"isolated_{index}": 1})
        script.append("exec " + " ".join(shlex.quote(a) for a in [
            self._ray(), "start", "--block", f"--address={self.address}", "--node-ip-address=127.0.0.1",
            f"--num-cpus={self.cpus_per_node}", "--num-gpus=0", f"--resources={resources}",
            "--disable-usage-stats", *_node_ports(index + 1)]))
        log = (self.base / f"worker{index}.log").open("a")
        return subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", "\n".join(script)],
                                stdout=log, stderr=subprocess.STDOUT, env=env, cwd="/", start_new_session=True)

    def _wait_for_nodes(self, timeout: float, expected: int, starting: Optional[subprocess.Popen] = None,
                        final: bool = True) -> bool:
        """Wait until ``expected`` nodes are alive. Stops waiting early when ``starting`` (the `ray start`
        of the node being added) has exited: it gave up. Returns whether they came up; when they did not
        and ``final``, stops the cluster and raises with the nodes' logs."""
        probe = ("import ray, time, sys\nray.init(address=sys.argv[1], log_to_driver=False)\n"
                 "deadline = time.time() + float(sys.argv[2])\n"
                 "while time.time() < deadline and len([n for n in ray.nodes() if n['Alive']]) < int(sys.argv[3]):\n"
                 "    time.sleep(0.5)\n"
                 "print('ALIVE', len([n for n in ray.nodes() if n['Alive']]))\n")
        waiter = subprocess.Popen([sys.executable, "-c", probe, self.address, str(timeout), str(expected)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/")
        deadline = time.time() + timeout + 60
        while waiter.poll() is None and time.time() < deadline:
            if starting is not None and starting.poll() is not None:
                waiter.kill()  # the node's `ray start` exited: it will not come up
                break
            time.sleep(0.5)
        if waiter.poll() is None:
            waiter.kill()
        out, err = waiter.communicate()
        found = [line.split()[1] for line in out.splitlines() if line.startswith("ALIVE ")]
        alive = int(found[-1]) if found else 0
        if alive >= expected:
            return True
        if final:
            logs = "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted(self.base.glob("*.log")))
            self.stop()
            raise RuntimeError(f"isolated cluster did not come up ({alive} nodes): {err[-1000:]}\n{logs}")
        return False

    def descendants(self, proc: subprocess.Popen) -> list:
        import psutil

        try:
            return psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def worker_processes(self, title: str) -> list:
        """Processes on the isolated nodes whose command line contains ``title`` (e.g. ``RayTrainWorker``)."""
        found = []
        for proc in self.worker_procs:
            for child in self.descendants(proc):
                try:
                    if title in " ".join(child.cmdline()):
                        found.append(child)
                except Exception:
                    pass
        return found

    def stop(self) -> None:
        """SIGTERM, then SIGKILL, to every process this cluster started and their descendants, by PID."""
        import psutil

        everyone = []
        for proc in self.procs:
            everyone += self.descendants(proc)
            try:
                everyone.append(psutil.Process(proc.pid))
            except psutil.NoSuchProcess:
                pass
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for p in everyone:
                try:
                    p.send_signal(sig)
                except psutil.NoSuchProcess:
                    pass
            _, everyone = psutil.wait_procs(everyone, timeout=10)
            if not everyone:
                break
        for proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        shutil.rmtree(self.base, ignore_errors=True)


def wait_for(predicate, timeout: float, what: str, poll: float = 0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
