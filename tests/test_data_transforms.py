"""Training / evaluation transforms and the Dataset's reproducible seeding."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from ctxseg.data import DataConfig, SegmentationDataset, SyntheticConfig, download_dataset, prepare_dataset
from ctxseg.data.config import AugmentConfig
from ctxseg.data.transforms import (
    Compose,
    Normalize,
    Pad,
    PhotometricDistortion,
    RandomCrop,
    RandomFlip,
    RandomResize,
    ResizeShortSide,
    build_eval_transform,
    build_train_transform,
    hsv_to_rgb,
    rgb_to_hsv,
)


def _pair(h=64, w=80, seed=0):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    lbl = np.zeros((h, w), dtype=np.uint8)
    lbl[:, w // 2:] = 5
    lbl[: h // 4, : w // 4] = 255
    return img, lbl


def test_train_transform_shapes_types_and_reproducibility():
    cfg = DataConfig(augment=AugmentConfig(crop_size=(48, 56)))
    t = build_train_transform(cfg)
    img, lbl = _pair()
    x1, y1 = t(img, lbl, np.random.default_rng(7))
    x2, y2 = t(img, lbl, np.random.default_rng(7))
    x3, y3 = t(img, lbl, np.random.default_rng(8))
    assert x1.shape == (3, 48, 56) and x1.dtype == torch.float32
    assert y1.shape == (48, 56) and y1.dtype == torch.int64
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(x1, x3)
    assert set(torch.unique(y1).tolist()) <= {0, 5, 255}


@pytest.mark.parametrize("seed", range(5))
def test_random_resize_keeps_label_values_nearest(seed):
    img, lbl = _pair()
    rr = RandomResize((0.5, 2.0))
    out_i, out_l = rr(img, lbl, np.random.default_rng(seed))
    assert out_i.shape[:2] == out_l.shape
    assert 32 <= out_l.shape[0] <= 128
    assert set(np.unique(out_l).tolist()) <= {0, 5, 255}  # nearest: no interpolated ids


def test_random_resize_base_size():
    img, lbl = _pair(64, 80)
    out_i, _ = RandomResize((1.0, 1.0), base_size=32)(img, lbl, np.random.default_rng(0))
    assert out_i.shape[:2] == (32, 40)


def test_cat_max_ratio_rejects_dominated_crops():
    lbl = np.zeros((100, 100), dtype=np.uint8)
    lbl[:, 80:] = 1  # class 0 covers 80 %
    img = np.zeros((100, 100, 3), dtype=np.uint8)

    def ratio_ok(crop_lbl):
        c = np.bincount(crop_lbl.ravel())
        c = c[c > 0]
        return len(c) > 1 and c.max() / c.sum() < 0.75

    with_ratio = sum(ratio_ok(RandomCrop((40, 40), 0.75, 10)(img, lbl, np.random.default_rng(s))[1]) for s in range(40))
    without = sum(ratio_ok(RandomCrop((40, 40), 1.0)(img, lbl, np.random.default_rng(s))[1]) for s in range(40))
    assert with_ratio >= 36 and without <= 20


def test_pad_uses_ignore_and_zero_after_normalize():
    img, lbl = _pair(20, 30)
    cfg = AugmentConfig()
    x, y = Compose([Normalize(cfg.mean, cfg.std), Pad((32, 40))])(img, lbl, np.random.default_rng(0))
    assert x.shape == (32, 40, 3) and y.shape == (32, 40)
    assert (y[20:] == 255).all() and (y[:, 30:] == 255).all()
    assert np.all(x[20:] == 0)
    assert np.array_equal(y[:20, :30], lbl)


def test_flip_and_photometric():
    img, lbl = _pair()
    fi, fl = RandomFlip(1.0)(img, lbl, np.random.default_rng(0))
    assert np.array_equal(fi, img[:, ::-1]) and np.array_equal(fl, lbl[:, ::-1])
    changed = 0
    for s in range(5):
        pi, pl = PhotometricDistortion()(img, lbl, np.random.default_rng(s))
        assert pi.dtype == np.uint8 and pi.shape == img.shape
        assert pl is lbl
        changed += int(not np.array_equal(pi, img))
    assert changed >= 4


def test_hsv_round_trip():
    rgb = np.random.default_rng(0).uniform(0, 255, size=(50, 3))
    assert np.allclose(hsv_to_rgb(rgb_to_hsv(rgb)), rgb, atol=1e-6)
    # pure red is hue 0, pure green 120
    h = rgb_to_hsv(np.array([[255.0, 0, 0], [0, 255.0, 0]]))[:, 0]
    assert np.allclose(h, [0, 120])


def test_eval_transform_short_side_and_keep():
    img, lbl = _pair(64, 80)
    x, y = build_eval_transform(DataConfig(eval_short_side=32))(img, lbl, np.random.default_rng(0))
    assert x.shape == (3, 32, 40) and y.shape == (32, 40)
    assert set(torch.unique(y).tolist()) <= {0, 5, 255}
    x, y = build_eval_transform(DataConfig())(img, lbl, np.random.default_rng(0))
    assert x.shape == (3, 64, 80) and torch.equal(y, torch.from_numpy(lbl).long())
    mean = torch.tensor(AugmentConfig().mean).view(3, 1, 1)
    std = torch.tensor(AugmentConfig().std).view(3, 1, 1)
    assert torch.allclose(x, (torch.from_numpy(img).permute(2, 0, 1).float() - mean) / std, atol=1e-5)
    _, y_full = ResizeShortSide(32, resize_label=False)(img, lbl, None)
    assert y_full.shape == (64, 80)


@pytest.fixture
def data_prepared(tmp_path):
    cfg = DataConfig(synthetic=SyntheticConfig(num_train=8, num_val=2), augment=AugmentConfig(crop_size=(64, 64)))
    download_dataset(cfg, tmp_path / "raw")
    prepare_dataset(cfg, tmp_path / "raw", tmp_path / "prep")
    return cfg, tmp_path / "prep"


def _epoch(ds, workers, persistent=False, loader=None):
    dl = loader or DataLoader(ds, batch_size=4, shuffle=False, num_workers=workers,
                              persistent_workers=persistent and workers > 0,
                              generator=torch.Generator().manual_seed(0))
    return [b for b in dl], dl


def _same(a, b):
    return all(torch.equal(x0, x1) and torch.equal(y0, y1) for (x0, y0), (x1, y1) in zip(a, b))


def test_set_epoch_seeding_independent_of_workers(data_prepared):
    cfg, root = data_prepared
    ds = SegmentationDataset(root, "train", build_train_transform(cfg), seed=5)
    assert len(ds) == 8 and ds.meta["num_classes"] == 13 and ds.ids[0] == "train_00000"
    ds.set_epoch(0)
    e0, _ = _epoch(ds, 0)
    e0_w, _ = _epoch(ds, 2)
    assert _same(e0, e0_w)
    # persistent workers: set_epoch in the main process reaches them through shared memory
    p0, loader = _epoch(ds, 2, persistent=True)
    assert _same(e0, p0)
    ds.set_epoch(1)
    p1, _ = _epoch(ds, 2, loader=loader)
    e1, _ = _epoch(ds, 0)
    assert _same(e1, p1) and not _same(e0, e1)


@pytest.mark.parametrize("workers,persistent", [(0, False), (2, True)])
def test_epochs_differ_without_set_epoch(data_prepared, workers, persistent):
    cfg, root = data_prepared
    ds = SegmentationDataset(root, "train", build_train_transform(cfg), seed=5)
    assert ds.epoch is None
    a, loader = _epoch(ds, workers, persistent)
    b, _ = _epoch(ds, workers, persistent, loader=loader)
    assert not _same(a, b)  # fresh augmentation every epoch
    ds2 = SegmentationDataset(root, "train", build_train_transform(cfg), seed=5)
    a2, _ = _epoch(ds2, workers, persistent)
    assert _same(a, a2)  # reproducible for a fixed loader seed and worker count


def test_dataset_errors(data_prepared):
    _, root = data_prepared
    with pytest.raises(FileNotFoundError, match="split 'test' does not exist"):
        SegmentationDataset(root, "test")
    with pytest.raises(FileNotFoundError, match="preprocess"):
        SegmentationDataset(root.parent / "nowhere", "train")
    x, y = SegmentationDataset(root, "val")[0]  # default transform: normalise only
    assert x.shape == (3, 128, 128) and y.dtype == torch.int64


def test_synthetic_upscaling_crop_warning(caplog):
    with caplog.at_level("WARNING", logger="ctxseg.data.transforms"):
        build_train_transform(DataConfig())  # papers' [0.5, 2.0] with a 128 crop of 128-px images
    assert "cut the cue off" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="ctxseg.data.transforms"):
        build_train_transform(DataConfig(augment=AugmentConfig(scale_range=(0.5, 1.0))))
        build_train_transform(DataConfig(name="ade20k"))
    assert caplog.text == ""
