"""Scoring a trained segmentor on a prepared split: the loop, the records it yields and the files.

:func:`evaluate` runs single-scale and (optionally) multi-scale + flip inference over a split in
one pass (the scale-1.0 pass is shared, see :func:`ctxseg.inference.predict_single_and_multi`),
scores predictions at the labels' own resolution (as mmseg does), keeps the palette predictions of
a fixed sample of images and the per-image class means of the pixel representation R (the points of
MCIBI Fig 3, in the space of MCIBI's memory; :func:`representation_features`).
:func:`metrics_record` turns the result into the full evaluation record
(``metrics/<model>.details.json``: model info, per-class IoU and accuracy, the multi-scale + flip
block, timing), and :func:`headline_metrics` into the few numbers of ``metrics/<model>.json``, the file
DVC declares as metrics: a metrics table (``dvc metrics show``) has one column per key of that file,
so it holds the headline numbers only. The ``write_*`` helpers write the evaluate stage's other
outputs atomically. Nothing here knows MLflow or DVC.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import torch

from ctxseg.inference import ClassifierInput, batched_by_size, predict_single_and_multi, resize_probs
from ctxseg.io import atomic_path, write_json
from ctxseg.metrics import ConfusionMatrix, named

log = logging.getLogger(__name__)

__all__ = [
    "Evaluation", "sample_indices", "evaluate", "class_prototypes", "metrics_record",
    "headline_metrics", "seed_headline", "seeds_record", "per_class_rows", "write_confusion", "write_predictions", "write_features",
    "HEADLINE", "HEADLINE_KEYS", "MS_FLIP_KEY", "DETAILS_SUFFIX", "details_file", "representation_features",
]

HEADLINE = ("mIoU", "pixAcc", "mAcc")
MS_FLIP_KEY = "ms_flip_mIoU"  # the multi-scale + flip mIoU in the headline file (absent without multi-scale)
HEADLINE_KEYS = HEADLINE + (MS_FLIP_KEY,)
DETAILS_SUFFIX = ".details.json"  # metrics/<model>.details.json: the full record, not a DVC metrics file


@dataclasses.dataclass
class Evaluation:
    """What one pass over a split produced."""

    single: ConfusionMatrix
    multi: Optional[ConfusionMatrix]
    predictions: dict[int, np.ndarray]          # dataset index -> uint8 class-id map (single scale)
    means: np.ndarray                           # [N, C] per-image class-mean features
    classes: np.ndarray                         # [N] their class ids
    image_index: np.ndarray                     # [N] their dataset indices
    seconds: float                              # model time (inference only)
    num_images: int
    scales: Optional[list[float]] = None
    flip: bool = False


def details_file(metrics_dir: Path, model_name: str) -> Path:
    """``metrics/<model>.details.json``: where the full record of a model's evaluation is written."""
    return Path(metrics_dir) / f"{model_name}{DETAILS_SUFFIX}"


def sample_indices(n: int, k: int) -> list[int]:
    """``k`` indices spread evenly over ``range(n)`` (the same for every model: fixed sample)."""
    if n <= 0 or k <= 0:
        return []
    if k >= n:
        return list(range(n))
    return sorted({int(round(i)) for i in np.linspace(0, n - 1, k)})


def representation_features(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The pixel representation R of each image in a single-scale whole-image pass: the features the
    feature-space figure plots (MCIBI Fig 3).

    A head that returns ``"r"`` among its outputs (MCIBI: R of Eq 3, the features its memory is a
    running class average of, Eq 6-10) gives that; every other head gives the input of its final
    classifier, which for the plain FCN head is the same 3x3 ConvBNReLU of stage 4 as MCIBI's R.
    MCIBI's classifier input is F = fusion(R, C_bi) (Eq 4), another space than the memory: stars of
    the memory drawn among points of F would sit apart from them by construction.
    """
    inner = getattr(model, "module", model)
    head = getattr(inner, "decode_head", None)
    seen: dict = {}

    def keep(_module, _inputs, output) -> None:
        if isinstance(output, dict) and torch.is_tensor(output.get("r")):
            seen["r"] = output["r"].detach()

    handle = head.register_forward_hook(keep) if head is not None else None
    try:
        with torch.no_grad(), ClassifierInput(model) as hook:
            model(images)
    finally:
        if handle is not None:
            handle.remove()
    if "r" in seen:
        return seen["r"]
    if hook.features is None:
        raise RuntimeError("the classifier forward hook recorded nothing; is decode_head.classifier used?")
    return hook.features


def class_prototypes(model: torch.nn.Module) -> Optional[np.ndarray]:
    """Dataset-level class representations [K, C] in the classifier-input space (MCIBI's memory), or None.

    Asks the model (``Segmentor.class_prototypes()``); models without that method fall back to the
    memory buffer found by :func:`ctxseg.inference.memory_of`.
    """
    model = getattr(model, "module", model)
    method = getattr(model, "class_prototypes", None)
    if callable(method):
        value = method()
    else:
        from ctxseg.inference import memory_of

        value = memory_of(model)
    return None if value is None else value.detach().float().cpu().numpy().astype(np.float32)


@torch.no_grad()
def evaluate(model: torch.nn.Module, samples: Iterable[tuple[torch.Tensor, torch.Tensor]], *, num_classes: int,
             ignore_index: int = 255, device: torch.device | str = "cpu", mode: str = "whole", crop_size: int = 512,
             stride: int = 341, scales: Optional[Sequence[float]] = None, flip: bool = True, batch_size: int = 8,
             keep_predictions: Iterable[int] = (), keep_features: Iterable[int] = (),
             progress=None) -> Evaluation:
    """Score ``model`` on ``(image [3,H,W], label [H',W'])`` samples (labels at their own resolution).

    ``scales=None`` skips multi-scale + flip. ``keep_predictions`` / ``keep_features`` are sample
    indices whose single-scale prediction / class-mean features are kept. ``progress`` is an optional
    callable taking the number of images just scored (e.g. ``tqdm.update``).
    """
    from ctxseg.visualize import class_mean_features

    device = torch.device(device)
    scales = list(scales) if scales else None
    single_cm = ConfusionMatrix(num_classes, ignore_index, device=device)
    ms_cm = ConfusionMatrix(num_classes, ignore_index, device=device) if scales else None
    vis_ids, feature_ids = set(keep_predictions), set(keep_features)
    predictions: dict[int, np.ndarray] = {}
    feats: list[tuple] = []
    seconds, count = 0.0, 0
    indexed = ((i, image, label) for i, (image, label) in enumerate(samples))
    for batch in batched_by_size(indexed, batch_size, key=lambda s: (tuple(s[1].shape), tuple(s[2].shape))):
        ids = [s[0] for s in batch]
        images = torch.stack([s[1] for s in batch]).to(device)
        labels = torch.stack([s[2] for s in batch]).to(device)
        start = time.perf_counter()
        single, ms = predict_single_and_multi(model, images, mode=mode, crop_size=crop_size, stride=stride,
                                              scales=scales, flip=flip)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds += time.perf_counter() - start
        prediction = resize_probs(single, labels.shape[-2:]).argmax(1)
        single_cm.update(prediction, labels)
        if ms_cm is not None:
            ms_cm.update(resize_probs(ms, labels.shape[-2:]).argmax(1), labels)
        for j, index in enumerate(ids):
            if index in vis_ids:
                predictions[index] = prediction[j].cpu().numpy().astype(np.uint8)
        wanted = [j for j, index in enumerate(ids) if index in feature_ids]
        if wanted:
            features = representation_features(model, images)
            means, classes, image_idx = class_mean_features(features[wanted].cpu(), labels[wanted].cpu(),
                                                            num_classes, ignore_index)
            feats.append((means, classes, np.asarray(ids)[wanted][image_idx]))
        count += len(batch)
        if progress is not None:
            progress(len(batch))
    if feats:
        means = np.concatenate([f[0] for f in feats]).astype(np.float32)
        classes = np.concatenate([f[1] for f in feats]).astype(np.int64)
        image_index = np.concatenate([f[2] for f in feats]).astype(np.int64)
    else:
        means, classes, image_index = np.zeros((0, 0), np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64)
    return Evaluation(single_cm, ms_cm, predictions, means, classes, image_index, seconds, count, scales, flip)


def metrics_record(result: Evaluation, class_names: Sequence[str], **info) -> dict:
    """The full evaluation record (``metrics/<model>.details.json``, what the register and report stages
    read): ``info`` (model, dataset, ...) then the metrics, per class and under ``ms_flip``."""
    single = result.single.compute()
    record = {**info, "num_images": result.num_images, "num_val_images": result.num_images}
    record.update({k: single[k] for k in HEADLINE})
    record["per_class_iou"] = named(single["per_class_iou"], class_names)
    record["per_class_acc"] = named(single["per_class_acc"], class_names)
    record["seconds_per_image"] = result.seconds / max(result.num_images, 1)
    if result.multi is not None:
        ms = result.multi.compute()
        record["ms_flip"] = {**{k: ms[k] for k in HEADLINE}, "per_class_iou": named(ms["per_class_iou"], class_names),
                             "scales": result.scales, "flip": result.flip}
    return record


def _nanmean(values: Sequence[Optional[float]]) -> Optional[float]:
    xs = [float(v) for v in values if v is not None and np.isfinite(v)]
    return sum(xs) / len(xs) if xs else None


def seed_headline(record: dict) -> dict:
    """One evaluation's headline numbers: ``mIoU``, ``pixAcc``, ``mAcc`` and ``ms_flip_mIoU`` (multi-scale)."""
    out = {k: float(record[k]) for k in HEADLINE}
    if "ms_flip" in record:
        out[MS_FLIP_KEY] = float(record["ms_flip"]["mIoU"])
    return out


def seeds_record(per_seed: Sequence[dict]) -> dict:
    """A model's record over its seeds (``metrics/<model>.details.json``), from one :func:`metrics_record`
    per seed (each with ``seed`` and, when tracked, ``run_id``):

    * the model info of the first seed; every headline number, per-class IoU / accuracy and the ms+flip
      block are the **mean over seeds** (a class missing from a seed's split is left out of its mean);
    * ``sd``: the sample standard deviation over seeds of each headline number (null with one seed);
    * ``seeds``: each seed's own headline numbers, per-class IoU and MLflow run, in the order given."""
    from ctxseg.stats import mean_sd

    first = per_seed[0]
    out = {k: v for k, v in first.items() if k not in ("seed", "run_id", "ms_flip", "per_class_iou",
                                                        "per_class_acc", *HEADLINE)}
    out["seconds_per_image"] = _nanmean([r.get("seconds_per_image") for r in per_seed])
    out.update({k: _nanmean([r[k] for r in per_seed]) for k in HEADLINE})
    for key in ("per_class_iou", "per_class_acc"):
        out[key] = {c: _nanmean([r[key].get(c) for r in per_seed]) for c in first[key]}
    if "ms_flip" in first:
        ms = [r["ms_flip"] for r in per_seed]
        out["ms_flip"] = {**{k: _nanmean([m[k] for m in ms]) for k in HEADLINE},
                          "per_class_iou": {c: _nanmean([m["per_class_iou"].get(c) for m in ms])
                                            for c in first["ms_flip"]["per_class_iou"]},
                          "scales": first["ms_flip"]["scales"], "flip": first["ms_flip"]["flip"]}
    heads = [seed_headline(r) for r in per_seed]
    out["sd"] = {k: mean_sd([h[k] for h in heads])[1] for k in heads[0]}
    out["seeds"] = [{"seed": r["seed"], "run_id": r.get("run_id"), **h, "per_class_iou": r["per_class_iou"]}
                    for r, h in zip(per_seed, heads)]
    return out


def headline_metrics(record: dict) -> dict:
    """The content of ``metrics/<model>.json``: flat numbers only. For a :func:`seeds_record`, the mean over
    seeds under the plain names (``mIoU``, ``pixAcc``, ``mAcc`` and, with multi-scale, ``ms_flip_mIoU``),
    so ``dvc metrics diff`` and ``dvc exp show`` compare means, each standard deviation as ``<name>_sd``
    (0 is written as 0, a single seed's as null) and the number of ``seeds``. DVC shows one column per key of a
    metrics file, so per-class values (the per-class plot file) and strings (the details file) stay out."""
    out = seed_headline(record)
    if "seeds" in record:
        for k in list(out):
            sd = record["sd"].get(k)
            out[f"{k}_sd"] = None if sd is None else float(sd)
        out["seeds"] = len(record["seeds"])
    return out


def per_class_rows(record: dict) -> list[dict]:
    """Rows of the per-class bar plot: ``{"class", "iou", "iou_ms_flip", "acc"}`` per class."""
    ms = record.get("ms_flip", {}).get("per_class_iou", {})
    acc = record.get("per_class_acc", {})
    return [{"class": c, "iou": v, "iou_ms_flip": ms.get(c), "acc": acc.get(c)}
            for c, v in record["per_class_iou"].items()]


def write_confusion(plot_dir: Path, matrix: torch.Tensor, class_names: Sequence[str], title: str) -> None:
    """``confusion.json`` (pixel counts, rows = ground truth) and ``confusion.png`` (row-normalised)."""
    from ctxseg.visualize import confusion_figure, save_png

    counts = matrix.cpu()
    write_json(plot_dir / "confusion.json", {"classes": list(class_names), "rows": "ground truth",
                                             "columns": "prediction", "matrix": counts.tolist()})
    save_png(confusion_figure(counts.numpy(), class_names, title=title), plot_dir / "confusion.png")


def write_predictions(pred_dir: Path, predictions: dict[int, np.ndarray], ids: Sequence[str], palette) -> None:
    """Palette PNGs ``<id>.png`` (pixel value = class id); the folder is replaced as a whole."""
    from ctxseg.visualize import palette_png

    with atomic_path(pred_dir) as tmp:
        tmp.mkdir(parents=True)
        for index, prediction in sorted(predictions.items()):
            palette_png(prediction, palette).save(tmp / f"{ids[index]}.png")


def write_features(path: Path, result: Evaluation, class_names: Sequence[str],
                   prototypes: Optional[np.ndarray] = None) -> None:
    """``features.npz``: means, classes, image_index, class_names and (MCIBI) ``memory`` = the prototypes."""
    arrays = {"means": result.means, "classes": result.classes, "image_index": result.image_index,
              "class_names": np.asarray(class_names)}
    if prototypes is not None:
        arrays["memory"] = np.asarray(prototypes, dtype=np.float32)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)
