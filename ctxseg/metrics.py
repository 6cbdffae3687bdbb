"""Segmentation metrics from a confusion matrix: mIoU, pixel accuracy (pixAcc), mean class accuracy (mAcc).

The confusion matrix ``C`` has ``C[t, p]`` = number of pixels of true class ``t`` predicted as ``p``;
pixels labelled ``ignore_index`` are excluded. From it:

* IoU_c  = C[c,c] / (Σ_p C[c,p] + Σ_t C[t,c] − C[c,c])
* Acc_c  = C[c,c] / Σ_p C[c,p]
* pixAcc = Σ_c C[c,c] / Σ C
* mIoU / mAcc: the mean over classes whose denominator is non-zero (a class absent from both the
  ground truth and the prediction is left out, not counted as 0 or 1), as in mmsegmentation.
  A class absent from the ground truth but predicted somewhere has IoU 0 (it counts in mIoU) and
  no accuracy (it does not count in mAcc).

The matrix is accumulated with one ``torch.bincount`` per batch (``t * K + p``), on the device the
predictions live on, and can be summed over ``torch.distributed`` ranks.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch


class ConfusionMatrix:
    """Accumulates a ``num_classes × num_classes`` confusion matrix across batches (int64, bincount)."""

    def __init__(self, num_classes: int, ignore_index: int = 255, device: Optional[torch.device] = None):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, prediction: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch. ``prediction`` and ``target`` are integer class maps of the same shape."""
        if prediction.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(prediction.shape)} != target shape {tuple(target.shape)}")
        n = self.num_classes
        target = target.reshape(-1).to(self.matrix.device)
        prediction = prediction.reshape(-1).to(self.matrix.device)
        valid = target != self.ignore_index
        target, prediction = target[valid].long(), prediction[valid].long()
        bad = (target < 0) | (target >= n)
        if bool(bad.any()):
            raise ValueError(
                f"target holds label {int(target[bad][0])} outside [0, {n - 1}] that is not ignore_index "
                f"({self.ignore_index}); check the dataset's label conversion"
            )
        bad = (prediction < 0) | (prediction >= n)
        if bool(bad.any()):
            raise ValueError(
                f"prediction holds class {int(prediction[bad][0])} outside [0, {n - 1}]: the model predicts more "
                f"classes than the dataset has ({n})"
            )
        self.matrix += torch.bincount(target * n + prediction, minlength=n * n).reshape(n, n)

    def merge(self, other: "ConfusionMatrix") -> None:
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge a {other.num_classes}-class matrix into a {self.num_classes}-class one")
        self.matrix += other.matrix.to(self.matrix.device)

    def all_reduce(self) -> None:
        """Sum the matrix over all ranks of an initialised ``torch.distributed`` process group."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self.matrix, op=dist.ReduceOp.SUM)

    def reset(self) -> None:
        self.matrix.zero_()

    def compute(self) -> dict:
        return metrics_from_confusion(self.matrix)


def confusion_matrix(prediction: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = 255) -> torch.Tensor:
    """One-shot confusion matrix ``C[t, p]`` of integer maps (see :class:`ConfusionMatrix`)."""
    cm = ConfusionMatrix(num_classes, ignore_index, device=prediction.device)
    cm.update(prediction, target)
    return cm.matrix


def metrics_from_confusion(matrix: torch.Tensor) -> dict:
    """mIoU, pixAcc, mAcc and per-class IoU/accuracy (NaN for classes with a zero denominator)."""
    m = torch.as_tensor(matrix).double().cpu()
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"a confusion matrix must be square, got shape {tuple(m.shape)}")
    tp = m.diag()
    gt = m.sum(1)
    pred = m.sum(0)
    union = gt + pred - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    acc = torch.where(gt > 0, tp / gt.clamp(min=1), torch.full_like(tp, float("nan")))
    total = m.sum()
    return {
        "mIoU": _nanmean(iou),
        "pixAcc": float(tp.sum() / total) if total > 0 else float("nan"),
        "mAcc": _nanmean(acc),
        "per_class_iou": [float(v) for v in iou],
        "per_class_acc": [float(v) for v in acc],
    }


def normalize_confusion(matrix: torch.Tensor, by: str = "true") -> torch.Tensor:
    """Row- (``by="true"``: recall per true class) or column- (``"pred"``: precision) normalised matrix.

    Rows/columns with no pixels stay 0.
    """
    m = torch.as_tensor(matrix).double().cpu()
    if by == "true":
        return m / m.sum(1, keepdim=True).clamp(min=1)
    if by == "pred":
        return m / m.sum(0, keepdim=True).clamp(min=1)
    raise ValueError(f"by must be 'true' or 'pred', got {by!r}")


def named(values: Sequence[float], class_names: Sequence[str]) -> dict[str, float]:
    """``[v0, v1, ...]`` -> ``{class_name: v}`` (the layout of ``metrics/<model>.json``)."""
    if len(values) != len(class_names):
        raise ValueError(f"{len(values)} values but {len(class_names)} class names")
    return dict(zip(class_names, (float(v) for v in values)))


def _nanmean(values: torch.Tensor) -> float:
    keep = ~torch.isnan(values)
    return float(values[keep].mean()) if bool(keep.any()) else float("nan")


def is_valid_fraction(value: float) -> bool:
    return not math.isnan(value) and 0.0 <= value <= 1.0
