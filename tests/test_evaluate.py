"""The evaluate stage on a hand-made prepared dataset and an untrained model (no Ray, no MLflow)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ctxseg.config import parse_params
from ctxseg.models import ModelConfig, build_segmentor
from pipeline import common

CLASSES = ["sea", "lake", "ship", "swan"]
PALETTE = [[0, 70, 200], [80, 170, 255], [140, 60, 20], [250, 250, 250]]


def make_prepared(root: Path, n: int = 3, size: int = 32, split: str = "val", seed: int = 0) -> Path:
    """A prepared-dataset folder (images, labels with ignore pixels, split list, meta.json)."""
    rng = np.random.default_rng(seed)
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "labels" / split).mkdir(parents=True, exist_ok=True)
    ids = [f"{split}_{i:03d}" for i in range(n)]
    for i in ids:
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / "images" / split / f"{i}.png")
        label = rng.integers(0, len(CLASSES), (size, size)).astype(np.uint8)
        label[:2] = 255
        Image.fromarray(label, mode="L").save(root / "labels" / split / f"{i}.png")
    (root / f"{split}.txt").write_text("\n".join(ids) + "\n")
    meta = {"dataset": "synthetic", "num_classes": len(CLASSES), "class_names": CLASSES, "palette": PALETTE,
            "ignore_index": 255, "splits": {split: n}}
    (root / "meta.json").write_text(json.dumps(meta))
    return root


def save_model(path: Path, cfg: ModelConfig, num_classes: int = len(CLASSES), seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_segmentor(cfg, num_classes).eval()
    if cfg.context == "mcibi":
        model.decode_head.memory.memory.normal_()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "model_config": cfg.model_dump(mode="json"), "model_name": path.parent.name,
                "num_classes": num_classes, "dataset": "synthetic", "class_names": CLASSES}, path)
    return model


def small_params(seeds=(0,), **evaluate):
    ev = {"scales": [0.75, 1.0], "flip": True, "num_visualisations": 2, "batch_size": 2, "log_mlflow": False}
    ev.update(evaluate)
    return parse_params({"seeds": list(seeds), "models": {"fcn": {"context": "none", "channels": 16},
                                                          "fcn_mcibi": {"context": "mcibi", "channels": 16}},
                         "evaluate": ev})


def test_evaluate_writes_metrics_plots_predictions_and_features(tmp_path):
    from pipeline.evaluate import evaluate_model

    params = small_params(seeds=(3, 7))
    paths = common.Paths(params, root=tmp_path)
    make_prepared(paths.prepared)
    models = [save_model(paths.seed_dir("fcn_mcibi", s) / "model.pt", params.models["fcn_mcibi"], seed=s)
              for s in (3, 7)]
    model = models[0]  # the first seed's predictions and features stand for the model

    report = evaluate_model(params, "fcn_mcibi", paths)

    # the DVC metrics file: the headline numbers only, flat, numbers (one short row in `dvc metrics show`):
    # the means over seeds under the plain names, so `dvc metrics diff` compares means, then their sd
    headline = json.loads(paths.metrics_file("fcn_mcibi").read_text())
    assert list(headline) == ["mIoU", "pixAcc", "mAcc", "ms_flip_mIoU", "mIoU_sd", "pixAcc_sd", "mAcc_sd",
                              "ms_flip_mIoU_sd", "seeds"]
    assert headline["seeds"] == 2
    assert all(type(v) is float and 0 <= v <= 1 for k, v in headline.items() if k != "seeds")
    assert headline["mIoU"] == pytest.approx(report["mIoU"])
    assert headline["ms_flip_mIoU"] == pytest.approx(report["ms_flip"]["mIoU"])
    per_seed = [s["mIoU"] for s in report["seeds"]]
    assert [s["seed"] for s in report["seeds"]] == [3, 7] and per_seed[0] != per_seed[1]
    assert headline["mIoU"] == pytest.approx(sum(per_seed) / 2)
    assert headline["mIoU_sd"] == pytest.approx(abs(per_seed[0] - per_seed[1]) / 2 ** 0.5)
    # everything else: the details record (what register and report read)
    metrics = json.loads((paths.metrics / "fcn_mcibi.details.json").read_text())
    assert metrics == json.loads(json.dumps(report))
    assert set(metrics["per_class_iou"]) == set(CLASSES)
    assert metrics["mIoU"] == headline["mIoU"] and metrics["ms_flip"]["mIoU"] == headline["ms_flip_mIoU"]
    assert metrics["ms_flip"]["scales"] == [0.75, 1.0] and 0 <= metrics["ms_flip"]["mIoU"] <= 1
    assert metrics["num_images"] == 3 and metrics["context"] == "mcibi"

    # the metrics agree with an independent single-scale computation
    from ctxseg.data import SegmentationDataset
    from ctxseg.data.transforms import build_eval_transform
    from ctxseg.metrics import ConfusionMatrix

    ds = SegmentationDataset(paths.prepared, "val", build_eval_transform(params.data))
    matrices, preds = [], {}
    with torch.no_grad():
        for n, m in enumerate(models):
            cm = ConfusionMatrix(len(CLASSES))
            for i in range(len(ds)):
                image, label = ds[i]
                pred = m(image[None])["logits"].argmax(1)[0]
                preds.setdefault(ds.ids[i], pred)  # the first seed's
                cm.update(pred, label)
            assert report["seeds"][n]["mIoU"] == pytest.approx(cm.compute()["mIoU"])
            matrices.append(cm.matrix)
    assert metrics["mIoU"] == pytest.approx(np.mean([s["mIoU"] for s in report["seeds"]]))
    confusion = json.loads((paths.plots / "fcn_mcibi" / "confusion.json").read_text())
    assert confusion["matrix"] == (matrices[0] + matrices[1]).tolist(), "pixel counts summed over seeds"

    # DVC plots data
    bars = json.loads((paths.plots / "fcn_mcibi" / "per_class_iou.json").read_text())
    assert [b["class"] for b in bars] == CLASSES
    assert [b["iou"] for b in bars] == [metrics["per_class_iou"][c] for c in CLASSES]
    assert [b["iou_ms_flip"] for b in bars] == [metrics["ms_flip"]["per_class_iou"][c] for c in CLASSES]
    assert (paths.plots / "fcn_mcibi" / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # palette PNGs of the fixed sample (first and last image): colours shown, pixel values = class ids
    written = sorted((paths.plots / "fcn_mcibi" / "predictions").glob("*.png"))
    assert [p.stem for p in written] == ["val_000", "val_002"]
    with Image.open(written[0]) as im:
        assert im.mode == "P"
        assert np.array_equal(np.asarray(im), preds["val_000"].numpy())
        assert im.getpalette()[:3] == PALETTE[0]

    # classifier-input features and the memory for the feature-space figure
    with np.load(paths.plots / "fcn_mcibi" / "features.npz") as f:
        assert f["means"].shape[1] == 16 and len(f["means"]) == len(f["classes"]) == len(f["image_index"])
        assert set(f["image_index"].tolist()) <= {0, 1, 2}
        assert f["memory"].shape == (len(CLASSES), 16)
        assert np.allclose(f["memory"], model.decode_head.memory.memory.numpy())
        # the points live in the memory's space: class means of R (the features the memory averages),
        # not of the fused classifier input F = fusion(R, C_bi)
        from ctxseg.visualize import class_mean_features

        image, label = ds[0]
        seen = {}
        hooks = [model.decode_head.bottleneck.register_forward_hook(lambda m, i, o: seen.__setitem__("r", o)),
                 model.decode_head.classifier.register_forward_pre_hook(lambda m, i: seen.__setitem__("f", i[0]))]
        with torch.no_grad():
            model(image[None])
        for h in hooks:
            h.remove()
        first = f["image_index"] == 0
        r_means, r_classes, _ = class_mean_features(seen["r"], label[None], len(CLASSES))
        f_means, _, _ = class_mean_features(seen["f"], label[None], len(CLASSES))
        assert f["classes"][first].tolist() == r_classes.tolist()
        assert np.allclose(f["means"][first], r_means, atol=1e-5)
        assert not np.allclose(f["means"][first], f_means, atol=1e-3)


def test_evaluate_without_multi_scale_has_no_ms_block_and_baseline_has_no_memory(tmp_path):
    from pipeline.evaluate import evaluate_model

    params = small_params(multi_scale=False, num_visualisations=0, feature_images=1, mode="slide", crop_size=16,
                          stride=12)
    paths = common.Paths(params, root=tmp_path)
    make_prepared(paths.prepared, n=2)
    save_model(paths.seed_dir("fcn", 0) / "model.pt", params.models["fcn"])
    report = evaluate_model(params, "fcn", paths)
    assert "ms_flip" not in report and report["inference"]["mode"] == "slide"
    headline = json.loads(paths.metrics_file("fcn").read_text())
    assert headline == {**{k: pytest.approx(report[k]) for k in ("mIoU", "pixAcc", "mAcc")},
                        "mIoU_sd": None, "pixAcc_sd": None, "mAcc_sd": None, "seeds": 1}, "one seed: no sd"
    assert list((paths.plots / "fcn" / "predictions").iterdir()) == []
    with np.load(paths.plots / "fcn" / "features.npz") as f:
        assert "memory" not in f.files and set(f["image_index"].tolist()) == {0}


def test_class_count_mismatch_and_missing_model_are_clear_errors(tmp_path):
    from ctxseg.checkpoint import ModelFileError, read_model_file
    from pipeline.evaluate import evaluate_model

    params = small_params()
    paths = common.Paths(params, root=tmp_path)
    make_prepared(paths.prepared, n=1)
    with pytest.raises(ModelFileError, match="dvc repro train"):
        evaluate_model(params, "fcn", paths)
    save_model(paths.seed_dir("fcn", 0) / "model.pt", params.models["fcn"], num_classes=6)
    with pytest.raises(ModelFileError, match="predicts 6 classes but the dataset has 4"):
        evaluate_model(params, "fcn", paths)
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(ModelFileError, match="garbage.pt"):
        read_model_file(bad)


def test_sample_indices_are_fixed_and_spread():
    from ctxseg.evaluation import sample_indices

    assert sample_indices(10, 4) == [0, 3, 6, 9]
    assert sample_indices(3, 5) == [0, 1, 2]
    assert sample_indices(5, 0) == [] and sample_indices(0, 3) == []


def test_predictions_are_scored_at_the_label_resolution(tmp_path):
    from pipeline.evaluate import evaluate_model

    params = parse_params({"seeds": [0], "models": {"fcn": {"context": "none", "channels": 16}},
                           "data": {"eval_short_side": 16},
                           "evaluate": {"multi_scale": False, "num_visualisations": 1, "log_mlflow": False}})
    paths = common.Paths(params, root=tmp_path)
    make_prepared(paths.prepared, n=1, size=32)
    save_model(paths.seed_dir("fcn", 0) / "model.pt", params.models["fcn"])
    evaluate_model(params, "fcn", paths)
    confusion = json.loads((paths.plots / "fcn" / "confusion.json").read_text())
    assert np.asarray(confusion["matrix"]).sum() == 32 * 32 - 2 * 32  # every labelled full-resolution pixel
    with Image.open(paths.plots / "fcn" / "predictions" / "val_000.png") as im:
        assert im.size == (32, 32)
