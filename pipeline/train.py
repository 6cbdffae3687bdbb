"""DVC stage ``train@<model>``: train one model of params.yaml with Ray Train (DDP), tracked in MLflow.

Resume: the Ray run directory is named from a fingerprint of the training config. Re-running after an
interruption finds the same directory and continues from its latest checkpoint; a changed config gets
a fresh run. A crashed worker is restarted by Ray (``train.max_failures``) from the last checkpoint.

Writes ``models/<model>/``: ``ray/`` (checkpoints), ``model.pt`` (final weights, loadable with
``weights_only=True``), ``run.json`` (MLflow run id, per-epoch history).
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch

from ctxseg.config import Params, flatten, params_to_dict, parse_params
from ctxseg.engine import (
    NonFiniteLossError,
    TrainState,
    build_optimizer,
    checkpoint_payload,
    format_eta,
    restore_from_payload,
    seed_everything,
    train_one_epoch,
    unwrap,
    validate,
)
from ctxseg.io import atomic_path, write_json
from ctxseg.models import build_segmentor
from pipeline import common

log = logging.getLogger("ctxseg.train")

CHECKPOINT_FILE = "state.pt"
NONFINITE_FILE = "nonfinite_loss.txt"  # left by rank 0 when the loss became NaN/inf
FAULT_ENV = "CTXSEG_FAULT_AT_ITERATION"  # tests: make rank 0 raise once at this iteration


# ---------------------------------------------------------------------------------------------
# what runs inside each Ray Train worker


def train_loop_per_worker(config: dict) -> None:
    """One DDP rank. ``config`` carries plain data only (params, absolute paths, MLflow ids)."""
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    common.setup_logging()
    _quiet_ray_report_log()
    params = parse_params(config["params"])
    model_name = config["model_name"]
    cfg = params.model_config_of(model_name)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(params.scaling.cpus_per_worker)))
    seed_everything(params.seed * 1000 + rank)
    device = ray.train.torch.get_device()

    train_set, train_loader, val_loader, num_classes = _loaders(params, Path(config["prepared"]), rank, world)
    model = build_segmentor(cfg, num_classes)
    if world > 1 and params.scaling.sync_batchnorm and device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = ray.train.torch.prepare_model(model)
    optimizer = build_optimizer(model, params.train)
    amp_dtype = _amp_dtype(params.train.amp, device)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None

    state = TrainState()
    checkpoint = ray.train.get_checkpoint()
    candidates = []
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            candidates.append(load_state(Path(ckpt_dir), device))
    if config.get("fallback_checkpoint"):
        # A driver stopped after a checkpoint was written but before Ray recorded it leaves a newer
        # checkpoint on disk than the one Ray offers: resume from whichever is further along.
        candidates.append(load_state(Path(config["fallback_checkpoint"]), device))
    payload = max(candidates, key=lambda p: p["state"]["iteration"], default=None)
    if payload is not None:
        state = restore_from_payload(payload, model, optimizer)
        if scaler is not None and "scaler" in payload:
            scaler.load_state_dict(payload["scaler"])
        if rank == 0:
            log.info("[%s] resumed from checkpoint at epoch %d, iteration %d", model_name, state.epoch, state.iteration)

    epochs = params.train.epochs
    iters_per_epoch = len(train_loader)
    total_iterations = epochs * iters_per_epoch
    tracker = _RankZeroTracker(config) if rank == 0 else None
    fault_at = config.get("fault_at_iteration")
    fault_marker = Path(config["run_dir"]) / ".fault_injected"

    def maybe_fail(iteration: int) -> None:
        if fault_at is not None and iteration == fault_at and rank == 0 and not fault_marker.exists():
            fault_marker.touch()
            raise RuntimeError(f"injected fault at iteration {iteration} ({FAULT_ENV})")

    started = time.perf_counter()
    start_iteration = state.iteration
    nodes = _count_nodes(world)

    def on_log(record: dict) -> None:
        if tracker is None:
            return
        done = state.iteration - start_iteration
        rate = (time.perf_counter() - started) / max(done, 1)
        eta = rate * (total_iterations - state.iteration)
        log.info(
            "[%s] epoch %d/%d it %d/%d loss %.4f lr %.5f %.1f img/s ETA %s",
            model_name, state.epoch + 1, epochs, state.iteration, total_iterations,
            record["loss"], record["lr"], record["images_per_s"], format_eta(eta),
        )
        tracker.log_metrics(record, step=state.iteration)

    try:
        for epoch in range(state.epoch, epochs):
            sampler = getattr(train_loader, "sampler", None)
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)
            train_set.set_epoch(epoch)  # augmentation depends on (seed, epoch, index) only
            summary = train_one_epoch(
                model, train_loader, optimizer, state, params.train, total_iterations,
                device=device, amp_dtype=amp_dtype, scaler=scaler, on_log=on_log, on_iteration=maybe_fail,
            )
            state.epoch = epoch + 1
            metrics: dict[str, Any] = {"epoch": state.epoch, "iteration": state.iteration}
            metrics.update({f"train_{k}": v for k, v in summary.items()})
            if state.epoch % params.train.val_every == 0 or state.epoch == epochs:
                val = validate(model, val_loader, num_classes, device=device)
                metrics.update({"val_mIoU": val["mIoU"], "val_pixAcc": val["pixAcc"], "val_mAcc": val["mAcc"]})
            spread = memory_rank_spread(model)
            if spread is not None:
                metrics["memory_rank_spread"] = spread
            metrics["num_nodes"] = nodes
            state.history.append(metrics)
            if tracker is not None:
                log.info("[%s] epoch %d/%d done: %s", model_name, state.epoch, epochs,
                         ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
                tracker.log_metrics({k: v for k, v in metrics.items() if k not in ("epoch", "iteration")},
                                    step=state.iteration)
                with tempfile.TemporaryDirectory() as tmp:
                    extra = {"scaler": scaler.state_dict()} if scaler is not None else None
                    torch.save(checkpoint_payload(model, optimizer, state, extra), Path(tmp) / CHECKPOINT_FILE)
                    tracker.log_checkpoint(Path(tmp))
                    ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))
            else:
                ray.train.report(metrics)
    except NonFiniteLossError as err:
        # Not retryable (a restart would meet the same NaN), so no worker raises: every rank saw the
        # same non-finite flag and returns; rank 0 leaves the message for the driver, which raises a
        # clear error. The last good checkpoint stays the latest one.
        log.error("[%s] %s", model_name, err)
        if rank == 0:
            (Path(config["run_dir"]) / NONFINITE_FILE).write_text(str(err), encoding="utf-8")
    finally:
        if tracker is not None:
            tracker.close()


def load_state(checkpoint_dir: Path, device: torch.device | str = "cpu") -> dict:
    """The training state saved in a checkpoint folder (tensors and plain data only)."""
    return torch.load(checkpoint_dir / CHECKPOINT_FILE, map_location=device, weights_only=True)


def _quiet_ray_report_log() -> None:
    """Ray Train V2 logs every report with all its metrics at INFO from a logger named after its
    source file (so LoggingConfig does not reach it); our epoch line already says it once."""
    try:
        from ray.train.v2._internal.execution import context as ray_context

        logging.getLogger(ray_context.__file__).setLevel(logging.WARNING)
    except ImportError:  # another Ray layout: keep its logs
        pass


def memory_rank_spread(model: torch.nn.Module) -> Optional[float]:
    """Largest difference of the MCIBI memory between ranks (0 when the exact DDP update works)."""
    import torch.distributed as dist

    buffers = [b for name, b in unwrap(model).named_buffers() if name.endswith("memory")]
    if not buffers:
        return None
    memory = buffers[0].detach().float().clone()
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return 0.0
    high, low = memory.clone(), memory.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    return float((high - low).abs().max())


def _count_nodes(world: int) -> int:
    """How many distinct Ray nodes the ranks run on."""
    import ray
    import torch.distributed as dist

    node = ray.get_runtime_context().get_node_id()
    if world == 1 or not (dist.is_available() and dist.is_initialized()):
        return 1
    nodes: list = [None] * world
    dist.all_gather_object(nodes, node)
    return len(set(nodes))


def _amp_dtype(setting: str, device: torch.device) -> Optional[torch.dtype]:
    if setting == "off" or device.type != "cuda":
        return None
    return torch.bfloat16 if setting == "bf16" else torch.float16


def _loaders(params: Params, prepared: Path, rank: int, world: int):
    import ray.train.torch
    from torch.utils.data import DataLoader, Subset

    from ctxseg.data import SegmentationDataset
    from ctxseg.data.transforms import build_eval_transform, build_train_transform

    train_set = SegmentationDataset(prepared, "train", build_train_transform(params.data))
    val_set = SegmentationDataset(prepared, "val", build_eval_transform(params.data))
    num_classes = int(train_set.meta["num_classes"])
    per_rank = max(1, params.train.batch_size // world)
    generator = torch.Generator().manual_seed(params.seed)
    train_loader = DataLoader(
        train_set, batch_size=per_rank, shuffle=True, drop_last=len(train_set) >= per_rank * world,
        num_workers=params.data.num_loader_workers, generator=generator,
        persistent_workers=params.data.num_loader_workers > 0,
    )
    train_loader = ray.train.torch.prepare_data_loader(train_loader)
    # Validation: an unpadded shard per rank (rank, rank + world, ...); confusion matrices are summed.
    shard = Subset(val_set, list(range(rank, len(val_set), world)))
    val_loader = DataLoader(shard, batch_size=1, shuffle=False, num_workers=0)
    return train_set, train_loader, val_loader, num_classes


class _RankZeroTracker:
    """MLflow logging from rank 0 only: metric histories, the latest checkpoint, system metrics."""

    def __init__(self, config: dict):
        from mlflow import MlflowClient

        self.client = MlflowClient(config["tracking_uri"])
        self.run_id = config["run_id"]
        self.logged_steps: dict[str, set[int]] = {}
        self.monitor = None
        if config.get("system_metrics"):
            try:
                from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

                self.monitor = SystemMetricsMonitor(self.run_id, resume_logging=True,
                                                    tracking_uri=config["tracking_uri"])
                self.monitor.start()
            except Exception as err:  # psutil missing or similar: training must go on
                log.warning("system metrics disabled: %s", err)

    def log_metrics(self, metrics: dict, step: int) -> None:
        """Log a point per metric, skipping (metric, step) pairs a previous attempt already logged: a
        resumed run replays the epochs after its checkpoint, with identical values (the RNG state is
        restored), so the history keeps one point per step."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = []
        for key, value in metrics.items():
            if not isinstance(value, (int, float)):
                continue
            if key not in self.logged_steps:
                self.logged_steps[key] = {m.step for m in self.client.get_metric_history(self.run_id, key)}
            if step in self.logged_steps[key]:
                continue
            self.logged_steps[key].add(step)
            batch.append(Metric(key, float(value), now, step))
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def log_checkpoint(self, directory: Path) -> None:
        self.client.log_artifacts(self.run_id, str(directory), artifact_path="checkpoint")

    def close(self) -> None:
        if self.monitor is not None:
            self.monitor.finish()


# ---------------------------------------------------------------------------------------------
# the driver


def run_name(params: Params, model_name: str) -> str:
    """MLflow run name that lines runs up in the comparison UI: ``<dataset>/<framework>+<context>``."""
    cfg = params.model_config_of(model_name)
    name = f"{params.data.name}/{cfg.framework}+{cfg.context}"
    canonical = cfg.framework if cfg.context == "none" else f"{cfg.framework}_{cfg.context}"
    return name if model_name == canonical else f"{name} [{model_name}]"


def training_fingerprint(params: Params, model_name: str) -> str:
    """What determines a training run's result; a change means the old checkpoints cannot be resumed."""
    plain = params_to_dict(params)
    return common.fingerprint({
        "model": plain["models"][model_name],
        "train": {k: v for k, v in plain["train"].items() if k not in ("log_every", "max_failures")},
        "data": plain["data"],
        "seed": plain["seed"],
        "world": plain["scaling"]["num_workers"],
    })


def _resolve_use_gpu(params: Params) -> bool:
    import ray

    if params.scaling.use_gpu != "auto":
        return bool(params.scaling.use_gpu)
    return ray.cluster_resources().get("GPU", 0) >= 1


def _storage(params: Params, model_dir: Path) -> str:
    if params.ray.storage_path:
        storage = params.ray.storage_path.rstrip("/")
        return f"{storage}/{model_dir.name}"
    return str(model_dir / "ray")


def _warn_node_local_storage(params: Params, storage: str) -> None:
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) > 1 and "://" not in storage:
        log.warning(
            "the Ray cluster has %d nodes but checkpoints go to the node-local path %s. Set ray.storage_path "
            "to a shared file system path (NFS) or an s3:// URI, or restarted workers on other nodes "
            "cannot find their checkpoint.", len(nodes), storage,
        )


def make_trainer(params: Params, model_name: str, paths: common.Paths, *, run_dir: Path, run_id: str,
                 storage: str, name: str, fallback: Optional[Path] = None, callbacks: Optional[list] = None):
    """The TorchTrainer of one training run; shared by the train stage and every Tune trial."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    use_gpu = _resolve_use_gpu(params)
    resources = {"CPU": params.scaling.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = params.scaling.gpus_per_worker
    fault = os.environ.get(FAULT_ENV)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "params": params_to_dict(params), "model_name": model_name, "prepared": str(paths.prepared),
            "run_dir": str(run_dir), "tracking_uri": common.mlflow_tracking_uri(params, paths.root),
            "run_id": run_id, "system_metrics": params.mlflow.system_metrics,
            "fault_at_iteration": int(fault) if fault else None,
            "fallback_checkpoint": str(fallback) if fallback else None,
        },
        scaling_config=ScalingConfig(num_workers=params.scaling.num_workers, use_gpu=use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=name, storage_path=storage, callbacks=callbacks,
            failure_config=FailureConfig(max_failures=params.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=params.train.checkpoints_to_keep),
            # Ray Train's own INFO lines repeat every reported metric; ours already say it once.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )


def train_model(params: Params, model_name: str, paths: common.Paths) -> dict:
    """Train ``model_name`` (resuming if its run was interrupted); return the run summary."""
    import mlflow

    cfg = params.model_config_of(model_name)
    meta = common.dataset_meta(paths)
    num_classes = int(meta["num_classes"])
    build_segmentor(cfg, num_classes)  # fail on a bad architecture config before Ray starts

    model_dir = paths.model_dir(model_name)
    model_dir.mkdir(parents=True, exist_ok=True)
    fp = training_fingerprint(params, model_name)
    run_file = model_dir / "run.json"
    previous = common.read_json(run_file, "", "") if run_file.is_file() else {}
    resumable = previous.get("fingerprint") == fp and previous.get("status") == "running"
    storage = _storage(params, model_dir)
    ray_name = f"run-{fp}"
    if not resumable:
        _clear_run_dir(storage, model_dir)

    root = paths.root
    experiment_id = common.mlflow_experiment(params, root)
    tracking_uri = common.mlflow_tracking_uri(params, root)
    client = mlflow.MlflowClient(tracking_uri)
    if resumable and previous.get("run_id"):
        run_id = previous["run_id"]
        client.update_run(run_id, status="RUNNING")
        log.info("[%s] resuming interrupted run %s (MLflow run %s)", model_name, ray_name, run_id)
    else:
        common.close_superseded_run(client, previous, "run_id", f"[{model_name}]")
        run_id = create_run(client, experiment_id, params, model_name, root, run_name(params, model_name),
                            {"stage": "train"})
    write_json(run_file, {"model": model_name, "fingerprint": fp, "status": "running", "run_id": run_id,
                          "experiment_id": experiment_id, "ray_run": f"{storage}/{ray_name}"})
    # After run.json names the run: a stage interrupted while logging them completes them on resume.
    log_run_params(client, run_id, params, model_name)

    (model_dir / NONFINITE_FILE).unlink(missing_ok=True)
    fallback = latest_checkpoint_on_disk(Path(storage) / ray_name) if resumable and "://" not in storage else None
    mode = common.init_ray(params)
    _warn_node_local_storage(params, storage)
    trainer = make_trainer(params, model_name, paths, run_dir=model_dir, run_id=run_id, storage=storage,
                           name=ray_name, fallback=fallback)
    log.info("[%s] Ray Train (%s Ray, %d worker(s), gpu=%s) -> %s/%s", model_name, mode,
             params.scaling.num_workers, trainer.scaling_config.use_gpu, storage, ray_name)
    try:
        result = trainer.fit()
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    nonfinite = model_dir / NONFINITE_FILE
    if nonfinite.is_file():
        client.set_terminated(run_id, status="FAILED")
        kept = f" Last good checkpoint: {result.checkpoint.path}." if result.checkpoint else ""
        raise NonFiniteLossError(f"[{model_name}] {nonfinite.read_text(encoding='utf-8')}{kept}")
    if result.checkpoint is None:
        client.set_terminated(run_id, status="FAILED")
        raise RuntimeError(f"[{model_name}] training finished without a checkpoint")

    with result.checkpoint.as_directory() as ckpt_dir:
        payload = load_state(Path(ckpt_dir))
    state = TrainState(**payload["state"])
    final = {"model": payload["model"], "model_config": cfg.model_dump(mode="json"), "model_name": model_name,
             "num_classes": num_classes, "dataset": params.data.name, "class_names": list(meta["class_names"])}
    with atomic_path(model_dir / "model.pt") as tmp:
        torch.save(final, tmp)
    if params.mlflow.log_model:
        _log_final_model(client, run_id, tracking_uri, cfg, num_classes, payload["model"])
    client.set_terminated(run_id, status="FINISHED")
    summary = {"model": model_name, "fingerprint": fp, "status": "finished", "run_id": run_id,
               "experiment_id": experiment_id, "ray_run": f"{storage}/{ray_name}", "history": state.history,
               "epochs": state.epoch, "iterations": state.iteration}
    write_json(run_file, summary)
    last = state.history[-1] if state.history else {}
    log.info("[%s] finished: %d epochs, val mIoU %.4f, MLflow run %s", model_name, state.epoch,
             last.get("val_mIoU", float("nan")), run_id)
    return summary


def latest_checkpoint_on_disk(run_dir: Path) -> Optional[Path]:
    """The newest complete checkpoint folder of a Ray run directory (by training epoch), if any.

    Ray records checkpoints in its snapshot only after they are persisted; a driver stopped in between
    leaves a complete checkpoint that Ray alone would not resume from.
    """
    best, best_epoch = None, -1
    for candidate in sorted(run_dir.glob("checkpoint_*")):
        try:
            payload = load_state(candidate)
        except Exception:  # a half-copied checkpoint: skip it
            continue
        epoch = int(payload["state"]["epoch"])
        if epoch > best_epoch:
            best, best_epoch = candidate, epoch
    return best


def _clear_run_dir(storage: str, model_dir: Path) -> None:
    """Start afresh: remove old checkpoints (the config changed or the previous run had finished)."""
    for stale in ("model.pt", ".fault_injected", NONFINITE_FILE):
        (model_dir / stale).unlink(missing_ok=True)
    if "://" in storage:
        import pyarrow.fs

        fs, path = pyarrow.fs.FileSystem.from_uri(storage)
        try:
            fs.delete_dir(path)
        except (FileNotFoundError, OSError):
            pass
    else:
        shutil.rmtree(storage, ignore_errors=True)


def create_run(client, experiment_id: str, params: Params, model_name: str, root: Path, name: str,
               tags: dict) -> str:
    """Create the MLflow run of one training run (train stage or Tune trial), tagged; return its id.

    Its params are logged separately (:func:`log_run_params`), once the caller has recorded the id
    where a resume finds it."""
    cfg = params.model_config_of(model_name)
    commit = common.git_commit(root)
    run = client.create_run(experiment_id, run_name=name, tags={
        "model": model_name, "dataset": params.data.name, "framework": cfg.framework, "context": cfg.context,
        "mlflow.source.git.commit": commit, "git_commit": commit, **tags,
    })
    return run.info.run_id


def log_run_params(client, run_id: str, params: Params, model_name: str, extra: Optional[dict] = None) -> None:
    """Log a training run's resolved params (plus ``extra``, e.g. a trial's ``tune.*`` values) to its
    MLflow run; idempotent (:func:`common.log_params`), so a resume calls it again."""
    plain = params_to_dict(params)
    plain["model"] = plain["models"][model_name]  # the resolved config of this model
    plain.pop("models")
    flat = {**flatten(plain), "model_name": model_name, **(extra or {})}
    common.log_params(client, run_id, flat)


def _log_final_model(client, run_id: str, tracking_uri: str, cfg, num_classes: int, state_dict: dict) -> None:
    import mlflow

    model = build_segmentor(cfg, num_classes)
    model.load_state_dict(state_dict)
    model.eval()
    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run(run_id=run_id):
        # Naming the requirements skips MLflow's inference, which imports the model in a subprocess:
        # 3 s of every train stage here (0.03 s with the list).
        mlflow.pytorch.log_model(model, name="model", serialization_format="pickle",
                                 pip_requirements=_model_requirements())


def _model_requirements() -> list[str]:
    """What loading the pickled model needs, pinned to the installed versions (the list MLflow infers)."""
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for package in ("torch", "numpy", "cloudpickle", "mlflow", "ctxseg"):
        try:
            pins.append(f"{package}=={version(package).split('+')[0]}")  # no local label (2.13.0+cpu)
        except PackageNotFoundError:
            pins.append(package)
    return pins


@common.stage
def main(argv: Optional[list[str]] = None) -> None:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a key of `models` in params.yaml")
    args = parser.parse_args(argv)
    params = common.load_stage_params(args.params)
    params.model_config_of(args.model)
    paths = common.Paths(params)
    train_model(params, args.model, paths)


if __name__ == "__main__":
    raise SystemExit(main())
