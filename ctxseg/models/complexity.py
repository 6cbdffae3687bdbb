"""Params / FLOPs of the context modules, in the setting of MCIBI Table 3 (input 1 x 2048 x 128 x 128).

Usage::

    python -m ctxseg.models.complexity [--json PATH] [--in-channels 2048] [--size 128]
                                       [--channels 512] [--num-classes 150] [--device meta]

Each row measures the decode-head feature path (everything between the backbone output and the
final 1x1 classifier): e.g. "DCA" = R (3x3 conv) + H1 + DCA (Eq 11-14) + concat fusion (Eq 4);
"ACF" = R + ACF + GP branch + concat fusion (CFNet Fig 3); "ASPP+DCA" adds the ASPP C_wi branch.
OCR rows receive the soft object regions as a given input (as in OCRNet's own complexity table).

Two counting conventions, side by side:

* ``flops_G`` -- ctxseg's: ``torch.utils.flop_counter.FlopCounterMode``, 2 FLOPs per multiply-add, every
  convolution *and* every matrix product of activations (attention q k^T and P v, SDPA, DCA's Eq 12
  gather, OCR's region gather) counted; element-wise ops, BN and pooling are not.
* ``macs_G`` -- the convention of MCIBI Table 3: multiply-adds (1 per MAC) of the layers only, i.e.
  ``(flops - matrix-product FLOPs) / 2``; the matrix products (:data:`MATRIX_PRODUCT_OPS`, per-op counts
  from FlopCounterMode) are left out. The paper's "FLOPs (G)" are multiply-adds: ctxseg's PPM row is
  618.6 GFLOPs = 309.3 GMACs against the paper's 309.45 G (params 23.07 M both). For DCA the paper also
  leaves out the matrix products: 243.9 GMACs of layers here against its 242.80 G, while with the two
  N x N attention products (N = 128^2) DCA costs 382.7 GMACs -- consistent with a counter that sees
  only conv / linear layers. (ctxseg's DCA applies g_k's and g_v's first 1x1 conv to the K memory rows
  instead of every pixel's C' = W^T M, the same numbers: 4.3 GMACs of convolution replaced by two small
  matrix products, so its layer count is 4.3 G below the 248.2 G of convolving C'.)

ASPP differs by design, not by convention: the paper's implementation fuses the five branches with a 3x3
conv (as mmseg's ASPPHead), ctxseg with DeepLabV3's 1x1 projection, 2560 x 512 x 8 = 10.49 M params and
171.8 GMACs less at 128^2 -- the whole gap (31.73 M / 502.5 G here, 42.21 M / 674.47 G in the paper).
The paper's ASPP+DCA adds only 3.42 M / 56.09 G to its ASPP (its §4.3 prose says 2.5 M / 40.94 G; the
table's 23.59 ms agrees with the prose), far less than its stand-alone DCA row (14.82 M / 242.80 G), so its
DCA there evidently works on ASPP's 512-channel output; ctxseg's ASPP+DCA runs R and H1 on the 2048-channel
backbone output like the stand-alone row, hence more than the paper.

By default the modules run on the ``meta`` device, so only shapes are computed and the table is instant.
:data:`PAPER_TABLE3` holds the figures printed in MCIBI Table 3 (Jin et al., ICCV 2021; V100, CUDA 11.0,
input 1 x 2048 x 128 x 128), checked against the paper's text; rows ctxseg does not implement (CCNet,
DANet, ANN, DNL, APCNet) are listed with the paper's figures only (:data:`PAPER_ONLY`).
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

__all__ = ["MODULES", "PAPER_TABLE3", "PAPER_ONLY", "MATRIX_PRODUCT_OPS", "measure", "complexity_table",
           "paper_only_rows", "main"]


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

# MCIBI Table 3 as printed (Jin et al., ICCV 2021): params (M), "FLOPs (G)" -- multiply-adds, without the
# attention matrix products (see the module docstring) -- and inference time (ms) on one V100 GPU, CUDA 11.0,
# for a 1 x 2048 x 128 x 128 feature map. Keys shared with MODULES are the rows ctxseg measures.
PAPER_TABLE3: Dict[str, Dict[str, float]] = {
    "ASPP": {"params_M": 42.21, "macs_G": 674.47, "time_ms": 101.44},
    "PPM": {"params_M": 23.07, "macs_G": 309.45, "time_ms": 29.57},
    "CCNet": {"params_M": 23.92, "macs_G": 397.38, "time_ms": 56.90},
    "DANet": {"params_M": 23.92, "macs_G": 392.02, "time_ms": 62.64},
    "ANN": {"params_M": 20.32, "macs_G": 335.24, "time_ms": 49.66},
    "DNL": {"params_M": 24.12, "macs_G": 395.25, "time_ms": 68.62},
    "APCNet": {"params_M": 30.46, "macs_G": 413.12, "time_ms": 54.20},
    "DCA": {"params_M": 14.82, "macs_G": 242.80, "time_ms": 47.64},
    "ASPP+DCA": {"params_M": 45.63, "macs_G": 730.56, "time_ms": 125.03},
}
# the paper's rows that ctxseg does not implement (shown with the paper's figures only)
PAPER_ONLY: List[str] = [name for name in PAPER_TABLE3 if name not in {m[0] for m in MODULES}]

# FlopCounterMode ops that are matrix products of activations (attention, gathers), not layers: left out of
# the paper-convention count. Layers appear as aten.convolution (ctxseg's heads have no nn.Linear).
MATRIX_PRODUCT_OPS = ("aten.bmm", "aten.baddbmm", "aten.mm", "aten.matmul", "aten._scaled_dot_product")


def _is_matrix_product(op: object) -> bool:
    name = str(op)
    return any(name == p or (p.startswith("aten._") and name.startswith(p)) for p in MATRIX_PRODUCT_OPS)


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
    """The ModelConfig of one table row (ACF: the authors' widths at C, H = 2, K = 2; OCR keys C/2)."""
    return ModelConfig(framework=framework, context=context, channels=channels,
                       ocr_key_channels=max(channels // 2, 1), acf={"heads": 2, "mixtures": 2})


def build_head(framework: str, context: str, in_channels: int, channels: int, num_classes: int,
               count: bool = False) -> FeaturePath:
    """The feature path of one table row, in eval mode, on the current default device."""
    return FeaturePath(table_config(framework, context, channels), in_channels, num_classes, count).eval()


def measure(framework: str, context: str, in_channels: int = 2048, size: int = 128, channels: int = 512,
            num_classes: int = 150, device: str = "meta") -> Dict[str, float]:
    """Params and FLOPs of one decode-head feature path on a 1 x in_channels x size x size input.

    ``flops``: 2 per multiply-add, everything counted; ``matrix_product_flops``: the part of it in
    :data:`MATRIX_PRODUCT_OPS`; ``macs``: multiply-adds of the layers alone (MCIBI Table 3's convention).
    """
    with torch.device(device):
        path = build_head(framework, context, in_channels, channels, num_classes, count=True)
        x = torch.randn(1, in_channels, size, size)
        soft = torch.randn(1, num_classes, size, size) if path.needs_soft_regions else None
    params = sum(p.numel() for p in path.feature_parameters())
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        path(x, soft)
    total = counter.get_total_flops()
    products = sum(n for op, n in counter.get_flop_counts().get("Global", {}).items() if _is_matrix_product(op))
    return {"params": float(params), "flops": float(total), "matrix_product_flops": float(products),
            "macs": (total - products) / 2.0}


def complexity_table(in_channels: int = 2048, size: int = 128, channels: int = 512, num_classes: int = 150,
                     device: str = "meta") -> List[Dict[str, object]]:
    """One row per :data:`MODULES` entry: ctxseg's params, FLOPs (2/MAC, with attention), GMACs of the
    layers alone, and the paper's figures where MCIBI Table 3 has the row (else None)."""
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
            "macs_G": ours["macs"] / 1e9,
            "paper_params_M": paper.get("params_M"),
            "paper_macs_G": paper.get("macs_G"),
            "paper_time_ms": paper.get("time_ms"),
        })
    return rows


def paper_only_rows() -> List[Dict[str, object]]:
    """MCIBI Table 3's rows for context schemes ctxseg does not implement: the paper's figures only."""
    return [{"module": name, "paper_params_M": PAPER_TABLE3[name]["params_M"],
             "paper_macs_G": PAPER_TABLE3[name]["macs_G"], "paper_time_ms": PAPER_TABLE3[name]["time_ms"]}
            for name in PAPER_ONLY]


def _fmt(v: Optional[float], width: int) -> str:
    return f"{'–' if v is None else f'{v:.2f}':>{width}}"


def format_table(rows: List[Dict[str, object]], setting: str) -> str:
    lines = [f"Context-module complexity ({setting})",
             "ctxseg: GFLOPs = 2 per multiply-add, attention / matrix products included; GMACs = multiply-adds of "
             "the layers only (the paper's convention)",
             "paper: MCIBI Table 3 as printed (its 'FLOPs (G)' are multiply-adds without the matrix products; "
             "time on a V100)",
             f"{'module':<16}{'params (M)':>11}{'GFLOPs':>10}{'GMACs':>10}{'paper params (M)':>18}"
             f"{'paper GMACs':>13}{'paper ms':>10}"]
    for r in list(rows) + paper_only_rows():
        lines.append(f"{r['module']:<16}{_fmt(r.get('params_M'), 11)}{_fmt(r.get('flops_G'), 10)}"
                     f"{_fmt(r.get('macs_G'), 10)}{_fmt(r.get('paper_params_M'), 18)}"
                     f"{_fmt(r.get('paper_macs_G'), 13)}{_fmt(r.get('paper_time_ms'), 10)}")
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
        _write_json_atomic(args.json, {
            "setting": setting,
            "flops_convention": "flops_G: 2 FLOPs per multiply-add, attention / matrix products included; "
                                "macs_G: multiply-adds of the layers only (matrix products left out, as MCIBI Table 3)",
            "paper_source": "MCIBI (Jin et al., ICCV 2021) Table 3: params, 'FLOPs' (multiply-adds), V100 time",
            "rows": rows, "paper_only": paper_only_rows()})
        logger.info("wrote %s", args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
