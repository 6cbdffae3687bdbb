"""Callbacks of a Ray Train worker around :func:`ctxseg.engine.fit`: progress lines, the per-epoch
checkpoint + report (:class:`RayReport`) and rank 0's MLflow logging (:class:`MlflowLog`).

MLflow agrees with the weights: a step's metrics reach MLflow only after the checkpoint that holds that
step is persisted, and the checkpoint carries them too, so a run interrupted between persisting a
checkpoint and logging its metrics logs them when it resumes from it (a step already in the history
is skipped: resume is exact, so a replayed value is the same).
"""
from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

from ctxseg.checkpoint import save_training_checkpoint
from ctxseg.engine import Callback, FitRun, format_eta
from pipeline.storage.run_storage import checkpoint_dir_name
from pipeline.mlflow_tracking.tracking import RemoteClient

log = logging.getLogger("ctxseg.train")


class ProgressLog(Callback):
    def __init__(self, model_name: str):
        self.name, self.started, self.start_iteration = model_name, time.perf_counter(), 0

    def on_fit_start(self, run: FitRun) -> None:
        self.start_iteration = run.state.iteration

    def on_log(self, run: FitRun, record: dict) -> None:
        done = run.state.iteration - self.start_iteration
        eta = (time.perf_counter() - self.started) / max(done, 1) * (run.total_iterations - run.state.iteration)
        log.info("[%s] epoch %d/%d it %d/%d loss %.4f lr %.5f %.1f img/s ETA %s", self.name, run.state.epoch + 1,
                 run.cfg.epochs, run.state.iteration, run.total_iterations, record["loss"], record["lr"],
                 record["images_per_s"], format_eta(eta))

    def on_epoch_end(self, run: FitRun, metrics: dict) -> None:
        log.info("[%s] epoch %d/%d done: %s", self.name, run.state.epoch, run.cfg.epochs,
                 ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float)))


class StorageFullStop(Exception):
    """Rank 0 could not persist a checkpoint because the storage is full; every rank stops."""


def is_disk_full(err: BaseException) -> bool:
    """ENOSPC / EDQUOT, raised directly or wrapped by Ray / pyarrow (which keep the message)."""
    import errno

    while err is not None:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(err) or "Disk quota exceeded" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


class RayReport(Callback):
    """Every epoch: rank 0 writes the checkpoint, every rank reports (Ray Train's report is a barrier).

    ``report(metrics, checkpoint_dir, dir_name)``: the rank's report to Ray Train or Tune
    (:class:`pipeline.ray_cluster.ray_train.RankSession`); ``extra(run, metrics)``: more entries for rank
    0's checkpoint payload (plain data)."""

    SPACE_MARGIN = 1 << 20  # bytes left free beyond the checkpoint

    def __init__(self, report: Callable[[dict, Optional[str], str], None],
                 extra: Optional[Callable[[FitRun, dict], dict]] = None, storage: Optional[str] = None):
        self.report, self.extra, self.storage = report, extra, storage

    def _check_space(self, size: int) -> None:
        """Refuse to hand Ray a checkpoint a local or mounted storage cannot hold: Ray 2.60 persists it
        in the background, and a copy that fails there for lack of space leaves the run waiting forever.
        (A bucket URI is not checked.)"""
        import errno
        import shutil

        if not self.storage or "://" in self.storage:
            return
        folder = Path(self.storage)
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        free = shutil.disk_usage(folder).free
        if free < size + self.SPACE_MARGIN:
            raise OSError(errno.ENOSPC, f"No space left on device: the checkpoint needs {size / 2**20:.1f} MiB, "
                                        f"{free / 2**20:.1f} MiB free at {self.storage}")

    def on_epoch_end(self, run: FitRun, metrics: dict) -> None:
        payload = run.checkpoint()  # every rank: gathers the ranks' RNG states
        if self.extra is not None:
            payload.update(self.extra(run, metrics))
        dir_name = checkpoint_dir_name(run.state.epoch)
        if run.rank != 0:
            self.report(metrics, None, dir_name)
            self._stop_if_full(run, None)
            return
        full = None
        try:
            with tempfile.TemporaryDirectory() as tmp:
                save_training_checkpoint(Path(tmp), payload)
                self._check_space(sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file()))
                self.report(metrics, tmp, dir_name)
        except Exception as err:  # a full disk fails every retry the same way: stop, do not retry
            if not is_disk_full(err):
                raise
            full = err
            self.report(metrics, None, dir_name)  # release the barrier
        self._stop_if_full(run, full)

    def _stop_if_full(self, run: FitRun, full: Optional[BaseException]) -> None:
        """Every rank learns whether rank 0 could not persist the checkpoint (one tiny all-reduce)."""
        import torch
        import torch.distributed as dist

        flag = torch.tensor([1.0 if full is not None else 0.0])
        if run.world > 1 and dist.is_available() and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0:
            raise StorageFullStop(f"the checkpoint of epoch {run.state.epoch} could not be written: "
                                  f"{str(full).splitlines()[0][:200] if full is not None else 'no space left'}")


class MlflowLog(Callback):
    """Rank 0's MLflow logging through the head's store actor. Interval records wait in memory until
    the epoch ends; placed after :class:`RayReport` (Ray Train) they are sent once the epoch's checkpoint
    is persisted, so the history never shows steps of a discarded attempt. In a Tune trial the report
    may never return (the scheduler ends the trial there), so it is placed before: a trial that fails
    before its checkpoint is persisted recomputes the epoch identically when restored (resume is exact)
    and a replayed step already in the history is skipped."""

    PAYLOAD_KEY = "mlflow_records"  # the checkpoint entry holding the epoch's records (step, metrics)

    def __init__(self, client: RemoteClient, run_id: str, system_metrics: bool, replay: Optional[list] = None):
        self.client, self.run_id, self.pending, self.logged = client, run_id, [], {}
        self.sent: Optional[tuple] = None  # (iteration, records) of the epoch already sent
        self.replay = list(replay or [])  # the records of the checkpoint a resumed run starts from
        self.system = None
        if system_metrics:
            from pipeline.mlflow_tracking.system_metrics import SystemSampler

            self.system = SystemSampler(lambda values, step: self._send(values, step))

    def _send(self, metrics: dict, step: int) -> None:
        self.client.actor.log_metric_points.remote(self.run_id, metrics, step)

    def on_fit_start(self, run: FitRun) -> None:
        import ray

        ray.get([self.client.actor.log_metric_points.remote(self.run_id, rec, step) for rec, step in self.replay])
        self.replay = []
        if self.system is not None:
            self.system.start()

    def _epoch_records(self, run: FitRun, metrics: dict) -> list:
        epoch = {k: v for k, v in metrics.items() if k not in ("epoch", "iteration")}
        return self.pending + [(epoch, run.state.iteration)]

    def checkpoint_records(self, run: FitRun, metrics: dict) -> dict:
        """The epoch's records for the checkpoint (:class:`RayReport` ``extra``), sent or not yet."""
        if self.sent is not None and self.sent[0] == run.state.iteration:
            return {self.PAYLOAD_KEY: self.sent[1]}
        return {self.PAYLOAD_KEY: self._epoch_records(run, metrics)}

    def on_log(self, run: FitRun, record: dict) -> None:
        self.pending.append((dict(record), run.state.iteration))

    def on_epoch_end(self, run: FitRun, metrics: dict) -> None:
        import ray

        records = self._epoch_records(run, metrics)
        self.sent = (run.state.iteration, records)
        ray.get([self.client.actor.log_metric_points.remote(self.run_id, rec, step) for rec, step in records])
        self.pending = []

    def on_fit_end(self, run: FitRun, error: Optional[BaseException]) -> None:
        if self.system is not None:
            self.system.stop()
