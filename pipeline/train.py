"""DVC stage ``train@<model>``: train one model of params.yaml with Ray Train (DDP), tracked in MLflow.

Resume: the Ray run directory is named from a fingerprint of the training config. Re-running after an
interruption finds the same directory and continues from its newest complete checkpoint; a changed
config gets a fresh run. A crashed worker is restarted by Ray (``train.max_failures``) from the newest
checkpoint that exists at that moment.

Writes ``models/<model>/``: ``model.pt`` (:mod:`ctxseg.checkpoint` model file) and ``run.json`` (MLflow
run id, per-epoch history), both DVC-cached outputs, so ``dvc exp apply``, ``dvc checkout`` and ``dvc
push/pull`` bring back the weights that match an experiment's metrics; and ``ray/``, the stage's working
state (git-ignored, not a DVC output, so DVC never deletes it): the checkpoints (unless
``ray.storage_path`` names shared storage) and ``resume.json``, the record an interrupted run resumes
from (DVC deletes the cached outputs before it re-runs a stage).
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Optional

from ctxseg.checkpoint import load_training_checkpoint, write_model_file
from ctxseg.config import Params, params_to_dict
from ctxseg.engine import TrainState
from ctxseg.io import write_json
from ctxseg.models import build_segmentor
from pipeline import common, dataset_access, mlflow_store, ray_env, tracking
from pipeline.ray_train import fatal_error_of, fit_or_explain, make_trainer
from pipeline.run_storage import clear_storage, remove_incomplete_checkpoints

log = logging.getLogger("ctxseg.train")


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


def storage_of(params: Params, model_dir: Path) -> str:
    """Where this model's Ray runs keep checkpoints: ``ray.storage_path/<model>`` or ``models/<model>/ray``."""
    if params.ray.storage_path:
        return f"{params.ray.storage_path.rstrip('/')}/{model_dir.name}"
    return str(model_dir / "ray")


def warn_node_local_storage(storage: str) -> None:
    nodes = ray_env.alive_nodes()
    if len(nodes) > 1 and "://" not in storage:
        log.warning("the Ray cluster has %d nodes but checkpoints go to %s: unless every node mounts it, set "
                    "ray.storage_path to a shared mount or an s3:// URI (README \"Scaling out\").", len(nodes), storage)


def train_model(params: Params, model_name: str, paths: common.Paths, *,
                worker_callbacks: Optional[list] = None) -> dict:
    """Train ``model_name`` (resuming if its run was interrupted); return the run summary.

    ``worker_callbacks``: extra :class:`ctxseg.engine.Callback` objects run in every worker."""
    import mlflow

    cfg = params.model_config_of(model_name)
    meta = common.dataset_meta(paths)
    num_classes = int(meta["num_classes"])
    build_segmentor(cfg, num_classes)  # fail on a bad architecture config before Ray starts

    model_dir = paths.model_dir(model_name)
    model_dir.mkdir(parents=True, exist_ok=True)
    fp = training_fingerprint(params, model_name)
    resume_file = model_dir / "ray" / "resume.json"
    previous = common.read_json(resume_file, "", "") if resume_file.is_file() else {}
    resumable = previous.get("fingerprint") == fp and previous.get("status") == "running"
    storage, ray_name = storage_of(params, model_dir), f"run-{fp}"
    (model_dir / "model.pt").unlink(missing_ok=True)
    (model_dir / "run.json").unlink(missing_ok=True)
    if not resumable:
        clear_storage(storage, ray_name)
        if "://" not in storage:
            shutil.rmtree(storage, ignore_errors=True)

    uri = mlflow_store.tracking_uri(params, paths.root)
    experiment_id = mlflow_store.experiment_id(params, paths.root)
    client = mlflow.MlflowClient(uri)
    if resumable and previous.get("run_id"):
        run_id = previous["run_id"]
        client.update_run(run_id, status="RUNNING")
        log.info("[%s] resuming interrupted run %s (MLflow run %s)", model_name, ray_name, run_id)
    else:
        tracking.close_superseded_run(client, previous, "run_id", f"[{model_name}]")
        run_id = tracking.create_run(client, experiment_id, params, model_name,
                                     mlflow_store.run_tags(common.git_commit(paths.root)),
                                     tracking.run_name(params, model_name) + mlflow_store.experiment_label(),
                                     {"stage": "train"})
    record = {"model": model_name, "fingerprint": fp, "status": "running", "run_id": run_id,
              "experiment_id": experiment_id, "ray_run": common.repo_relative(f"{storage}/{ray_name}", paths.root)}
    resume_file.parent.mkdir(parents=True, exist_ok=True)
    write_json(resume_file, record)
    # After resume.json names the run: a stage interrupted while logging them completes them on resume.
    tracking.log_run_params(client, run_id, params, model_name)

    mode = ray_env.init_ray(params, paths.root, params.ray.num_cpus)
    warn_node_local_storage(storage)
    dataset = dataset_access.publish(paths.prepared, params.ray.data_path)
    store = tracking.start_store_actor(uri)
    trainer = make_trainer(params, model_name, dataset=dataset, store=store, run_id=run_id, storage=storage,
                           name=ray_name, worker_callbacks=worker_callbacks)
    log.info("[%s] Ray Train (%s Ray, %d worker(s), gpu=%s) -> %s/%s", model_name, mode,
             params.scaling.num_workers, trainer.scaling_config.use_gpu, storage, ray_name)
    result = fit_or_explain(trainer, client, run_id, f"[{model_name}]", f"{storage}/{ray_name}",
                            params.train.max_failures)
    fatal = fatal_error_of(store, run_id, model_name)
    if fatal is not None or result.checkpoint is None:
        for partial in remove_incomplete_checkpoints(storage, ray_name):
            log.info("[%s] removed the incomplete checkpoint %s", model_name, partial)
        client.set_terminated(run_id, status="FAILED")
        raise fatal or RuntimeError(f"[{model_name}] training finished without a checkpoint")

    with result.checkpoint.as_directory() as ckpt_dir:
        payload = load_training_checkpoint(Path(ckpt_dir))
        client.log_artifacts(run_id, ckpt_dir, artifact_path="checkpoint")  # the final training state
    state = TrainState(**payload["state"])
    model_file = write_model_file(model_dir / "model.pt", weights=payload["model"],
                                  model_config=cfg.model_dump(mode="json"), num_classes=num_classes,
                                  class_names=list(meta["class_names"]), dataset=params.data.name,
                                  model_name=model_name)
    if params.mlflow.log_model:  # the model file itself: weights + config, loadable with weights_only=True
        client.log_artifact(run_id, model_file.source, artifact_path="model")
    client.set_terminated(run_id, status="FINISHED")
    summary = {**record, "status": "finished", "history": state.history, "epochs": state.epoch,
               "iterations": state.iteration}
    write_json(model_dir / "run.json", summary)
    write_json(resume_file, {**record, "status": "finished"})
    last = state.history[-1] if state.history else {}
    log.info("[%s] finished: %d epochs, val mIoU %.4f, MLflow run %s", model_name, state.epoch,
             last.get("val_mIoU", float("nan")), run_id)
    return summary


@common.stage
def main(argv: Optional[list[str]] = None) -> None:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a key of `models` in params.yaml")
    args = parser.parse_args(argv)
    params = common.load_stage_params(args.params)
    params.model_config_of(args.model)
    train_model(params, args.model, common.Paths(params))


if __name__ == "__main__":
    raise SystemExit(main())
