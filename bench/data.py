"""Group ``data`` (issue #16) - a JPEG dataset at N and 4N pairs through the real stages.

An ADE20K-shaped folder of generated photo-like JPEGs (512x384, quality 90) and label PNGs (raw ids
0..150, reduce-zero-label) is the ``data.source`` of a throw-away project (:func:`make_project`);
``dvc repro preprocess`` runs source -> download -> preprocess. Reported per size:

* prepared bytes / source bytes: bytes of files in ``data/prepared`` that are *not* the source's own
  files (hard links to the source count zero), over the source folder's bytes;
* DVC cache bytes / source bytes (``.dvc/cache``);
* preprocess CPU per pair: ``prepare_dataset`` with one process, ``time.process_time`` / pairs; and the
  wall time with the default workers (one per available CPU) against one worker;
* no-op ``dvc repro preprocess`` and ``dvc status`` wall times (median of 3);
* loader ms per image: ``SegmentationDataset.load`` (the original JPEG + the label PNG).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

from bench import median, run_worker, target, worker_main
from pipeline.scratch import make_project, pipeline_env

MODULE = "bench.data"
H, W = 384, 512


def _photo(rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    chans = [np.sin(xx / rng.uniform(9, 40) + rng.uniform(0, 6)) * np.cos(yy / rng.uniform(9, 40)) for _ in range(3)]
    img = 127 + 80 * np.stack(chans, -1) + rng.normal(0, 10, (H, W, 3)).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def _label(rng: np.random.Generator) -> np.ndarray:
    lbl = np.full((H, W), rng.integers(1, 151), np.uint8)
    for _ in range(int(rng.integers(4, 12))):
        y, x = int(rng.integers(0, H - 20)), int(rng.integers(0, W - 20))
        lbl[y:y + int(rng.integers(20, H // 2)), x:x + int(rng.integers(20, W // 2))] = rng.integers(0, 151)
    return lbl


def make_source(root: Path, n: int, seed: int = 0) -> Path:
    """``root/ADEChallengeData2016`` with ``n`` pairs (9/10 training, 1/10 validation)."""
    from PIL import Image
    from tqdm import tqdm

    rng = np.random.default_rng(seed)
    d = root / "ADEChallengeData2016"
    n_val = max(1, n // 10)
    for i in tqdm(range(n), desc=f"generate {n} pairs", disable=None):
        sub = "validation" if i < n_val else "training"
        for kind in ("images", "annotations"):
            (d / kind / sub).mkdir(parents=True, exist_ok=True)
        stem = f"ADE_{sub}_{i:08d}"
        Image.fromarray(_photo(rng)).save(d / "images" / sub / f"{stem}.jpg", quality=90)
        Image.fromarray(_label(rng), mode="L").save(d / "annotations" / sub / f"{stem}.png")
    return root


def _files(root: Path) -> List[os.stat_result]:
    return [p.stat() for p in root.rglob("*") if p.is_file()] if root.exists() else []


def _new_bytes(root: Path, known_inodes: set) -> int:
    seen, total = set(), 0
    for st in _files(root):
        key = (st.st_dev, st.st_ino)
        if key in known_inodes or key in seen:
            continue
        seen.add(key)
        total += st.st_size
    return total


def _sh(cmd: List[str], cwd: Path) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=pipeline_env(), capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr[-1500:]}")
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------- worker
def _prepare_job(spec: dict) -> dict:
    """CPU of prepare_dataset with one process, and wall with 1 vs the default workers."""
    from ctxseg.data import DataConfig, SegmentationDataset, prepare_dataset

    out: Dict[str, float] = {}
    raw = Path(spec["raw"])
    for workers in (1, None):
        cfg = DataConfig(name="ade20k", source=spec["source"], preprocess_workers=workers)
        dest = Path(spec["scratch"]) / f"prepared-{workers}"
        c0, t0 = time.process_time(), time.perf_counter()
        meta = prepare_dataset(cfg, raw, dest)
        key = "one" if workers == 1 else "default"
        out[f"cpu_s_{key}"] = time.process_time() - c0
        out[f"wall_s_{key}"] = time.perf_counter() - t0
        out["pairs"] = sum(meta["splits"].values())
    from ctxseg.data.prepare import _effective_workers

    out["default_workers"] = _effective_workers(None, int(out["pairs"]))
    ds = SegmentationDataset(Path(spec["scratch"]) / "prepared-1", "train")
    n = min(len(ds), 200)
    ds.load(0)
    t0 = time.perf_counter()
    for i in range(n):
        ds.load(i)
    out["load_ms"] = 1000 * (time.perf_counter() - t0) / n
    return out


def _worker(spec: dict) -> dict:
    return {"prepare": _prepare_job}[spec["job"]](spec)


# ----------------------------------------------------------------------------- driver
def run(opts) -> dict:
    sizes = [20, 80] if opts.quick else [250, 1000]
    base = Path(tempfile.mkdtemp(prefix="ctxseg-bench-data-", dir=os.environ.get("CTXSEG_BENCH_TMP")))
    rows: List[dict] = []
    targets: List[dict] = []
    per: Dict[int, dict] = {}
    try:
        for n in sizes:
            src = make_source(base / f"src-{n}", n)
            src_files = _files(src)
            src_bytes = sum(st.st_size for st in src_files)
            src_inodes = {(st.st_dev, st.st_ino) for st in src_files}
            proj = make_project(base / f"proj-{n}", {"data": {"name": "ade20k", "source": str(src)}})
            full_s = _sh([sys.executable, "-m", "dvc", "repro", "preprocess"], proj)
            noop = [_sh([sys.executable, "-m", "dvc", "repro", "preprocess"], proj) for _ in range(3)]
            status = [_sh([sys.executable, "-m", "dvc", "status", "preprocess"], proj) for _ in range(3)]
            prepared = proj / "data" / "prepared" / "ade20k"
            new_b = _new_bytes(prepared, src_inodes)
            cache_b = sum(st.st_size for st in _files(proj / ".dvc" / "cache"))
            job = run_worker(MODULE, {"job": "prepare", "source": str(src), "raw": str(proj / "data" / "raw" / "ade20k"),
                                      "scratch": str(base / f"scratch-{n}")}, timeout=3600)
            if "error" in job:
                raise RuntimeError(job["error"])
            r = {"pairs": n, "source MB": src_bytes / 1e6, "prepared new MB": new_b / 1e6,
                 "prepared / source": new_b / src_bytes, "DVC cache / source": cache_b / src_bytes,
                 "preprocess CPU ms/pair": 1000 * job["cpu_s_one"] / job["pairs"],
                 "preprocess wall s, 1 / default workers": f"{job['wall_s_one']:.1f} / {job['wall_s_default']:.1f}",
                 "default workers": job["default_workers"],
                 "full repro s": full_s, "no-op repro s": median(noop), "dvc status s": median(status),
                 "loader ms/image": job["load_ms"]}
            per[n] = r
            rows.append(r)
            shutil.rmtree(base / f"scratch-{n}", ignore_errors=True)
        small, big = per[sizes[0]], per[sizes[-1]]
        for n, r in per.items():
            total = r["prepared / source"] + r["DVC cache / source"]
            targets.append(target(f"prepared + cache at N={n}", "<= 1.15x source (labels only new)",
                                  f"{1 + total:.3f}x", 1 + total <= 1.15, "source itself counted as 1x"))
            targets.append(target(f"preprocess CPU per pair at N={n} (0.2 MP)", "<= 15 ms",
                                  f"{r['preprocess CPU ms/pair']:.1f} ms", r["preprocess CPU ms/pair"] <= 15.0))
        for key in ("no-op repro s", "dvc status s"):
            growth = big[key] / small[key]
            targets.append(target(f"{key} growth N -> 4N", "< 2x", f"{growth:.2f}x", growth < 2.0))
        return {"rows": rows, "targets": targets, "per_size": per}
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    worker_main(_worker)
