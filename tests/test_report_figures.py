"""The numeric helpers behind the report's figures (ctxseg.visualize), against hand-computed values."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ctxseg.visualize import class_mean_features, overlay, palette_png, pca_2d


def test_class_mean_features_hand_case():
    # 2x2 features (2 channels) under a 4x4 label map: nearest downsampling reads labels at (0,0) (0,2) (2,0) (2,2)
    feats = torch.tensor([[[1.0, 10.0], [5.0, 7.0]],
                          [[2.0, 20.0], [6.0, 8.0]]])[None]
    labels = torch.full((1, 4, 4), 9)  # 9: not read by the downsampling
    labels[0, 0, 0], labels[0, 0, 2], labels[0, 2, 0], labels[0, 2, 2] = 0, 1, 0, 255
    second = torch.full((1, 4, 4), 255)  # a fully ignored image contributes nothing
    means, classes, images = class_mean_features(torch.cat([feats, feats]), torch.cat([labels, second]), num_classes=10)
    assert classes.tolist() == [0, 1] and images.tolist() == [0, 0]
    assert means.tolist() == [[3.0, 4.0], [10.0, 20.0]]


def test_pca_matches_an_eigendecomposition_reference():
    rng = np.random.default_rng(0)
    t = rng.normal(size=200)
    s = rng.normal(size=200)
    x = np.outer(t, [2.0, 1.0, -2.0]) + 0.3 * np.outer(s, [1.0, 0.0, 1.0]) + 0.01 * rng.normal(size=(200, 3))
    coords, ratio = pca_2d(x)
    centred = x - x.mean(0)
    values, vectors = np.linalg.eigh(np.cov(centred.T))
    order = np.argsort(values)[::-1]
    reference = centred @ vectors[:, order[:2]]
    assert np.allclose(np.abs(coords), np.abs(reference), atol=1e-8)
    assert np.allclose(ratio, values[order[:2]] / values.sum())
    assert ratio[0] > 0.9
    # deterministic sign: the largest-magnitude loading of PC1 (the 2.0 / -2.0 direction) is positive
    again, _ = pca_2d(x[::-1].copy())
    assert np.allclose(again[::-1], coords)


def test_overlay_and_palette_png():
    image = np.full((2, 2, 3), 100, np.uint8)
    mask = np.zeros((2, 2, 3), np.uint8)
    mask[0, 0] = (200, 0, 50)
    out = overlay(image, mask, alpha=0.25)
    assert out[0, 0].tolist() == [125, 75, 88] and out[1, 1].tolist() == [75, 75, 75]
    with pytest.raises(ValueError):
        overlay(image, mask[:1])
    label = np.array([[0, 1], [255, 1]], np.uint8)
    img = palette_png(label, [(10, 20, 30), (40, 50, 60)])
    assert img.mode == "P" and np.array_equal(np.asarray(img), label)
    assert np.asarray(img.convert("RGB"))[0, 1].tolist() == [40, 50, 60]
    assert np.asarray(img.convert("RGB"))[1, 0].tolist() == [0, 0, 0]  # ignore is black
