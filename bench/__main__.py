"""``python -m bench [--quick] [--only NAME[,NAME]]``: run the benchmark groups, print the tables, write
``bench/results.json`` (atomically) and ``bench/RESULTS.md``."""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import json
import sys
import time
import traceback
from pathlib import Path

from bench import BENCH_DIR, load_info, markdown_table
from ctxseg.io import write_text

GROUPS = ["attention", "memory_update", "train_step", "pipeline", "ray_cpu", "study", "cloud", "evaluation", "gpu", "data"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="tiny sizes (seconds to a few minutes; the smoke test)")
    p.add_argument("--only", default="", help=f"comma-separated groups: {', '.join(GROUPS)}")
    p.add_argument("--out", default=str(BENCH_DIR / "results.json"), help="results JSON (default: %(default)s)")
    p.add_argument("--md", default=None, help="markdown table (default: RESULTS.md next to --out)")
    p.add_argument("--mem-cap-gib", type=float, default=6.0,
                   help="explicit attention runs only where its predicted peak fits under this (default: %(default)s)")
    p.add_argument("--work-s", type=float, default=120.0,
                   help="seconds of plain-process training work for Ray vs plain (default: %(default)s)")
    return p.parse_args(argv)


def _loadavg(values) -> str:
    return " / ".join(f"{v:.2f}" for v in values) if values else "n/a"


def render(results: dict) -> str:
    out = ["# ctxseg benchmarks\n",
           f"Command: `{results['command']}`  \nDate: {results['date']}  \n"
           f"Machine: {results['machine']}\n",
           "Every figure is a ratio of two things measured side by side in the same run (medians of "
           "interleaved repeats), or a count. Absolute seconds depend on what else the machine ran "
           f"(load average at the start {_loadavg(results['info'].get('loadavg'))}, at the end "
           f"{_loadavg(results['info'].get('loadavg_end'))}); ratios much less.\n"]
    targets = []
    for name in GROUPS:
        g = results["groups"].get(name)
        if g is None:
            continue
        out.append(f"## {name}\n")
        if g.get("skipped"):
            out.append(f"skipped: {g['skipped']}\n")
            continue
        if g.get("error"):
            out.append(f"error: {g['error'].splitlines()[-1] if g['error'] else ''}\n")
            continue
        out.append(markdown_table(g.get("rows", [])))
        out.append(f"\n({g.get('seconds', 0):.0f} s)\n")
        targets += g.get("targets", [])
    if targets:
        out.append("## targets (issue 8)\n")
        out.append(markdown_table([{"target": t["target"], "wanted": t["wanted"], "measured": t["value"],
                                    "met": {True: "yes", False: "MISSED", None: "n/a"}[t["met"]],
                                    "note": t.get("note", "")} for t in targets]))
    return "\n".join(out)


def main(argv=None) -> int:
    args = parse_args(argv)
    only = [g.strip() for g in args.only.split(",") if g.strip()]
    unknown = [g for g in only if g not in GROUPS]
    if unknown:
        print(f"unknown group(s) {unknown}; choose from {GROUPS}", file=sys.stderr)
        return 2
    out = Path(args.out)
    md = Path(args.md) if args.md else out.with_name("RESULTS.md")
    info = load_info()
    results = {"command": "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:]),
               "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "quick": args.quick,
               "machine": f"{info['cpu_count']} CPUs, torch {info['torch']} ({info['torch_threads']} threads)"
                          + (f", GPU {info['gpu']}" if info.get("gpu") else ", no GPU"),
               "info": info, "groups": {}}
    if only and out.is_file():  # --only: keep the other groups' latest figures
        try:
            old = json.loads(out.read_text())
            if old.get("quick") == args.quick:
                results["groups"] = {k: v for k, v in old.get("groups", {}).items() if k not in only}
                results["command"] = old.get("command", "") + " ; " + results["command"]
        except (ValueError, OSError):
            pass
    failed = False
    for name in only or GROUPS:
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        try:
            res = importlib.import_module(f"bench.{name}").run(args)
        except Exception:  # keep going: one broken group must not hide the others
            res = {"error": traceback.format_exc(), "rows": [], "targets": []}
            failed = True
        res["seconds"] = time.perf_counter() - t0
        results["groups"][name] = res
        if res.get("skipped"):
            print(f"skipped: {res['skipped']}")
        elif res.get("error"):
            print(res["error"], file=sys.stderr)
        else:
            print(markdown_table(res.get("rows", [])), flush=True)
        # after every group, so an interrupted run keeps what it measured
        write_text(out, json.dumps(results, indent=1, default=str))
    info_end = load_info()
    results["info"]["loadavg_end"] = info_end.get("loadavg")
    write_text(out, json.dumps(results, indent=1, default=str))
    write_text(md, render(results))
    print(f"wrote {out} and {md}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
