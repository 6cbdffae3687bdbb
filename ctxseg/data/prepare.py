"""The preprocess stage: convert any supported raw dataset into the canonical layout.

::

    out_dir/images/<split>/<id>.<jpg|png>  the original image file, hard-linked (same bytes, no copy)
    out_dir/labels/<split>/<id>.png        uint8 single channel, train ids, ignore = 255
    out_dir/<split>.txt                    one id per line (train, val, and test where labelled)
    out_dir/meta.json                      dataset, num_classes, class_names, palette, ignore_index,
                                           splits {split: count}, image_suffix {split: ".jpg"}, ...

Nothing that does not change is copied: an image keeps its original bytes and is hard-linked into
the layout where the file system allows (same device), else copied byte for byte; only an image in
a format other than JPEG or PNG is re-encoded (as PNG). A label is written only where the dataset's
mapping changes it; a single-channel PNG label that already holds train ids is hard-linked too. So a
JPEG dataset costs its label PNGs and the manifests on disk, and preprocessing costs a decode (the
validation) per image instead of a PNG encode.

Everything is written into a temporary sibling directory and moved into place with ``os.replace``
only when every pair converted and validated; an error or interruption leaves no partial output
(and keeps a previous complete output untouched). Conversion runs in a process pool (default: one
process per CPU available) with a progress bar. Every pair is validated (readable, same size,
labels in ``0..num_classes-1`` or 255); failures are collected and reported together, naming the
files.

The prepared files are links to the source's: never write to them in place (this module and DVC
never do: outputs are replaced, the preprocess output is not cached by DVC; see docs/datasets.md).
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import shutil
import sys
import time
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from tqdm import tqdm

from ctxseg.data.decoders import LutDecoder, read_png_label
from ctxseg.data.layout import check_sample_ids, format_problems
from ctxseg.data.types import IGNORE_INDEX, DatasetInfo, DataValidationError, LabelDecoder, Sample

__all__ = ["prepare_dataset", "convert_samples", "convert_one", "DataValidationError", "Sample", "LabelDecoder",
           "LutDecoder", "read_png_label", "save_png"]

log = logging.getLogger(__name__)

PNG_COMPRESS_LEVEL = 3  # fixed so output is byte-reproducible


#: image formats kept as they are (PIL format name -> suffix in the prepared layout)
KEPT_FORMATS = {"JPEG": ".jpg", "PNG": ".png"}
DEFAULT_IMAGE_SUFFIX = ".png"  # layouts prepared before images kept their format


def _read_image_checked(path: Path) -> Tuple[Tuple[int, int], Optional[str], Optional[np.ndarray]]:
    """Decode fully (detects truncation). Returns ((H, W), kept suffix or None, RGB array when the
    format is not kept and must be re-encoded)."""
    with Image.open(path) as im:
        im.load()
        suffix = KEPT_FORMATS.get(im.format or "")
        arr = None if suffix is not None else np.asarray(im.convert("RGB"))
        return (int(im.size[1]), int(im.size[0])), suffix, arr


def link_or_copy(src: Path, dst: Path) -> str:
    """Hard-link ``src`` at ``dst`` (same bytes, no new disk space); where the file system refuses
    (another device, no link support, link limit), copy its bytes. Returns "link" or "copy"."""
    try:
        os.link(src, dst)
        return "link"
    except OSError:
        shutil.copyfile(src, dst)
        return "copy"


def _read_label_raw(path: Any) -> Tuple[Optional[np.ndarray], bool]:
    """The raw ids of a PNG label and whether the file itself is usable as a prepared label (a
    single-channel 8-bit PNG: the loader reads L and P modes as ids). ``(None, False)`` otherwise."""
    if not isinstance(path, (str, os.PathLike)) or not str(path).lower().endswith(".png"):
        return None, False
    raw = read_png_label(Path(path))
    with Image.open(path) as im:
        usable = im.format == "PNG" and im.mode in ("L", "P")
    return raw, usable


def _decode_label(decoder: LabelDecoder, label: Any) -> Tuple[np.ndarray, bool]:
    """``(train ids, the label file can be linked as it is)``. A :class:`LutDecoder` (most datasets)
    reads the file once here; any other decoder reads it itself and its output is written."""
    if type(decoder).__call__ is LutDecoder.__call__:
        raw, usable = _read_label_raw(label)
        if raw is not None:
            lbl = decoder.map(raw)
            return lbl, usable and raw.dtype == np.uint8 and np.array_equal(raw, lbl)
    return decoder(label), False


def save_png(array: np.ndarray, path: Path) -> None:
    mode = "RGB" if array.ndim == 3 else "L"
    Image.fromarray(np.ascontiguousarray(array), mode=mode).save(
        path, format="PNG", compress_level=PNG_COMPRESS_LEVEL, optimize=False)


@dataclass
class _Job:
    sample: Sample
    decoder: LabelDecoder
    out_root: Path
    num_classes: int
    check_only: bool = False


@dataclass
class _Result:
    split: str
    id: str
    hist: Optional[np.ndarray] = None
    size: Optional[Tuple[int, int]] = None
    suffix: str = DEFAULT_IMAGE_SUFFIX
    stored: Counter = field(default_factory=Counter)  # "image link" / "label written" / ... -> count
    problems: List[Tuple[str, str]] = field(default_factory=list)


def convert_one(job: _Job) -> _Result:
    """Read, convert, validate and write one pair. Never raises for bad data: returns problems."""
    s = job.sample
    res = _Result(split=s.split, id=s.id)
    size = lbl = None
    suffix: Optional[str] = None
    rgb: Optional[np.ndarray] = None
    label_kept = False
    try:
        size, suffix, rgb = _read_image_checked(Path(s.image))
    except FileNotFoundError:
        res.problems.append((str(s.image), "image file is missing"))
    except Exception as e:  # noqa: BLE001 - PIL raises many types for corrupt files
        res.problems.append((str(s.image), f"image cannot be read ({type(e).__name__}: {e}); the file is "
                                           f"corrupt or truncated: re-download or re-extract it"))
    try:
        lbl, label_kept = _decode_label(job.decoder, s.label)
    except FileNotFoundError as e:
        res.problems.append((str(s.label), f"label file is missing ({e})"))
    except Exception as e:  # noqa: BLE001
        res.problems.append((str(s.label), f"label cannot be read/converted ({type(e).__name__}: {e})"))
    if size is None or lbl is None:
        return res
    if lbl.ndim != 2:
        res.problems.append((str(s.label), f"label must be 2-D, got shape {lbl.shape}"))
        return res
    if size != lbl.shape:
        res.problems.append((str(s.label), f"size mismatch: image {s.image} is {size[1]}x{size[0]} "
                                           f"but label is {lbl.shape[1]}x{lbl.shape[0]} (WxH)"))
        return res
    hist = np.bincount(lbl.ravel(), minlength=256)
    bad = np.nonzero(hist[job.num_classes:IGNORE_INDEX])[0] + job.num_classes
    if len(bad):
        res.problems.append((str(s.label), f"label values {bad.tolist()} are out of range: allowed are "
                                           f"0..{job.num_classes - 1} and {IGNORE_INDEX} (ignore)"))
        return res
    res.hist = hist[: job.num_classes].astype(np.int64)
    res.size = size
    res.suffix = suffix or DEFAULT_IMAGE_SUFFIX
    if not job.check_only:
        img_out = job.out_root / "images" / s.split / f"{s.id}{res.suffix}"
        lbl_out = job.out_root / "labels" / s.split / f"{s.id}.png"
        if suffix is not None:
            res.stored["image " + link_or_copy(Path(s.image), img_out)] += 1
        else:
            save_png(rgb, img_out)
            res.stored["image re-encoded"] += 1
        if label_kept:
            res.stored["label " + link_or_copy(Path(s.label), lbl_out)] += 1
        else:
            save_png(lbl, lbl_out)
            res.stored["label written"] += 1
    return res


#: a pool only pays off for a few hundred pairs per worker (spawning a worker costs ~1 s)
MIN_PAIRS_PER_WORKER = 256


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask: a container's or ``taskset``'s limit)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def _effective_workers(requested: Optional[int], n: int) -> int:
    """``requested`` processes (None: one per available CPU), capped by the CPUs and by the work."""
    cpus = available_cpus()
    return max(1, min(requested or cpus, cpus, n // MIN_PAIRS_PER_WORKER))


def _summarise(problems: List[Tuple[str, str]], limit: int = 20) -> str:
    return format_problems(problems, limit)


def convert_samples(
    samples: Sequence[Sample],
    decoder: LabelDecoder,
    info: DatasetInfo,
    out_dir: Path,
    workers: Optional[int] = None,
    extra_meta: Optional[Dict[str, Any]] = None,
    source_desc: str = "",
    problems: Sequence[Tuple[str, str]] = (),
) -> Dict[str, Any]:
    """Convert ``samples`` into the canonical layout at ``out_dir`` atomically; return meta.

    ``problems`` (from the dataset's listing: missing or unpaired labels) are reported together with
    every bad sample id and every pair that fails to convert, in one :class:`DataValidationError`;
    nothing is written unless there is no problem at all."""
    from ctxseg.io import atomic_path, write_json

    out_dir = Path(out_dir)
    if not samples:
        listed = f":\n{_summarise(list(problems))}" if problems else ""
        raise DataValidationError(f"no image/label pairs found in {source_desc or 'the raw data'}; check the "
                                  f"`source`/raw folder layout for dataset {info.name!r}{listed}", problems)
    # ids must be unique per split and safe as file names; pairs with a bad id are still checked
    # (check_only) so that every problem is reported in one pass
    listing_problems: List[Tuple[str, str]] = list(problems) + check_sample_ids(samples)
    bad_ids = {str(f) for f, _ in listing_problems}
    splits = sorted({s.split for s in samples}, key=lambda x: ("train", "val", "test").index(x)
                    if x in ("train", "val", "test") else 9)
    t0 = time.perf_counter()
    n_workers = _effective_workers(workers, len(samples))
    with atomic_path(out_dir) as tmp:
        for sp in splits:
            (tmp / "images" / sp).mkdir(parents=True, exist_ok=True)
            (tmp / "labels" / sp).mkdir(parents=True, exist_ok=True)
        jobs = [_Job(s, decoder, tmp, info.num_classes, check_only=str(s.image) in bad_ids) for s in samples]
        results: List[_Result] = []
        bar = tqdm(total=len(jobs), desc=f"preprocess {info.name}", unit="img", disable=None)
        try:
            if n_workers <= 1:
                for j in jobs:
                    results.append(convert_one(j))
                    bar.update(1)
            else:
                # fork on Linux (fast, works from notebooks and stdin scripts; the workers only run
                # numpy/PIL code); spawn elsewhere
                method = "fork" if sys.platform.startswith("linux") else "spawn"
                ctx = mp.get_context(method)
                with ProcessPoolExecutor(max_workers=n_workers, mp_context=ctx) as ex:
                    try:
                        for r in ex.map(convert_one, jobs, chunksize=32):
                            results.append(r)
                            bar.update(1)
                    except BaseException:
                        ex.shutdown(wait=True, cancel_futures=True)
                        raise
        finally:
            bar.close()
        problems = listing_problems + [p for r in results for p in r.problems]
        if problems:
            raise DataValidationError(
                f"{len(problems)} invalid image/label pair(s) in {source_desc or info.name}; nothing was written. "
                f"Fix or remove these files (or re-download / re-extract the dataset) and run the preprocess "
                f"stage again:\n{_summarise(problems)}", problems)
        per_split: Dict[str, List[_Result]] = defaultdict(list)
        for r in results:
            per_split[r.split].append(r)
        meta_splits: Dict[str, int] = {}
        freq: Dict[str, List[float]] = {}
        counts: Dict[str, List[int]] = {}
        sizes: Dict[str, Dict[str, List[int]]] = {}
        suffixes: Dict[str, str] = {}
        odd_suffixes: Dict[str, Dict[str, str]] = {}
        stored: Counter = Counter()
        for r in results:
            stored.update(r.stored)
        for sp in splits:
            rs = sorted(per_split[sp], key=lambda r: r.id)
            (tmp / f"{sp}.txt").write_text("".join(f"{r.id}\n" for r in rs))
            total = np.sum([r.hist for r in rs], axis=0)
            meta_splits[sp] = len(rs)
            counts[sp] = total.tolist()
            denom = max(int(total.sum()), 1)
            freq[sp] = [round(float(c) / denom, 8) for c in total]
            hs = [r.size[0] for r in rs]
            ws = [r.size[1] for r in rs]
            sizes[sp] = {"min_hw": [min(hs), min(ws)], "max_hw": [max(hs), max(ws)]}
            # the images' suffix (their original format): the split's usual one, and the exceptions
            suffixes[sp] = Counter(r.suffix for r in rs).most_common(1)[0][0]
            odd = {r.id: r.suffix for r in rs if r.suffix != suffixes[sp]}
            if odd:
                odd_suffixes[sp] = odd
        meta: Dict[str, Any] = {
            "dataset": info.name,
            "num_classes": info.num_classes,
            "class_names": list(info.class_names),
            "palette": [list(c) for c in info.palette],
            "ignore_index": info.ignore_index,
            "splits": meta_splits,
            "class_pixel_frequency": freq,
            "class_pixel_count": counts,
            "image_size_range": sizes,
            "image_suffix": suffixes,
            "label_conversion": decoder.describe(),
        }
        if odd_suffixes:
            meta["image_suffix_by_id"] = odd_suffixes
        if extra_meta:
            meta.update(extra_meta)
        write_json(tmp / "meta.json", meta)
    log.info("prepared %s: %s pairs -> %s in %.1f s (%d worker(s)); files: %s", info.name, meta_splits, out_dir,
             time.perf_counter() - t0, n_workers, ", ".join(f"{k} {v}" for k, v in sorted(stored.items())))
    if stored.get("image copy"):
        log.warning("%d image(s) were copied, not hard-linked (the source is on another file system or does not "
                    "support links): the prepared data takes their size again on disk. Put data.source on the "
                    "same file system as the repository to avoid it", stored["image copy"])
    return meta


def prepare_dataset(cfg, raw_dir: Path, out_dir: Path) -> Dict[str, Any]:
    """The preprocess stage: raw data of ``cfg.name`` in ``raw_dir`` (or ``cfg.source``) -> canonical
    layout in ``out_dir`` (atomic). Returns the meta dict also written to ``out_dir/meta.json``."""
    from ctxseg.data import sources

    raw_dir = Path(raw_dir)
    info = sources.dataset_info(cfg.name, cfg)
    sources.check_raw(cfg, raw_dir)
    root = sources.resolve_root(cfg, raw_dir)
    listing = sources.list_samples(cfg, root)
    return convert_samples(listing.samples, listing.decoder, info, Path(out_dir), workers=cfg.preprocess_workers,
                           extra_meta=listing.extra, source_desc=str(root), problems=listing.problems)
