"""DVC stage ``train@<model>``: train one model of params.yaml once per seed of ``seeds``, with Ray
Train (DDP), tracked in MLflow.

The seeds run one after another in one process, so Ray starts once per stage, the dataset is published
once and one MLflow store actor serves them all. In MLflow the model is a parent run (``<dataset>/
<framework>+<context>``) with one nested run per seed (``... seed <s>``): the UI groups a model's seeds
under it, and the evaluate stage logs their mean and standard deviation to it.

Resume: each seed's Ray run directory is named from a fingerprint of its training config. Re-running
after an interruption finds the same directory and continues from its newest complete checkpoint; a
changed config gets a fresh run. A seed that had finished is not trained again: its model file is
rebuilt from its final checkpoint (DVC deletes the stage's outputs before it re-runs it). A crashed
worker is restarted by Ray (``train.max_failures``) from the newest checkpoint that exists at that moment.

Writes ``models/<model>/seeds/<seed>/``: ``model.pt`` (:mod:`ctxseg.checkpoint` model file) and
``run.json`` (MLflow run id, per-epoch history), a DVC-cached output, so ``dvc exp apply``, ``dvc
checkout`` and ``dvc push/pull`` bring back the weights that match an experiment's metrics; and
``models/<model>/ray/``, the stage's working state (git-ignored, not a DVC output, so DVC never deletes
it): ``group.json`` (the parent MLflow run) and per seed ``seed<s>/`` with the checkpoints (unless
``ray.storage_path`` names shared storage) and ``resume.json``, the record an interrupted run resumes from.
"""
from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path
from typing import Optional

from ctxseg.checkpoint import load_training_checkpoint, write_model_file
from ctxseg.config import Params, params_to_dict
from ctxseg.engine import TrainState
from ctxseg.io import write_json
from ctxseg.models import build_segmentor
from pipeline import common
from pipeline.storage import dataset_access
from pipeline.mlflow_tracking import mlflow_store, tracking
from pipeline.ray_cluster import ray_env
from pipeline.ray_cluster.ray_train import fatal_error_of, fit_or_explain, make_trainer
from pipeline.storage.filesystems import check_ray_storage
from pipeline.storage.run_storage import clear_storage, newest_checkpoint, remove_incomplete_checkpoints

log = logging.getLogger("ctxseg.train")


def training_fingerprint(params: Params, model_name: str) -> str:
    """What determines a training run's result; a change means the old checkpoints cannot be resumed."""
    plain = params_to_dict(params)
    return common.fingerprint({
        "model": plain["models"][model_name],
        "train": {k: v for k, v in plain["train"].items() if k not in ("log_every", "max_failures")},
        "data": plain["data"],
        "seed": params.seed,
        "world": plain["scaling"]["num_workers"],
    })


def code_fingerprint() -> str:
    """A hash of the code a training runs (``ctxseg/`` and ``pipeline/`` sources): a seed that had finished
    is reused only while it is unchanged."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted([*(root / "ctxseg").rglob("*.py"), *(root / "pipeline").rglob("*.py")]):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):  # editor / notebook litter, as in .dvcignore
            continue
        digest.update(rel.as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def storage_of(params: Params, model_dir: Path) -> str:
    """Where a seed's Ray runs keep checkpoints: ``ray.storage_path/<model>/seed<s>`` or
    ``models/<model>/ray/seed<s>``."""
    if params.ray.storage_path:
        return f"{params.ray.storage_path.rstrip('/')}/{model_dir.name}/seed{params.seed}"
    return str(model_dir / "ray" / f"seed{params.seed}")


def warn_node_local_storage(storage: str) -> None:
    nodes = ray_env.alive_nodes()
    if len(nodes) > 1 and "://" not in storage:
        log.warning("the Ray cluster has %d nodes but checkpoints go to %s: unless every node mounts it, set "
                    "ray.storage_path to a shared mount or an s3:// URI (docs/cluster.md).", len(nodes), storage)


class SeedRun:
    """One seed's training run: its resume record, checkpoint storage and MLflow run (nested in the model's)."""

    def __init__(self, params: Params, model_name: str, paths: common.Paths, code: Optional[str] = None):
        self.params, self.model_name, self.seed = params, model_name, params.seed
        self.code = code or code_fingerprint()  # the stage hashes its code once and passes it to every seed
        self.tag = f"[{model_name} seed {self.seed}]"
        self.fingerprint = training_fingerprint(params, model_name)
        model_dir = paths.model_dir(model_name)
        self.storage, self.ray_name = storage_of(params, model_dir), f"run-{self.fingerprint}"
        self.out_dir = paths.seed_dir(model_name, self.seed)
        self.resume_file = model_dir / "ray" / f"seed{self.seed}" / "resume.json"
        self.previous = common.read_json(self.resume_file, "", "") if self.resume_file.is_file() else {}
        same = self.previous.get("fingerprint") == self.fingerprint
        self.resumable = same and self.previous.get("status") == "running"
        self.finished = same and self.previous.get("status") == "finished" \
            and self.previous.get("code") == self.code

    def open(self, client, experiment_id: str, parent_run_id: str, root: Path) -> dict:
        """Create (or, resuming, reopen) the seed's MLflow run and write its resume record."""
        if self.resumable and self.previous.get("run_id"):
            run_id = self.previous["run_id"]
            client.update_run(run_id, status="RUNNING")
            log.info("%s resuming interrupted run %s (MLflow run %s)", self.tag, self.ray_name, run_id)
        else:
            tracking.close_superseded_run(client, self.previous, "run_id", self.tag)
            clear_storage(self.storage, self.ray_name)
            if "://" not in self.storage:
                shutil.rmtree(self.storage, ignore_errors=True)
            run_id = tracking.create_run(
                client, experiment_id, self.params, self.model_name, mlflow_store.run_tags(common.git_commit(root)),
                f"{tracking.run_name(self.params, self.model_name)} seed {self.seed}{mlflow_store.experiment_label()}",
                {"stage": "train", "seed": str(self.seed), "mlflow.parentRunId": parent_run_id})
        record = {"model": self.model_name, "seed": self.seed, "fingerprint": self.fingerprint,
                  "code": self.code, "status": "running",
                  "run_id": run_id, "parent_run_id": parent_run_id, "experiment_id": experiment_id,
                  "ray_run": common.repo_relative(f"{self.storage}/{self.ray_name}", root)}
        self.resume_file.parent.mkdir(parents=True, exist_ok=True)
        write_json(self.resume_file, record)
        # After resume.json names the run: a stage interrupted while logging them completes them on resume.
        tracking.log_run_params(client, run_id, self.params, self.model_name, {"seed": self.seed})
        return record

    def final_state(self) -> Optional[dict]:
        """The final checkpoint of a seed that had finished with this config (None: train it again)."""
        if not self.finished:
            return None
        payload = newest_checkpoint(self.storage, self.ray_name, None)
        epochs = self.params.train.epochs
        return payload if payload is not None and payload["state"].get("epoch") == epochs else None

    def write_outputs(self, payload: dict, record: dict, cfg, meta: dict):
        """``model.pt`` and ``run.json`` of this seed from its final training state; returns (summary, file)."""
        state = TrainState(**payload["state"])
        model_file = write_model_file(self.out_dir / "model.pt", weights=payload["model"],
                                      model_config=cfg.model_dump(mode="json"), num_classes=int(meta["num_classes"]),
                                      class_names=list(meta["class_names"]), dataset=self.params.data.name,
                                      model_name=self.model_name)
        summary = {**record, "status": "finished", "history": state.history, "epochs": state.epoch,
                   "iterations": state.iteration}
        write_json(self.out_dir / "run.json", summary)
        write_json(self.resume_file, {**record, "status": "finished"})
        return summary, model_file


def open_model_run(params: Params, model_name: str, model_dir: Path, client, experiment_id: str,
                   root: Path) -> str:
    """The model's parent MLflow run, which groups its seeds: reused while the model's training config
    (seed aside) and its list of seeds are unchanged, else created."""
    group_file = model_dir / "ray" / "group.json"
    key = common.fingerprint({"config": training_fingerprint(params.for_seed(0), model_name), "seeds": params.seeds})
    previous = common.read_json(group_file, "", "") if group_file.is_file() else {}
    if previous.get("fingerprint") == key and previous.get("run_id"):
        try:
            client.update_run(previous["run_id"], status="RUNNING")
            return previous["run_id"]
        except Exception as err:  # the store no longer holds it (deleted, or another store): start a new one
            log.warning("[%s] the model's MLflow run %s is gone (%s); creating a new one", model_name,
                        previous["run_id"], type(err).__name__)
    tracking.close_superseded_run(client, previous, "run_id", f"[{model_name}]")
    run_id = tracking.create_run(client, experiment_id, params, model_name,
                                 mlflow_store.run_tags(common.git_commit(root)),
                                 tracking.run_name(params, model_name) + mlflow_store.experiment_label(),
                                 {"stage": "train", "seeds": ",".join(map(str, params.seeds))})
    group_file.parent.mkdir(parents=True, exist_ok=True)
    write_json(group_file, {"model": model_name, "fingerprint": key, "status": "running", "run_id": run_id})
    tracking.log_run_params(client, run_id, params, model_name)
    return run_id


def train_model(params: Params, model_name: str, paths: common.Paths, *,
                worker_callbacks: Optional[list] = None) -> list[dict]:
    """Train ``model_name`` once per seed of ``params.seeds`` (resuming a run that was interrupted, reusing
    a seed that had finished); return the runs' summaries, in the order of the seeds.

    ``worker_callbacks``: extra :class:`ctxseg.engine.Callback` objects run in every worker."""
    import mlflow

    cfg = params.model_config_of(model_name)
    meta = common.dataset_meta(paths)
    build_segmentor(cfg, int(meta["num_classes"]))  # fail on a bad architecture config before Ray starts

    # a cluster or store that does not answer: one line now, before any run is opened, not minutes of retries
    ray_env.check_cluster(params)
    check_ray_storage(params.ray)
    uri = mlflow_store.open_tracking(params, paths.root)
    model_dir = paths.model_dir(model_name)
    shutil.rmtree(model_dir / "seeds", ignore_errors=True)  # every seed's files are written anew below
    experiment_id = mlflow_store.experiment_id(params, paths.root)
    client = mlflow.MlflowClient(uri)
    parent_run_id = open_model_run(params, model_name, model_dir, client, experiment_id, paths.root)
    code = code_fingerprint()
    runs = [SeedRun(params.for_seed(seed), model_name, paths, code) for seed in params.seeds]

    summaries, started = [], None
    for run in runs:
        payload = run.final_state()
        if payload is not None:
            summary, _ = run.write_outputs(payload, {k: v for k, v in run.previous.items() if k != "status"}, cfg, meta)
            log.info("%s had finished: model file rebuilt from its final checkpoint", run.tag)
            summaries.append(summary)
            continue
        record = run.open(client, experiment_id, parent_run_id, paths.root)
        if started is None:  # Ray, the published dataset and the MLflow store actor: once per stage
            mode = ray_env.init_ray(params, paths.root, params.ray.num_cpus)
            started = (mode, dataset_access.publish(paths.prepared, params.ray.data_path),
                       tracking.start_store_actor(uri))
        mode, dataset, store = started
        warn_node_local_storage(run.storage)
        summaries.append(_fit(run, record, cfg, meta, client, mode, dataset, store, worker_callbacks))
    client.set_terminated(parent_run_id, status="FINISHED")
    write_json(model_dir / "ray" / "group.json",
               {**common.read_json(model_dir / "ray" / "group.json", "", ""), "status": "finished"})
    return summaries


def _fit(run: SeedRun, record: dict, cfg, meta: dict, client, mode: str, dataset, store,
         worker_callbacks: Optional[list]) -> dict:
    """Train one seed with Ray Train and write its outputs."""
    params, run_id = run.params, record["run_id"]
    trainer = make_trainer(params, run.model_name, dataset=dataset, store=store, run_id=run_id, storage=run.storage,
                           name=run.ray_name, worker_callbacks=worker_callbacks, stage_owns_ray=mode == "local")
    log.info("%s Ray Train (%s Ray, %d worker(s), gpu=%s) -> %s/%s", run.tag, mode,
             params.scaling.num_workers, trainer.scaling_config.use_gpu, run.storage, run.ray_name)
    result = fit_or_explain(trainer, client, run_id, run.tag, f"{run.storage}/{run.ray_name}",
                            params.train.max_failures)
    fatal = fatal_error_of(store, run_id, run.model_name)
    if fatal is not None or result.checkpoint is None:
        for partial in remove_incomplete_checkpoints(run.storage, run.ray_name):
            log.info("%s removed the incomplete checkpoint %s", run.tag, partial)
        client.set_terminated(run_id, status="FAILED")
        raise fatal or RuntimeError(f"{run.tag} training finished without a checkpoint")

    with result.checkpoint.as_directory() as ckpt_dir:
        payload = load_training_checkpoint(Path(ckpt_dir))
        client.log_artifacts(run_id, ckpt_dir, artifact_path="checkpoint")  # the final training state
    summary, model_file = run.write_outputs(payload, record, cfg, meta)
    if params.mlflow.log_model:  # the model file itself: weights + config, loadable with weights_only=True
        client.log_artifact(run_id, model_file.source, artifact_path="model")
    client.set_terminated(run_id, status="FINISHED")
    last = summary["history"][-1] if summary["history"] else {}
    log.info("%s finished: %d epochs, val mIoU %.4f, MLflow run %s", run.tag, summary["epochs"],
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
