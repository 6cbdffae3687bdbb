"""Predict: colour masks and overlays for images, with a trained ctxseg model.

    python -m pipeline.predict --model MODEL --input IMAGE_OR_FOLDER --output DIR
    ctxseg-predict --model models/fcn_mcibi --input photo.jpg --output out/

MODEL is a ``model.pt`` written by the train stage (or its ``models/<name>/`` folder), an MLflow model
URI (``runs:/<run id>/model``, ``models:/<registered name>@best``) or a bare MLflow run id. For every
input image ``<stem>`` it writes, at the input's size:

* ``<stem>_mask.png`` — palette PNG: shows the class colours; its pixel values are the class ids;
* ``<stem>_overlay.png`` — the colour mask blended over the image;

and ``predictions.json`` (model, classes, files). Class names and palette come from the model file,
``--meta`` (a prepared dataset's ``meta.json``) or the dataset the model was trained on.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ctxseg.config import ConfigError, load_params
from ctxseg.io import atomic_path, write_json
from pipeline import common

log = logging.getLogger("ctxseg.predict")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm")
RUN_ID = re.compile(r"^[0-9a-f]{32}$")


class PredictError(ConfigError):
    """The inputs of predict are wrong (unreadable image, class-count mismatch, unknown model)."""


# ---------------------------------------------------------------------------------------------
# the model and its classes


def load_model(source: str, params_file: Optional[Path] = None) -> tuple[torch.nn.Module, dict]:
    """``(model in eval mode, info)`` where info holds ``num_classes``, ``class_names``, ``dataset``, ``source``."""
    path = Path(source)
    if path.is_dir():
        path = path / "model.pt"
    if path.suffix == ".pt" or path.exists():
        from pipeline.evaluate import load_trained

        if not path.is_file():
            raise PredictError(f"{path}: no such model file. Pass models/<name>/model.pt (written by `dvc repro "
                               "train`), a models/<name> folder, an MLflow runs:/ or models:/ URI, or a run id.")
        model, payload = load_trained(path)
        return model, {"num_classes": int(payload["num_classes"]), "class_names": payload.get("class_names"),
                       "dataset": payload.get("dataset"), "source": str(path), "model_name": payload.get("model_name")}
    if RUN_ID.match(source):
        source = f"runs:/{source}/model"
    if source.startswith(("runs:/", "models:/")):
        return _load_mlflow(source, params_file)
    raise PredictError(f"--model {source!r}: not a file, folder, MLflow URI (runs:/..., models:/...) or run id")


def _load_mlflow(uri: str, params_file: Optional[Path]) -> tuple[torch.nn.Module, dict]:
    import mlflow
    from mlflow.exceptions import MlflowException

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    tracking = _tracking_uri(params_file)
    mlflow.set_tracking_uri(tracking)
    try:
        model = mlflow.pytorch.load_model(uri, map_location="cpu")
    except MlflowException as err:
        raise PredictError(f"--model {uri}: cannot load it from the MLflow store {tracking} ({err}). Check the run id "
                           "or set MLFLOW_TRACKING_URI / mlflow.tracking_uri.") from None
    model.eval()
    info = {"num_classes": int(getattr(model, "num_classes", 0)) or None, "class_names": None, "dataset": None,
            "source": uri, "model_name": None}
    run_id = uri.split("/")[1] if uri.startswith("runs:/") else None
    try:
        client = mlflow.MlflowClient(tracking)
        if run_id is None:
            name, _, ref = uri[len("models:/"):].partition("@")
            version = client.get_model_version_by_alias(name, ref) if ref else None
            run_id = version.run_id if version is not None else None
        if run_id:
            run = client.get_run(run_id)
            info["dataset"] = run.data.tags.get("dataset") or run.data.params.get("data.name")
            info["model_name"] = run.data.params.get("model_name")
    except MlflowException as err:
        log.warning("no run information for %s (%s); naming classes by id", uri, err)
    return model, info


def _tracking_uri(params_file: Optional[Path]) -> str:
    if params_file is not None and params_file.is_file():
        params = load_params(params_file)
        return common.mlflow_tracking_uri(params, params_file.resolve().parent)
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def resolve_classes(info: dict, model_classes: int, meta_file: Optional[Path]) -> tuple[list[str], list]:
    """Class names and palette for the model's ``model_classes`` outputs; refuses a count mismatch."""
    from ctxseg.data.info import get_dataset_info, voc_colormap

    if meta_file is not None:
        meta_file = meta_file / "meta.json" if meta_file.is_dir() else meta_file
        meta = common.read_json(meta_file, "dataset meta", "Pass data/prepared/<dataset>/meta.json.")
        if int(meta["num_classes"]) != model_classes:
            raise PredictError(f"{meta_file}: the dataset has {meta['num_classes']} classes but the model "
                               f"({info['source']}) predicts {model_classes}. Use the model trained on this dataset, "
                               "or the meta.json of the model's dataset.")
        return list(meta["class_names"]), [tuple(c) for c in meta["palette"]]
    names = info.get("class_names")
    if names is not None and len(names) != model_classes:
        raise PredictError(f"{info['source']}: the model predicts {model_classes} classes but its file lists "
                           f"{len(names)} class names; the file is inconsistent, re-run the train stage.")
    palette = None
    if info.get("dataset"):
        try:
            ds = get_dataset_info(info["dataset"])
        except (KeyError, ValueError):
            ds = None
        if ds is not None and ds.num_classes == model_classes:
            names = names or list(ds.class_names)
            palette = [tuple(c) for c in ds.palette]
        elif ds is not None:
            log.warning("the model predicts %d classes but dataset %r has %d; using generic colours",
                        model_classes, info["dataset"], ds.num_classes)
    return names or [f"class_{k}" for k in range(model_classes)], palette or voc_colormap(model_classes)


# ---------------------------------------------------------------------------------------------
# images


def list_inputs(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise PredictError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
        return files
    raise FileNotFoundError(f"{path}: no such image or folder")


def read_rgb(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise PredictError(f"{path}: cannot read this file as an image ({err}). Remove it from the input or convert "
                           f"it to one of {', '.join(IMAGE_SUFFIXES)}.") from None


def predict_image(model: torch.nn.Module, image: np.ndarray, mean, std, *, device: torch.device,
                  short_side: Optional[int] = None, **inference) -> np.ndarray:
    """Class-id map (uint8 HxW, the image's size) for one RGB uint8 image."""
    from ctxseg.data.transforms import Normalize, ResizeShortSide
    from ctxseg.inference import predict_probs, resize_probs

    h, w = image.shape[:2]
    x = image
    if short_side is not None:
        x, _ = ResizeShortSide(short_side, resize_label=False)(x, None, None)
    x, _ = Normalize(mean, std)(x, None, None)
    tensor = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32))[None].to(device)
    probs = predict_probs(model, tensor, **inference)
    if probs.shape[1] > 255:
        raise PredictError(f"the model predicts {probs.shape[1]} classes; palette PNG masks hold at most 255")
    return resize_probs(probs, (h, w)).argmax(1)[0].to(torch.uint8).cpu().numpy()


def output_stems(files: list[Path]) -> list[str]:
    """Unique output names: the file stem, plus the suffix when two inputs share a stem."""
    stems = [f.stem for f in files]
    return [f"{f.stem}_{f.suffix.lstrip('.').lower()}" if stems.count(f.stem) > 1 else f.stem for f in files]


def run_predict(model_source: str, input_path: Path, output: Path, *, params_file: Optional[Path] = None,
                meta_file: Optional[Path] = None, alpha: float = 0.5, device: str = "auto",
                short_side: Optional[int] = None, **inference) -> list[dict]:
    from tqdm import tqdm

    from ctxseg.data.config import IMAGENET_MEAN, IMAGENET_STD
    from ctxseg.data.info import colorize
    from ctxseg.visualize import overlay, palette_png

    files = list_inputs(input_path)
    images = {f: read_rgb(f) for f in files}  # every input is checked before anything is written
    model, info = load_model(model_source, params_file)
    num_classes = info["num_classes"] or int(getattr(model, "num_classes"))
    class_names, palette = resolve_classes(info, num_classes, meta_file)
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    if params_file is not None and params_file.is_file():
        a = load_params(params_file).data.augment
        mean, std = a.mean, a.std
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    model.to(dev)
    output.mkdir(parents=True, exist_ok=True)
    written = []
    for f, stem in tqdm(list(zip(files, output_stems(files))), desc="predict", unit="img"):
        image = images[f]
        mask = predict_image(model, image, mean, std, device=dev, short_side=short_side, **inference)
        mask_file, overlay_file = output / f"{stem}_mask.png", output / f"{stem}_overlay.png"
        with atomic_path(mask_file) as tmp:
            palette_png(mask, palette).save(tmp, format="PNG")
        from PIL import Image

        with atomic_path(overlay_file) as tmp:
            Image.fromarray(overlay(image, colorize(mask, palette), alpha)).save(tmp, format="PNG")
        counts = np.bincount(mask.ravel(), minlength=num_classes)
        written.append({"input": str(f), "mask": mask_file.name, "overlay": overlay_file.name,
                        "size": [int(image.shape[0]), int(image.shape[1])],
                        "classes": {class_names[k]: round(float(c) / mask.size, 6) for k, c in enumerate(counts) if c}})
    write_json(output / "predictions.json", {"model": info["source"], "model_name": info.get("model_name"),
                                              "num_classes": num_classes, "class_names": class_names,
                                              "inference": {"short_side": short_side, **inference},
                                              "images": written})
    return written


def _scales(text: str) -> list[float]:
    try:
        values = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise PredictError(f"--scales {text!r}: give comma-separated numbers, e.g. 0.75,1.0,1.25") from None
    if not values or any(v <= 0 for v in values):
        raise PredictError(f"--scales {text!r}: needs positive numbers")
    return values


@common.stage
def main(argv: Optional[list[str]] = None) -> None:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", required=True,
                        help="models/<name>/model.pt (or its folder), runs:/<run id>/model, models:/<name>@best, or a run id")
    parser.add_argument("--input", required=True, type=Path, help="an image or a folder of images")
    parser.add_argument("--output", required=True, type=Path, help="folder for <stem>_mask.png and <stem>_overlay.png")
    parser.add_argument("--meta", type=Path, default=None,
                        help="a prepared dataset's meta.json (class names, palette); checked against the model")
    parser.add_argument("--mode", choices=["whole", "slide"], default="whole")
    parser.add_argument("--crop-size", type=int, default=512)
    parser.add_argument("--stride", type=int, default=341)
    parser.add_argument("--scales", default="1.0", help="comma-separated test scales, e.g. 0.5,0.75,1.0,1.25,1.5,1.75")
    parser.add_argument("--flip", action="store_true", help="also average the horizontally flipped image")
    parser.add_argument("--short-side", type=int, default=None, help="resize the short side for inference")
    parser.add_argument("--alpha", type=float, default=0.5, help="mask opacity in the overlay (0-1)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    args = parser.parse_args(argv)
    if not 0.0 <= args.alpha <= 1.0:
        raise PredictError(f"--alpha {args.alpha}: must be between 0 and 1")
    if args.crop_size < 1 or args.stride < 1:
        raise PredictError("--crop-size and --stride must be positive")
    run_predict(args.model, args.input, args.output, params_file=Path(args.params), meta_file=args.meta,
                alpha=args.alpha, device=args.device, short_side=args.short_side, mode=args.mode,
                crop_size=args.crop_size, stride=args.stride, scales=_scales(args.scales), flip=args.flip)
    print(args.output)


if __name__ == "__main__":
    raise SystemExit(main())
