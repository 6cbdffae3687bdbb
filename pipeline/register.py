"""DVC stage ``register``: the best model (by its mean single-scale mIoU over seeds) into the MLflow Model
Registry; of that model, the weights of its best seed.

The models' mIoU and MLflow run ids are read from ``metrics/<model>.details.json`` (the evaluate
stage's full record; ``metrics/<model>.json`` is the DVC metrics file with the headline numbers only).

Registers the run artifact ``model/model.pt`` of the best model's training run (the weights-only
model file, checked with :func:`ctxseg.checkpoint.read_model_file` before it is registered) as a
version of ``report.registered_model_name`` (default ``ctxseg-<data.name>``) and points the alias
``best`` at it, so that ``ctxseg-predict --model models:/<name>@best`` loads it.

Writes ``registry/best.json``: what happened (``status``: registered / reused / skipped / failed,
with ``reason``), the model, its mIoU and run, the registered name, version, alias and URI. The
stage never fails because of MLflow: an unreachable store is recorded there, and ``report`` shows it.
Idempotent: a version already registered from the same run is reused.
"""
from __future__ import annotations

import logging
from typing import Optional

from ctxseg.config import Params
from ctxseg.io import write_json
from ctxseg.report import miou_of
from ctxseg.sweep import finite
from ctxseg.study import REGISTRY_RECORD, StudyLayout, collect_results
from pipeline import common
from pipeline.mlflow_tracking import mlflow_store
from pipeline.mlflow_tracking.model_store import MODEL_ARTIFACT, MODEL_ARTIFACT_DIR, download_model_file, reachable_client

log = logging.getLogger("ctxseg.register")

ALIAS = "best"


def register_best_model(params: Params, paths: common.Paths, records: list[dict]) -> dict:
    """Register the best record's model artifact and point alias ``best`` at it; never raises."""
    scored = [r for r in records if finite(miou_of(r))]
    if not scored:
        return {"status": "skipped", "reason": "no model has a finite mIoU"}
    best = max(scored, key=miou_of)
    seeds = [s for s in best["metrics"].get("seeds", []) if finite(s.get("mIoU"))]
    top = max(seeds, key=lambda s: s["mIoU"]) if seeds else {"mIoU": miou_of(best), "run_id": best["run_id"]}
    out = {"model": best["name"], "mean_mIoU": miou_of(best), "seeds": len(seeds), "seed": top.get("seed"),
           "mIoU": top["mIoU"], "run_id": top.get("run_id")}
    if not params.report.register_model:
        return {**out, "status": "skipped", "reason": "`report.register_model` is false"}
    if not out["run_id"]:
        return {**out, "status": "skipped", "reason": f"{best['name']} seed {out['seed']} has no MLflow run "
                                                      f"(models/{best['name']}/seeds/{out['seed']}/run.json)"}
    name = params.report.registered_model_name or f"ctxseg-{params.data.name}"
    out["registered_model"] = name
    client = reachable_client(params, paths)
    if client is None:
        return {**out, "status": "failed", "reason": "the MLflow tracking store cannot be reached"}
    try:
        run_id = out["run_id"]
        if MODEL_ARTIFACT not in {a.path for a in client.list_artifacts(run_id, MODEL_ARTIFACT_DIR)}:
            return {**out, "status": "skipped", "reason": f"run {run_id} logged no model (no `{MODEL_ARTIFACT}` "
                                                          "artifact; was `mlflow.log_model` false?)"}
        tracking = mlflow_store.tracking_uri(params, paths.root)
        download_model_file(f"runs:/{run_id}/{MODEL_ARTIFACT}", tracking)  # weights only: refuse anything else
        source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{MODEL_ARTIFACT_DIR}"
        version, status = _existing_version(client, name, run_id, source), "reused"
        if version is None:
            if not client.search_registered_models(f"name = '{name}'"):
                client.create_registered_model(name, description="best ctxseg model by validation mIoU")
            version = client.create_model_version(name, source=source, run_id=run_id,
                                                  tags={"model": best["name"], "dataset": params.data.name,
                                                        "seed": str(out["seed"])})
            status = "registered"
        client.set_registered_model_alias(name, ALIAS, version.version)
        client.set_model_version_tag(name, version.version, "mIoU", f"{out['mIoU']:.6f}")
        client.set_model_version_tag(name, version.version, "mean_mIoU_over_seeds", f"{miou_of(best):.6f}")
        client.set_model_version_tag(name, version.version, "model", best["name"])
        # the run-relative form: true wherever the repo (and its default store) is moved or copied
        return {**out, "status": status, "version": str(version.version), "alias": ALIAS,
                "source": f"runs:/{run_id}/{MODEL_ARTIFACT_DIR}", "uri": f"models:/{name}@{ALIAS}"}
    except Exception as err:  # a bad artifact (ModelFileError) or the store failing half-way
        log.warning("could not register %s in the MLflow Model Registry: %s", best["name"], err)
        return {**out, "status": "failed", "reason": f"{type(err).__name__}: {err}"}


def _existing_version(client, name: str, run_id: str, source: str):
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except Exception:  # the registered model does not exist yet
        return None
    return next((v for v in versions if v.run_id == run_id and v.source in (source, f"runs:/{run_id}/model")), None)


def register(params: Params, paths: common.Paths) -> dict:
    """Register the study's best model and write ``registry/best.json``; return its content."""
    result = register_best_model(params, paths, collect_results(params, StudyLayout.from_paths(paths)))
    write_json(paths.root / REGISTRY_RECORD, result)
    if result["status"] in ("registered", "reused"):
        log.info("%s %s version %s as %s (%s)", result["status"], result["model"], result["version"], result["uri"],
                 result["source"])
    else:
        log.warning("best model %s not registered: %s", result.get("model", "–"), result["reason"])
    return result


@common.stage
def main(argv: Optional[list[str]] = None) -> None:
    args = common.base_parser(__doc__.splitlines()[0]).parse_args(argv)
    params = common.load_stage_params(args.params)
    register(params, common.Paths(params))


if __name__ == "__main__":
    raise SystemExit(main())
