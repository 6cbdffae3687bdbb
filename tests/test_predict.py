"""pipeline.predict: masks of the input's size, overlays, clear errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ctxseg.data.config import IMAGENET_MEAN, IMAGENET_STD
from ctxseg.models import ModelConfig
from test_evaluate import CLASSES, PALETTE, make_prepared, save_model


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "models" / "fcn" / "model.pt"
    model = save_model(path, ModelConfig(context="none", channels=16))
    return path, model


def _images(folder, sizes=((37, 53), (20, 30))):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {}
    for i, (h, w) in enumerate(sizes):
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        name = f"img{i}.png" if i % 2 == 0 else f"img{i}.jpg"
        Image.fromarray(arr).save(folder / name, quality=95)
        arrays[name] = np.asarray(Image.open(folder / name).convert("RGB"))
    (folder / "notes.txt").write_text("not an image, skipped by extension")
    return arrays


def test_predict_writes_masks_of_the_input_size_and_overlays(tmp_path, model_file):
    from pipeline.predict import main

    path, model = model_file
    arrays = _images(tmp_path / "in")
    out = tmp_path / "out"
    meta = make_prepared(tmp_path / "prepared", n=1, size=8) / "meta.json"  # the same 4 classes, with a palette
    rc = main(["--model", str(path.parent), "--input", str(tmp_path / "in"), "--output", str(out),
               "--params", str(tmp_path / "absent.yaml"), "--meta", str(meta)])
    assert rc == 0
    report = json.loads((out / "predictions.json").read_text())
    assert report["class_names"] == CLASSES and len(report["images"]) == 2
    for name, image in arrays.items():
        stem = name.rsplit(".", 1)[0]
        with Image.open(out / f"{stem}_mask.png") as mask_img:
            assert mask_img.mode == "P" and mask_img.size == (image.shape[1], image.shape[0])
            mask = np.asarray(mask_img)
        # the same prediction computed directly: normalise, forward, argmax
        x = (image.astype(np.float32) - np.float32(IMAGENET_MEAN)) / np.float32(IMAGENET_STD)
        with torch.no_grad():
            expected = model(torch.from_numpy(x.transpose(2, 0, 1).copy())[None])["logits"].argmax(1)[0].numpy()
        assert np.array_equal(mask, expected)
        # the overlay is for reading: enlarged by a whole factor towards a 512 px short side (at most 8x),
        # strong tint, class boundaries drawn, a legend strip under it
        shown = next(e for e in report["images"] if e["mask"] == f"{stem}_mask.png")
        scale = min(8, -(-512 // min(image.shape[:2])))
        assert shown["overlay_scale"] == scale > 1
        with Image.open(out / f"{stem}_overlay.png") as ov:
            overlay = np.asarray(ov)
        h, w = image.shape[0] * scale, image.shape[1] * scale
        assert overlay.shape[1] == w and overlay.shape[0] > h  # the legend strip below the image
        big = mask.repeat(scale, 0).repeat(scale, 1)  # nearest-neighbour: every label pixel a scale x scale block
        up = np.asarray(Image.fromarray(image).resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32)
        expected = 0.4 * up + 0.6 * np.asarray(PALETTE, dtype=np.float32)[big]
        edge = np.zeros(big.shape, bool)
        edge[:, 1:] |= big[:, 1:] != big[:, :-1]
        edge[:, :-1] |= big[:, 1:] != big[:, :-1]
        edge[1:] |= big[1:] != big[:-1]
        edge[:-1] |= big[1:] != big[:-1]
        assert edge.any() and (overlay[:h][edge] == 0).all()  # boundaries: black lines on both sides
        assert np.abs(overlay[:h][~edge].astype(np.float32) - expected[~edge]).max() <= 1.0
        legend = overlay[h:]
        swatches = {k for k in range(len(CLASSES)) if solid_square(np.all(legend == PALETTE[k], axis=2), 8)}
        assert swatches == set(np.unique(mask).tolist())  # a swatch for every class present, none for the others


def test_single_image_and_options(tmp_path, model_file):
    from pipeline.predict import run_predict

    path, _ = model_file
    arrays = _images(tmp_path / "in", sizes=((41, 29),))
    written = run_predict(str(path), tmp_path / "in" / "img0.png", tmp_path / "out", short_side=24,
                          mode="slide", crop_size=16, stride=12, scales=[0.75, 1.0], flip=True)
    assert len(written) == 1 and written[0]["size"] == [41, 29]
    with Image.open(tmp_path / "out" / "img0_mask.png") as m:
        assert m.size == (29, 41)
        assert int(np.asarray(m).max()) < len(CLASSES)


def test_unreadable_image_is_reported_the_rest_written_and_the_exit_says_so(tmp_path, model_file, capsys):
    from pipeline.predict import main

    path, _ = model_file
    _images(tmp_path / "in")
    (tmp_path / "in" / "broken.png").write_bytes(b"\x89PNG but truncated")
    rc = main(["--model", str(path), "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")])
    assert rc == 2, "a user error: one input could not be read"
    err = capsys.readouterr().err
    assert "broken.png" in err and "cannot read this file as an image" in err and "1 of 3 input(s)" in err
    report = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert sorted(e["mask"] for e in report["images"]) == ["img0_mask.png", "img1_mask.png"]
    assert [u["input"] for u in report["unreadable"]] == [str(tmp_path / "in" / "broken.png")]
    assert (tmp_path / "out" / "img0_mask.png").is_file() and not (tmp_path / "out" / "broken_mask.png").exists()
    # nothing readable at all: nothing is written
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"junk")
    assert main(["--model", str(path), "--input", str(tmp_path / "bad"), "--output", str(tmp_path / "none")]) == 2
    assert "none of the 1 file(s) could be read" in capsys.readouterr().err and not (tmp_path / "none").exists()


def test_a_second_run_into_the_same_folder_merges_predictions_json(tmp_path, model_file):
    from pipeline.predict import main

    path, _ = model_file
    _images(tmp_path / "first", sizes=((20, 30),))
    _images(tmp_path / "second", sizes=((20, 30), (24, 24)))
    (tmp_path / "second" / "img0.png").rename(tmp_path / "second" / "other.png")
    out = tmp_path / "out"
    assert main(["--model", str(path), "--input", str(tmp_path / "first"), "--output", str(out)]) == 0
    assert main(["--model", str(path), "--input", str(tmp_path / "second"), "--output", str(out)]) == 0
    report = json.loads((out / "predictions.json").read_text())
    # the first run's img0 stays listed (its files are still there), the second run's images are added
    assert [e["mask"] for e in report["images"]] == ["img0_mask.png", "img1_mask.png", "other_mask.png"]
    assert {e["input"] for e in report["images"]} == {str(tmp_path / "first" / "img0.png"),
                                                     str(tmp_path / "second" / "img1.jpg"),
                                                     str(tmp_path / "second" / "other.png")}
    assert all(e["model"] == str(path) for e in report["images"]) and report["unreadable"] == []


def test_class_count_mismatch_fails_clearly(tmp_path, capsys):
    from pipeline.predict import main

    path = tmp_path / "m" / "model.pt"
    save_model(path, ModelConfig(context="none", channels=16), num_classes=6)
    meta_root = make_prepared(tmp_path / "prepared", n=1, size=8)  # 4 classes
    _images(tmp_path / "in", sizes=((16, 16),))
    rc = main(["--model", str(path), "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
               "--meta", str(meta_root / "meta.json")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "the dataset has 4 classes but the model" in err and "predicts 6" in err
    # the model file itself is inconsistent: 6 outputs, 4 class names
    rc = main(["--model", str(path), "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")])
    assert rc == 2 and "predicts 6 classes but its file lists 4 class names" in capsys.readouterr().err


def test_missing_inputs_and_bad_model_source(tmp_path, model_file, capsys):
    from pipeline.predict import main

    path, _ = model_file
    assert main(["--model", str(path), "--input", str(tmp_path / "nope"), "--output", str(tmp_path / "o")]) == 2
    assert "no such image or folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["--model", str(path), "--input", str(tmp_path / "empty"), "--output", str(tmp_path / "o")]) == 2
    assert "no images" in capsys.readouterr().err
    _images(tmp_path / "in", sizes=((8, 8),))
    assert main(["--model", str(tmp_path / "missing.pt"), "--input", str(tmp_path / "in"),
                 "--output", str(tmp_path / "o")]) == 2
    assert "missing.pt: no such model file" in capsys.readouterr().err
    assert main(["--model", "not-a-model", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "o")]) == 2
    assert "not a file, folder, MLflow URI" in capsys.readouterr().err


def test_output_stems_disambiguate_shared_names(tmp_path):
    from pipeline.predict import output_stems

    files = [tmp_path / "a.png", tmp_path / "a.jpg", tmp_path / "b.png"]
    assert output_stems(files) == ["a_png", "a_jpg", "b"]


def test_display_overlay_upscales_small_images_only_and_names_the_classes():
    from ctxseg.prediction import class_boundaries, display_overlay, display_scale, upscale_label

    assert display_scale(128, 96) == 6 and display_scale(600, 800) == 1 and display_scale(8, 8) == 8
    assert display_scale(128, 128, min_side=0) == 1
    label = np.array([[0, 0, 1], [0, 2, 1]], np.uint8)
    big = upscale_label(label, 3)
    assert big.shape == (6, 9) and np.array_equal(big[::3, ::3], label) and set(np.unique(big)) == {0, 1, 2}
    edge = class_boundaries(label, width=1)
    assert edge.tolist() == [[False, True, False], [True, True, False]]
    image = np.full((2, 3, 3), 200, np.uint8)
    shown, info = display_overlay(image, label, PALETTE, CLASSES, alpha=0.6, min_side=0)
    assert info["scale"] == 1 and info["size"] == [2, 3]
    assert info["legend"] == ["sea", "lake", "ship"]  # present classes only, largest share first (3, 2, 1 px)
    assert shown[2:].shape[1] == 3  # the legend strip, as wide as the image
    big_image = np.full((600, 700, 3), 90, np.uint8)
    big_label = np.zeros((600, 700), np.uint8)
    big_label[:, 350:] = 3
    shown, info = display_overlay(big_image, big_label, PALETTE, CLASSES)
    assert info["scale"] == 1 and shown.shape[1] == 700 and shown.shape[0] > 600  # large: not enlarged
    assert (shown[:600, 349:351] == 0).all() and info["legend"] == ["sea", "swan"]
    assert shown[300, 100].tolist() == [round(0.4 * 90 + 0.6 * c) for c in PALETTE[0]]  # the stronger tint


def test_predict_overlay_options(tmp_path, model_file):
    from pipeline.predict import main

    from ctxseg.data.info import voc_colormap

    path, _ = model_file
    _images(tmp_path / "in", sizes=((20, 30),))
    out = tmp_path / "out"
    assert main(["--model", str(path), "--input", str(tmp_path / "in" / "img0.png"), "--output", str(out),
                 "--overlay-min-side", "0", "--alpha", "1.0"]) == 0
    with Image.open(out / "img0_overlay.png") as ov, Image.open(out / "img0_mask.png") as m:
        overlay, mask = np.asarray(ov), np.asarray(m)
    assert overlay.shape[1] == 30 and overlay.shape[0] > 20  # input size, plus the legend strip
    inner = ~class_edges(mask)
    palette = np.asarray(voc_colormap(len(CLASSES)))  # no meta: the model's 4 classes get the VOC colours
    assert np.array_equal(overlay[:20][inner], palette[mask][inner])  # alpha 1: the class colours alone
    assert json.loads((out / "predictions.json").read_text())["images"][0]["overlay_scale"] == 1
    assert main(["--model", str(path), "--input", str(tmp_path / "in"), "--output", str(out), "--alpha", "1.5"]) == 2


def class_edges(mask):
    from ctxseg.prediction import class_boundaries

    return class_boundaries(mask, width=1)


def solid_square(hit: np.ndarray, n: int) -> bool:
    """Whether the boolean map holds an n x n block that is all True (a colour swatch, not text pixels)."""
    c = np.pad(hit.astype(np.int32), ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    sums = c[n:, n:] - c[:-n, n:] - c[n:, :-n] + c[:-n, :-n]
    return bool((sums == n * n).any())
