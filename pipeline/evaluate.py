"""DVC stage ``evaluate@<model>``: validation-split metrics of a trained model.

Writes (all atomically):

* ``metrics/<model>.json`` — the DVC metrics file: the headline numbers only, flat (``mIoU``,
  ``pixAcc``, ``mAcc`` and, when enabled, the multi-scale + flip ``ms_flip_mIoU``), so that ``dvc
  metrics show`` has one short row per model;
* ``metrics/<model>.details.json`` — the full record the register and report stages read (a plain
  output): model info and MLflow ``run_id``, per-class IoU and accuracy, the ``ms_flip`` block with its
  per-class IoU, scales and flip, timing, parameter count;
* ``plots/<model>/per_class_iou.json`` (DVC bar plot: IoU, ms+flip IoU and accuracy per class),
  ``plots/<model>/confusion.png`` (DVC image plot) and ``plots/<model>/confusion.json`` (the
  pixel-count matrix, rows = ground truth);
* ``plots/<model>/predictions/<id>.png`` — palette PNGs (pixel value = class id) of a fixed sample;
* ``plots/<model>/features.npz`` — per-image class-mean features at the classifier input and, for
  MCIBI, the memory (the report's feature-space figure);

and logs the metrics and these files to the model's MLflow run. The loop and the records are
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
from pipeline import common, mlflow_store

log = logging.getLogger("ctxseg.evaluate")


def evaluate_model(params: Params, model_name: str, paths: common.Paths) -> dict:
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from ctxseg.data import SegmentationDataset
    from ctxseg.data.transforms import build_eval_transform

    meta = common.dataset_meta(paths)
    num_classes, class_names = int(meta["num_classes"]), list(meta["class_names"])
    model_file = paths.model_dir(model_name) / "model.pt"
    model, record = load_model(model_file, "cpu", num_classes)
    if record.class_names and list(record.class_names) != class_names:
        log.warning("[%s] %s was trained with class names %s, the prepared dataset has %s; scoring by class id",
                    model_name, model_file, record.class_names, class_names)
    ev = params.evaluate
    # labels stay at their original resolution; predictions are resized to them (as mmseg scores)
    dataset = SegmentationDataset(paths.prepared, ev.split, build_eval_transform(params.data, resize_label=False))
    if len(dataset) == 0:
        raise ConfigError(f"{paths.prepared / (ev.split + '.txt')}: split {ev.split!r} is empty; nothing to evaluate")
    loader = DataLoader(dataset, batch_size=None, shuffle=False, num_workers=params.data.num_loader_workers)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    with tqdm(total=len(dataset), desc=f"evaluate {model_name}", unit="img", dynamic_ncols=True) as bar:
        result = evaluation.evaluate(
            model, loader, num_classes=num_classes, ignore_index=int(meta.get("ignore_index", 255)), device=device,
            mode=ev.mode, crop_size=ev.crop_size, stride=ev.stride, scales=ev.scales if ev.multi_scale else None,
            flip=ev.flip, batch_size=ev.batch_size,
            keep_predictions=evaluation.sample_indices(len(dataset), ev.num_visualisations),
            keep_features=evaluation.sample_indices(len(dataset), ev.feature_images), progress=bar.update)
    report = evaluation.metrics_record(
        result, class_names, model=model_name, framework=record.model_config.get("framework"),
        context=record.model_config.get("context"), dataset=params.data.name, split=ev.split,
        num_params=sum(p.numel() for p in model.parameters()),
        inference={"mode": ev.mode, "crop_size": ev.crop_size, "stride": ev.stride, "device": device.type})
    run_id = _run_id(paths, model_name)
    if run_id:
        report["run_id"] = run_id

    plot_dir = paths.plots / model_name
    details_file = evaluation.details_file(paths.metrics, model_name)
    write_json(paths.metrics_file(model_name), evaluation.headline_metrics(report))
    write_json(details_file, report)
    write_json(plot_dir / "per_class_iou.json", evaluation.per_class_rows(report))
    evaluation.write_confusion(plot_dir, result.single.matrix, class_names,
                               f"{model_name}: confusion (row-normalised)")
    evaluation.write_predictions(plot_dir / "predictions", result.predictions, dataset.ids, meta["palette"])
    evaluation.write_features(plot_dir / "features.npz", result, class_names, evaluation.class_prototypes(model))
    if ev.log_mlflow and run_id:
        _log_to_mlflow(params, paths, model_name, run_id, report, plot_dir, details_file)
    log.info("[%s] mIoU %.4f pixAcc %.4f mAcc %.4f%s", model_name, report["mIoU"], report["pixAcc"], report["mAcc"],
             f" | ms+flip mIoU {report['ms_flip']['mIoU']:.4f}" if "ms_flip" in report else "")
    return report


def _run_id(paths: common.Paths, model_name: str) -> Optional[str]:
    run_file = paths.model_dir(model_name) / "run.json"
    if not run_file.is_file():
        return None
    return common.read_json(run_file, "training run record", "Run `dvc repro train` first.").get("run_id")


def metric_key(name: str) -> str:
    """A class name as a valid MLflow metric-name fragment."""
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", name)


def _log_to_mlflow(params: Params, paths: common.Paths, model_name: str, run_id: str, report: dict,
                   plot_dir: Path, details_file: Path) -> None:
    """Metrics (``eval_*``, ``eval_iou/<class>``) and the evaluation files to the model's training run."""
    import mlflow
    from mlflow.entities import Metric
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient(mlflow_store.tracking_uri(params, paths.root))
    metrics = {f"eval_{k}": report[k] for k in evaluation.HEADLINE}
    metrics.update({f"eval_iou/{metric_key(c)}": v for c, v in report["per_class_iou"].items()})
    if "ms_flip" in report:
        metrics.update({f"eval_ms_flip_{k}": report["ms_flip"][k] for k in evaluation.HEADLINE})
    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, 0) for k, v in metrics.items() if v is not None and v == v]
    try:
        for i in range(0, len(batch), 500):
            client.log_batch(run_id, metrics=batch[i:i + 500])
        client.set_tag(run_id, "evaluated", "true")
        client.log_artifact(run_id, str(paths.metrics_file(model_name)), artifact_path="evaluation")
        client.log_artifact(run_id, str(details_file), artifact_path="evaluation")
        for name in ("per_class_iou.json", "confusion.json", "confusion.png"):
            client.log_artifact(run_id, str(plot_dir / name), artifact_path="evaluation")
        if (plot_dir / "predictions").is_dir() and any((plot_dir / "predictions").iterdir()):
            client.log_artifacts(run_id, str(plot_dir / "predictions"), artifact_path="evaluation/predictions")
    except MlflowException as err:
        log.warning("[%s] could not log the evaluation to MLflow run %s (%s); the metrics files are written",
                    model_name, run_id, err)


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
