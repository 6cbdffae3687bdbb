"""DVC stage ``evaluate@<model>``: validation-split metrics of a trained model.

Writes (all atomically):

* ``metrics/<model>.json`` — mIoU, pixAcc, mAcc, per-class IoU and accuracy, single-scale and (when
  enabled) multi-scale + flip under ``ms_flip`` (DVC metrics);
* ``plots/<model>/per_class_iou.json`` (DVC bar plot), ``plots/<model>/confusion.png`` (DVC image
  plot) and ``plots/<model>/confusion.json`` (the pixel-count matrix, rows = ground truth);
* ``plots/<model>/predictions/<id>.png`` — palette PNGs (pixel value = class id) of a fixed sample;
* ``plots/<model>/features.npz`` — per-image class-mean features at the classifier input and, for
  MCIBI, the memory (the report's feature-space figure);

and logs the metrics and these files to the model's MLflow run.
"""
from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm import tqdm

from ctxseg.config import ConfigError, Params
from ctxseg.inference import ClassifierInput, batched_by_size, memory_of, predict_single_and_multi, resize_probs
from ctxseg.io import atomic_path, write_json
from ctxseg.metrics import ConfusionMatrix, named
from ctxseg.models import ModelConfig, build_segmentor
from pipeline import common

log = logging.getLogger("ctxseg.evaluate")


def load_trained(model_file: Path, expected_classes: Optional[int] = None) -> tuple[torch.nn.Module, dict]:
    """Rebuild a trained segmentor from ``models/<model>/model.pt`` (loaded with ``weights_only=True``)."""
    model_file = Path(model_file)
    if not model_file.is_file():
        raise FileNotFoundError(f"{model_file}: trained model not found. Run `dvc repro train` first.")
    try:
        payload = torch.load(model_file, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated file, pickle with code objects, not a torch file at all
        raise ConfigError(f"{model_file}: cannot be read as a ctxseg model file ({err}). Re-run the train stage "
                          "to write it again.") from None
    missing = [k for k in ("model", "model_config", "num_classes") if k not in payload]
    if not isinstance(payload, dict) or missing:
        raise ConfigError(f"{model_file}: not a ctxseg model file (missing {missing}); expected the "
                          "models/<model>/model.pt written by the train stage")
    num_classes = int(payload["num_classes"])
    if expected_classes is not None and num_classes != expected_classes:
        raise ConfigError(
            f"{model_file}: the model predicts {num_classes} classes but the dataset has {expected_classes}. "
            "Retrain it on this dataset (dvc repro train) or pick the matching dataset in params.yaml (data.name)."
        )
    cfg = ModelConfig.model_validate(payload["model_config"])
    model = build_segmentor(cfg, num_classes)
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as err:  # size mismatch / missing keys: the file's weights and its config disagree
        first = str(err).strip().splitlines()
        raise ConfigError(f"{model_file}: the weights do not fit the model described in the same file "
                          f"({num_classes} classes, {cfg.framework}+{cfg.context}): "
                          f"{' '.join(first[1:3]) if len(first) > 1 else first[0]}. Re-run the train stage.") from None
    model.eval()
    return model, payload


def sample_indices(n: int, k: int) -> list[int]:
    """``k`` indices spread evenly over ``range(n)`` (the same for every model: fixed sample)."""
    if n <= 0 or k <= 0:
        return []
    if k >= n:
        return list(range(n))
    return sorted({int(round(i)) for i in np.linspace(0, n - 1, k)})


def evaluate_model(params: Params, model_name: str, paths: common.Paths) -> dict:
    from torch.utils.data import DataLoader

    from ctxseg.data import SegmentationDataset
    from ctxseg.data.transforms import build_eval_transform
    from ctxseg.visualize import class_mean_features

    meta = common.dataset_meta(paths)
    num_classes = int(meta["num_classes"])
    class_names = list(meta["class_names"])
    ignore_index = int(meta.get("ignore_index", 255))
    model_file = paths.model_dir(model_name) / "model.pt"
    model, payload = load_trained(model_file, num_classes)
    if payload.get("class_names") and list(payload["class_names"]) != class_names:
        log.warning("[%s] %s was trained with class names %s, the prepared dataset has %s; scoring by class id",
                    model_name, model_file, payload["class_names"], class_names)
    ev = params.evaluate
    # labels stay at their original resolution; predictions are resized to them (as mmseg scores)
    dataset = SegmentationDataset(paths.prepared, ev.split, build_eval_transform(params.data, resize_label=False))
    if len(dataset) == 0:
        raise ConfigError(f"{paths.prepared / (ev.split + '.txt')}: split {ev.split!r} is empty; nothing to evaluate")
    loader = DataLoader(dataset, batch_size=None, shuffle=False, num_workers=params.data.num_loader_workers)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    scales = list(ev.scales) if ev.multi_scale else None
    single_cm = ConfusionMatrix(num_classes, ignore_index, device=device)
    ms_cm = ConfusionMatrix(num_classes, ignore_index, device=device) if scales else None
    vis_ids = set(sample_indices(len(dataset), ev.num_visualisations))
    feature_ids = set(sample_indices(len(dataset), ev.feature_images))
    vis: dict[int, np.ndarray] = {}
    feats: list[tuple] = []
    seconds = 0.0
    indexed = ((i, image, label) for i, (image, label) in enumerate(loader))
    bar = tqdm(total=len(dataset), desc=f"evaluate {model_name}", unit="img", dynamic_ncols=True)
    for batch in batched_by_size(indexed, ev.batch_size, key=lambda s: (tuple(s[1].shape), tuple(s[2].shape))):
        ids = [s[0] for s in batch]
        images = torch.stack([s[1] for s in batch]).to(device)
        labels = torch.stack([s[2] for s in batch]).to(device)
        start = time.perf_counter()
        single, ms = predict_single_and_multi(model, images, mode=ev.mode, crop_size=ev.crop_size,
                                              stride=ev.stride, scales=scales, flip=ev.flip)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds += time.perf_counter() - start
        prediction = resize_probs(single, labels.shape[-2:]).argmax(1)
        single_cm.update(prediction, labels)
        if ms_cm is not None:
            ms_cm.update(resize_probs(ms, labels.shape[-2:]).argmax(1), labels)
        for j, index in enumerate(ids):
            if index in vis_ids:
                vis[index] = prediction[j].cpu().numpy().astype(np.uint8)
        wanted = [j for j, index in enumerate(ids) if index in feature_ids]
        if wanted:
            features = classifier_features(model, images)
            means, classes, image_idx = class_mean_features(features[wanted].cpu(), labels[wanted].cpu(),
                                                            num_classes, ignore_index)
            feats.append((means, classes, np.asarray(ids)[wanted][image_idx]))
        bar.update(len(batch))
    bar.close()

    single = single_cm.compute()
    report = {
        "model": model_name,
        "framework": payload.get("model_config", {}).get("framework"),
        "context": payload.get("model_config", {}).get("context"),
        "dataset": params.data.name,
        "split": ev.split,
        "num_images": len(dataset),
        "num_val_images": len(dataset),
        "num_params": sum(p.numel() for p in model.parameters()),
        "mIoU": single["mIoU"],
        "pixAcc": single["pixAcc"],
        "mAcc": single["mAcc"],
        "per_class_iou": named(single["per_class_iou"], class_names),
        "per_class_acc": named(single["per_class_acc"], class_names),
        "inference": {"mode": ev.mode, "crop_size": ev.crop_size, "stride": ev.stride, "device": device.type},
        "seconds_per_image": seconds / len(dataset),
    }
    if ms_cm is not None:
        ms = ms_cm.compute()
        report["ms_flip"] = {"mIoU": ms["mIoU"], "pixAcc": ms["pixAcc"], "mAcc": ms["mAcc"],
                             "per_class_iou": named(ms["per_class_iou"], class_names),
                             "scales": scales, "flip": ev.flip}
    run_id = _run_id(paths, model_name)
    if run_id:
        report["run_id"] = run_id

    plot_dir = paths.plots / model_name
    write_json(paths.metrics_file(model_name), report)
    write_json(plot_dir / "per_class_iou.json",
               [{"class": c, "iou": v, "iou_ms_flip": report.get("ms_flip", {}).get("per_class_iou", {}).get(c)}
                for c, v in report["per_class_iou"].items()])
    write_json(plot_dir / "confusion.json", {"classes": class_names, "rows": "ground truth", "columns": "prediction",
                                             "matrix": single_cm.matrix.cpu().tolist()})
    _write_confusion_png(plot_dir / "confusion.png", single_cm.matrix.cpu().numpy(), class_names, model_name)
    _write_predictions(plot_dir / "predictions", vis, dataset, meta["palette"])
    _write_features(plot_dir / "features.npz", feats, model, class_names)
    if ev.log_mlflow and run_id:
        _log_to_mlflow(params, paths, model_name, run_id, report, plot_dir)
    log.info("[%s] mIoU %.4f pixAcc %.4f mAcc %.4f%s", model_name, report["mIoU"], report["pixAcc"], report["mAcc"],
             f" | ms+flip mIoU {report['ms_flip']['mIoU']:.4f}" if "ms_flip" in report else "")
    return report


def classifier_features(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The features entering the final classifier in a single-scale whole-image pass (forward hook)."""
    with torch.no_grad(), ClassifierInput(model) as hook:
        model(images)
    if hook.features is None:
        raise RuntimeError("the classifier forward hook recorded nothing; is decode_head.classifier used?")
    return hook.features


def _run_id(paths: common.Paths, model_name: str) -> Optional[str]:
    run_file = paths.model_dir(model_name) / "run.json"
    if not run_file.is_file():
        return None
    return common.read_json(run_file, "training run record", "Run `dvc repro train` first.").get("run_id")


def _write_confusion_png(path: Path, matrix: np.ndarray, class_names: list, model_name: str) -> None:
    from ctxseg.visualize import confusion_figure, save_png

    save_png(confusion_figure(matrix, class_names, title=f"{model_name}: confusion (row-normalised)"), path)


def _write_predictions(pred_dir: Path, vis: dict, dataset, palette: list) -> None:
    from ctxseg.visualize import palette_png

    with atomic_path(pred_dir) as tmp:
        tmp.mkdir(parents=True)
        for index, prediction in sorted(vis.items()):
            palette_png(prediction, palette).save(tmp / f"{dataset.ids[index]}.png")


def _write_features(path: Path, feats: list, model, class_names: list) -> None:
    if feats:
        means = np.concatenate([f[0] for f in feats]).astype(np.float32)
        classes = np.concatenate([f[1] for f in feats]).astype(np.int64)
        images = np.concatenate([f[2] for f in feats]).astype(np.int64)
    else:
        means, classes, images = np.zeros((0, 0), np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64)
    memory = memory_of(model)
    arrays = {"means": means, "classes": classes, "image_index": images, "class_names": np.asarray(class_names)}
    if memory is not None:
        arrays["memory"] = memory.numpy().astype(np.float32)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)


def metric_key(name: str) -> str:
    """A class name as a valid MLflow metric-name fragment."""
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", name)


def _log_to_mlflow(params: Params, paths: common.Paths, model_name: str, run_id: str, report: dict,
                   plot_dir: Path) -> None:
    """Metrics (``eval_*``, ``eval_iou/<class>``) and the evaluation files to the model's training run."""
    import mlflow
    from mlflow.entities import Metric
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient(common.mlflow_tracking_uri(params, paths.root))
    metrics = {f"eval_{k}": report[k] for k in ("mIoU", "pixAcc", "mAcc")}
    metrics.update({f"eval_iou/{metric_key(c)}": v for c, v in report["per_class_iou"].items()})
    if "ms_flip" in report:
        metrics.update({f"eval_ms_flip_{k}": report["ms_flip"][k] for k in ("mIoU", "pixAcc", "mAcc")})
    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, 0) for k, v in metrics.items() if v is not None and v == v]
    try:
        for i in range(0, len(batch), 500):
            client.log_batch(run_id, metrics=batch[i:i + 500])
        client.set_tag(run_id, "evaluated", "true")
        client.log_artifact(run_id, str(paths.metrics_file(model_name)), artifact_path="evaluation")
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
