"""Params / FLOPs of the context modules, in the setting of MCIBI Table 3 (input 1 x 2048 x 128 x 128).

Usage::

    python -m ctxseg.models.complexity [--json PATH] [--in-channels 2048] [--size 128]
                                       [--channels 512] [--num-classes 150] [--device meta]

Each row measures the decode-head feature path (everything between the backbone output and the
final 1x1 classifier): e.g. "DCA" = R (3x3 conv) + H1 + DCA (Eq 11-14) + concat fusion (Eq 4);
"ACF" = R + ACF + GP branch + concat fusion (CFNet Fig 3); "ASPP+DCA" adds the ASPP C_wi branch.
OCR rows receive the soft object regions as a given input (as in OCRNet's own complexity table).

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` (1 multiply-add = 2 FLOPs; convs,
matmuls/einsums and SDPA are counted; element-wise ops, BN and pooling are not). By default the
modules run on the ``meta`` device, so only shapes are computed and the table is instant.

The "paper" columns hold the figures printed in MCIBI Table 3 (Jin et al., ICCV 2021). They are
the *paper's* numbers, not ours; entries left as ``None`` were not available when this file was
written (no network access) and print as "n/a".
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula, sdpa_flop_count

from . import acf as acf_module

from .config import ModelConfig
from .segmentor import DecodeHead

logger = logging.getLogger(__name__)

__all__ = ["MODULES", "PAPER_TABLE3", "measure", "complexity_table", "main"]

def _cpu_flash_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of PyTorch's fused CPU SDPA kernel (not in FlopCounterMode's registry): q k^T and P v."""
    return sdpa_flop_count(query, key, value)


# registered globally, so every FlopCounterMode counts the fused CPU attention (as it does the CUDA ones)
if torch.ops.aten._scaled_dot_product_flash_attention_for_cpu not in flop_registry:
    register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu)(_cpu_flash_flops)

# row name -> (framework, context)
MODULES: List[Tuple[str, str, str]] = [
    ("FCN (3x3 conv)", "fcn", "none"),
    ("PPM", "pspnet", "none"),
    ("ASPP", "deeplabv3", "none"),
    ("OCR", "ocrnet", "none"),
    ("DCA", "fcn", "mcibi"),
    ("ACF", "fcn", "acf"),
    ("PPM+DCA", "pspnet", "mcibi"),
    ("ASPP+DCA", "deeplabv3", "mcibi"),
    ("OCR+DCA", "ocrnet", "mcibi"),
    ("ASPP+ACF", "deeplabv3", "acf"),
]

# Paper's figures (MCIBI Table 3): params in M, FLOPs in G. None = not transcribed (offline).
PAPER_TABLE3: Dict[str, Dict[str, Optional[float]]] = {
    name: {"params_M": None, "flops_G": None} for name, _, _ in MODULES
}


def _head(framework: str, context: str, in_channels: int, channels: int, num_classes: int) -> DecodeHead:
    cfg = ModelConfig(framework=framework, context=context, channels=channels,
                      ocr_key_channels=max(channels // 2, 1),
                      acf={"channels": channels // 2, "heads": 2, "mixtures": 2})
    head = DecodeHead(cfg, in_channels, num_classes)
    head.classifier = nn.Identity()  # measure the feature path, not the 1x1 classifier
    return head.eval()


def measure(framework: str, context: str, in_channels: int = 2048, size: int = 128, channels: int = 512,
            num_classes: int = 150, device: str = "meta") -> Dict[str, float]:
    """Params and FLOPs of one decode-head feature path on a 1 x in_channels x size x size input."""
    with torch.device(device):
        head = _head(framework, context, in_channels, channels, num_classes)
        x = torch.randn(1, in_channels, size, size)
        soft = torch.randn(1, num_classes, size, size) if framework == "ocrnet" else None
        if context == "mcibi":
            head.memory.memory.normal_()
    params = sum(p.numel() for p in head.parameters())
    counter = FlopCounterMode(display=False)
    padding, acf_module.PAD_HEAD_DIMS = acf_module.PAD_HEAD_DIMS, False  # count the maths, not padding
    try:
        with torch.no_grad(), counter:
            head(x, soft)
    finally:
        acf_module.PAD_HEAD_DIMS = padding
    return {"params": float(params), "flops": float(counter.get_total_flops())}


def complexity_table(in_channels: int = 2048, size: int = 128, channels: int = 512, num_classes: int = 150,
                     device: str = "meta") -> List[Dict[str, object]]:
    rows = []
    for name, fw, ctx in MODULES:
        ours = measure(fw, ctx, in_channels, size, channels, num_classes, device)
        paper = PAPER_TABLE3.get(name, {})
        rows.append({
            "module": name,
            "framework": fw,
            "context": ctx,
            "params_M": ours["params"] / 1e6,
            "flops_G": ours["flops"] / 1e9,
            "paper_params_M": paper.get("params_M"),
            "paper_flops_G": paper.get("flops_G"),
        })
    return rows


def _fmt(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def format_table(rows: List[Dict[str, object]], setting: str) -> str:
    lines = [f"Context-module complexity ({setting}); 'paper' = figures printed in MCIBI Table 3",
             f"{'module':<16}{'params (M)':>12}{'FLOPs (G)':>12}{'paper params (M)':>18}{'paper FLOPs (G)':>17}"]
    for r in rows:
        lines.append(f"{r['module']:<16}{r['params_M']:>12.2f}{r['flops_G']:>12.2f}"
                     f"{_fmt(r['paper_params_M']):>18}{_fmt(r['paper_flops_G']):>17}")
    return "\n".join(lines)


def _write_json_atomic(path: str, payload: dict) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=None, help="write the table as JSON to this path")
    ap.add_argument("--in-channels", type=int, default=2048)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--channels", type=int, default=512)
    ap.add_argument("--num-classes", type=int, default=150)
    ap.add_argument("--device", default="meta", help="'meta' (shapes only, instant) or 'cpu'")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rows = complexity_table(args.in_channels, args.size, args.channels, args.num_classes, args.device)
    setting = f"input 1x{args.in_channels}x{args.size}x{args.size}, {args.channels} channels, {args.num_classes} classes"
    logger.info("%s", format_table(rows, setting))
    if args.json:
        _write_json_atomic(args.json, {"setting": setting, "flops_convention": "2 FLOPs per multiply-add",
                                       "paper_source": "MCIBI (Jin et al., ICCV 2021) Table 3", "rows": rows})
        logger.info("wrote %s", args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
