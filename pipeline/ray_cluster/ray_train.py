"""One training run on Ray Train: the worker loop (wiring around :func:`ctxseg.engine.fit`) and its trainer.

Shared by the ``train`` stage and every Tune trial. Inside each worker: the dataset is resolved and
its identity checked (:mod:`pipeline.storage.dataset_access`), the newest complete checkpoint *at this moment*
is restored (Ray's record or a newer one on disk), and :func:`ctxseg.engine.fit` runs with three
callbacks: progress lines, :class:`RayReport` (checkpoint + report every epoch) and, on rank 0,
:class:`MlflowLog` (metrics flushed to MLflow only after the checkpoint that holds them is persisted).

Errors a restart would meet again (a non-finite loss, a dataset a node cannot read) are not raised in
the worker, where Ray would retry them: every rank agrees on them, rank 0 hands the message to the
head's store actor and every rank returns; the driver then raises it (:func:`fatal_error_of`).
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

from ctxseg.config import Params, params_to_dict, parse_params
from ctxseg.engine import Callback, NonFiniteLossError, build_optimizer, fit, restore_from_payload
from pipeline import common
from pipeline.storage import dataset_access
from pipeline.ray_cluster import ray_env
from pipeline.storage.filesystems import ray_storage
from pipeline.storage.run_storage import checkpoint_payload, last_checkpoint_name, newest_checkpoint
from pipeline.mlflow_tracking.tracking import RemoteClient
from pipeline.ray_cluster.train_callbacks import MlflowLog, ProgressLog, RayReport, StorageFullStop

log = logging.getLogger("ctxseg.train")


def _agree(rank_error: Optional[str], world: int) -> list[str]:
    """Every rank's error message (or None), gathered on all ranks."""
    import torch.distributed as dist

    if world == 1 or not (dist.is_available() and dist.is_initialized()):
        return [rank_error] if rank_error else []
    errors: list = [None] * world
    dist.all_gather_object(errors, rank_error)
    return [e for e in errors if e]


class RankSession:
    """What a training rank asks of the Ray library it runs under: its rank, its device, the checkpoint
    it restarts from and the per-epoch report. :class:`RayTrainRank` (a Ray Train worker, any world
    size) and :class:`TuneTrialRank` (a single-rank Tune trial that trains in its own process)."""

    rank, world = 0, 1
    report_returns = True  # False: the report may end the rank (a Tune scheduler stopping the trial there)

    @property
    def device(self) -> torch.device:
        raise NotImplementedError

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device)

    def restore_payload(self, config: dict) -> Optional[dict]:
        """The training state the rank starts from (None: a fresh run)."""
        raise NotImplementedError

    def report(self, metrics: dict, checkpoint_dir: Optional[str], dir_name: str) -> None:
        """Report an epoch's metrics, with the checkpoint folder (rank 0) persisted before it returns."""
        raise NotImplementedError


class RayTrainRank(RankSession):
    """A rank of a Ray Train worker group (DDP when ``world`` > 1)."""

    def __init__(self):
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()

    @property
    def device(self) -> torch.device:
        import ray.train.torch

        return ray.train.torch.get_device()

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model)

    def restore_payload(self, config: dict) -> Optional[dict]:
        """The newest complete checkpoint of the run's storage *now* (newer than Ray's record when a
        driver stopped between writing one and recording it), else Ray's record."""
        import ray.train

        return newest_checkpoint(config["storage"], config["ray_name"], ray.train.get_checkpoint())

    def report(self, metrics: dict, checkpoint_dir: Optional[str], dir_name: str) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=dir_name)


class TuneTrialRank(RankSession):
    """The only rank of a Tune trial that trains in the trial's own process (no worker group to start:
    the trial's actor, reused across trials, is the worker). Tune persists its checkpoints and restores
    a restarted or resumed trial from the newest one it recorded."""

    report_returns = False

    def __init__(self, use_gpu: bool):
        self.use_gpu = use_gpu

    @property
    def device(self) -> torch.device:
        return torch.device("cuda:0" if self.use_gpu and torch.cuda.is_available() else "cpu")

    def restore_payload(self, config: dict) -> Optional[dict]:
        from ray import tune

        return checkpoint_payload(tune.get_checkpoint())

    def report(self, metrics: dict, checkpoint_dir: Optional[str], dir_name: str) -> None:
        from ray import tune

        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None)


def train_loop_per_worker(config: dict) -> None:
    """One DDP rank of a Ray Train worker group (the ``train`` stage, and Tune trials of several ranks)."""
    run_rank(config, RayTrainRank())


def run_rank(config: dict, session: RankSession) -> None:
    """One rank's training. ``config`` carries plain data and Ray handles only (no head-local paths)."""
    import ray

    from ctxseg.engine import seed_everything
    from ctxseg.loaders import build_loaders
    from ctxseg.models import build_segmentor

    common.setup_logging()
    ray_env.quiet_ray_report_log()
    params = parse_params(config["params"]).for_seed(config["seed"])
    name = config["model_name"]
    rank, world = session.rank, session.world
    torch.set_num_threads(max(1, int(params.scaling.cpus_per_worker)))
    seed_everything(params.seed * 1000 + rank)
    device = session.device
    node = f"{ray.util.get_node_ip_address()} ({ray.get_runtime_context().get_node_id()[:12]})"
    problem = None
    try:
        prepared = dataset_access.resolve(config["dataset"], node)
    except dataset_access.DatasetUnavailableError as err:
        problem = str(err)
    errors = _agree(problem, world)
    store = config["store"]
    if errors:
        if rank == 0:
            ray.get(store.record_fatal.remote(config["run_id"], "dataset", "; ".join(sorted(set(errors)))))
        return

    loaders = build_loaders(params.data, prepared, batch_size=params.train.batch_size, seed=params.seed,
                            rank=rank, world=world)
    model = build_segmentor(params.model_config_of(name), loaders.num_classes)
    if world > 1 and params.scaling.sync_batchnorm and device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = session.prepare_model(model)
    optimizer = build_optimizer(model, params.train)
    amp_dtype = None if params.train.amp == "off" or device.type != "cuda" else (
        torch.bfloat16 if params.train.amp == "bf16" else torch.float16)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    payload = session.restore_payload(config)
    state = restore_from_payload(payload, model, optimizer, scaler) if payload is not None else None
    if state is not None and rank == 0:
        log.info("[%s] resumed from checkpoint at epoch %d, iteration %d", name, state.epoch, state.iteration)

    callbacks: list[Callback] = [RayReport(session.report)]
    if rank == 0:
        mlflow_log = MlflowLog(RemoteClient(store), config["run_id"], config["system_metrics"],
                               replay=(payload or {}).get(MlflowLog.PAYLOAD_KEY))
        report = RayReport(session.report, extra=mlflow_log.checkpoint_records, storage=config["storage"])
        # MLflow hears of an epoch after its checkpoint is persisted, unless the report may not return
        callbacks = [ProgressLog(name), *((report, mlflow_log) if session.report_returns else (mlflow_log, report))]
    callbacks += list(config.get("callbacks") or [])
    try:
        fit(model, loaders.train, loaders.val, optimizer, params.train, num_classes=loaders.num_classes,
            state=state, callbacks=callbacks, device=device, amp_dtype=amp_dtype, scaler=scaler,
            epoch_metrics={"num_nodes": ray_env.count_rank_nodes(world)})
    except NonFiniteLossError as err:  # every rank saw the same all-reduced flag and stops here
        if rank == 0:
            log.error("[%s] %s", name, err)
            ray.get(store.record_fatal.remote(config["run_id"], "nonfinite", str(err)))
    except StorageFullStop as err:  # likewise: every rank saw rank 0's flag
        if rank == 0:
            ray.get(store.record_fatal.remote(config["run_id"], "storage", (
                f"{err}. The checkpoint storage {config['storage']} is full: free space there (or set "
                "ray.storage_path to a larger volume), then run `dvc repro` to continue from the last "
                "complete checkpoint")))


def fatal_error_of(store, run_id: str, model_name: str) -> Optional[Exception]:
    """The driver-side error for a run whose workers recorded a non-retryable error, else None."""
    import ray

    found = ray.get(store.fatal.remote(run_id))
    if found is None:
        return None
    kind, message = found
    error = {"nonfinite": NonFiniteLossError, "storage": common.StageFailed}.get(
        kind, dataset_access.DatasetUnavailableError)
    return error(f"[{model_name}] {message}")


def fit_or_explain(trainer, client, run_id: str, what: str, run_path: str, max_failures: int):
    """``trainer.fit()``, with its two endings that are not errors of the code explained in one line.

    Ctrl-C: Ray Train's SIGINT handler aborts the run and leaves ``fit`` with ``SystemExit``; the MLflow
    run is closed as KILLED and tagged resumable, and the stage exits 130. Retries used up: one line
    names the last checkpoint and says that ``dvc repro`` continues from it (exit 1)."""
    from ray.train import TrainingFailedError
    from ray.train.v2.api.exceptions import ControllerError

    try:
        return trainer.fit()
    except (KeyboardInterrupt, SystemExit):
        client.set_tag(run_id, "ctxseg.state", "interrupted, resumable: run `dvc repro` again")
        client.set_terminated(run_id, status="KILLED")
        raise KeyboardInterrupt from None
    except ControllerError as err:
        client.set_terminated(run_id, status="FAILED")
        raise common.StageFailed(f"{what} {workers_not_started(trainer, err)}") from None
    except TrainingFailedError as err:
        client.set_terminated(run_id, status="FAILED")
        storage, _, ray_name = run_path.rpartition("/")
        last = last_checkpoint_name(storage, ray_name)
        cause = (str(err).strip().splitlines() or ["?"])[-1][:300]
        raise common.StageFailed(
            f"{what} training failed after train.max_failures={max_failures} worker restarts (last error: {cause}). "
            f"Last checkpoint: {f'{run_path}/{last}' if last else 'none yet'}; run `dvc repro` to continue from it."
        ) from None


def workers_not_started(trainer, err: Exception) -> str:
    """The one-line reason of a run whose Ray Train workers never started (:func:`ray_env.explain_start_failure`)."""
    scaling = trainer.scaling_config
    per_worker = dict(scaling.resources_per_worker or {"CPU": 1})
    cause = getattr(err, "controller_failure", err)
    if type(cause).__name__ not in ("WorkerGroupStartupTimeoutError", "WorkerGroupStartupFailedError"):
        return f"training failed in Ray Train's controller: {str(cause).strip()[:300]}"
    params = trainer.train_loop_config["params"]
    timeout, attempts = params["ray"]["worker_start_timeout_s"], params["ray"]["worker_start_attempts"]
    return (f"Ray Train workers did not start ({type(cause).__name__}: {attempts} attempt(s) of {timeout:g} s, "
            f"ray.worker_start_attempts / ray.worker_start_timeout_s): "
            f"{ray_env.explain_start_failure(scaling.num_workers, per_worker)}")


def rank_config(params: Params, model_name: str, *, dataset: dict, store, run_id: str, storage: str, name: str,
                worker_callbacks: Optional[list] = None) -> dict:
    """The ``config`` of :func:`run_rank`: plain data and Ray handles only, so a rank runs on any node."""
    return {"params": params_to_dict(params), "seed": params.seed, "model_name": model_name, "dataset": dataset,
            "store": store, "run_id": run_id, "system_metrics": params.mlflow.system_metrics, "storage": storage,
            "ray_name": name, "callbacks": list(worker_callbacks or [])}


def without_placement_group_cleaner(trainer_class):
    """``trainer_class`` less Ray Train's placement-group cleaner: a helper actor that every ``fit``
    starts, which polls the state API for the controller's liveness so that a placement group left by a
    controller that *died* is removed while the Ray instance lives on. A stage that owns its local
    instance needs none (the instance and every placement group end with the stage), and the actor costs
    about 2.5 s per fit on 2 CPUs, plus the dashboard's CPU it polls (bench ``pipeline``)."""
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    class StageOwnedTrainer(trainer_class):
        def _create_default_callbacks(self):
            return [callback for callback in super()._create_default_callbacks()
                    if not isinstance(callback, PlacementGroupCleanerCallback)]

    StageOwnedTrainer.__name__ = StageOwnedTrainer.__qualname__ = f"StageOwned{trainer_class.__name__}"
    return StageOwnedTrainer


def make_trainer(params: Params, model_name: str, *, dataset: dict, store, run_id: str, storage: str,
                 name: str, callbacks: Optional[list] = None, worker_callbacks: Optional[list] = None,
                 stage_owns_ray: bool = False):
    """The TorchTrainer of one training run; shared by the train stage and every Tune trial of several ranks.

    ``stage_owns_ray``: the caller started the local Ray instance and stops it when it ends; the
    trainer then starts no placement-group cleaner (:func:`without_placement_group_cleaner`)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    use_gpu = ray_env.resolve_use_gpu(params)
    storage_path, storage_filesystem = ray_storage(storage)
    resources = {"CPU": params.scaling.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = params.scaling.gpus_per_worker
    trainer_class = without_placement_group_cleaner(TorchTrainer) if stage_owns_ray else TorchTrainer
    return trainer_class(
        train_loop_per_worker,
        train_loop_config=rank_config(params, model_name, dataset=dataset, store=store, run_id=run_id,
                                      storage=storage, name=name, worker_callbacks=worker_callbacks),
        scaling_config=ScalingConfig(num_workers=params.scaling.num_workers, use_gpu=use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=name, storage_path=storage_path, storage_filesystem=storage_filesystem, callbacks=callbacks,
            # A worker group that cannot start (resources short) fails after worker_start_attempts tries
            # of ray.worker_start_timeout_s each; Ray's default retries it forever.
            failure_config=FailureConfig(max_failures=params.train.max_failures,
                                         controller_failure_limit=params.ray.worker_start_attempts - 1),
            checkpoint_config=CheckpointConfig(num_to_keep=params.train.checkpoints_to_keep),
            # Ray Train's own INFO lines repeat every reported metric; ours already say it once.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )


__all__ = ["RankSession", "RayTrainRank", "TuneTrialRank", "train_loop_per_worker", "run_rank", "rank_config",
           "make_trainer", "without_placement_group_cleaner", "fatal_error_of", "fit_or_explain"]
