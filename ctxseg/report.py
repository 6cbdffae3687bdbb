"""Report building blocks: a document model rendered to Markdown and self-contained HTML, and the
tables of a study laid out as the papers present them (pure functions of plain records).

A *record* is one trained model: ``{"name", "framework", "context", "variant": {...}, "metrics":
metrics/<model>.details.json (the full evaluation record), "run": run.json}``; a *sweep row* is one line of ``tune/results.csv``.

* MCIBI Table 5: each framework × {baseline, +MCIBI, +ACF}, mIoU and the delta against the baseline;
* MCIBI Table 1 (fusion F of Eq 4) and Table 2 (memory init / update / momentum schedule / RCL);
* MCIBI Table 3 (complexity of each context module);
* CFNet Table 3: the K mixtures × H heads grid.

The ``report`` DVC stage (``pipeline/report.py``) reads the files, calls these, adds figures and
MLflow links, and writes ``reports/``.
"""
from __future__ import annotations

import base64
import csv
import html
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ctxseg.config import ConfigError
from ctxseg.stats import METHOD, Comparison, compare, mean_sd
from ctxseg.sweep import finite, grid_rows, noise_level, noise_verdict

CONTEXTS = ("none", "mcibi", "acf")
CONTEXT_LABEL = {"none": "baseline", "mcibi": "+MCIBI", "acf": "+ACF"}
FUSION_LABEL = {"add": "add (R + C_bi)", "weighted_add": "weighted add", "concat": "concat (Eq 4)"}
# MCIBI Table 2 knobs (memory initialisation / update / momentum schedule / RCL)
MEMORY_KEYS = ("init", "update", "momentum_power", "rcl")
SYMBOL = {"mcibi.momentum": "m0", "mcibi.alpha": "α", "mcibi.beta": "β", "acf.mixtures": "K", "acf.heads": "H"}
SWEEP_FIXED_COLUMNS = ("sweep", "trial_id", "model", "status", "epochs", "iterations", "final_mIoU", "best_mIoU",
                       "seed", "repeat_of", "mlflow_run_id")
SWEEP_TEXT_COLUMNS = ("sweep", "trial_id", "model", "status", "mlflow_run_id", "repeat_of")


class Document:
    """A tiny document model rendered to both Markdown and self-contained HTML."""

    def __init__(self, title: str):
        self.title = title
        self.blocks: list[tuple] = []

    def heading(self, text: str, level: int = 2) -> None:
        self.blocks.append(("heading", level, text))

    def paragraph(self, text: str) -> None:
        self.blocks.append(("paragraph", text))

    def bullets(self, items: Sequence[str]) -> None:
        if items:
            self.blocks.append(("bullets", list(items)))

    def code(self, text: str) -> None:
        self.blocks.append(("code", text))

    def table(self, headers: list[str], rows: list[list[str]], caption: str = "") -> None:
        self.blocks.append(("table", headers, rows, caption))

    def image(self, path: Path, caption: str) -> None:
        self.blocks.append(("image", path, caption))

    def markdown(self, base: Path) -> str:
        out = [f"# {self.title}", ""]
        for block in self.blocks:
            kind = block[0]
            if kind == "heading":
                out += ["#" * block[1] + " " + block[2], ""]
            elif kind == "paragraph":
                out += [block[1], ""]
            elif kind == "bullets":
                out += [f"- {item}" for item in block[1]] + [""]
            elif kind == "code":
                out += ["```", block[1], "```", ""]
            elif kind == "table":
                headers, rows, caption = block[1], block[2], block[3]
                if caption:
                    out += [f"*{caption}*", ""]
                out.append("| " + " | ".join(_md_cell(h) for h in headers) + " |")
                out.append("|" + "|".join("---" for _ in headers) + "|")
                out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
                out.append("")
            elif kind == "image":
                out += [f"![{block[2]}]({block[1].relative_to(base).as_posix()})", "", f"*{block[2]}*", ""]
        return "\n".join(out)

    def html(self) -> str:
        parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>",
                 "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
                 "table{border-collapse:collapse;margin:.5em 0 1.2em}td,th{border:1px solid #ccc;padding:4px 8px;"
                 "text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}"
                 "caption{caption-side:top;text-align:left;font-style:italic;padding:.3em 0}"
                 "img{max-width:100%}pre{background:#f6f6f6;padding:.6em;overflow-x:auto}"
                 "figcaption{font-style:italic;color:#444}</style></head><body>",
                 f"<h1>{html.escape(self.title)}</h1>"]
        for block in self.blocks:
            kind = block[0]
            if kind == "heading":
                parts.append(f"<h{block[1]}>{html.escape(block[2])}</h{block[1]}>")
            elif kind == "paragraph":
                parts.append(f"<p>{_inline_html(block[1])}</p>")
            elif kind == "bullets":
                parts.append("<ul>" + "".join(f"<li>{_inline_html(i)}</li>" for i in block[1]) + "</ul>")
            elif kind == "code":
                parts.append(f"<pre>{html.escape(block[1])}</pre>")
            elif kind == "table":
                caption = f"<caption>{html.escape(block[3])}</caption>" if block[3] else ""
                head = "".join(f"<th>{html.escape(h)}</th>" for h in block[1])
                body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in block[2])
                parts.append(f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            elif kind == "image":
                data = base64.b64encode(block[1].read_bytes()).decode()
                parts.append(f"<figure><img src='data:image/png;base64,{data}' alt='{html.escape(block[2])}'>"
                             f"<figcaption>{html.escape(block[2])}</figcaption></figure>")
        parts.append("</body></html>")
        return "\n".join(parts)


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _inline_html(text: str) -> str:
    """Escape, then render Markdown `code` spans and **bold**."""
    import re

    pieces = html.escape(text).split("`")
    out = []
    for i, piece in enumerate(pieces):
        if i % 2:
            out.append(f"<code>{piece}</code>")
        else:
            out.append(re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", piece))
    return "".join(out)


def pct(value: Optional[float]) -> str:
    return f"{100 * value:.2f}" if finite(value) else "–"


def fmt_num(value: Any, digits: int = 2) -> str:
    return f"{value:.{digits}f}" if finite(value) else "n/a"


def main_records(records: list[dict]) -> dict[tuple[str, str], dict]:
    """The record standing for each (framework, context): the canonically named model (``fcn``,
    ``fcn_mcibi``, ``fcn_acf``) if listed, else the first listed one."""
    out: dict[tuple[str, str], dict] = {}
    for r in records:
        key = (r["framework"], r["context"])
        canonical = r["framework"] if r["context"] == "none" else f"{r['framework']}_{r['context']}"
        if key not in out or (r["name"] == canonical and out[key]["name"] != canonical):
            out[key] = r
    return out


def frameworks(records: list[dict]) -> list[str]:
    seen: list[str] = []
    for r in records:
        if r["framework"] not in seen:
            seen.append(r["framework"])
    return seen


def miou_of(r: Optional[dict], ms: bool = False) -> Optional[float]:
    if r is None:
        return None
    m = r["metrics"]
    return m.get("ms_flip", {}).get("mIoU") if ms else m.get("mIoU")


def seed_values(r: Optional[dict], ms: bool = False) -> list[float]:
    """Each seed's mIoU (single scale, or multi-scale + flip) of a record; its one mIoU for a record that
    has no per-seed values."""
    if r is None:
        return []
    seeds = r["metrics"].get("seeds")
    if seeds:
        key = "ms_flip_mIoU" if ms else "mIoU"
        return [s[key] for s in seeds if finite(s.get(key))]
    value = miou_of(r, ms)
    return [value] if finite(value) else []


def versus(r: Optional[dict], base: Optional[dict], ms: bool = False) -> Comparison:
    """mIoU of ``r`` minus its baseline's, over seeds (:func:`ctxseg.stats.compare`)."""
    return compare(seed_values(r, ms), seed_values(base, ms))


def mean_sd_cell(values: Sequence[float]) -> str:
    """``58.40 ± 1.20`` (mIoU %, mean ± sample sd over seeds), ``58.40`` for one seed, ``–`` for none."""
    mean, sd = mean_sd(values)
    if mean is None:
        return "–"
    return f"{100 * mean:.2f}" + (f" ± {100 * sd:.2f}" if sd is not None else "")


def delta_cell(c: Comparison, with_verdict: bool = True) -> str:
    """``+12.30 [+5.10, +19.50] helped``: the mean difference in points, its 95% interval, the verdict."""
    if c.diff is None:
        return "–"
    verdict = c.verdict
    short = ("no verdict (1 seed)" if verdict.startswith("no verdict") else
             "not distinguishable" if verdict.startswith("not distinguishable") else verdict)
    return c.interval_text() + (f" {short}" if with_verdict else "")


def seeds_note(records: list[dict]) -> str:
    """How the study's verdicts were made: seeds per model and the interval method."""
    counts = sorted({len(seed_values(r)) for r in records})
    n = "/".join(map(str, counts)) or "0"
    if counts and max(counts) < 2:
        return ("One seed per model: the table shows each model's single run and no verdict can be given, because "
                "one run says nothing about seed noise. Train several (`seeds: [0, 1, 2]`) for verdicts.")
    return (f"{n} seeds per model; mIoU is the mean ± the sample standard deviation over seeds; Δ is the difference "
            f"of means against the framework's baseline with its 95% interval ({METHOD}). A verdict is read off "
            "the interval alone: \"helped\" above zero, \"hurt\" below zero, otherwise \"not distinguishable\" "
            "with that many seeds. There is no fixed threshold.")


def paper_table5(records: list[dict]) -> tuple[list[str], list[list[str]]]:
    """MCIBI Table 5 layout: one row per framework, baseline / +MCIBI / +ACF (mean ± sd over seeds) with Δ
    to the baseline, its 95% interval over seeds and the verdict. Single-scale mIoU (%)."""
    mains = main_records(records)
    headers = ["framework", "baseline", "+MCIBI", "Δ +MCIBI [95% CI]", "+ACF", "Δ +ACF [95% CI]"]
    rows = []
    for fw in frameworks(records):
        base = mains.get((fw, "none"))
        row = [fw]
        for ctx in CONTEXTS:
            r = mains.get((fw, ctx))
            row.append("–" if r is None else mean_sd_cell(seed_values(r)))
            if ctx != "none":
                row.append("–" if r is None or base is None else delta_cell(versus(r, base)))
        rows.append(row)
    return headers, rows


def main_results_table(records: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Every model: mIoU mean ± sd and each seed's, the delta against its framework's baseline with its
    95% interval and verdict, pixAcc, mAcc, and the multi-scale + flip mIoU with its own delta."""
    baselines = {fw: r for (fw, ctx), r in main_records(records).items() if ctx == "none"}
    headers = ["model", "framework", "context", "variant", "seeds", "mIoU (%)", "mIoU per seed", "Δ vs baseline [95% CI]",
               "pixAcc (%)", "mAcc (%)", "mIoU ms+flip (%)", "Δ ms+flip [95% CI]", "params (M)"]
    rows = []
    order = {c: i for i, c in enumerate(CONTEXTS)}
    for r in sorted(records, key=lambda r: (frameworks(records).index(r["framework"]), order.get(r["context"], 9))):
        m = r["metrics"]
        base = baselines.get(r["framework"])
        is_base = base is r or base is None
        n_params = m.get("num_params")
        seeds = m.get("seeds") or []
        per_seed = ", ".join(f"{s['seed']}: {pct(s.get('mIoU'))}" for s in seeds) or pct(m.get("mIoU"))
        rows.append([r["name"], r["framework"], r["context"], variant_label(r), str(len(seed_values(r))),
                     mean_sd_cell(seed_values(r)), per_seed, "" if is_base else delta_cell(versus(r, base)),
                     _mean_sd_of(m, "pixAcc"), _mean_sd_of(m, "mAcc"), mean_sd_cell(seed_values(r, True)),
                     "" if is_base else delta_cell(versus(r, base, True)),
                     f"{n_params / 1e6:.2f}" if finite(n_params) else "–"])
    return headers, rows


def _mean_sd_of(metrics: dict, key: str) -> str:
    seeds = metrics.get("seeds")
    return mean_sd_cell([s[key] for s in seeds if finite(s.get(key))] if seeds else [metrics.get(key)])


def variant_label(r: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(r["variant"].items())) or "default"


def headline(records: list[dict], complexity: Optional[list[dict]], trained: Optional[list[dict]] = None) -> list[str]:
    """One line per context model: its mIoU change over the baseline with the 95% interval over seeds and
    the verdict the interval gives, and its extra cost (in the paper's setting from ``complexity``, and as
    trained here from ``trained``, see :func:`trained_cost_rows`), each in one named counting convention."""
    mains = main_records(records)
    cost = {}
    for row in complexity or []:
        cost[(row["framework"], row["context"])] = row
    own = {row["name"]: row for row in trained or []}
    lines = []
    for fw in frameworks(records):
        base = mains.get((fw, "none"))
        for ctx in ("mcibi", "acf"):
            r = mains.get((fw, ctx))
            if r is None:
                continue
            text = f"`{r['name']}` ({fw} {CONTEXT_LABEL[ctx]}): "
            if base is None:
                text += f"mIoU {mean_sd_cell(seed_values(r))}% (no {fw} baseline in this study to compare with)"
            else:
                c, c_ms = versus(r, base), versus(r, base, True)
                text += (f"{c.interval_text()} mIoU points over `{base['name']}` single-scale "
                         f"({mean_sd_cell(seed_values(base))} → {mean_sd_cell(seed_values(r))}, "
                         f"{len(seed_values(r))} seeds), {c_ms.interval_text()} with multi-scale + flip: "
                         f"**{c.verdict}**")
            c, b = cost.get((fw, ctx)), cost.get((fw, "none"))
            if c and b and finite(c.get("macs_G")) and finite(b.get("macs_G")):
                text += (f"; cost in the MCIBI Table 3 setting: {c['params_M'] - b['params_M']:+.2f} M params, "
                         f"{c['macs_G'] - b['macs_G']:+.1f} GMACs (multiply-adds of the layers, the paper's "
                         "convention)")
                if finite(c.get("latency_ms")) and finite(b.get("latency_ms")):
                    text += f", {c['latency_ms'] - b['latency_ms']:+.1f} ms CPU latency (small input)"
            mine, theirs = own.get(r["name"]), own.get(base["name"]) if base is not None else None
            if mine and theirs and finite(mine["params_M"]) and finite(theirs["params_M"]):
                text += f"; as trained here: {mine['params_M'] - theirs['params_M']:+.2f} M params"
                if finite(mine["flops_G"]) and finite(theirs["flops_G"]):
                    text += (f", {mine['flops_G'] - theirs['flops_G']:+.3f} GFLOPs per image (2 FLOPs per "
                             "multiply-add, attention products included)")
                if finite(mine.get("latency_ms")) and finite(theirs.get("latency_ms")):
                    text += f", {mine['latency_ms'] - theirs['latency_ms']:+.1f} ms CPU latency per image"
            lines.append(text + ".")
    return lines


def context_groups(meta: dict) -> dict[str, list[str]]:
    """Groups of classes that look alike and are told apart only by context, from a dataset's meta.json.

    Read generically from ``meta["context_groups"]`` (``{group: [class, ...]}``); datasets prepared
    before that key existed carry it as ``meta["synthetic"]["groups"]``. Empty for datasets without.
    """
    groups = meta.get("context_groups")
    if groups is None:
        groups = (meta.get("synthetic") or {}).get("groups")
    return {str(g): list(members) for g, members in (groups or {}).items()}


def context_classes(meta: dict) -> list[str]:
    """Classes that only context tells apart (the members of :func:`context_groups`), in group order."""
    return [c for members in context_groups(meta).values() for c in members if c in meta.get("class_names", [])]


def class_mean_values(r: dict, classes: Sequence[str]) -> list[float]:
    """Each seed's mean IoU over ``classes`` (the classes a seed's split lacks are left out of its mean)."""
    seeds = r["metrics"].get("seeds") or [r["metrics"]]
    out = []
    for s in seeds:
        present = [s["per_class_iou"].get(c) for c in classes if finite(s["per_class_iou"].get(c))]
        if present:
            out.append(sum(present) / len(present))
    return out


def context_class_table(records: list[dict], meta: dict) -> Optional[tuple[list[str], list[list[str]]]]:
    """IoU of the context-dependent classes per main model (means over seeds), and their mean (mean ± sd
    over seeds) with its Δ to the baseline, 95% interval over seeds and verdict."""
    classes = context_classes(meta)
    if not classes:
        return None
    mains = main_records(records)
    headers = ["model"] + classes + ["mean (%)", "Δ mean vs baseline [95% CI]"]
    rows = []
    for fw in frameworks(records):
        base_values = None
        for ctx in CONTEXTS:
            r = mains.get((fw, ctx))
            if r is None:
                continue
            values = class_mean_values(r, classes)
            if ctx == "none":
                base_values = values
            rows.append([r["name"]] + [pct(r["metrics"]["per_class_iou"].get(c)) for c in classes]
                        + [mean_sd_cell(values),
                           "" if ctx == "none" or base_values is None else delta_cell(compare(values, base_values))])
    return headers, rows


def class_deltas(records: list[dict]) -> tuple[Optional[str], dict[str, dict]]:
    """(baseline name, {context model: {class: IoU - baseline IoU}}) for the first framework with a baseline."""
    mains = main_records(records)
    for fw in frameworks(records):
        base = mains.get((fw, "none"))
        if base is None:
            continue
        out = {}
        for ctx in ("mcibi", "acf"):
            r = mains.get((fw, ctx))
            if r is None:
                continue
            bi = base["metrics"]["per_class_iou"]
            out[r["name"]] = {c: (v - bi[c]) if finite(v) and finite(bi.get(c)) else None
                              for c, v in r["metrics"]["per_class_iou"].items()}
        if out:
            return base["name"], out
    return None, {}


def _mcibi_groups(records: list[dict]) -> dict[str, tuple[dict, list[dict]]]:
    """framework -> (main MCIBI record, all MCIBI records of that framework)."""
    mains = main_records(records)
    groups = {}
    for fw in frameworks(records):
        runs = [r for r in records if r["framework"] == fw and r["context"] == "mcibi"]
        if runs:
            groups[fw] = (mains[(fw, "mcibi")], runs)
    return groups


def _other_differences(r: dict, ref: dict, table_keys: Sequence[str]) -> str:
    diff = [f"{k}={v}" for k, v in sorted(r["flat"].items())
            if k not in table_keys and v != ref["flat"].get(k) and not k.startswith("acf.")]
    return ", ".join(diff) or "–"


def fusion_table(records: list[dict]) -> list[tuple[str, list[str], list[list[str]]]]:
    """MCIBI Table 1: fusion F of Eq 4 (add / weighted add / concat), other memory knobs as the main run's."""
    tables = []
    baselines = {fw: r for (fw, c), r in main_records(records).items() if c == "none"}
    for fw, (main, runs) in _mcibi_groups(records).items():
        same = [r for r in runs if all(r["flat"][f"mcibi.{k}"] == main["flat"][f"mcibi.{k}"] for k in MEMORY_KEYS)]
        if len({r["flat"]["mcibi.fusion"] for r in same}) < 2:
            continue
        base = baselines.get(fw)
        rows = []
        if base is not None:
            rows.append([base["name"], "(no DCA: baseline)", mean_sd_cell(seed_values(base)), "", "–"])
        order = list(FUSION_LABEL)
        for r in sorted(same, key=lambda r: order.index(r["flat"]["mcibi.fusion"])):
            rows.append([r["name"], FUSION_LABEL[r["flat"]["mcibi.fusion"]], mean_sd_cell(seed_values(r)),
                         delta_cell(versus(r, base)) if base else "–",
                         _other_differences(r, main, ["mcibi.fusion"])])
        tables.append((fw, ["model", "fusion F", "mIoU (%)", "Δ vs baseline [95% CI]", "other differences"], rows))
    return tables


def memory_table(records: list[dict]) -> list[tuple[str, list[str], list[list[str]]]]:
    """MCIBI Table 2: memory initialisation, update (cosine / mean), momentum schedule (poly / constant), RCL."""
    tables = []
    baselines = {fw: r for (fw, c), r in main_records(records).items() if c == "none"}
    for fw, (main, runs) in _mcibi_groups(records).items():
        same = [r for r in runs if r["flat"]["mcibi.fusion"] == main["flat"]["mcibi.fusion"]]
        if len({tuple(r["flat"][f"mcibi.{k}"] for k in MEMORY_KEYS) for r in same}) < 2:
            continue
        base = baselines.get(fw)
        rows = []
        if base is not None:
            rows.append([base["name"], "–", "–", "–", "–", mean_sd_cell(seed_values(base)), "", "–"])
        for r in same:
            f = r["flat"]
            p = f["mcibi.momentum_power"]
            schedule = "constant" if p == 0 else f"poly (p={p})"
            rows.append([r["name"], str(f["mcibi.init"]), str(f["mcibi.update"]), schedule,
                         "✓" if f["mcibi.rcl"] else "✗", mean_sd_cell(seed_values(r)),
                         delta_cell(versus(r, base)) if base else "–",
                         _other_differences(r, main, [f"mcibi.{k}" for k in MEMORY_KEYS])])
        tables.append((fw, ["model", "memory init", "update", "momentum", "RCL", "mIoU (%)", "Δ vs baseline [95% CI]",
                            "other differences"], rows))
    return tables


def read_sweep(path: Path) -> list[dict]:
    """Rows of ``tune/results.csv`` with numbers parsed (empty cells -> None)."""
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in ("model", "best_mIoU") if c not in (reader.fieldnames or [])]
        if missing:
            raise ConfigError(f"{path}: missing column(s) {missing}; expected trial_id, model, status, iterations, "
                              "final_mIoU, best_mIoU and one column per swept key. Re-run `dvc repro tune`.")
        rows = []
        for raw in reader:
            rows.append({k: _parse_cell(v) if k not in SWEEP_TEXT_COLUMNS else (v or "")
                         for k, v in raw.items() if k is not None})
    return rows


def _parse_cell(value: Optional[str]) -> Any:
    if value is None or value.strip() == "":
        return None
    try:
        number = float(value)
    except ValueError:
        return value.strip()
    return int(number) if number.is_integer() and "." not in value and "e" not in value.lower() else number


def sweep_score(row: dict) -> Optional[float]:
    for key in ("best_mIoU", "final_mIoU"):
        if finite(row.get(key)):
            return float(row[key])
    return None


def percent_scale(values: list[float]) -> float:
    """mIoU in results.csv as a fraction (0-1, like metrics/) -> x100; already-percent values are kept."""
    return 1.0 if values and max(values) > 1.0 else 100.0


def swept_keys(rows: list[dict]) -> list[str]:
    keys: list[str] = []
    for row in rows:
        for k, v in row.items():
            if k not in SWEEP_FIXED_COLUMNS and "." in k and v is not None and k not in keys:
                keys.append(k)
    return keys


def kh_grid(rows: list[dict]) -> dict[str, tuple[list, list, np.ndarray]]:
    """model -> (K values, H values, best mIoU grid [K, H]) over trials that set both acf.mixtures and acf.heads."""
    out = {}
    for model in sorted({r["model"] for r in rows}):
        trials = [r for r in rows if r["model"] == model and r.get("acf.mixtures") is not None
                  and r.get("acf.heads") is not None and sweep_score(r) is not None]
        if not trials:
            continue
        ks = sorted({r["acf.mixtures"] for r in trials})
        hs = sorted({r["acf.heads"] for r in trials})
        grid = np.full((len(ks), len(hs)), np.nan)
        for r in trials:
            i, j = ks.index(r["acf.mixtures"]), hs.index(r["acf.heads"])
            grid[i, j] = np.nanmax([grid[i, j], sweep_score(r)])
        out[model] = (ks, hs, grid)
    return out


def per_key_best(rows: list[dict], key: str) -> list[tuple[Any, float, int]]:
    """(value, best mIoU, trials) for each value of a swept key."""
    by: dict[Any, list[float]] = {}
    for r in rows:
        if r.get(key) is not None and sweep_score(r) is not None:
            by.setdefault(r[key], []).append(sweep_score(r))
    return [(v, max(s), len(s)) for v, s in sorted(by.items(), key=lambda kv: (str(type(kv[0])), kv[0]))]


def value_text(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def add_complexity_section(doc: Document, rows: list[dict]) -> None:
    """MCIBI Table 3 beside ctxseg's measurements, in both counting conventions (see
    :mod:`ctxseg.models.complexity`): ctxseg's GFLOPs (2 per multiply-add, attention included), ctxseg's
    GMACs of the layers alone, and the paper's figures, which are multiply-adds without the matrix products.
    The paper's rows that ctxseg does not implement are listed with the paper's figures only."""
    from ctxseg.models import complexity

    doc.heading("Complexity (MCIBI Table 3)", level=3)
    setting = "input 1×2048×128×128, 512 channels, 150 classes"
    headers = ["module", "params (M)", "GFLOPs (2/MAC, with attention)", "GMACs (layers only)", "CPU latency (ms)",
               "paper: params (M)", "paper: GMACs", "paper: time (ms, V100)"]
    body = []
    for r in rows:
        body.append([r["module"], fmt_num(r["params_M"]), fmt_num(r["flops_G"], 1), fmt_num(r.get("macs_G"), 1),
                     fmt_num(r.get("latency_ms"), 1), fmt_num(r.get("paper_params_M")),
                     fmt_num(r.get("paper_macs_G"), 1), fmt_num(r.get("paper_time_ms"), 1)])
    for r in complexity.paper_only_rows():
        body.append([f"{r['module']} (paper only)", "–", "–", "–", "–", fmt_num(r["paper_params_M"]),
                     fmt_num(r["paper_macs_G"], 1), fmt_num(r["paper_time_ms"], 1)])
    doc.table(headers, body, caption=f"Decode-head feature path; params, GFLOPs and GMACs measured here in the "
                                     f"paper's setting ({setting})")
    latency_setting = rows[0].get("latency_setting", "") if rows else ""
    doc.paragraph("Two counting conventions. **GFLOPs** is ctxseg's: 2 FLOPs per multiply-add, convolutions and "
                  "every matrix product of activations (the attention products q kᵀ and P v, DCA's Eq 12 gather) "
                  "counted. **GMACs** is the paper's: multiply-adds of the layers only, the matrix products left "
                  "out. MCIBI Table 3's \"FLOPs (G)\" are such multiply-adds: ctxseg's PPM row (618.6 GFLOPs = "
                  "309.3 GMACs) matches its 309.45 G; DCA's two 128²×128² attention products (about 137 GMACs) are "
                  "not in the paper's 242.80 G. ASPP differs by design: the paper fuses the branches with a 3×3 "
                  "conv, ctxseg with a 1×1 projection (10.49 M params, 171.8 GMACs less).")
    doc.paragraph(f"CPU latency is measured here on a much smaller input ({latency_setting}) "
                  "to fit the report's time budget: compare modules with each other, not with a GPU. "
                  "Columns marked **paper** are the figures printed in MCIBI Table 3 (Jin et al., ICCV 2021; its "
                  "timings were taken on a V100 GPU); they are the paper's numbers, not ours, and `n/a` means the "
                  "paper has no such row. Rows marked *paper only* are context schemes ctxseg does not implement.")


def kh_epochs(rows: list[dict], grids: dict[str, tuple[list, list, np.ndarray]]) -> dict[str, np.ndarray]:
    """model -> epochs run by the trial behind each cell of :func:`kh_grid` (NaN where no trial)."""
    out = {}
    for model, (ks, hs, grid) in grids.items():
        epochs = np.full(grid.shape, np.nan)
        for r in rows:
            if r["model"] != model or r.get("acf.mixtures") not in ks or r.get("acf.heads") not in hs:
                continue
            i, j = ks.index(r["acf.mixtures"]), hs.index(r["acf.heads"])
            if sweep_score(r) is not None and sweep_score(r) == grid[i, j] and finite(r.get("epochs")):
                epochs[i, j] = r["epochs"] if not np.isfinite(epochs[i, j]) else max(epochs[i, j], r["epochs"])
        out[model] = epochs
    return out


def _epochs_note(epochs: Any, longest: Any, status: Optional[str] = None) -> str:
    """How many epochs a trial ran, e.g. ``"4 ep"``, ``"2 ep, stopped early"`` (fewer than ``longest``),
    ``"0 ep, failed"`` (status ERROR)."""
    if not finite(epochs):
        return ""
    if status == "ERROR":
        return f"{int(epochs)} ep, failed"
    return f"{int(epochs)} ep" + ("" if not finite(longest) or epochs >= longest else ", stopped early")


def score_cell(score: Any, epochs: Any, longest: Any) -> str:
    """A sweep table cell: the score (%) and, beside it, how many epochs its trial ran, so that a score
    reached by a trial ASHA stopped early is not read as a like-for-like comparison."""
    if not finite(score):
        return "–"
    note = _epochs_note(epochs, longest)
    return f"{score:.2f}" + (f" ({note})" if note else "")


def add_sweep_section(doc: Document, results: Path, best_yaml: Path, figures: Path, root: Path,
                      enabled: bool = True, colours: Optional[dict] = None) -> None:
    """Sweep results of ``tune/``: the K x H grid (CFNet Table 3), each swept MCIBI / ACF key, every
    trial, the best trials. Every score is shown with the epochs its trial ran (ASHA stops weak trials
    early); ``colours`` is the report's model -> colour mapping."""
    from ctxseg.visualize import heatmap_figure, save_png, sweep_scatter_figure

    doc.heading("Sweep results (tune)")
    if not enabled:
        doc.paragraph("Sweep results are switched off (`report.sweeps: false`).")
        return
    if not results.is_file():
        doc.paragraph(f"No sweep results: `{results.relative_to(root)}` does not exist "
                      "(run `dvc repro tune` to sweep K x H for ACF and m0 / α / β for MCIBI).")
        return
    every_row = read_sweep(results)
    rows = grid_rows(every_row)  # the sweeps' own trials; seed repeats are reported on their own below
    if not rows:
        doc.paragraph(f"No sweep results: `{results.relative_to(root)}` holds no trials.")
        return
    scale = percent_scale([s for s in (sweep_score(r) for r in rows) if s is not None])
    statuses: dict[str, int] = {}
    for r in rows:
        statuses[r.get("status") or "?"] = statuses.get(r.get("status") or "?", 0) + 1
    keys = swept_keys(rows)
    longest = {m: max((r["epochs"] for r in rows if r["model"] == m and finite(r.get("epochs"))), default=None)
               for m in {r["model"] for r in rows}}
    ran = {m: sorted({int(r["epochs"]) for r in rows if r["model"] == m and finite(r.get("epochs"))
                      and sweep_score(r) is not None}) for m in sorted(longest)}
    doc.paragraph(f"{len(rows)} trials ({', '.join(f'{n} {s}' for s, n in sorted(statuses.items()))}) over "
                  f"{', '.join(f'`{k}`' for k in keys) or 'no swept key'}; a trial's score is its best validation "
                  "mIoU (early-stopped trials keep the best they reached). ASHA stops weak trials early, so the "
                  "trials did not all run the same number of epochs ("
                  + "; ".join(f"`{m}`: {', '.join(map(str, e))} epochs" for m, e in ran.items() if e) + "). "
                  "Every score below carries the epochs its trial ran; a score reached in fewer epochs than the "
                  "longest trials (\"stopped early\") is not a like-for-like comparison with them.")
    grids = kh_grid(rows)
    epochs = kh_epochs(rows, grids)
    for model, (ks, hs, grid) in grids.items():
        doc.table(["K (acf.mixtures) \\ H (acf.heads)"] + [str(h) for h in hs],
                  [[str(k)] + [score_cell(scale * v, e, longest.get(model)) for v, e in zip(grid[i], epochs[model][i])]
                   for i, k in enumerate(ks)],
                  caption=f"{model}: best mIoU (%) over K mixtures × H heads (layout of CFNet Table 3), with the "
                          f"epochs the cell's trial ran (the longest trials ran "
                          f"{fmt_num(longest.get(model), 0)} epochs)")
        notes = [[_epochs_note(e, longest.get(model)).replace(", stopped early", "*") for e in row]
                 for row in epochs[model]]
        doc.image(save_png(heatmap_figure(scale * grid, ks, hs, "H (acf.heads)", "K (acf.mixtures)",
                                          f"{model}: mIoU (%) over K × H", notes=notes,
                                          title_colour=(colours or {}).get(model, "black")),
                           figures / f"sweep_kh_{safe_name(model)}.png"),
                  f"{model}: best validation mIoU (%) per K × H, with the epochs its trial ran "
                  "(* = stopped early by ASHA)")
    series = {}
    for key in [k for k in keys if k not in ("acf.mixtures", "acf.heads")]:
        best = per_key_best(rows, key)
        if not best:
            continue
        doc.table([key, "best mIoU (%) (epochs its trial ran)", "trials"],
                  [[value_text(v), score_cell(scale * s, e, longest.get(m)), str(n)]
                   for v, s, n, e, m in _per_key_best_epochs(rows, key, best)],
                  caption=f"mIoU against {key}" + (f" ({SYMBOL[key]})" if key in SYMBOL else ""))
        scored = [r for r in rows if finite(r.get(key)) and sweep_score(r) is not None]
        if scored:
            series[f"{key} ({SYMBOL[key]})" if key in SYMBOL else key] = (
                [r[key] for r in scored], [scale * sweep_score(r) for r in scored],
                [bool(finite(r.get("epochs")) and finite(longest.get(r["model"])) and r["epochs"] < longest[r["model"]])
                 for r in scored], [r["model"] for r in scored],
                [float(r["epochs"]) if finite(r.get("epochs")) else None for r in scored])
    if series:
        doc.image(save_png(sweep_scatter_figure(series, colours=colours), figures / "sweep_params.png"),
                  "Every trial's validation mIoU (%) against each swept MCIBI / ACF setting, in its model's colour "
                  "(filled: ran every epoch; hollow: stopped early by ASHA)")
    _every_trial_tables(doc, rows, keys, longest, scale)
    lines = []
    for model in sorted({r["model"] for r in rows}):
        best_row = max((r for r in rows if r["model"] == model and sweep_score(r) is not None), key=sweep_score,
                       default=None)
        if best_row is not None:
            setting = ", ".join(f"{k}={value_text(best_row[k])}" for k in keys if best_row.get(k) is not None)
            note = _epochs_note(best_row.get("epochs"), longest.get(model))
            lines.append(f"`{model}`: trial `{best_row.get('trial_id', '?')}` ({setting}), mIoU "
                         f"{fmt_num(scale * sweep_score(best_row))}%" + (f" after {note}" if note else ""))
    if lines:
        doc.paragraph("Best trial per swept model (short trials: compare trials with each other, not with the main "
                      "table's fully trained models):")
        doc.bullets(lines)
    _add_noise_section(doc, every_row, scale)
    if best_yaml.is_file():
        text = best_yaml.read_text(encoding="utf-8").strip()
        comments = [line[1:].strip() for line in text.splitlines() if line.startswith("#")]
        if comments:  # the tune stage's summary header (the full configs follow it in the file)
            doc.paragraph(f"`{best_yaml.relative_to(root)}` (summary; the file holds the full model configs):")
            doc.code("\n".join(comments))
        else:
            doc.paragraph(f"`{best_yaml.relative_to(root)}`:")
            doc.code(text if len(text.splitlines()) <= 40 else "\n".join(text.splitlines()[:40]) + "\n...")


def _every_trial_tables(doc: Document, rows: list[dict], keys: list[str], longest: dict, scale: float) -> None:
    """One table per sweep, one row per trial (best score first): its swept values, score, epochs, status."""
    for name in dict.fromkeys(r.get("sweep") or "" for r in rows):
        trials = sorted((r for r in rows if (r.get("sweep") or "") == name),
                        key=lambda r: -(sweep_score(r) if sweep_score(r) is not None else -1))
        swept = [k for k in keys if any(r.get(k) is not None for r in trials)]
        doc.table(["trial", "model"] + swept + ["best mIoU (%)", "epochs run", "status"],
                  [[str(r.get("trial_id", "?")), str(r.get("model", "?"))]
                   + [value_text(r[k]) if r.get(k) is not None else "–" for k in swept]
                   + [fmt_num(scale * sweep_score(r), 2) if sweep_score(r) is not None else "–",
                      _epochs_note(r.get("epochs"), longest.get(r.get("model")), r.get("status")) or "–",
                      str(r.get("status") or "?")]
                   for r in trials],
                  caption=f"{name or 'sweep'}: every trial, best first, with the epochs it ran")


def _add_noise_section(doc: Document, rows: list[dict], scale: float) -> None:
    """How far to trust each sweep: its grid's spread beside the seed-to-seed spread of its repeats."""
    doc.paragraph("How far to trust the sweeps: each sweep's best and worst configuration among the trials that ran "
                  "every epoch were trained again with another seed for as many epochs (`tune.seed_repeats`). "
                  "Only trials of equal length are compared, and two configurations are told apart only when "
                  "they differ by more than the 95% band of seed noise those repeats give.")
    for name in dict.fromkeys(r.get("sweep") for r in rows):
        sweep_rows = [r for r in rows if r.get("sweep") == name]
        noise = noise_level(sweep_rows)
        if noise is not None:
            ran = {r.get("trial_id"): r.get("epochs") for r in sweep_rows}
            doc.table(["configuration (trial)", "mIoU (%) at the sweep's seed", "mIoU (%) at seed + 1", "change",
                       "epochs (each run)"],
                      [[str(trial), fmt_num(scale * a, 2), fmt_num(scale * b, 2), f"{scale * (b - a):+.2f}",
                        fmt_num(ran.get(trial), 0)] for trial, a, b in noise["pairs"]],
                      caption=f"{name}: seed repeats (the repeat runs as many epochs as the original trial)")
        doc.paragraph(f"`{name}`: {noise_verdict(noise)}")


def _per_key_best_epochs(rows: list[dict], key: str, best: list[tuple]) -> list[tuple]:
    """``best`` rows of :func:`per_key_best` with the epochs and model of the trial behind each."""
    out = []
    for value, score, n in best:
        trial = next((r for r in rows if r.get(key) == value and sweep_score(r) == score), {})
        out.append((value, score, n, trial.get("epochs"), trial.get("model")))
    return out


def complexity_rows(latency_in_channels: int, latency_size: int, latency_channels: int, latency_repeats: int,
                    num_classes: int) -> list[dict]:
    """Params / FLOPs in the paper's setting (:mod:`ctxseg.models.complexity`) + our measured CPU latency."""
    import torch

    from ctxseg.inference import measure_latencies
    from ctxseg.models import complexity

    rows = complexity.complexity_table(device="meta")
    cases = {}
    for i, row in enumerate(rows):
        torch.manual_seed(i)
        head = complexity.build_head(row["framework"], row["context"], latency_in_channels, latency_channels,
                                     num_classes)
        x = torch.randn(1, latency_in_channels, latency_size, latency_size)
        soft = torch.randn(1, num_classes, latency_size, latency_size) if head.needs_soft_regions else None
        cases[row["module"]] = (head, (x, soft))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: steadier on a shared machine, and comparable between machines
    try:
        timings = measure_latencies(cases, warmup=1, repeats=latency_repeats)
    finally:
        torch.set_num_threads(threads)
    setting = (f"1×{latency_in_channels}×{latency_size}×{latency_size}, {latency_channels} channels, "
               f"CPU, 1 thread, best of {latency_repeats} round-robin runs")
    for row in rows:
        row["latency_ms"] = timings[row["module"]]["min_ms"]
        row["latency_setting"] = setting
    return rows


def trained_cost_rows(records: list[dict], image_size: Optional[Sequence[int]], latency_repeats: int = 3) -> list[dict]:
    """Cost of each trained model as it was configured (its backbone, channels, context head) and scored:
    params, GFLOPs of one forward pass on an image of ``image_size`` (counted on the meta device),
    CPU latency of that forward pass (one thread, best of ``latency_repeats`` round-robin runs, the
    models built from their configs: the weights do not change the cost), and the seconds per image
    the evaluate stage measured (every test scale included). None where a value cannot be had."""
    out = []
    for r in records:
        m, cfg = r["metrics"], r.get("config")
        out.append({"name": r["name"], "framework": r["framework"], "context": r["context"],
                    "backbone": getattr(getattr(cfg, "backbone", None), "name", None),
                    "channels": getattr(cfg, "channels", None),
                    "params_M": m["num_params"] / 1e6 if finite(m.get("num_params")) else None,
                    "flops_G": _model_gflops(r, image_size) if image_size else None,
                    "latency_ms": None,
                    "seconds_per_image": m.get("seconds_per_image"),
                    "device": (m.get("inference") or {}).get("device")})
    if image_size and latency_repeats > 0:
        for row, ms in zip(out, _model_latencies(records, image_size, latency_repeats)):
            row["latency_ms"] = ms
    return out


def _build_trained(record: dict, device: str):
    """The record's segmentor from its config (no pretrained weights), ready to measure, or None."""
    from ctxseg.models import build_segmentor

    cfg, num_classes = record.get("config"), len(record["metrics"].get("per_class_iou") or {}) or 2
    if cfg is None:
        return None
    import torch

    config = cfg.model_copy(update={"backbone": cfg.backbone.model_copy(update={"pretrained": None})})
    with torch.device(device):
        model = build_segmentor(config, num_classes).eval()
    head = getattr(model, "decode_head", None)
    if device != "meta" and hasattr(head, "prepare_measurement"):
        head.prepare_measurement()  # e.g. MCIBI's memory rows, as after training
    return model


def _model_gflops(record: dict, image_size: Sequence[int]) -> Optional[float]:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ctxseg.models import complexity  # noqa: F401  (registers the FLOP rules of fused attention)

    try:
        model = _build_trained(record, "meta")
        if model is None:
            return None
        with torch.device("meta"):
            x = torch.randn(1, 3, int(image_size[0]), int(image_size[1]))
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(x)
        return counter.get_total_flops() / 1e9
    except Exception:  # a model the meta device cannot run: the table says n/a
        return None


def _model_latencies(records: list[dict], image_size: Sequence[int], repeats: int) -> list[Optional[float]]:
    """CPU latency (ms, best of ``repeats``) of one forward pass per trained model, timed round-robin on
    one thread (steadier on a shared machine, comparable between machines); None where it fails."""
    import torch

    from ctxseg.inference import measure_latencies

    cases = {}
    for i, r in enumerate(records):
        try:
            torch.manual_seed(i)
            model = _build_trained(r, "cpu")
        except Exception:  # the config no longer builds: the table says n/a
            model = None
        if model is not None:
            cases[r["name"]] = (model, (torch.randn(1, 3, int(image_size[0]), int(image_size[1])),))
    if not cases:
        return [None] * len(records)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        timings = measure_latencies(cases, warmup=1, repeats=repeats)
    except Exception:
        return [None] * len(records)
    finally:
        torch.set_num_threads(threads)
    return [timings[r["name"]]["min_ms"] if r["name"] in timings else None for r in records]


def add_trained_cost_table(doc: Document, rows: list[dict], image_size: Optional[Sequence[int]]) -> None:
    """The cost of the models actually trained here (as configured), with the change against each
    framework's baseline: params, GFLOPs and CPU latency of one image, and the evaluate stage's time."""
    base = {r["framework"]: r for r in rows if r["context"] == "none"}
    body = []
    for r in rows:
        b = base.get(r["framework"])
        diff = (lambda key, digits=2: "" if b is None or b is r or not (finite(r[key]) and finite(b[key]))
                else f"{r[key] - b[key]:+.{digits}f}")
        body.append([r["name"], r["backbone"] or "–", str(r["channels"] or "–"), fmt_num(r["params_M"]),
                     diff("params_M"), fmt_num(r["flops_G"], 3), diff("flops_G", 3), fmt_num(r["latency_ms"], 1),
                     diff("latency_ms", 1),
                     fmt_num(1000 * r["seconds_per_image"], 1) if finite(r["seconds_per_image"]) else "n/a",
                     r["device"] or "–"])
    size = f"{image_size[0]}×{image_size[1]}" if image_size else "n/a"
    doc.table(["model", "backbone", "channels", "params (M)", "Δ params", f"GFLOPs ({size})", "Δ GFLOPs",
               f"CPU latency (ms, {size})", "Δ latency", "ms / image (evaluate)", "device"], body,
              caption=f"Cost of the models trained here, as configured (whole model: backbone, channels and "
                      f"context head of params.yaml), on one {size} image; CPU latency: 1 thread, best of the "
                      "round-robin runs; ms / image: the evaluate stage's inference time per image, every test "
                      "scale and the flip included")
