"""Every real-dataset converter, on tiny archives fabricated in that dataset's real on-disk layout.

Each test goes through the public path: ``download_dataset`` (with ``source`` = the fabricated archive
or folder; safe extraction; layout check) then ``prepare_dataset`` (conversion to train ids), and
checks exact train ids pixel by pixel.
"""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
import zipfile
from pathlib import Path
from typing import Dict

import numpy as np
import pytest
from PIL import Image

from ctxseg.data import DataConfig, DataValidationError, download_dataset, prepare_dataset
from ctxseg.data.info import voc_colormap
from ctxseg.data.sources import rle_decode

H, W = 10, 12


def _img(seed: int = 0, h: int = H, w: int = W) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _enc(arr: np.ndarray, fmt: str = "PNG", palette: bool = False) -> bytes:
    im = Image.fromarray(arr)
    if palette:
        im = im.convert("P") if arr.ndim == 3 else Image.fromarray(arr, mode="P")
        im.putpalette([c for rgb in voc_colormap(256) for c in rgb])
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def _stripes(values, h: int = H, w: int = W, dtype=np.uint8) -> np.ndarray:
    """Label with vertical stripes, one per value (value k in columns [k*w/n, (k+1)*w/n))."""
    lbl = np.zeros((h, w), dtype=dtype)
    edges = np.linspace(0, w, len(values) + 1).astype(int)
    for v, a, b in zip(values, edges[:-1], edges[1:]):
        lbl[:, a:b] = v
    return lbl


def _zip(path: Path, files: Dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def _tar(path: Path, files: Dict[str, bytes], mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as tf:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return path


def _folder(root: Path, files: Dict[str, bytes]) -> Path:
    for name, data in files.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return root


def _mat(**arrays) -> bytes:
    savemat = pytest.importorskip("scipy.io").savemat

    buf = io.BytesIO()
    savemat(buf, arrays)
    return buf.getvalue()


def _run(tmp_path: Path, cfg: DataConfig):
    raw = download_dataset(cfg, tmp_path / "raw" / cfg.name)
    out = tmp_path / "prepared" / cfg.name
    meta = prepare_dataset(cfg, raw, out)

    def label(split: str, i: str) -> np.ndarray:
        return np.asarray(Image.open(out / "labels" / split / f"{i}.png"))

    def image(split: str, i: str) -> np.ndarray:
        from ctxseg.data.dataset import image_file

        return np.asarray(Image.open(image_file(out, meta, split, i)).convert("RGB"))

    return meta, label, image


def _row(lbl: np.ndarray, n: int) -> list:
    """The value of each of the n stripes."""
    edges = np.linspace(0, lbl.shape[1], n + 1).astype(int)
    return [int(lbl[0, a]) for a in edges[:-1]]


# ------------------------------------------------------------------------------------------ ADE20K


def test_ade20k_reduce_zero_label(tmp_path):
    raw_vals = [0, 1, 2, 150]
    files = {"ADEChallengeData2016/objectInfo150.txt": b"Idx\tRatio\tTrain\tVal\tName\n",
             "ADEChallengeData2016/sceneCategories.txt": b"ADE_train_00000001 airport\n"}
    for split, sub, n in (("train", "training", 2), ("val", "validation", 1)):
        for k in range(1, n + 1):
            stem = f"ADE_{split}_{k:08d}"
            files[f"ADEChallengeData2016/images/{sub}/{stem}.jpg"] = _enc(_img(k), "JPEG")
            files[f"ADEChallengeData2016/annotations/{sub}/{stem}.png"] = _enc(_stripes(raw_vals))
    arc = _zip(tmp_path / "ADEChallengeData2016.zip", files)
    meta, label, image = _run(tmp_path, DataConfig(name="ade20k", source=str(arc), verify_checksums=False))
    assert meta["splits"] == {"train": 2, "val": 1} and meta["num_classes"] == 150
    assert _row(label("val", "ADE_val_00000001"), 4) == [255, 0, 1, 149]
    assert image("train", "ADE_train_00000002").shape == (H, W, 3)
    assert meta["class_names"][0] == "wall" and meta["class_names"][149] == "flag"


def test_ade20k_published_checksum_is_enforced(tmp_path):
    arc = _zip(tmp_path / "ADEChallengeData2016.zip", {"ADEChallengeData2016/x.txt": b"x"})
    from ctxseg.data import ChecksumError

    with pytest.raises(ChecksumError, match="219e1696abb36c8ba3a3afe7fb2f4b4606a897c7"):
        download_dataset(DataConfig(name="ade20k", source=str(arc)), tmp_path / "raw")


# ----------------------------------------------------------------------------------- VOC + SBD


def _voc2012(tmp_path: Path, colour_labels: bool = False) -> Path:
    base = "VOCdevkit/VOC2012"
    files = {f"{base}/ImageSets/Segmentation/train.txt": b"2007_000032\n",
             f"{base}/ImageSets/Segmentation/val.txt": b"2007_000039\n",
             f"{base}/ImageSets/Segmentation/trainval.txt": b"2007_000032\n2007_000039\n",
             f"{base}/Annotations/2007_000032.xml": b"<annotation/>"}
    for k, i in enumerate(["2007_000032", "2007_000039", "2008_000002", "2008_000003"]):
        files[f"{base}/JPEGImages/{i}.jpg"] = _enc(_img(k), "JPEG")
    lbl = _stripes([0, 1, 15, 255])
    for i in ["2007_000032", "2007_000039"]:
        if colour_labels:
            lut = np.array(voc_colormap(256), dtype=np.uint8)
            lut[255] = (224, 224, 192)
            files[f"{base}/SegmentationClass/{i}.png"] = _enc(lut[lbl])
        else:
            files[f"{base}/SegmentationClass/{i}.png"] = _enc(lbl, palette=True)
    return _tar(tmp_path / "VOCtrainval_11-May-2012.tar", files, mode="w")


def _sbd(tmp_path: Path) -> Path:
    base = "benchmark_RELEASE/dataset"
    files = {f"{base}/train.txt": b"2008_000002\n2007_000039\n", f"{base}/val.txt": b"2008_000003\n"}
    for i in ["2008_000002", "2008_000003", "2007_000039"]:
        files[f"{base}/img/{i}.jpg"] = _enc(_img(7), "JPEG")
        seg = _stripes([0, 20, 7, 255])
        files[f"{base}/cls/{i}.mat"] = _mat(GTcls={"Segmentation": seg, "Boundaries": np.zeros(1),
                                                   "CategoriesPresent": np.array([20, 7])})
    return _tar(tmp_path / "benchmark.tgz", files)


@pytest.mark.parametrize("colour", [False, True], ids=["indexed", "colour"])
def test_voc_aug_trainaug_split_and_label_sources(tmp_path, colour):
    src = tmp_path / "archives"
    src.mkdir()
    _voc2012(src, colour_labels=colour)
    _sbd(src)
    meta, label, _ = _run(tmp_path, DataConfig(name="voc_aug", source=str(src), verify_checksums=False))
    # trainaug = VOC train + SBD train/val - VOC val
    assert meta["splits"] == {"train": 3, "val": 1}
    assert _row(label("val", "2007_000039"), 4) == [0, 1, 15, 255]  # VOC PNG (indexed or colour)
    assert _row(label("train", "2007_000032"), 4) == [0, 1, 15, 255]
    assert _row(label("train", "2008_000002"), 4) == [0, 20, 7, 255]  # SBD .mat
    assert meta["class_names"][15] == "person"


# ------------------------------------------------------------------------------- Pascal Context


def _voc2010(tmp_path: Path) -> Path:
    base = "VOCdevkit/VOC2010"
    files = {f"{base}/ImageSets/Main/train.txt": b"2008_000002\n", f"{base}/ImageSets/Main/val.txt": b"2008_000003\n"}
    for k, i in enumerate(["2008_000002", "2008_000003"]):
        files[f"{base}/JPEGImages/{i}.jpg"] = _enc(_img(k), "JPEG")
    return _tar(tmp_path / "VOCtrainval_03-May-2010.tar", files, mode="w")


# raw 459-class ids: unlabelled, aeroplane, accordion (not in the 59), wood
PC_RAW = [0, 2, 1, 458]


@pytest.mark.parametrize("name,expected", [("pascal_context", [0, 1, 0, 59]), ("pascal_context59", [255, 0, 255, 58])])
def test_pascal_context_stanford_mat(tmp_path, name, expected):
    src = tmp_path / "archives"
    src.mkdir()
    _voc2010(src)
    files = {"trainval/" + f"{i}.mat": _mat(LabelMap=_stripes(PC_RAW, dtype=np.uint16))
             for i in ["2008_000002", "2008_000003"]}
    files["labels.txt"] = b"1: accordion\n2: aeroplane\n"
    _tar(src / "trainval.tar.gz", files)
    meta, label, _ = _run(tmp_path, DataConfig(name=name, source=str(src), verify_checksums=False))
    assert meta["splits"] == {"train": 1, "val": 1}
    assert meta["num_classes"] == (60 if name == "pascal_context" else 59)
    assert _row(label("val", "2008_000003"), 4) == expected
    assert meta["class_names"][expected[1]] == "aeroplane"


def _rle_counts(mask: np.ndarray) -> list:
    flat = mask.T.ravel().astype(np.uint8)  # column-major, starting with a run of zeros
    counts, cur, run = [], 0, 0
    for v in flat:
        if v != cur:
            counts.append(run)
            run, cur = 0, v
        run += 1
    counts.append(run)
    return counts


def _rle_string(counts: list) -> str:
    """pycocotools rleToString."""
    out = []
    for i, x in enumerate(counts):
        if i > 2:
            x -= counts[i - 2]
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if (c & 0x10) else (x != 0)
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


def test_rle_decode_matches_encoding():
    rng = np.random.default_rng(0)
    m = rng.random((13, 17)) < 0.4
    counts = _rle_counts(m)
    assert np.array_equal(rle_decode(counts, 13, 17), m)
    assert np.array_equal(rle_decode(_rle_string(counts), 13, 17), m)


def test_pascal_context_detail_json(tmp_path):
    src = tmp_path / "src"
    voc = _folder(src, {"VOCdevkit/VOC2010/JPEGImages/2008_000002.jpg": _enc(_img(1), "JPEG"),
                        "VOCdevkit/VOC2010/JPEGImages/2008_000003.jpg": _enc(_img(2), "JPEG")})
    raw = _stripes(PC_RAW, dtype=np.int64)
    annos = []
    for img_id in (2008000002, 2008000003):
        for cat in (2, 1, 458):
            counts = _rle_counts(raw == cat)
            annos.append({"id": len(annos) + 1, "image_id": img_id, "category_id": cat,
                          "segmentation": {"size": [H, W], "counts": _rle_string(counts) if cat != 1 else counts}})
    data = {"images": [{"image_id": 2008000002, "file_name": "2008_000002.jpg", "height": H, "width": W, "phase": "train"},
                       {"image_id": 2008000003, "file_name": "2008_000003.jpg", "height": H, "width": W, "phase": "val"}],
            "annos_segmentation": annos, "categories": []}
    (voc / "trainval_merged.json").write_text(json.dumps(data))
    meta, label, _ = _run(tmp_path, DataConfig(name="pascal_context", source=str(src)))
    assert meta["splits"] == {"train": 1, "val": 1}
    assert _row(label("train", "2008_000002"), 4) == [0, 1, 0, 59]


# ------------------------------------------------------------------------------------ COCO-Stuff


def test_coco_stuff164k_182_to_171(tmp_path):
    src = tmp_path / "archives"
    src.mkdir()
    raw_vals = [0, 11, 12, 91, 181, 255]  # person, unused slot, stop sign, banner, wood, unlabelled
    _zip(src / "train2017.zip", {"train2017/000000000009.jpg": _enc(_img(1), "JPEG"),
                                 "train2017/000000000025.jpg": _enc(_img(2), "JPEG")})
    _zip(src / "val2017.zip", {"val2017/000000000139.jpg": _enc(_img(3), "JPEG")})
    _zip(src / "stuffthingmaps_trainval2017.zip", {
        f"{sp}/{i}.png": _enc(_stripes(raw_vals))
        for sp, i in (("train2017", "000000000009"), ("train2017", "000000000025"), ("val2017", "000000000139"))})
    meta, label, _ = _run(tmp_path, DataConfig(name="coco_stuff164k", source=str(src), verify_checksums=False))
    assert meta["splits"] == {"train": 2, "val": 1} and meta["num_classes"] == 171
    assert _row(label("val", "000000000139"), 6) == [0, 255, 11, 80, 170, 255]
    assert [meta["class_names"][k] for k in (11, 80, 170)] == ["stop sign", "banner", "wood"]


def test_coco_stuff10k_mat(tmp_path):
    raw_vals = [0, 1, 12, 13, 182]  # unlabelled, person, unused slot, stop sign, wood (1-based)
    files = {"imageLists/train.txt": b"COCO_train2014_000000000077\n",
             "imageLists/test.txt": b"COCO_train2014_000000000078\n",
             "imageLists/all.txt": b"COCO_train2014_000000000077\nCOCO_train2014_000000000078\n"}
    for k, i in enumerate(["COCO_train2014_000000000077", "COCO_train2014_000000000078"]):
        files[f"images/{i}.jpg"] = _enc(_img(k), "JPEG")
        files[f"annotations/{i}.mat"] = _mat(S=_stripes(raw_vals, dtype=np.uint16), names=np.array(["x"]))
    arc = _zip(tmp_path / "cocostuff-10k-v1.1.zip", files)
    meta, label, _ = _run(tmp_path, DataConfig(name="coco_stuff10k", source=str(arc)))
    assert meta["splits"] == {"train": 1, "val": 1}
    assert _row(label("val", "COCO_train2014_000000000078"), 5) == [255, 0, 255, 11, 170]


# ------------------------------------------------------------------------------------ Cityscapes


def test_cityscapes_labelid_to_trainid(tmp_path):
    src = tmp_path / "archives"
    src.mkdir()
    raw_vals = [0, 7, 8, 26, 33, 29]  # unlabeled, road, sidewalk, car, bicycle, caravan
    gt, left = {"license.txt": b"x", "README": b"x"}, {"license.txt": b"x"}
    for split, city, n in (("train", "aachen", 2), ("val", "frankfurt", 1), ("test", "berlin", 1)):
        for k in range(n):
            base = f"{city}_{k:06d}_000019"
            left[f"leftImg8bit/{split}/{city}/{base}_leftImg8bit.png"] = _enc(_img(k))
            lbl = _stripes(raw_vals) if split != "test" else np.zeros((H, W), np.uint8)
            gt[f"gtFine/{split}/{city}/{base}_gtFine_labelIds.png"] = _enc(lbl)
            gt[f"gtFine/{split}/{city}/{base}_gtFine_color.png"] = _enc(_img(9))
            gt[f"gtFine/{split}/{city}/{base}_gtFine_polygons.json"] = b"{}"
    a = _zip(src / "gtFine_trainvaltest.zip", gt)
    b = _zip(src / "leftImg8bit_trainvaltest.zip", left)
    sums = {p.name: "md5:" + hashlib.md5(p.read_bytes()).hexdigest() for p in (a, b)}
    meta, label, _ = _run(tmp_path, DataConfig(name="cityscapes", source=str(src), checksums=sums))
    assert meta["splits"] == {"train": 2, "val": 1}  # test has no public labels
    assert _row(label("val", "frankfurt_000000_000019"), 6) == [255, 0, 1, 13, 18, 255]
    # without the override, the published md5 stops the fabricated archives
    from ctxseg.data import ChecksumError

    with pytest.raises(ChecksumError, match="4237c19de34c8a376e9ba46b495d6f66"):
        download_dataset(DataConfig(name="cityscapes", source=str(src)), tmp_path / "raw2")


# ------------------------------------------------------------------------------------ LIP / CIHP


def _lip_folder(root: Path, bad_value: int | None = None) -> Path:
    files = {"LIP/TrainVal_images/train_id.txt": b"77_471474\n100034_483681\n",
             "LIP/TrainVal_images/val_id.txt": b"100034_483682\n"}
    for split, ids in (("train", ["77_471474", "100034_483681"]), ("val", ["100034_483682"])):
        for k, i in enumerate(ids):
            files[f"LIP/TrainVal_images/{split}_images/{i}.jpg"] = _enc(_img(k), "JPEG")
            vals = [0, 2, 13, 19] if bad_value is None or split == "val" else [0, bad_value, 13, 19]
            files[f"LIP/TrainVal_parsing_annotations/{split}_segmentations/{i}.png"] = _enc(_stripes(vals))
    return _folder(root, files)


def test_lip_folder_source(tmp_path):
    src = _lip_folder(tmp_path / "lip_src")
    meta, label, _ = _run(tmp_path, DataConfig(name="lip", source=str(src)))
    assert meta["splits"] == {"train": 2, "val": 1} and meta["num_classes"] == 20
    assert _row(label("val", "100034_483682"), 4) == [0, 2, 13, 19]
    assert json.loads((tmp_path / "raw" / "lip" / "source.json").read_text())["path"] == str(src.resolve())
    assert not (tmp_path / "raw" / "lip" / "extracted").exists()  # linked, not copied


def test_lip_release_zips(tmp_path):
    staged = _lip_folder(tmp_path / "staged") / "LIP"
    src = tmp_path / "downloads"
    src.mkdir()
    for top in ("TrainVal_images", "TrainVal_parsing_annotations"):
        _zip(src / f"{top}.zip", {str(p.relative_to(staged)): p.read_bytes()
                                  for p in sorted((staged / top).rglob("*")) if p.is_file()})
    meta, label, _ = _run(tmp_path, DataConfig(name="lip", source=str(src)))
    assert meta["splits"] == {"train": 2, "val": 1}
    assert _row(label("train", "77_471474"), 4) == [0, 2, 13, 19]
    assert (tmp_path / "raw" / "lip" / "extracted" / "TrainVal_images" / "TrainVal_images" / "train_images").is_dir()


def test_lip_out_of_range_label_names_the_file(tmp_path):
    src = _lip_folder(tmp_path / "lip_src", bad_value=25)
    cfg = DataConfig(name="lip", source=str(src))
    raw = download_dataset(cfg, tmp_path / "raw")
    with pytest.raises(DataValidationError) as ei:
        prepare_dataset(cfg, raw, tmp_path / "prep")
    msg = str(ei.value)
    assert "train_segmentations/77_471474.png" in msg and "[25]" in msg and "0..19" in msg
    assert len(ei.value.problems) == 2 and not (tmp_path / "prep").exists()


def test_cihp_archive(tmp_path):
    base = "instance-level_human_parsing"
    files = {f"{base}/Training/train_id.txt": b"0000006\n0000008\n", f"{base}/Validation/val_id.txt": b"0000001\n",
             f"{base}/Testing/Images/0000002.jpg": _enc(_img(5), "JPEG")}
    for sub, ids in (("Training", ["0000006", "0000008"]), ("Validation", ["0000001"])):
        for k, i in enumerate(ids):
            files[f"{base}/{sub}/Images/{i}.jpg"] = _enc(_img(k), "JPEG")
            files[f"{base}/{sub}/Category_ids/{i}.png"] = _enc(_stripes([0, 5, 14, 19]))
            files[f"{base}/{sub}/Instance_ids/{i}.png"] = _enc(_stripes([0, 1, 1, 2]))
    arc = _tar(tmp_path / "instance-level_human_parsing.tar.gz", files)
    meta, label, _ = _run(tmp_path, DataConfig(name="cihp", source=str(arc)))
    assert meta["splits"] == {"train": 2, "val": 1}
    assert _row(label("train", "0000008"), 4) == [0, 5, 14, 19]
    assert meta["class_names"][5] == "upper-clothes"


# ---------------------------------------------------------------------------------------- CamVid


def test_camvid_segnet_layout_void_to_ignore(tmp_path):
    files = {}
    for split, ids in (("train", ["0001TP_006690", "0001TP_006720"]), ("val", ["0016E5_07959"]), ("test", ["0001TP_008550"])):
        lines = []
        for k, i in enumerate(ids):
            files[f"CamVid/{split}/{i}.png"] = _enc(_img(k))
            files[f"CamVid/{split}annot/{i}.png"] = _enc(_stripes([0, 3, 10, 11]))
            lines.append(f"/SegNet/CamVid/{split}/{i}.png /SegNet/CamVid/{split}annot/{i}.png")
        files[f"CamVid/{split}.txt"] = ("\n".join(lines) + "\n").encode()
    src = _folder(tmp_path / "segnet", files)
    meta, label, _ = _run(tmp_path, DataConfig(name="camvid", source=str(src / "CamVid")))
    assert meta["splits"] == {"train": 2, "val": 1, "test": 1}
    assert _row(label("test", "0001TP_008550"), 4) == [0, 3, 10, 255]
    assert meta["class_names"][10] == "bicyclist"
