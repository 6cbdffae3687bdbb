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
    sizes = dict(batch=2, size=256, iters=3, dca_channels=256, dca_size=32) if opts.quick else {}
    return {"rows": measure(torch.device("cuda"), **sizes), "targets": [], "device": torch.cuda.get_device_name(0)}


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mib(device) -> float:
    """Peak CUDA memory since the last reset (NaN on the CPU, where this group only checks the code)."""
    import torch

    return torch.cuda.max_memory_allocated(device) / MIB if device.type == "cuda" else float("nan")


def measure(device, *, batch: int = 8, size: int = 512, iters: int = 10, dca_channels: int = 2048,
            dca_size: int = 128, backbone: str = "resnet50") -> List[dict]:
    """The group's rows on ``device`` (CUDA in the bench; the tests run it on the CPU, tiny, to check the
    AMP training step and the DCA call still match the library)."""
    import torch

    from ctxseg.config import TrainConfig
    from ctxseg.engine import build_optimizer
    from ctxseg.models import ModelConfig, build_segmentor
    from ctxseg.models.dca import DCA

    if device.type == "cuda":
        amp = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        amp = torch.bfloat16
    rows: List[dict] = []
    base_ips = None
    for ctx in ("none", "mcibi", "acf"):
        cfg = ModelConfig(framework="deeplabv3", context=ctx, channels=512, backbone={"name": backbone})
        torch.manual_seed(0)
        model = build_segmentor(cfg, 19).to(device).train()
        opt = build_optimizer(model, TrainConfig())
        scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None
        x = torch.randn(batch, 3, size, size, device=device)
        y = torch.randint(0, 19, (batch, size, size), device=device)

        def step():
            with torch.autocast(device.type, dtype=amp):
                out = model(x, y, 0.5)
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(out["loss"]).backward()
                scaler.step(opt)
                scaler.update()
            else:
                out["loss"].backward()
                opt.step()
            return out["loss"]

        for _ in range(2):
            loss = step()
        if not torch.isfinite(loss):
            raise RuntimeError(f"deeplabv3+{ctx}: non-finite loss under AMP {amp}")
        _sync(device)
        _reset_peak(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            step()
        _sync(device)
        ips = batch * iters / (time.perf_counter() - t0)
        base_ips = base_ips or ips
        rows.append({"what": f"train deeplabv3{'' if ctx == 'none' else '+' + ctx} {backbone} {size}^2 "
                             f"AMP {str(amp)[6:]}",
                     "images_per_s": ips, "vs_baseline": ips / base_ips, "peak_MiB": _peak_mib(device)})
        del model, opt
        if device.type == "cuda":
            torch.cuda.empty_cache()
    c, s = dca_channels, dca_size
    dca = DCA(c).to(device).eval()
    feats = torch.randn(1, c, s, s, device=device)
    wl = torch.randn(1, 19, s, s, device=device)
    mem = torch.randn(19, c, device=device)
    for label, dtype in (("fp32", None), (f"AMP {str(amp)[6:]}", amp)):
        times = []
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            for i in range(25):
                _sync(device)
                if i == 5:
                    _reset_peak(device)
                t0 = time.perf_counter()
                out = dca(feats, wl, mem)
                _sync(device)
                if i >= 5:
                    times.append(time.perf_counter() - t0)
        if out.shape != feats.shape:
            raise RuntimeError(f"DCA returned {tuple(out.shape)} for input {tuple(feats.shape)}")
        ms = 1000 * median(times)
        rows.append({"what": f"DCA latency 1x{c}x{s}^2 {label}", "ms": ms,
                     "vs_paper_V100_47.64ms": ms / PAPER_DCA_MS_V100, "peak_MiB": _peak_mib(device)})
    return rows
