"""DVC stage ``evaluate@<model>``: validation-split metrics of a trained model, every seed of it.

Each seed's model (``models/<model>/seeds/<seed>/model.pt``) is scored on its own; the files hold the
model over its seeds. Writes (all atomically):

* ``metrics/<model>.json`` — the DVC metrics file: the headline numbers only, flat: the mean over seeds
  of ``mIoU``, ``pixAcc``, ``mAcc`` and, when enabled, the multi-scale + flip ``ms_flip_mIoU``, each with
  its standard deviation ``<name>_sd``, and the number of ``seeds``;
* ``metrics/<model>.details.json`` — the full record the register and report stages read (a plain
  output, :func:`ctxseg.evaluation.seeds_record`): model info and the MLflow ``run_id`` of the model's
  parent run, per-class IoU and accuracy and the ``ms_flip`` block (means over seeds), ``sd``, and
  under ``seeds`` every seed's own numbers and run;
* ``plots/<model>/per_class_iou.json`` (DVC bar plot: mean IoU, ms+flip IoU and accuracy per class),
  ``plots/<model>/confusion.png`` (DVC image plot) and ``plots/<model>/confusion.json`` (the
  pixel-count matrix summed over seeds, rows = ground truth);
* ``plots/<model>/predictions/<id>.png`` — palette PNGs (pixel value = class id) of a fixed sample,
  predicted by the first seed;
* ``plots/<model>/features.npz`` — the first seed's per-image class-mean features at the classifier
  input and, for MCIBI, its memory (the report's feature-space figure);

and logs each seed's metrics to its MLflow run, the means and standard deviations and these files to the
model's parent run. The loop and the records are
:mod:`ctxseg.evaluation`; the model file is read by :mod:`ctxseg.checkpoint` (``weights_only``).
"""
from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Optional

import torch

from ctxseg import evaluation
from ctxseg.checkpoint import load_model
from ctxseg.config import ConfigError, Params
from ctxseg.io import write_json
from pipeline import common
from pipeline.mlflow_tracking import mlflow_store

log = logging.getLogger("ctxseg.evaluate")


def evaluate_model(params: Params, model_name: str, paths: common.Paths) -> dict:
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from ctxseg.data import SegmentationDataset
    from ctxseg.data.transforms import build_eval_transform

    meta = common.dataset_meta(paths)
    num_classes, class_names = int(meta["num_classes"]), list(meta["class_names"])
    ev = params.evaluate
    # labels stay at their original resolution; predictions are resized to them (as mmseg scores)
    dataset = SegmentationDataset(paths.prepared, ev.split, build_eval_transform(params.data, resize_label=False))
    if len(dataset) == 0:
        raise ConfigError(f"{paths.prepared / (ev.split + '.txt')}: split {ev.split!r} is empty; nothing to evaluate")
    loader = DataLoader(dataset, batch_size=None, shuffle=False, num_workers=params.data.num_loader_workers)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    per_seed, first, first_model, confusion, parent_run_id = [], None, None, None, None
    for seed in params.seeds:
        model_file = paths.seed_dir(model_name, seed) / "model.pt"
        model, record = load_model(model_file, "cpu", num_classes)
        if record.class_names and list(record.class_names) != class_names:
            log.warning("[%s] %s was trained with class names %s, the prepared dataset has %s; scoring by class id",
                        model_name, model_file, record.class_names, class_names)
        model.to(device)
        keep = first is None  # the first seed's predictions and features stand for the model
        with tqdm(total=len(dataset), desc=f"evaluate {model_name} seed {seed}", unit="img",
                  dynamic_ncols=True) as bar:
            result = evaluation.evaluate(
                model, loader, num_classes=num_classes, ignore_index=int(meta.get("ignore_index", 255)),
                device=device, mode=ev.mode, crop_size=ev.crop_size, stride=ev.stride,
                scales=ev.scales if ev.multi_scale else None, flip=ev.flip, batch_size=ev.batch_size,
                keep_predictions=evaluation.sample_indices(len(dataset), ev.num_visualisations) if keep else [],
                keep_features=evaluation.sample_indices(len(dataset), ev.feature_images) if keep else [],
                progress=bar.update)
        report = evaluation.metrics_record(
            result, class_names, model=model_name, framework=record.model_config.get("framework"),
            context=record.model_config.get("context"), dataset=params.data.name, split=ev.split,
            num_params=sum(p.numel() for p in model.parameters()),
            inference={"mode": ev.mode, "crop_size": ev.crop_size, "stride": ev.stride, "device": device.type})
        run = _run_record(paths, model_name, seed)
        report.update(seed=seed, run_id=run.get("run_id"))
        parent_run_id = parent_run_id or run.get("parent_run_id")
        per_seed.append(report)
        matrix = result.single.matrix.cpu()
        confusion = matrix if confusion is None else confusion + matrix
        if keep:
            first, first_model = result, model
        log.info("[%s seed %d] mIoU %.4f pixAcc %.4f mAcc %.4f%s", model_name, seed, report["mIoU"],
                 report["pixAcc"], report["mAcc"],
                 f" | ms+flip mIoU {report['ms_flip']['mIoU']:.4f}" if "ms_flip" in report else "")

    study = evaluation.seeds_record(per_seed)
    if parent_run_id:
        study["run_id"] = parent_run_id
    plot_dir = paths.plots / model_name
    details_file = evaluation.details_file(paths.metrics, model_name)
    write_json(paths.metrics_file(model_name), evaluation.headline_metrics(study))
    write_json(details_file, study)
    write_json(plot_dir / "per_class_iou.json", evaluation.per_class_rows(study))
    evaluation.write_confusion(plot_dir, confusion, class_names,
                               f"{model_name}: confusion (row-normalised, {len(per_seed)} seed(s))")
    evaluation.write_predictions(plot_dir / "predictions", first.predictions, dataset.ids, meta["palette"])
    evaluation.write_features(plot_dir / "features.npz", first, class_names, evaluation.class_prototypes(first_model))
    if ev.log_mlflow:
        _log_to_mlflow(params, paths, model_name, study, plot_dir, details_file)
    sd = study["sd"].get("mIoU")
    log.info("[%s] over %d seed(s): mIoU %.4f%s", model_name, len(per_seed), study["mIoU"],
             f" ± {sd:.4f} (sd)" if sd is not None else " (one seed: no spread)")
    return study


def _run_record(paths: common.Paths, model_name: str, seed: int) -> dict:
    run_file = paths.seed_dir(model_name, seed) / "run.json"
    return common.read_json(run_file, "training run record", "Run `dvc repro train` first.") if run_file.is_file() else {}


def metric_key(name: str) -> str:
    """A class name as a valid MLflow metric-name fragment."""
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", name)


def _log_to_mlflow(params: Params, paths: common.Paths, model_name: str, study: dict, plot_dir: Path,
                   details_file: Path) -> None:
    """Each seed's metrics (``eval_*``, ``eval_iou/<class>``) to its own run; the means over seeds under the
    same names, their standard deviations (``eval_<name>_sd``) and the evaluation files to the model's
    parent run, so that the comparison view lines up models by their means and each seed beside them."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient(mlflow_store.open_tracking(params, paths.root))
    try:
        for seed in study["seeds"]:
            if seed.get("run_id"):
                _log_metrics(client, seed["run_id"], seed, seed["per_class_iou"])
        run_id = study.get("run_id")
        if not run_id:
            return
        means = {**evaluation.seed_headline(study), **{f"{k}_sd": v for k, v in study["sd"].items()}}
        _log_metrics(client, run_id, means, study["per_class_iou"])
        client.set_tag(run_id, "evaluated", "true")
        client.log_artifact(run_id, str(paths.metrics_file(model_name)), artifact_path="evaluation")
        client.log_artifact(run_id, str(details_file), artifact_path="evaluation")
        for name in ("per_class_iou.json", "confusion.json", "confusion.png"):
            client.log_artifact(run_id, str(plot_dir / name), artifact_path="evaluation")
        if (plot_dir / "predictions").is_dir() and any((plot_dir / "predictions").iterdir()):
            client.log_artifacts(run_id, str(plot_dir / "predictions"), artifact_path="evaluation/predictions")
    except MlflowException as err:
        log.warning("[%s] could not log the evaluation to MLflow (%s); the metrics files are written", model_name, err)


def _log_metrics(client, run_id: str, headline: dict, per_class_iou: dict) -> None:
    from mlflow.entities import Metric

    metrics = {f"eval_{k}": v for k, v in headline.items() if k in evaluation.HEADLINE_KEYS or k.endswith("_sd")}
    metrics.update({f"eval_iou/{metric_key(c)}": v for c, v in per_class_iou.items()})
    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, 0) for k, v in metrics.items() if v is not None and v == v]
    for i in range(0, len(batch), 500):
        client.log_batch(run_id, metrics=batch[i:i + 500])


@common.stage
def main(argv: Optional[list[str]] = None) -> None:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a key of `models` in params.yaml")
    args = parser.parse_args(argv)
    params = common.load_stage_params(args.params)
    params.model_config_of(args.model)
    evaluate_model(params, args.model, common.Paths(params))


if __name__ == "__main__":
    raise SystemExit(main())
