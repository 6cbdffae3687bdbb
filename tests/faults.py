"""Fault injection for tests: engine callbacks shipped to Ray workers by value (production code has no
fault hook; it runs whatever callbacks a caller passes, see ``pipeline.train.train_model``)."""
from __future__ import annotations

import os
import signal
import sys

from ctxseg.engine import Callback


def ship_by_value() -> None:
    """Let Ray workers unpickle this module's classes without importing it (tests/ is not shipped)."""
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])


class CrashOnceAt(Callback):
    """Rank ``rank`` raises at ``iteration`` in a run that started from scratch; a run resumed from a
    checkpoint (the restart) does not fail again. ``kill=True`` ends the worker process with SIGKILL."""

    def __init__(self, iteration: int, rank: int = 0, kill: bool = False, marker: str | None = None):
        self.iteration, self.rank, self.kill, self.marker = iteration, rank, kill, marker
        self.armed = True

    def on_fit_start(self, run) -> None:
        self.armed = run.state.iteration == 0

    def on_iteration_start(self, run, iteration: int) -> None:
        if self.armed and run.rank == self.rank and iteration == self.iteration:
            if self.marker:  # evidence for a test on this machine that the fault happened
                open(self.marker, "w").close()
            if self.kill:
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"injected fault at iteration {iteration}")


class CrashAlwaysAt(Callback):
    """Rank ``rank`` raises at ``iteration`` in every attempt: retries cannot help."""

    def __init__(self, iteration: int, rank: int = 0):
        self.iteration, self.rank = iteration, rank

    def on_iteration_start(self, run, iteration: int) -> None:
        if run.rank == self.rank and iteration == self.iteration:
            raise RuntimeError(f"injected fault at iteration {iteration}, every attempt")

