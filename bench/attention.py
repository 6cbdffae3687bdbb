"""Group 1 - attention kernels: ours against explicit-softmax forms of the same maths.

* DCA refinement (MCIBI Eq 11-14), C = 512 (transform 256), 19 memory rows; ours is fused SDPA;
* ACF (CFNet), d_model 512, H = 4 heads, K = 2 mixtures, keys on the 3x3/stride-2 pooled map; ours
  is, on the CPU, the row-blocked mixture kernel of ``ctxseg.models.mixture_attention``;

batch 2, forward + backward of the whole module (identical convs; only the attention kernel differs:
``dca.flat_attention`` / ``acf.mos_attention`` are swapped for the explicit form, which stores the
N x N (DCA) or N x N/4 per mixture (ACF) matrix like the public reference code). Each measurement
runs in fresh processes: one for the timed runs (the first of several is a warm-up), one for a run
measuring peak memory (see ``bench/__init__.py``).

The explicit form is only run where its peak, predicted from the smaller sizes (quadratic in N),
fits under ``--mem-cap-gib``; otherwise it is reported as "does not fit".

ACF in training also has dropout (0.1) on the co-occurrent probabilities (PyTorch's CPU SDPA has no
fused dropout: it would fall back to its math path, which stores N x M like the explicit form). The
``acf+dropout0.1`` row compares ours with the explicit form with dropout.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from typing import Dict, List

from bench import GIB, MIB, PeakMemory, median, run_worker, target, worker_main

MODULE = "bench.attention"


# ----------------------------------------------------------------------------- explicit forms
def explicit_flat(q, k, v, scale, dropout_p=0.0):
    import torch

    attn = torch.softmax((q @ k.transpose(-2, -1)) * scale, dim=-1)  # [B, 1, N, N]
    if dropout_p > 0:
        attn = torch.nn.functional.dropout(attn, dropout_p)
    return attn @ v


def explicit_mos(q, k, v, prior, scale, dropout_p=0.0, pad_head_dims=True):
    """Reference-style MoS: P(j|i) = sum_k pi_k softmax(s^k) materialised, dropout, then P V."""
    import torch

    attn = torch.softmax((q @ k.transpose(-2, -1)) * scale, dim=-1)  # [B, H, K, N, M]
    attn = (attn * prior[..., None, None]).sum(2)  # [B, H, N, M]
    if dropout_p > 0:
        attn = torch.nn.functional.dropout(attn, dropout_p)
    return attn @ v  # [B, H, N, dv]


# ----------------------------------------------------------------------------- worker
def _worker(spec: dict) -> dict:
    import torch

    from ctxseg.models import acf as acf_mod
    from ctxseg.models import dca as dca_mod

    dev = spec.get("device", "cpu")
    kind, impl, size, batch = spec["kind"], spec["impl"], spec["size"], spec["batch"]
    dropout = float(spec.get("dropout", 0.0))
    if impl == "explicit":
        dca_mod.flat_attention = explicit_flat
        acf_mod.mos_attention = explicit_mos
    torch.manual_seed(0)
    c = 512
    if kind == "dca":
        mod = dca_mod.DCA(c).to(dev)
        feats = torch.randn(batch, c, size, size, device=dev, requires_grad=True)
        w_logits = torch.randn(batch, 19, size, size, device=dev, requires_grad=True)
        memory = torch.randn(19, c, device=dev)
        call = lambda: mod(feats, w_logits, memory)  # noqa: E731
    else:
        mod = acf_mod.ACF(c, heads=4, mixtures=2, dropout=dropout).to(dev)  # the authors' widths: d = dv = C/H
        feats = torch.randn(batch, c, size, size, device=dev, requires_grad=True)
        call = lambda: mod(feats)  # noqa: E731
    mod.train()
    gout = torch.randn(feats.shape, generator=torch.Generator().manual_seed(1)).to(dev)
    sync = torch.cuda.synchronize if dev.startswith("cuda") else (lambda: None)

    def step():
        feats.grad = None
        for p in mod.parameters():
            p.grad = None
        out = call()
        out.backward(gout)
        sync()
        return out

    if spec.get("mode") != "memory":
        times = []
        for _ in range(int(spec.get("iters", 1))):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        return {"times": times}
    torch.manual_seed(0)  # the same dropout masks in every implementation's saved output
    with PeakMemory(dev) as pm:
        out = step()
    if spec.get("save"):
        torch.save({"out": out.detach().cpu(), "grad": feats.grad.detach().cpu()}, spec["save"])
    return {"peak_bytes": pm.extra}


# ----------------------------------------------------------------------------- driver
def _measure(kind, impl, size, batch, iters, save=None, dropout=0.0, device="cpu") -> dict:
    """``iters`` timed runs of one implementation in a fresh process, then a memory run in another."""
    spec = {"kind": kind, "impl": impl, "size": size, "batch": batch, "iters": iters, "save": save,
            "dropout": dropout, "device": device}
    timed = run_worker(MODULE, dict(spec, mode="time"))
    if "error" in timed:
        return timed
    memory = run_worker(MODULE, dict(spec, mode="memory"), memory_run=device == "cpu")
    return {**timed, **memory}


def _predict(points: Dict[int, int], size: int) -> float:
    """Peak bytes at ``size`` from the two largest measured sizes, fitting a*N^2 + b*N (N = size^2)."""
    if not points:
        return float("nan")
    (s1, p1), *rest = sorted(points.items(), reverse=True)
    n1, n = s1 * s1, size * size
    if not rest:
        return p1 * (n / n1) ** 2
    s2, p2 = rest[0]
    n2 = s2 * s2
    a = (p1 / n1 - p2 / n2) / (n1 - n2) if n1 != n2 else p1 / n1 ** 2
    a = max(a, 0.0)
    b = p1 / n1 - a * n1
    return a * n * n + b * n


def _precision(quick: bool) -> List[dict]:
    """Kernel-level accuracy: ours and the explicit form in fp32 against an fp64 explicit reference.

    (Module-level gradient differences above are larger because 1e-5 output differences flip a
    few ReLU gates after batch norm; this isolates the attention kernels.)"""
    import torch

    from ctxseg.models.acf import mos_attention

    n = 256 if quick else 4096
    g = torch.Generator().manual_seed(0)
    out = []
    cases = {
        "dca kernel": ((1, 1, n, 256), (1, 1, n, 256), (1, 1, n, 256), 256 ** -0.5),
        "acf kernel": ((1, 4, 2, n, 128), (1, 4, 2, n // 4, 128), (1, 4, n // 4, 128), 256 ** -0.5),
    }
    for name, (qs, ks, vs, scale) in cases.items():
        base = [torch.randn(s, generator=g, dtype=torch.float64) for s in (qs, ks, vs)]
        prior = torch.softmax(torch.randn(1, 4, 2, generator=g, dtype=torch.float64), -1)
        grad = None

        def run_one(fn, dtype):
            nonlocal grad
            t = [x.to(dtype).clone().requires_grad_() for x in base]
            o = fn(*t, prior.to(dtype)) if name.startswith("acf") else fn(*t)
            if grad is None:
                grad = torch.randn(o.shape, generator=g, dtype=torch.float64)
            o.backward(grad.to(dtype))
            return [o.detach().double()] + [x.grad.double() for x in t]

        if name.startswith("acf"):
            ours, expl = (lambda q, k, v, p: mos_attention(q, k, v, p, scale)), \
                (lambda q, k, v, p: explicit_mos(q, k, v, p, scale))
        else:
            from ctxseg.models.dca import flat_attention

            ours, expl = (lambda q, k, v: flat_attention(q, k, v, scale)), (lambda q, k, v: explicit_flat(q, k, v, scale))
        ref = run_one(expl, torch.float64)
        for label, fn in (("ours fp32", ours), ("explicit fp32", expl)):
            res = run_one(fn, torch.float32)
            rel = [float((a - b).abs().max() / b.abs().max()) for a, b in zip(res, ref)]
            out.append({"module": f"{name} N={n}", "size": label, "max_rel_err_vs_fp64_out": rel[0],
                        "max_rel_err_vs_fp64_grads": max(rel[1:])})
    return out


def run(opts) -> dict:
    import torch

    quick = opts.quick
    sizes = [8, 16] if quick else [32, 64, 96, 128]
    batch = 2
    cap = opts.mem_cap_gib * GIB
    rows: List[dict] = []
    raw: Dict[str, dict] = {}
    explicit_peaks: Dict[str, Dict[int, int]] = {"dca": {}, "acf": {}}
    tmp = tempfile.mkdtemp(prefix="ctxseg-bench-att-")
    for size in sizes:
        # timed runs per process (the first of >1 is a warm-up) and interleaved rounds
        iters = 3 if size <= 32 else (2 if size <= 96 else 1)
        rounds = 2
        for kind in ("dca", "acf"):
            pred = _predict(explicit_peaks[kind], size)
            run_explicit = not (pred == pred and pred > cap)
            if size == max(sizes) and not quick and not run_explicit:
                rounds = 1
            res = {"ours": [], "explicit": []}
            order = ["ours", "explicit"] if run_explicit else ["ours"]
            for r in range(rounds):
                for impl in (order if r % 2 == 0 else order[::-1]):
                    save = os.path.join(tmp, f"{kind}{size}{impl}.pt") if r == 0 else None
                    res[impl].append(_measure(kind, impl, size, batch, iters, save))
            err = [x["error"] for v in res.values() for x in v if "error" in x]
            if err:
                rows.append({"module": kind, "size": f"{size}^2", "error": err[0][-200:]})
                continue

            def stat(impl):
                runs = res[impl]
                t = [tt for x in runs for tt in (x["times"][1:] if len(x["times"]) > 1 else x["times"])]
                return median(t), max(x["peak_bytes"] for x in runs)

            t_s, m_s = stat("ours")
            row = {"module": kind, "size": f"{size}^2", "N": size * size, "ours_s": t_s,
                   "ours_peak_MiB": m_s / MIB}
            if run_explicit:
                t_e, m_e = stat("explicit")
                explicit_peaks[kind][size] = m_e
                a = torch.load(os.path.join(tmp, f"{kind}{size}ours.pt"), weights_only=True)
                b = torch.load(os.path.join(tmp, f"{kind}{size}explicit.pt"), weights_only=True)
                row.update({"explicit_s": t_e, "explicit_peak_MiB": m_e / MIB, "speedup": t_e / t_s,
                            "mem_ratio": m_e / max(m_s, 1),
                            "max_abs_diff_out": float((a["out"] - b["out"]).abs().max()),
                            "max_abs_diff_grad": float((a["grad"] - b["grad"]).abs().max()),
                            "rel_diff_grad": float((a["grad"] - b["grad"]).abs().max() / b["grad"].abs().max())})
            else:
                row.update({"explicit_s": "does not fit", "explicit_peak_MiB": f"> cap (predicted {pred / GIB:.1f} GiB)",
                            "speedup": "n/a", "mem_ratio": f"~{pred / max(m_s, 1):.0f} (predicted)"})
            row["timed_runs"] = f"{len(res['ours'])}x{max(1, iters - 1)}"
            rows.append(row)
            raw[f"{kind}{size}"] = res
    # ACF in training mode: dropout 0.1 on the co-occurrent probabilities
    dsize = 16 if quick else 64
    res = {"ours": [], "explicit": []}
    for r in range(2):
        for impl in (["ours", "explicit"] if r % 2 == 0 else ["explicit", "ours"]):
            res[impl].append(_measure("acf", impl, dsize, batch, 2, dropout=0.1))
    if not any("error" in x for v in res.values() for x in v):
        t_c, t_u = (median(x["times"][-1] for x in res[i]) for i in ("ours", "explicit"))
        m_c, m_u = (max(x["peak_bytes"] for x in res[i]) for i in ("ours", "explicit"))
        rows.append({"module": "acf+dropout0.1", "size": f"{dsize}^2", "N": dsize * dsize,
                     "ours_s": t_c, "ours_peak_MiB": m_c / MIB, "explicit_s": t_u,
                     "explicit_peak_MiB": m_u / MIB, "speedup": t_u / t_c, "mem_ratio": m_u / max(m_c, 1),
                     "timed_runs": "2x1"})
    shutil.rmtree(tmp, ignore_errors=True)
    rows += _precision(quick)
    targets = []
    for kind in ("dca", "acf"):
        r96 = next((r for r in rows if r.get("module") == kind and r.get("size") == "96^2"), None)
        if r96 is not None and isinstance(r96.get("speedup"), float):
            targets.append(target(f"{kind} 96^2 speed", ">= 1.3x", round(r96["speedup"], 2), r96["speedup"] >= 1.3))
            targets.append(target(f"{kind} 96^2 peak memory", ">= 4x less", round(r96["mem_ratio"], 1),
                                  r96["mem_ratio"] >= 4))
        r128 = next((r for r in rows if r.get("module") == kind and r.get("size") == "128^2"), None)
        if r128 is not None and "ours_peak_MiB" in r128:
            targets.append(target(f"{kind} 128^2 extra memory (ours)", "< 1 GiB",
                                  f"{r128['ours_peak_MiB']:.0f} MiB", r128["ours_peak_MiB"] < 1024))
    return {"rows": rows, "targets": targets, "batch": batch, "mem_cap_gib": opts.mem_cap_gib,
            "raw": raw, "note": "times: median seconds of forward+backward; peaks: max process RSS growth"}


if __name__ == "__main__":
    worker_main(_worker)
