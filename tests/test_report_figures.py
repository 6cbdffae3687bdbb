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


def test_colour_names_tell_the_look_alike_classes_apart():
    from ctxseg.visualize import colour_name

    # the synthetic dataset's sea and lake, desert and beach
    assert colour_name((0, 70, 200)) == "blue" and colour_name((80, 170, 255)) == "light blue"
    assert colour_name((230, 200, 90)) == "yellow" and colour_name((255, 150, 70)) == "orange"
    assert colour_name((20, 90, 40)) == "dark green" and colour_name((128, 128, 128)) == "grey"
    assert colour_name((255, 255, 255)) == "white" and colour_name((0, 0, 0)) == "black"


def test_feature_space_text_says_whether_points_gather_around_the_memory():
    from ctxseg.study import feature_space_text
    from ctxseg.visualize import class_spread

    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    classes = np.repeat(np.arange(3), 20)
    means = centres[classes] + 0.5 * rng.normal(size=(60, 2))
    near = class_spread(means, classes, centres)
    assert near["nearest_memory_own"] == 1.0 and near["to_memory"] < 1.0
    far = class_spread(means, classes, centres[[1, 2, 0]])  # every entry sits on another class
    assert far["nearest_memory_own"] == 0.0
    panel = {"model": "m", "means": means, "classes": classes}
    text = feature_space_text({"m": {**panel, "memory": centres}})
    assert "the dots do gather around their class's memory entry" in text
    text = feature_space_text({"m": {**panel, "memory": centres[[1, 2, 0]]}})
    assert "the dots do not gather" in text and "0% of the dots are nearer their own class's memory entry" in text


def test_sweep_scatter_marks_each_trial_with_its_epochs_and_model_colour():
    from matplotlib.colors import to_rgba

    from ctxseg.visualize import sweep_scatter_figure

    colours = {"fcn_mcibi": (1.0, 0.5, 0.0, 1.0)}
    fig = sweep_scatter_figure({"m0": ([0.5, 0.9, 0.7], [44.0, 40.0, 42.0], [False, True, False],
                                       ["fcn_mcibi"] * 3, [4, 2, 4])}, colours=colours)
    ax = fig.axes[0]
    assert sorted(t.get_text() for t in ax.texts) == ["2 ep", "4 ep", "4 ep"]
    filled, hollow = ax.collections[:2]
    assert filled.get_label() == "fcn_mcibi: ran every epoch" and len(filled.get_offsets()) == 2
    assert hollow.get_label() == "fcn_mcibi: stopped early (ASHA)" and len(hollow.get_offsets()) == 1
    assert tuple(filled.get_facecolor()[0]) == to_rgba(colours["fcn_mcibi"])
    assert tuple(hollow.get_edgecolor()[0]) == to_rgba(colours["fcn_mcibi"])
