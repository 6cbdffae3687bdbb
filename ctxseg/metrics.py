"""Segmentation metrics from a confusion matrix: mIoU, pixel accuracy (pixAcc), mean class accuracy (mAcc).

The confusion matrix ``C`` has ``C[t, p]`` = number of pixels of true class ``t`` predicted as ``p``;
pixels labelled ``ignore_index`` are excluded. From it:

* IoU_c  = C[c,c] / (Σ_p C[c,p] + Σ_t C[t,c] − C[c,c])
* Acc_c  = C[c,c] / Σ_p C[c,p]
* pixAcc = Σ_c C[c,c] / Σ C
* mIoU / mAcc: the mean over classes whose denominator is non-zero (a class absent from both the
  ground truth and the prediction is left out, not counted as 0 or 1), as in mmsegmentation.
"""
from __future__ import annotations

import math
from typing import Optional

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
        self.matrix += torch.bincount(target * n + prediction, minlength=n * n).reshape(n, n)

    def merge(self, other: "ConfusionMatrix") -> None:
        self.matrix += other.matrix.to(self.matrix.device)

    def all_reduce(self) -> None:
        """Sum the matrix over all ranks of an initialised ``torch.distributed`` process group."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self.matrix, op=dist.ReduceOp.SUM)

    def compute(self) -> dict:
        return metrics_from_confusion(self.matrix)


def metrics_from_confusion(matrix: torch.Tensor) -> dict:
    """mIoU, pixAcc, mAcc and per-class IoU/accuracy (NaN for classes with a zero denominator)."""
    m = matrix.double().cpu()
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


def _nanmean(values: torch.Tensor) -> float:
    keep = ~torch.isnan(values)
    return float(values[keep].mean()) if bool(keep.any()) else float("nan")


def is_valid_fraction(value: float) -> bool:
    return not math.isnan(value) and 0.0 <= value <= 1.0
