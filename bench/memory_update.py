"""Group 2 - MCIBI memory update (Eq 6-10): ours against a per-class loop, at K = 19 and K = 150.

C = 512, features [2, 512, 64, 64] (a 512 x 512 crop at output stride 8), two 512 x 512 label maps
(blocky random labels, 16 x 16 blocks, every class present), all classes initialised (the cosine
update path). Forms compared, each timed in its own process and measured for memory in another
(peak RSS growth = extra memory):

* ``loop``: per-class loop as in the reference code: F.interpolate the features to label size, then
  for each class select its pixels, cosine weights, weighted mean;
* ``ours``: ``ctxseg.models.memory.FeatureMemory``.

Max abs difference of the updated memory against ``loop`` is reported. The update's share of a full
training step is in the ``train_step`` group.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from typing import List

from bench import MIB, PeakMemory, median, run_worker, target, worker_main

MODULE = "bench.memory_update"


def loop_update(memory, feats, labels, momentum, ignore=255):
    """Reference-style Eq 6, 8-10: full-size upsampling, then a Python loop over the classes present."""
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        up = F.interpolate(feats, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        up = up.permute(0, 2, 3, 1).reshape(-1, up.shape[1])  # [n, C]
        lab = labels.reshape(-1)
        new = memory.clone()
        for k in lab.unique().tolist():
            if k == ignore or k >= memory.shape[0]:
                continue
            pix = up[lab == k]  # [n_k, C]
            cos = torch.nn.functional.cosine_similarity(pix, memory[k][None], dim=1)
            w = (1 - cos) / (1 - cos).sum()  # Eq 9
            new[k] = (1 - momentum) * memory[k] + momentum * (w[:, None] * pix).sum(0)  # Eq 10, Eq 6
        memory.copy_(new)


def _inputs(k, size, label_size, batch=2, c=512):
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    feats = torch.relu(torch.randn(batch, c, size, size, generator=g))
    blocks = torch.randint(0, k, (batch, 1, label_size // 16, label_size // 16), generator=g).float()
    labels = F.interpolate(blocks, size=(label_size, label_size), mode="nearest")[:, 0].long()
    flat = labels.view(-1)
    flat[: k] = torch.arange(k)  # every class present
    labels[:, :4, :] = 255  # some ignore
    memory = torch.relu(torch.randn(k, c, generator=g))
    return feats, labels, memory


def _worker(spec: dict) -> dict:
    import torch

    from ctxseg.models.memory import FeatureMemory

    feats, labels, memory = _inputs(spec["K"], spec["size"], spec["label_size"])
    impl = spec["impl"]
    if impl == "loop":
        updated = memory.clone()  # the tensor each form updates in place
        fn = lambda: loop_update(updated, feats, labels, 0.5)  # noqa: E731
    else:
        m = FeatureMemory(spec["K"], memory.shape[1], init="mean", update="cosine")
        m.initialized[:] = True
        updated = m.memory
        fn = lambda: m.update(feats, labels, 0.5)  # noqa: E731

    def reset():
        updated.copy_(memory)

    if spec.get("mode") != "memory":
        times = []
        for _ in range(spec["iters"]):
            reset()
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return {"times": times}
    reset()
    with PeakMemory() as pm:
        fn()
    if spec.get("save"):
        torch.save(updated.clone(), spec["save"])
    return {"peak_bytes": pm.extra}


def run(opts) -> dict:
    import torch

    quick = opts.quick
    size, label_size = (16, 128) if quick else (64, 512)
    iters = 2 if quick else 4
    rows: List[dict] = []
    tmp = tempfile.mkdtemp(prefix="ctxseg-bench-mem-")
    impls = ["loop", "ours"]
    targets = []
    for k in (19, 150):
        res = {i: [] for i in impls}
        for r in range(1 if quick else 2):
            for impl in (impls if r % 2 == 0 else impls[::-1]):
                save = os.path.join(tmp, f"{impl}{k}.pt") if r == 0 else None
                spec = {"impl": impl, "K": k, "size": size, "label_size": label_size, "iters": iters, "save": save}
                timed = run_worker(MODULE, dict(spec, mode="time"))
                memory = run_worker(MODULE, dict(spec, mode="memory"), memory_run=True)
                res[impl].append({**timed, **memory})
        errors = [x["error"] for v in res.values() for x in v if "error" in x]
        if errors:
            rows.append({"K": k, "error": errors[0][-200:]})
            continue
        ref = torch.load(os.path.join(tmp, f"loop{k}.pt"), weights_only=True)
        t = {i: median(tt for x in res[i] for tt in x["times"][1:]) for i in impls}
        for impl in impls:
            out = torch.load(os.path.join(tmp, f"{impl}{k}.pt"), weights_only=True)
            rows.append({"K": k, "C": 512, "labels": f"2x{label_size}^2", "form": impl, "time_s": t[impl],
                         "speedup_vs_loop": t["loop"] / t[impl],
                         "extra_peak_MiB": max(x["peak_bytes"] for x in res[impl]) / MIB,
                         "max_abs_diff_vs_loop": float((out - ref).abs().max())})
        if k == 150:
            sp = t["loop"] / t["ours"]
            targets.append(target("memory update K=150 vs per-class loop", ">= 5x", round(sp, 1), sp >= 5))
            mine = max(x["peak_bytes"] for x in res["ours"]) / MIB
            full = 2 * 512 * label_size * label_size * 4 / MIB
            targets.append(target("memory update extra memory bounded", "no label-size B x C x H x W map",
                                  f"{mine:.0f} MiB (full map {full:.0f} MiB)", mine < full / 4))
    shutil.rmtree(tmp, ignore_errors=True)
    return {"rows": rows, "targets": targets, "timed_runs": f"2 processes x {iters - 1} (first of each is warm-up)"}


if __name__ == "__main__":
    worker_main(_worker)
