"""Confusion matrix and mIoU / pixAcc / mAcc against hand-computed cases and a slow reference."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ctxseg.metrics import ConfusionMatrix, confusion_matrix, metrics_from_confusion, named, normalize_confusion


def test_hand_case_with_ignore_label():
    # valid pixels (t, p): (0,0) (0,1) (1,1) (1,1) (2,0); the ignore pixel is predicted 2 and must not count
    target = torch.tensor([[0, 0, 1], [1, 2, 255]])
    pred = torch.tensor([[0, 1, 1], [1, 0, 2]])
    cm = ConfusionMatrix(3)
    cm.update(pred, target)
    assert cm.matrix.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    m = cm.compute()
    # IoU0 = 1/(2+2-1), IoU1 = 2/(2+3-2), IoU2 = 0/(1+0-0)
    assert m["per_class_iou"] == pytest.approx([1 / 3, 2 / 3, 0.0])
    assert m["mIoU"] == pytest.approx(1 / 3)
    assert m["pixAcc"] == pytest.approx(3 / 5)
    assert m["per_class_acc"] == pytest.approx([1 / 2, 1.0, 0.0])
    assert m["mAcc"] == pytest.approx(1 / 2)


def test_absent_classes_left_out_of_the_means():
    # class 2: predicted but absent from the ground truth -> IoU 0 (counts), accuracy undefined (left out)
    # class 3: absent from both -> IoU and accuracy undefined, left out of both means
    target = torch.tensor([0, 0, 1, 1])
    pred = torch.tensor([0, 2, 1, 1])
    m = metrics_from_confusion(confusion_matrix(pred, target, 4))
    iou, acc = m["per_class_iou"], m["per_class_acc"]
    assert iou[:3] == pytest.approx([0.5, 1.0, 0.0]) and math.isnan(iou[3])
    assert acc[:2] == pytest.approx([0.5, 1.0]) and math.isnan(acc[2]) and math.isnan(acc[3])
    assert m["mIoU"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    assert m["mAcc"] == pytest.approx(0.75)
    assert m["pixAcc"] == pytest.approx(3 / 4)


def test_everything_ignored_gives_nan_not_an_error():
    m = metrics_from_confusion(confusion_matrix(torch.zeros(2, 2, dtype=torch.long),
                                                torch.full((2, 2), 255), 3))
    assert math.isnan(m["mIoU"]) and math.isnan(m["pixAcc"]) and math.isnan(m["mAcc"])


def _slow_reference(pred: np.ndarray, target: np.ndarray, k: int, ignore: int = 255):
    matrix = np.zeros((k, k), dtype=np.int64)
    for t, p in zip(target.ravel(), pred.ravel()):
        if t != ignore:
            matrix[t, p] += 1
    ious = []
    for c in range(k):
        union = matrix[c].sum() + matrix[:, c].sum() - matrix[c, c]
        if union > 0:
            ious.append(matrix[c, c] / union)
    return matrix, float(np.mean(ious))


def test_accumulated_batches_match_a_slow_reference():
    rng = np.random.default_rng(0)
    k = 5
    target = rng.integers(0, k, size=(6, 17, 13))
    target[rng.random(target.shape) < 0.1] = 255
    target[target == 4] = 3  # class 4 never in the ground truth
    pred = rng.integers(0, k - 1, size=target.shape)  # ... nor predicted
    cm = ConfusionMatrix(k)
    for i in range(0, 6, 2):  # three batches
        cm.update(torch.from_numpy(pred[i:i + 2]), torch.from_numpy(target[i:i + 2]))
    matrix, miou = _slow_reference(pred, target, k)
    assert cm.matrix.numpy().tolist() == matrix.tolist()
    assert cm.compute()["mIoU"] == pytest.approx(miou)
    other = ConfusionMatrix(k)
    other.update(torch.from_numpy(pred), torch.from_numpy(target))
    other.merge(cm)
    assert (other.matrix == 2 * cm.matrix).all()


def test_bad_inputs_raise_clear_errors():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="outside"):
        cm.update(torch.tensor([0, 1]), torch.tensor([0, 7]))
    with pytest.raises(ValueError, match="more classes"):
        cm.update(torch.tensor([0, 5]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="shape"):
        cm.update(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long))


def test_normalize_and_named():
    m = torch.tensor([[3, 1], [0, 0]])
    assert normalize_confusion(m, "true").tolist() == [[0.75, 0.25], [0.0, 0.0]]
    assert normalize_confusion(m, "pred").tolist() == [[1.0, 1.0], [0.0, 0.0]]
    assert named([0.5, 0.25], ["sea", "lake"]) == {"sea": 0.5, "lake": 0.25}
    with pytest.raises(ValueError):
        named([0.5], ["sea", "lake"])
