"""DVC stage ``evaluate@<model>``: validation-split metrics of a trained model.

Writes ``metrics/<model>.json`` (mIoU, pixAcc, mAcc, per-class IoU; single-scale and, when enabled,
multi-scale + flip), ``plots/<model>/per_class_iou.json`` (DVC plots data), colour-palette prediction
PNGs for a fixed sample in ``plots/<model>/predictions/``, and logs all of it to the model's MLflow run.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm import tqdm

from ctxseg.config import ConfigError, Params
from ctxseg.inference import predict_probs
from ctxseg.io import atomic_path, write_json
from ctxseg.metrics import ConfusionMatrix
from ctxseg.models import ModelConfig, build_segmentor
from pipeline import common

log = logging.getLogger("ctxseg.evaluate")


def load_trained(model_file: Path, expected_classes: Optional[int] = None) -> tuple[torch.nn.Module, dict]:
    """Rebuild a trained segmentor from ``models/<model>/model.pt`` (loaded with ``weights_only=True``)."""
    if not model_file.is_file():
        raise FileNotFoundError(f"{model_file}: trained model not found. Run `dvc repro train` first.")
    payload = torch.load(model_file, map_location="cpu", weights_only=True)
    num_classes = int(payload["num_classes"])
    if expected_classes is not None and num_classes != expected_classes:
        raise ConfigError(
            f"{model_file}: the model predicts {num_classes} classes but the dataset has {expected_classes}. "
            "Retrain it on this dataset (dvc repro train) or pick the matching dataset in params.yaml (data.name)."
        )
    cfg = ModelConfig.model_validate(payload["model_config"])
    model = build_segmentor(cfg, num_classes)
    model.load_state_dict(payload["model"])
    model.eval()
    return model, payload


def colourise(label: np.ndarray, palette: list) -> np.ndarray:
    """Class-id map -> RGB image; ignore (255) is black."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[: len(palette)] = np.asarray(palette, dtype=np.uint8)
    return lut[label.astype(np.uint8)]


def evaluate_model(params: Params, model_name: str, paths: common.Paths) -> dict:
    from torch.utils.data import DataLoader

    from ctxseg.data import SegmentationDataset
    from ctxseg.data.transforms import build_eval_transform

    meta = common.dataset_meta(paths)
    num_classes = int(meta["num_classes"])
    model, payload = load_trained(paths.model_dir(model_name) / "model.pt", num_classes)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    val_set = SegmentationDataset(paths.prepared, "val", build_eval_transform(params.data))
    loader = DataLoader(val_set, batch_size=1, shuffle=False, num_workers=0)
    ev = params.evaluate
    settings = {"single_scale": {"scales": [1.0], "flip": False}}
    if ev.multi_scale:
        settings["multi_scale_flip"] = {"scales": list(ev.scales), "flip": ev.flip}
    matrices = {name: ConfusionMatrix(num_classes) for name in settings}
    vis_ids = set(range(0, len(val_set), max(1, len(val_set) // max(ev.num_visualisations, 1))))
    vis_ids = sorted(vis_ids)[: ev.num_visualisations]
    pred_dir = paths.plots / model_name / "predictions"
    palette = meta["palette"]
    vis: dict[int, np.ndarray] = {}
    seconds = {name: 0.0 for name in settings}
    for index, (image, label) in enumerate(tqdm(loader, desc=f"evaluate {model_name}", unit="img")):
        for name, setting in settings.items():
            start = time.perf_counter()
            probs = predict_probs(model, image, mode=ev.mode, crop_size=ev.crop_size, stride=ev.stride, **setting)
            seconds[name] += time.perf_counter() - start
            prediction = probs.argmax(1)
            matrices[name].update(prediction, label)
            if name == "single_scale" and index in vis_ids:
                vis[index] = prediction[0].numpy()
    results = {name: cm.compute() for name, cm in matrices.items()}
    class_names = list(meta["class_names"])
    single = results["single_scale"]
    report = {
        "model": model_name,
        "dataset": params.data.name,
        "num_val_images": len(val_set),
        "mIoU": single["mIoU"],
        "pixAcc": single["pixAcc"],
        "mAcc": single["mAcc"],
        "per_class_iou": dict(zip(class_names, single["per_class_iou"])),
        "seconds_per_image": {k: v / max(len(val_set), 1) for k, v in seconds.items()},
    }
    if "multi_scale_flip" in results:
        ms = results["multi_scale_flip"]
        report["ms_flip"] = {"mIoU": ms["mIoU"], "pixAcc": ms["pixAcc"], "mAcc": ms["mAcc"],
                             "per_class_iou": dict(zip(class_names, ms["per_class_iou"]))}
    write_json(paths.metrics_file(model_name), report)
    write_json(paths.plots / model_name / "per_class_iou.json",
               [{"class": c, "iou": (v if v == v else None)} for c, v in zip(class_names, single["per_class_iou"])])
    write_json(paths.plots / model_name / "confusion.json",
               {"classes": class_names, "matrix": matrices["single_scale"].matrix.tolist()})
    _write_predictions(pred_dir, vis, val_set, palette)
    _log_to_mlflow(params, paths, model_name, report, pred_dir)
    log.info("[%s] mIoU %.4f pixAcc %.4f mAcc %.4f%s", model_name, report["mIoU"], report["pixAcc"], report["mAcc"],
             f" | ms+flip mIoU {report['ms_flip']['mIoU']:.4f}" if "ms_flip" in report else "")
    return report


def _write_predictions(pred_dir: Path, vis: dict, val_set, palette: list) -> None:
    from PIL import Image

    with atomic_path(pred_dir) as tmp:
        tmp.mkdir(parents=True)
        for index, prediction in vis.items():
            Image.fromarray(colourise(prediction, palette)).save(tmp / f"{val_set.ids[index]}.png")


def _log_to_mlflow(params: Params, paths: common.Paths, model_name: str, report: dict, pred_dir: Path) -> None:
    import mlflow

    run_file = paths.model_dir(model_name) / "run.json"
    run_id = common.read_json(run_file, "training run record", "Run `dvc repro train` first.").get("run_id")
    if not run_id:
        return
    client = mlflow.MlflowClient(common.mlflow_tracking_uri(params, paths.root))
    metrics = {f"eval_{k}": report[k] for k in ("mIoU", "pixAcc", "mAcc")}
    if "ms_flip" in report:
        metrics.update({f"eval_ms_flip_{k}": report["ms_flip"][k] for k in ("mIoU", "pixAcc", "mAcc")})
    for key, value in metrics.items():
        if value == value:
            client.log_metric(run_id, key, float(value))
    client.log_artifact(run_id, str(paths.metrics_file(model_name)), artifact_path="evaluation")
    if pred_dir.is_dir():
        client.log_artifacts(run_id, str(pred_dir), artifact_path="evaluation/predictions")


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
