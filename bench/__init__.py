"""ctxseg benchmarks: every figure is a ratio of two things measured side by side in the same run, or
a count (bytes, FLOPs, pixels). Run everything with ``python -m bench`` (``make bench``); ``--quick``
runs tiny sizes (the smoke test), ``--only NAME[,NAME]`` one group. Results go to ``bench/results.json``
(atomically, with ``ctxseg.io.write_text``) and the table to ``bench/RESULTS.md``.

Groups (one module each): ``attention``, ``memory_update``, ``train_step``, ``pipeline``,
``evaluation``, ``gpu``, ``data``. Each exposes ``run(opts) -> dict`` with ``rows`` (the table) and ``targets``
(the issue's targets with the measured value and met / missed).

Timed runs and memory runs happen in separate fresh subprocesses. Timed runs use the normal allocator
(what users get). A memory run starts with a fixed glibc mmap threshold (``MEMORY_RUN_ENV``), so freed
large blocks go back to the OS, and measures the growth of the process's peak resident set (``VmHWM``,
reset through ``/proc/self/clear_refs``) over its resident set just before the step. (Timing under the
fixed threshold would charge page faults to every large allocation, penalising code that allocates per
block; switching it at run time leaves the earlier heap behind and over-counts.) On CUDA,
``torch.cuda.max_memory_allocated`` is used instead.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = ROOT / "bench"
GIB = 1 << 30
MIB = 1 << 20

# For memory runs: a fixed glibc mmap threshold from process start, so allocations above 128 KiB are
# mmapped and returned on free and the resident set tracks live memory.
MEMORY_RUN_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def median(values: Iterable[float]) -> float:
    vals = [float(v) for v in values]
    return statistics.median(vals) if vals else float("nan")


def _status(field: str) -> int:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def rss_bytes() -> int:
    return _status("VmRSS")


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """``with PeakMemory(device) as pm: ...`` then ``pm.extra``: peak bytes above the level at entry."""

    def __init__(self, device: str = "cpu"):
        self.device = device
        self.extra = 0

    def __enter__(self) -> "PeakMemory":
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            reset_peak_rss()
            self.base = rss_bytes()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            self.extra = torch.cuda.max_memory_allocated() - self.base
        else:
            self.extra = max(0, _status("VmHWM") - self.base)


def timed(fn: Callable[[], Any], sync: Optional[Callable[[], None]] = None) -> float:
    t0 = time.perf_counter()
    fn()
    if sync is not None:
        sync()
    return time.perf_counter() - t0


def interleaved(fns: Dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> Dict[str, List[float]]:
    """Time each callable ``repeats`` times, alternating the order every round (A B, B A, ...)."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    out: Dict[str, List[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in (names if r % 2 == 0 else names[::-1]):
            out[n].append(timed(fns[n]))
    return out


def run_worker(module: str, spec: dict, timeout: float = 1800, memory_run: bool = False) -> dict:
    """Run ``python -m <module> --worker '<json>'`` in a fresh process; return the JSON it prints last.
    ``memory_run``: with ``MEMORY_RUN_ENV`` (for :class:`PeakMemory`; never time such a process)."""
    env = dict(os.environ)
    if memory_run:
        env.update(MEMORY_RUN_ENV)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-m", module, "--worker", json.dumps(spec)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": f"worker exit {proc.returncode}: {proc.stderr.strip()[-800:]}"}
    return json.loads(lines[-1])


def worker_main(handler: Callable[[dict], dict]) -> None:
    """Entry of a worker process: ``--worker <json>`` -> print one JSON line."""
    spec = json.loads(sys.argv[sys.argv.index("--worker") + 1])
    print(json.dumps(handler(spec)), flush=True)


def load_info() -> dict:
    """Machine facts recorded with the results (load average: other jobs share the CPU)."""
    import platform

    import torch

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }
    try:
        info["loadavg"] = list(os.getloadavg())
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def target(name: str, wanted: str, value: Any, met: Optional[bool], note: str = "") -> dict:
    return {"target": name, "wanted": wanted, "value": value, "met": met, "note": note}


def fmt(v: Any) -> str:
    if isinstance(v, float):
        if v != v:
            return "n/a"
        if abs(v) >= 100:
            return f"{v:.0f}"
        if abs(v) >= 1:
            return f"{v:.2f}"
        return f"{v:.3g}"
    return str(v)


def markdown_table(rows: List[dict]) -> str:
    if not rows:
        return "(no rows)\n"
    cols: List[str] = []
    for r in rows:
        for c in r:
            if c not in cols:
                cols.append(c)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines) + "\n"
