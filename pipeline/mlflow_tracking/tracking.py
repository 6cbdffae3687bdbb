"""MLflow runs of the study: naming, creation, params, superseded runs, and a client any Ray node can use.

Only the process on the head (the stage's driver, or an actor pinned to its node) opens the user's
tracking store: a SQLite file or a folder exists on the head alone, and many writers on SQLite lock
each other. Every other process holds a :class:`RemoteClient`, which forwards each call to a
:class:`StoreActor` on the head (artifacts are logged by the driver, on the head). Per-step logging costs one actor call
per ``train.log_every`` iterations (see ``bench/pipeline.py``).
"""
from __future__ import annotations

import logging
from typing import Any, Optional

from ctxseg.config import Params, flatten, params_to_dict

log = logging.getLogger("ctxseg.tracking")

MLFLOW_PARAM_CHARS = 6000  # MLflow's limit on one param value
MLFLOW_BATCH_PARAMS = 100  # MLflow's limit on params per log_batch


def run_name(params: Params, model_name: str) -> str:
    """MLflow run name that lines runs up in the comparison UI: ``<dataset>/<framework>+<context>``."""
    cfg = params.model_config_of(model_name)
    name = f"{params.data.name}/{cfg.framework}+{cfg.context}"
    canonical = cfg.framework if cfg.context == "none" else f"{cfg.framework}_{cfg.context}"
    return name if model_name == canonical else f"{name} [{model_name}]"


def create_run(client, experiment_id: str, params: Params, model_name: str, origin: dict, name: str,
               tags: dict) -> str:
    """Create the MLflow run of one training run (train stage or Tune trial), tagged; return its id.

    ``origin``: :func:`pipeline.mlflow_tracking.mlflow_store.run_tags` of the stage's driver (git revision, DVC
    experiment). Its params are logged separately (:func:`log_run_params`), once the caller has
    recorded the id where a resume finds it."""
    cfg = params.model_config_of(model_name)
    run = client.create_run(experiment_id, run_name=name, tags={
        "model": model_name, "dataset": params.data.name, "framework": cfg.framework, "context": cfg.context,
        **origin, **tags,
    })
    return run.info.run_id


def log_params(client, run_id: str, flat: dict) -> None:
    """Log flat ``{key: value}`` params to an MLflow run in batches (``None`` as "null", long values cut).

    Idempotent: only params the run does not hold yet are sent, so a run whose set-up was interrupted
    part-way is completed by calling this again on resume. A value that differs from the logged one can
    only be a run setting (``ray.address``, ``mlflow.*``: not part of the run's fingerprint, e.g. fixed
    after a failed start); MLflow refuses to change a param, so the first value stays and the change is
    logged here."""
    from mlflow.entities import Param

    logged = client.get_run(run_id).data.params
    values = {k: ("null" if v is None else str(v))[:MLFLOW_PARAM_CHARS] for k, v in flat.items()}
    changed = sorted(k for k, v in values.items() if k in logged and logged[k] != v)
    if changed:
        log.info("run %s keeps its first value of %s (changed since: %s)", run_id, ", ".join(changed),
                 ", ".join(f"{k}={values[k]}" for k in changed))
    items = [Param(k, v) for k, v in sorted(values.items()) if k not in logged]
    for i in range(0, len(items), MLFLOW_BATCH_PARAMS):
        client.log_batch(run_id, params=items[i:i + MLFLOW_BATCH_PARAMS])


def log_run_params(client, run_id: str, params: Params, model_name: str, extra: Optional[dict] = None) -> None:
    """Log a training run's resolved params (plus ``extra``, e.g. a trial's ``tune.*`` values) to its
    MLflow run; idempotent (:func:`log_params`), so a resume calls it again."""
    plain = params_to_dict(params)
    plain["model"] = plain["models"][model_name]  # the resolved config of this model
    plain.pop("models")
    log_params(client, run_id, {**flatten(plain), "model_name": model_name, **(extra or {})})


def close_superseded_run(client, record: dict, run_key: str, what: str) -> None:
    """Close as KILLED the MLflow run of an interrupted stage that will not be resumed (its params changed).

    ``record`` is the stage's state file (``status`` "running" while interrupted, the run id under
    ``run_key``). A run killed hard stays RUNNING in MLflow forever otherwise; FAILED / FINISHED runs
    are left as they are."""
    run_id = record.get(run_key)
    if record.get("status") != "running" or not run_id:
        return
    try:
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, status="KILLED")
            log.info("%s params changed: interrupted MLflow run %s closed as KILLED, starting afresh", what, run_id)
    except Exception as err:  # the run may live in a tracking store no longer configured
        log.warning("%s could not close the superseded MLflow run %s: %s", what, run_id, err)


def log_metric_points(client, run_id: str, metrics: dict, step: int, logged: dict[str, set]) -> None:
    """Log one point per numeric metric at ``step``, skipping (metric, step) pairs already in the run's
    history (``logged`` caches it per key): a resumed run replays the epochs after its checkpoint with
    identical values, so the history keeps exactly one point per step."""
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = []
    for key, value in metrics.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        if key not in logged:
            logged[key] = {m.step for m in client.get_metric_history(run_id, key)}
        if step in logged[key]:
            continue
        logged[key].add(step)
        batch.append(Metric(key, float(value), now, step))
    if batch:
        client.log_batch(run_id, metrics=batch)


# ---------------------------------------------------------------------------------------------
# one store, reached from any node


class StoreActor:
    """An MlflowClient living on the head node (wrapped by ``ray.remote`` in :func:`start_store_actor`).

    It also carries errors that a restart would meet again (a non-finite loss, a dataset a node cannot
    read) from the workers to the driver: :meth:`record_fatal` / :meth:`fatal`, through Ray, no files."""

    def __init__(self, tracking_uri: str):
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri)
        self.logged: dict[str, dict[str, set]] = {}
        self.fatal_errors: dict[str, tuple[str, str]] = {}

    def record_fatal(self, run_id: str, kind: str, message: str) -> None:
        self.fatal_errors.setdefault(run_id, (kind, message))

    def fatal(self, run_id: str) -> Optional[tuple[str, str]]:
        return self.fatal_errors.get(run_id)

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.client, method)(*args, **kwargs)

    def log_metric_points(self, run_id: str, metrics: dict, step: int) -> None:
        log_metric_points(self.client, run_id, metrics, step, self.logged.setdefault(run_id, {}))


class RemoteClient:
    """The MlflowClient calls the study makes, forwarded to a :class:`StoreActor` (blocking)."""

    def __init__(self, actor):
        self.actor = actor
        self.logged: dict[str, dict[str, set]] = {}

    def __getattr__(self, method: str):
        import ray

        def forward(*args: Any, **kwargs: Any) -> Any:
            return ray.get(self.actor.call.remote(method, *args, **kwargs))

        return forward


def start_store_actor(tracking_uri: str):
    """A :class:`StoreActor` pinned to this (the driver's) node; it lives as long as the stage's Ray job."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    actor_cls = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(StoreActor)
    return actor_cls.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=here, soft=False),
    ).remote(tracking_uri)

