"""Group 6 - GPU mode: runs when CUDA is available, otherwise reports ``skipped``.

* training images/s of ResNet-50 DeepLabV3 (none / +MCIBI / +ACF) at 512 x 512 with AMP (bf16 where
  supported, else fp16 with a GradScaler), batch 8 (2 in --quick), ratios against the baseline;
* DCA module latency (forward, eval) on a 1 x 2048 x 128 x 128 input (19 memory rows), fp32 and
  AMP, beside the figure of 47.64 ms on a V100 from MCIBI Table 3 (different GPU: a context figure,
  not a like-for-like ratio); peak CUDA memory of the module.
"""
from __future__ import annotations

import time
from typing import List

from bench import MIB, median

PAPER_DCA_MS_V100 = 47.64


def run(opts) -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device", "rows": [], "targets": []}
    from ctxseg.config import TrainConfig
    from ctxseg.engine import build_optimizer
    from ctxseg.models import ModelConfig, build_segmentor
    from ctxseg.models.dca import DCA

    dev = torch.device("cuda")
    quick = opts.quick
    amp = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    batch, size, iters = (2, 256, 3) if quick else (8, 512, 10)
    rows: List[dict] = []
    base_ips = None
    for ctx in ("none", "mcibi", "acf"):
        cfg = ModelConfig(framework="deeplabv3", context=ctx, channels=512,
                          backbone={"name": "resnet_tiny" if quick else "resnet50"})
        torch.manual_seed(0)
        model = build_segmentor(cfg, 19).to(dev).train()
        opt = build_optimizer(model, TrainConfig())
        scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None
        x = torch.randn(batch, 3, size, size, device=dev)
        y = torch.randint(0, 19, (batch, size, size), device=dev)

        def step():
            with torch.autocast("cuda", dtype=amp):
                out = model(x, y, 0.5)
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(out["loss"]).backward()
                scaler.step(opt)
                scaler.update()
            else:
                out["loss"].backward()
                opt.step()

        for _ in range(2):
            step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
        ips = batch * iters / (time.perf_counter() - t0)
        base_ips = base_ips or ips
        rows.append({"what": f"train deeplabv3{'' if ctx == 'none' else '+' + ctx} r50 {size}^2 AMP {str(amp)[6:]}",
                     "images_per_s": ips, "vs_baseline": ips / base_ips,
                     "peak_MiB": torch.cuda.max_memory_allocated() / MIB})
        torch.cuda.empty_cache()
    c, s = (256, 32) if quick else (2048, 128)
    dca = DCA(c).to(dev).eval()
    feats = torch.randn(1, c, s, s, device=dev)
    wl = torch.randn(1, 19, s, s, device=dev)
    mem = torch.randn(19, c, device=dev)
    for label, dtype in (("fp32", None), (f"AMP {str(amp)[6:]}", amp)):
        times = []
        with torch.no_grad(), torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            for i in range(25):
                torch.cuda.synchronize()
                if i == 5:
                    torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                dca(feats, wl, mem)
                torch.cuda.synchronize()
                if i >= 5:
                    times.append(time.perf_counter() - t0)
        ms = 1000 * median(times)
        rows.append({"what": f"DCA latency 1x{c}x{s}^2 {label}", "ms": ms,
                     "vs_paper_V100_47.64ms": ms / PAPER_DCA_MS_V100,
                     "peak_MiB": torch.cuda.max_memory_allocated() / MIB})
    return {"rows": rows, "targets": [], "device": torch.cuda.get_device_name(0)}
