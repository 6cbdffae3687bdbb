"""Smoke test of the benchmark harness: it runs on tiny sizes and writes valid JSON and markdown.

No timing assertions: benchmarks report figures, they do not pass or fail on speed.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_quick_writes_valid_results(tmp_path):
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--only", "train_step,evaluation,gpu", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["quick"] is True
    assert set(data["groups"]) == {"train_step", "evaluation", "gpu"}
    for name in ("train_step", "evaluation"):
        group = data["groups"][name]
        assert "error" not in group, group.get("error")
        assert group["rows"], name
    shares = [v for k, v in data["groups"]["train_step"]["rows"][0].items() if k.endswith(" %")]
    assert abs(sum(shares) - 100.0) < 1e-6
    gpu = data["groups"]["gpu"]
    assert gpu.get("skipped") or gpu["rows"]  # skips cleanly without CUDA
    md = (tmp_path / "RESULTS.md").read_text()
    assert "python -m bench --quick" in md and "## train_step" in md


def test_attention_worker_and_helpers():
    from bench import markdown_table, run_worker
    from bench.attention import _predict

    spec = {"kind": "acf", "impl": "authors", "size": 8, "batch": 1, "iters": 2}
    timed = run_worker("bench.attention", dict(spec, mode="time"))
    assert "error" not in timed, timed
    assert len(timed["times"]) == 2 and "peak_bytes" not in timed
    memory = run_worker("bench.attention", dict(spec, mode="memory"), memory_run=True)
    assert "error" not in memory, memory
    assert memory["peak_bytes"] > 0 and "times" not in memory  # a forward+backward allocates
    # quadratic peak model: exact on a*N^2 + b*N
    pts = {s: 3 * (s * s) ** 2 + 5 * s * s for s in (16, 32)}
    assert abs(_predict(pts, 64) - (3 * 4096 ** 2 + 5 * 4096)) < 1e-3 * 3 * 4096 ** 2
    assert "| a |" in markdown_table([{"a": 1.0}])


def test_the_authors_acf_restated_in_the_bench_computes_our_module():
    """bench/attention.py's restatement of the authors' ACFModule (Φ of a separately pooled map, one
    softmax per mixture) gives our ACF's output and input gradient on the same weights."""
    import torch

    from bench.attention import authors_acf
    from ctxseg.models.acf import ACF

    mod = ACF(32, heads=4, mixtures=2, dropout=0.0).double().train()
    x = torch.randn(2, 32, 9, 7, dtype=torch.float64, requires_grad=True)
    ours = mod(x)
    (grad_ours,) = torch.autograd.grad(ours.sum(), x)
    theirs = authors_acf(mod, x)
    (grad_theirs,) = torch.autograd.grad(theirs.sum(), x)
    assert torch.allclose(ours, theirs, atol=1e-10) and torch.allclose(grad_ours, grad_theirs, atol=1e-9)


def test_the_authors_dca_restated_in_the_bench_computes_our_module():
    """bench/attention.py's authors' form of DCA (C' formed per pixel, g_k / g_v over it, the N x N matrix
    stored) gives our DCA's output and gradients on the same weights."""
    import torch

    from bench.attention import authors_dca
    from ctxseg.models.dca import DCA

    mod = DCA(16).double().train()
    feats = torch.randn(2, 16, 5, 7, dtype=torch.float64, requires_grad=True)
    w_logits = torch.randn(2, 5, 5, 7, dtype=torch.float64, requires_grad=True)
    memory = torch.randn(5, 16, dtype=torch.float64)
    results = []
    for fn in (lambda: mod(feats, w_logits, memory), lambda: authors_dca(mod, feats, w_logits, memory)):
        out = fn()
        results.append([out, *torch.autograd.grad((out * out).sum(), (feats, w_logits))])
    for ours, theirs in zip(*results):
        assert torch.allclose(ours, theirs, atol=1e-10)


def test_gpu_group_code_runs_on_the_cpu_with_bf16_autocast():
    """The GPU group has no CUDA here: run its measurement body on the CPU at tiny sizes, so a change in
    the model or DCA signatures, or an AMP failure (non-finite loss, dtype mismatch), breaks this test
    instead of the first GPU run."""
    import math

    import torch

    from bench.gpu import measure

    rows = measure(torch.device("cpu"), batch=2, size=64, iters=1, dca_channels=32, dca_size=16,
                   backbone="resnet_tiny")
    assert [r["what"].split(" ")[1] for r in rows[:3]] == ["deeplabv3", "deeplabv3+mcibi", "deeplabv3+acf"]
    assert rows[0]["vs_baseline"] == 1.0
    assert all(r["images_per_s"] > 0 and math.isnan(r["peak_MiB"]) for r in rows[:3])
    assert [r["what"] for r in rows[3:]] == ["DCA latency 1x32x16^2 fp32", "DCA latency 1x32x16^2 AMP bfloat16"]
    assert all(r["ms"] > 0 for r in rows[3:])


def test_cloud_group_checkpoint_worker_writes_and_reads_a_real_checkpoint(tmp_path):
    """The ``cloud`` group's checkpoint job on a local folder (the bucket side runs in `python -m bench
    --only cloud`): the payload is a real training checkpoint, written and read back through the stages'
    filesystem layer."""
    import torch

    from bench import run_worker
    from bench.cloud import _checkpoint_bytes

    done = run_worker("bench.cloud", {"job": "checkpoint_io", "n": 2, "locations": {"local": str(tmp_path / "ck")}})
    assert "error" not in done, done
    assert done["bytes"] > 1_000_000 and done["local"]["write_s"] > 0 and done["local"]["read_s"] > 0
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["checkpoint_epoch_0000", "checkpoint_epoch_0001"]
    import io

    payload = torch.load(io.BytesIO(_checkpoint_bytes()), weights_only=True)
    assert {"model", "optimizer", "state", "rng"} <= payload.keys() and payload["optimizer"]["state"]
