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

from .config import ModelConfig
from .segmentor import build_decoder, within_image

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


class FeaturePath(nn.Module):
    """A_wi and the context head up to the classifier input: ``forward(x, soft_regions=None) -> F``.

    This is what a row of the table measures. ``count=True`` runs the heads in their counting mode
    (``ContextHead.features(..., count=True)``: the model's maths only, no implementation padding),
    as :func:`measure` does; the default runs the path exactly as training / inference does, for
    latency. ``soft_regions`` is used only by an A_wi that declares ``needs_soft_regions`` (OCR).
    Attributes not found on the path are looked up on the head (e.g. ``path.memory`` of MCIBI).
    """

    def __init__(self, cfg: ModelConfig, in_channels: int, num_classes: int, count: bool = False) -> None:
        super().__init__()
        self.context_module, self.decode_head = build_decoder(cfg, in_channels, num_classes)
        self.count = count
        self.decode_head.prepare_measurement()  # e.g. memory rows as after training

    @property
    def needs_soft_regions(self) -> bool:
        return self.context_module is not None and self.context_module.needs_soft_regions

    def feature_parameters(self) -> List[nn.Parameter]:
        """Parameters of the path to F: A_wi and the head without its final classifier."""
        wi = list(self.context_module.parameters()) if self.context_module is not None else []
        return wi + self.decode_head.feature_parameters()

    def forward(self, x: torch.Tensor, soft_regions: Optional[torch.Tensor] = None) -> torch.Tensor:
        c_wi = within_image(self.context_module, x, soft_regions)
        return self.decode_head.features(x, c_wi, count=self.count)[0]

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("decode_head"), name)


def table_config(framework: str, context: str, channels: int = 512) -> ModelConfig:
    """The ModelConfig of one table row (ACF: Phi/Psi width C/2, H = 2, K = 2; OCR keys C/2)."""
    return ModelConfig(framework=framework, context=context, channels=channels,
                       ocr_key_channels=max(channels // 2, 1),
                       acf={"channels": channels // 2, "heads": 2, "mixtures": 2})


def build_head(framework: str, context: str, in_channels: int, channels: int, num_classes: int,
               count: bool = False) -> FeaturePath:
    """The feature path of one table row, in eval mode, on the current default device."""
    return FeaturePath(table_config(framework, context, channels), in_channels, num_classes, count).eval()


def measure(framework: str, context: str, in_channels: int = 2048, size: int = 128, channels: int = 512,
            num_classes: int = 150, device: str = "meta") -> Dict[str, float]:
    """Params and FLOPs of one decode-head feature path on a 1 x in_channels x size x size input."""
    with torch.device(device):
        path = build_head(framework, context, in_channels, channels, num_classes, count=True)
        x = torch.randn(1, in_channels, size, size)
        soft = torch.randn(1, num_classes, size, size) if path.needs_soft_regions else None
    params = sum(p.numel() for p in path.feature_parameters())
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        path(x, soft)
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
