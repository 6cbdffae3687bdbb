"""Predict: colour masks and overlays for images, with a trained ctxseg model.

    python -m pipeline.predict --model MODEL --input IMAGE_OR_FOLDER --output DIR
    ctxseg-predict --model models/fcn_mcibi --input photo.jpg --output out/

MODEL is a ``model.pt`` written by the train stage (``models/<name>/seeds/<seed>/model.pt``, its folder, or
``models/<name>/``, which takes the first seed), an MLflow model
URI (``runs:/<run id>/model``, ``models:/<registered name>@best``) or a bare MLflow run id. For every
input image ``<stem>`` it writes, at the input's size:

* ``<stem>_mask.png`` — palette PNG: shows the class colours; its pixel values are the class ids;

and, for people to look at, ``<stem>_overlay.png``: the class colours blended over the image
(``--alpha``), class boundaries drawn, a legend of the classes present under it, and a small image
enlarged by a whole factor until its short side reaches ``--overlay-min-side`` (the class map with
nearest-neighbour sampling); see :func:`ctxseg.prediction.display_overlay`. ``predictions.json``
lists the model, the classes and, per image, its files, class shares and overlay scale. Class names and palette come from ``--meta`` (a
prepared dataset's ``meta.json``), the model file or the dataset the model was trained on.

Every form of MODEL ends in the same weights-only model file: an MLflow URI is resolved to the run
artifact ``model/model.pt`` (the train stage logs it; the ``register`` stage registers it), downloaded
and read by :func:`ctxseg.checkpoint.read_model_file`. Nothing is ever unpickled.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Optional

import torch

from ctxseg.checkpoint import ModelFile, load_model, read_model_file
from ctxseg.config import load_params, parse_params
from ctxseg.io import write_json
from ctxseg.prediction import (DISPLAY_MIN_SIDE, OVERLAY_ALPHA, PredictError, list_images,
                               output_stems, predict_image, read_rgb, resolve_classes, write_mask_and_overlay)
from pipeline import common
from pipeline.mlflow_tracking import mlflow_store
from pipeline.mlflow_tracking.model_store import download_model_file

log = logging.getLogger("ctxseg.predict")

__all__ = ["main", "run_predict", "read_model_source", "output_stems", "PredictError"]

RUN_ID = re.compile(r"^[0-9a-f]{32}$")


def read_model_source(source: str, params_file: Optional[Path] = None) -> ModelFile:
    """The model file named by ``--model``: a path, a folder, ``runs:/…``, ``models:/…`` or a run id."""
    path = Path(source)
    if path.is_dir() and not (path / "model.pt").is_file() and (path / "seeds").is_dir():
        seeds = sorted((p for p in (path / "seeds").iterdir() if (p / "model.pt").is_file()),
                       key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name))
        if seeds:  # a model folder of the train stage: one model file per seed
            log.info("%s: using seed %s of %s (pass %s/seeds/<seed> for another)", path, seeds[0].name,
                     ", ".join(p.name for p in seeds), path)
            path = seeds[0]
    if path.is_dir():
        path = path / "model.pt"
    if path.suffix == ".pt" or path.exists():
        if not path.is_file():
            raise PredictError(f"{path}: no such model file. Pass models/<name>/seeds/<seed>/model.pt (written by "
                               "`dvc repro train`), a models/<name> folder, an MLflow runs:/ or models:/ URI, or a "
                               "run id.")
        return read_model_file(path)
    if RUN_ID.match(source):
        source = f"runs:/{source}/model"
    if source.startswith(("runs:/", "models:/")):
        return download_model_file(source, _tracking_uri(params_file))
    raise PredictError(f"--model {source!r}: not a file, folder, MLflow URI (runs:/..., models:/...) or run id")


def _tracking_uri(params_file: Optional[Path]) -> str:
    if params_file is not None and params_file.is_file():
        params = load_params(params_file)
        return mlflow_store.tracking_uri(params, params_file.resolve().parent)
    return mlflow_store.tracking_uri(parse_params({}), Path.cwd())  # the default store of the current folder


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise PredictError(f"--device {name!r}: use auto, cpu, cuda or cuda:N") from None


def run_predict(model_source: str, input_path: Path, output: Path, *, params_file: Optional[Path] = None,
                meta_file: Optional[Path] = None, alpha: float = OVERLAY_ALPHA, device: str = "auto",
                short_side: Optional[int] = None, overlay_min_side: int = DISPLAY_MIN_SIDE,
                **inference) -> list[dict]:
    from tqdm import tqdm

    from ctxseg.data.config import IMAGENET_MEAN, IMAGENET_STD

    files = list_images(input_path)
    images, unreadable = {}, []
    for f in files:  # every input is read before anything is written; an unreadable one is reported, not fatal
        try:
            images[f] = read_rgb(f)
        except PredictError as err:
            log.warning("skipping %s", err)
            unreadable.append({"input": str(f), "error": str(err)})
    if not images:
        raise PredictError(f"{input_path}: none of the {len(files)} file(s) could be read as an image; first: "
                           f"{unreadable[0]['error']}")
    record = read_model_source(model_source, params_file)
    meta = None
    if meta_file is not None:
        meta_file = meta_file / "meta.json" if meta_file.is_dir() else meta_file
        meta = common.read_json(meta_file, "dataset meta", "Pass data/prepared/<dataset>/meta.json.")
    class_names, palette = resolve_classes(record.num_classes, source=record.source, class_names=record.class_names,
                                           dataset=record.dataset, meta=meta, meta_file=meta_file)
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    if params_file is not None and params_file.is_file():
        augment = load_params(params_file).data.augment
        mean, std = augment.mean, augment.std
    dev = _device(device)
    model, _ = load_model(record, dev)
    output.mkdir(parents=True, exist_ok=True)
    written = []
    for f, stem in tqdm([(f, s) for f, s in zip(files, output_stems(files)) if f in images], desc="predict",
                        unit="img"):
        image = images[f]
        mask = predict_image(model, image, mean, std, device=dev, short_side=short_side, **inference)
        mask_file, overlay_file = output / f"{stem}_mask.png", output / f"{stem}_overlay.png"
        shown = write_mask_and_overlay(mask, image, palette, mask_file, overlay_file, alpha, class_names,
                                       overlay_min_side)
        written.append({"input": str(f), "mask": mask_file.name, "overlay": overlay_file.name,
                        "size": [int(image.shape[0]), int(image.shape[1])],
                        "classes": shown["classes"], "overlay_scale": shown["scale"], "model": record.source})
    write_json(output / "predictions.json", merged_record(output / "predictions.json", written, unreadable, {
        "model": record.source, "model_name": record.model_name, "num_classes": record.num_classes,
        "class_names": class_names, "inference": {"short_side": short_side, **inference}}))
    if unreadable:
        raise PredictError(f"{len(unreadable)} of {len(files)} input(s) could not be read (listed under `unreadable` "
                           f"in {output / 'predictions.json'}; the other {len(written)} were written); first: "
                           f"{unreadable[0]['error']}")
    return written


def merged_record(path: Path, written: list[dict], unreadable: list[dict], run: dict) -> dict:
    """``predictions.json`` of an output folder used before: this run's images replace the entries of the same
    mask name, the earlier entries (whose files are still there) are kept, each entry naming its model."""
    images = {}
    if path.is_file():
        try:
            previous = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            previous = {}
        for entry in previous.get("images", []):
            if isinstance(entry, dict) and (path.parent / str(entry.get("mask", ""))).is_file():
                images[entry["mask"]] = {"model": previous.get("model"), **entry}
    images.update({entry["mask"]: entry for entry in written})
    return {**run, "images": [images[k] for k in sorted(images)], "unreadable": unreadable}


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
                        help="models/<name>/seeds/<seed>/model.pt (or its folder, or models/<name> for its first seed), "
                             "runs:/<run id>/model, models:/<name>@best, or a run id")
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
    parser.add_argument("--alpha", type=float, default=OVERLAY_ALPHA, help="mask opacity in the overlay (0-1)")
    parser.add_argument("--overlay-min-side", type=int, default=DISPLAY_MIN_SIDE,
                        help="enlarge overlays of smaller images to this short side (0: the input's size)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    args = parser.parse_args(argv)
    if not 0.0 <= args.alpha <= 1.0:
        raise PredictError(f"--alpha {args.alpha}: must be between 0 and 1")
    if args.crop_size < 1 or args.stride < 1:
        raise PredictError("--crop-size and --stride must be positive")
    written = run_predict(args.model, args.input, args.output, params_file=Path(args.params), meta_file=args.meta,
                          alpha=args.alpha, device=args.device, short_side=args.short_side, mode=args.mode,
                          crop_size=args.crop_size, stride=args.stride, scales=_scales(args.scales), flip=args.flip,
                          overlay_min_side=args.overlay_min_side)
    log.info("%d mask(s) and overlay(s) written to %s", len(written), args.output)


if __name__ == "__main__":
    raise SystemExit(main())
