"""Complexity table (MCIBI Table 3 setting): params / FLOPs per context module and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

from ctxseg.models.complexity import MODULES, PAPER_TABLE3, complexity_table, main, measure
from ctxseg.models.dca import DCA


def test_fcn_head_counts_match_closed_form():
    # FCN head feature path = one 3x3 conv (no bias) + BN: params and 2*MAC FLOPs in closed form
    r = measure("fcn", "none", in_channels=32, size=8, channels=16, num_classes=3)
    assert r["params"] == 32 * 16 * 9 + 2 * 16
    assert r["flops"] == 2 * 32 * 16 * 9 * 8 * 8


def test_dca_attention_flops_are_counted():
    dca = DCA(8).eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        dca(torch.randn(1, 8, 6, 6), torch.randn(1, 3, 6, 6), torch.randn(3, 8))
    n, t = 36, 4
    attention = 2 * 2 * n * n * t  # q k^T and P v
    convs = 2 * n * (8 * t + t * t) * 2 + 2 * n * 8 * t + 2 * n * t * 8  # g_q, g_k, g_v, g_o
    gather = 2 * n * 3 * 8  # Eq 12
    assert counter.get_total_flops() == attention + convs + gather


def test_table_on_cpu_and_meta_agree_and_cli_writes_json(tmp_path):
    small = dict(in_channels=16, size=9, channels=8, num_classes=3)
    meta = complexity_table(device="meta", **small)
    cpu = complexity_table(device="cpu", **small)
    assert [r["module"] for r in meta] == [m[0] for m in MODULES]
    for a, b in zip(meta, cpu):
        assert a["params_M"] == b["params_M"] > 0 and a["flops_G"] == b["flops_G"] > 0
        assert "paper_params_M" in a and "paper_flops_G" in a
    by = {r["module"]: r for r in meta}
    assert by["ASPP+DCA"]["flops_G"] > by["ASPP"]["flops_G"]
    assert set(PAPER_TABLE3) == set(by)
    out = tmp_path / "c.json"
    assert main(["--json", str(out), "--in-channels", "16", "--size", "9", "--channels", "8", "--num-classes", "3"]) == 0
    payload = json.loads(out.read_text())
    assert payload["rows"] == meta and "MCIBI" in payload["paper_source"]


def test_module_cli_runs_and_models_import_no_ray_mlflow_dvc():
    # `python -m ctxseg.models.complexity` in a fresh interpreter, then check what got imported
    code = (
        "import runpy, sys\n"
        "sys.argv = ['complexity', '--in-channels', '16', '--size', '8', '--channels', '8']\n"
        "try:\n    runpy.run_module('ctxseg.models.complexity', run_name='__main__')\n"
        "except SystemExit as e:\n    assert e.code == 0, e.code\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('ray', 'mlflow', 'dvc')]\n"
        "assert not bad, bad\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "PPM" in res.stderr + res.stdout and "paper" in res.stderr + res.stdout
