"""System metrics of rank 0's node (CPU, memory, GPU memory), sampled in a thread and sent to MLflow
through the head's store actor: MLflow's own monitor opens the tracking store from the worker, which a
node without the head's disk cannot do. Keys follow MLflow's (``system/cpu_utilization_percentage``...)."""
from __future__ import annotations

import threading
import time
from typing import Callable

INTERVAL_S = 10.0


class SystemSampler:
    def __init__(self, send: Callable[[dict, int], None], interval: float = INTERVAL_S):
        self.send, self.interval = send, interval
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="ctxseg-system-metrics", daemon=True)

    def sample(self) -> dict:
        import psutil
        import torch

        memory = psutil.virtual_memory()
        values = {
            "system/cpu_utilization_percentage": psutil.cpu_percent(),
            "system/system_memory_usage_megabytes": (memory.total - memory.available) / 2**20,
            "system/system_memory_usage_percentage": memory.percent,
        }
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                values[f"system/gpu_{i}_memory_usage_megabytes"] = torch.cuda.memory_allocated(i) / 2**20
        return values

    def _loop(self) -> None:
        while not self.stopped.wait(self.interval):
            try:
                # step = Unix seconds: increasing across restarted attempts, so none is skipped as a replay
                self.send(self.sample(), int(time.time()))
            except Exception:  # the store went away (run ended): stop sampling, training goes on
                return

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopped.set()
