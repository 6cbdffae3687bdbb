"""The preprocess stage: convert any supported raw dataset into the canonical layout.

::

    out_dir/images/<split>/<id>.png   RGB
    out_dir/labels/<split>/<id>.png   uint8 single channel, train ids, ignore = 255
    out_dir/<split>.txt               one id per line (train, val, and test where labelled)
    out_dir/meta.json                 dataset, num_classes, class_names, palette, ignore_index,
                                      splits {split: count}, class_pixel_frequency {split: [...]},
                                      class_pixel_count {split: [...]}, image_size_range, ...

Everything is written into a temporary sibling directory and moved into place with ``os.replace``
only when every pair converted and validated; an error or interruption leaves no partial output
(and keeps a previous complete output untouched). Conversion runs in a process pool with a
progress bar. Every pair is validated (readable, same size, labels in ``0..num_classes-1`` or 255);
failures are collected and reported together, naming the files.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import shutil
import sys
import time
from collections import defaultdict
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


def _read_image_checked(path: Path) -> Tuple[Optional[np.ndarray], bool]:
    """Decode fully (detects truncation). Returns (RGB array, source_is_rgb_png)."""
    with Image.open(path) as im:
        im.load()
        is_rgb_png = im.format == "PNG" and im.mode == "RGB"
        arr = np.asarray(im.convert("RGB"))
    return arr, is_rgb_png


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
    problems: List[Tuple[str, str]] = field(default_factory=list)


def convert_one(job: _Job) -> _Result:
    """Read, convert, validate and write one pair. Never raises for bad data: returns problems."""
    s = job.sample
    res = _Result(split=s.split, id=s.id)
    img = lbl = None
    src_is_png = False
    try:
        img, src_is_png = _read_image_checked(Path(s.image))
    except FileNotFoundError:
        res.problems.append((str(s.image), "image file is missing"))
    except Exception as e:  # noqa: BLE001 - PIL raises many types for corrupt files
        res.problems.append((str(s.image), f"image cannot be read ({type(e).__name__}: {e}); the file is "
                                           f"corrupt or truncated: re-download or re-extract it"))
    try:
        lbl = job.decoder(s.label)
    except FileNotFoundError as e:
        res.problems.append((str(s.label), f"label file is missing ({e})"))
    except Exception as e:  # noqa: BLE001
        res.problems.append((str(s.label), f"label cannot be read/converted ({type(e).__name__}: {e})"))
    if img is None or lbl is None:
        return res
    if lbl.ndim != 2:
        res.problems.append((str(s.label), f"label must be 2-D, got shape {lbl.shape}"))
        return res
    if img.shape[:2] != lbl.shape:
        res.problems.append((str(s.label), f"size mismatch: image {s.image} is {img.shape[1]}x{img.shape[0]} "
                                           f"but label is {lbl.shape[1]}x{lbl.shape[0]} (WxH)"))
        return res
    hist = np.bincount(lbl.ravel(), minlength=256)
    bad = np.nonzero(hist[job.num_classes:IGNORE_INDEX])[0] + job.num_classes
    if len(bad):
        res.problems.append((str(s.label), f"label values {bad.tolist()} are out of range: allowed are "
                                           f"0..{job.num_classes - 1} and {IGNORE_INDEX} (ignore)"))
        return res
    res.hist = hist[: job.num_classes].astype(np.int64)
    res.size = (int(img.shape[0]), int(img.shape[1]))
    if not job.check_only:
        img_out = job.out_root / "images" / s.split / f"{s.id}.png"
        lbl_out = job.out_root / "labels" / s.split / f"{s.id}.png"
        if src_is_png:
            shutil.copyfile(s.image, img_out)
        else:
            save_png(img, img_out)
        save_png(lbl, lbl_out)
    return res


#: a pool only pays off for a few hundred pairs per worker (spawning a worker costs ~1 s)
MIN_PAIRS_PER_WORKER = 256


def _effective_workers(requested: int, n: int) -> int:
    cpus = os.cpu_count() or 1
    return max(1, min(requested, cpus, n // MIN_PAIRS_PER_WORKER))


def _summarise(problems: List[Tuple[str, str]], limit: int = 20) -> str:
    return format_problems(problems, limit)


def convert_samples(
    samples: Sequence[Sample],
    decoder: LabelDecoder,
    info: DatasetInfo,
    out_dir: Path,
    workers: int = 2,
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
            "label_conversion": decoder.describe(),
        }
        if extra_meta:
            meta.update(extra_meta)
        write_json(tmp / "meta.json", meta)
    log.info("prepared %s: %s pairs -> %s in %.1f s (%d worker(s))", info.name, meta_splits, out_dir,
             time.perf_counter() - t0, n_workers)
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
