"""DVC stage ``report``: the study's results as the papers present them.

Writes ``reports/report.md`` and a self-contained ``reports/report.html`` (images inlined), plus the
PNG figures in ``reports/figures/``.
"""
from __future__ import annotations

import base64
import html
import logging
import math
from pathlib import Path
from typing import Optional

from ctxseg.config import Params
from ctxseg.io import atomic_path, write_text
from pipeline import common

log = logging.getLogger("ctxseg.report")


class Document:
    """A tiny document model rendered to both Markdown and self-contained HTML."""

    def __init__(self, title: str):
        self.title = title
        self.blocks: list[tuple] = []

    def heading(self, text: str, level: int = 2) -> None:
        self.blocks.append(("heading", level, text))

    def paragraph(self, text: str) -> None:
        self.blocks.append(("paragraph", text))

    def code(self, text: str) -> None:
        self.blocks.append(("code", text))

    def table(self, headers: list[str], rows: list[list[str]]) -> None:
        self.blocks.append(("table", headers, rows))

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
            elif kind == "code":
                out += ["```", block[1], "```", ""]
            elif kind == "table":
                headers, rows = block[1], block[2]
                out.append("| " + " | ".join(headers) + " |")
                out.append("|" + "|".join("---" for _ in headers) + "|")
                out += ["| " + " | ".join(row) + " |" for row in rows]
                out.append("")
            elif kind == "image":
                out += [f"![{block[2]}]({block[1].relative_to(base).as_posix()})", "", f"*{block[2]}*", ""]
        return "\n".join(out)

    def html(self) -> str:
        parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>",
                 "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
                 "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
                 "text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}"
                 "img{max-width:100%}pre{background:#f6f6f6;padding:.6em}</style></head><body>",
                 f"<h1>{html.escape(self.title)}</h1>"]
        for block in self.blocks:
            kind = block[0]
            if kind == "heading":
                parts.append(f"<h{block[1]}>{html.escape(block[2])}</h{block[1]}>")
            elif kind == "paragraph":
                parts.append(f"<p>{html.escape(block[1])}</p>")
            elif kind == "code":
                parts.append(f"<pre>{html.escape(block[1])}</pre>")
            elif kind == "table":
                head = "".join(f"<th>{html.escape(h)}</th>" for h in block[1])
                body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in block[2])
                parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            elif kind == "image":
                data = base64.b64encode(block[1].read_bytes()).decode()
                parts.append(f"<figure><img src='data:image/png;base64,{data}' alt='{html.escape(block[2])}'>"
                             f"<figcaption>{html.escape(block[2])}</figcaption></figure>")
        parts.append("</body></html>")
        return "\n".join(parts)


def pct(value: Optional[float]) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}"


def delta(value: Optional[float], base: Optional[float]) -> str:
    if value is None or base is None or math.isnan(value) or math.isnan(base):
        return "–"
    return f"{100 * (value - base):+.2f}"


def collect_results(params: Params, paths: common.Paths) -> list[dict]:
    """One record per model of params: its config, metrics/<model>.json and run.json."""
    records = []
    for name, cfg in params.models.items():
        metrics = common.read_json(paths.metrics_file(name), f"metrics of model {name!r}",
                                   "Run `dvc repro evaluate` first.")
        run_file = paths.model_dir(name) / "run.json"
        run = common.read_json(run_file, "", "") if run_file.is_file() else {}
        records.append({"name": name, "framework": cfg.framework, "context": cfg.context,
                        "metrics": metrics, "run": run})
    return records


def main_results_table(records: list[dict]) -> tuple[list[str], list[list[str]]]:
    """MCIBI Table 5 layout: framework × context, mIoU with the delta against the framework's baseline."""
    baselines = {r["framework"]: r for r in records if r["context"] == "none"}
    headers = ["model", "framework", "context", "mIoU (%)", "Δ vs baseline", "pixAcc (%)", "mAcc (%)",
               "mIoU ms+flip (%)", "Δ ms+flip"]
    rows = []
    order = {"none": 0, "mcibi": 1, "acf": 2}
    for r in sorted(records, key=lambda r: (r["framework"], order.get(r["context"], 9), r["name"])):
        m = r["metrics"]
        base = baselines.get(r["framework"])
        bm = base["metrics"] if base else None
        ms = m.get("ms_flip", {}).get("mIoU")
        bms = bm.get("ms_flip", {}).get("mIoU") if bm else None
        rows.append([r["name"], r["framework"], r["context"], pct(m["mIoU"]),
                     delta(m["mIoU"], bm["mIoU"] if bm else None) if r["context"] != "none" else "",
                     pct(m["pixAcc"]), pct(m["mAcc"]), pct(ms),
                     delta(ms, bms) if r["context"] != "none" else ""])
    return headers, rows


def per_class_figure(records: list[dict], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    classes = list(records[0]["metrics"]["per_class_iou"])
    width = 0.8 / max(len(records), 1)
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(classes) * max(1, len(records) / 2)), 3.5))
    x = np.arange(len(classes))
    for i, r in enumerate(records):
        values = [r["metrics"]["per_class_iou"].get(c) for c in classes]
        values = [np.nan if v is None else 100 * v for v in values]
        ax.bar(x + i * width, values, width, label=r["name"])
    ax.set_xticks(x + 0.4 - width / 2, classes, rotation=45, ha="right")
    ax.set_ylabel("IoU (%)")
    ax.set_title("Per-class IoU (single scale)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return out


def build_report(params: Params, paths: common.Paths) -> Document:
    records = collect_results(params, paths)
    meta = common.dataset_meta(paths)
    doc = Document(params.report.title)
    splits = meta.get("splits", {})
    doc.paragraph(
        f"Dataset: {params.data.name} ({meta['num_classes']} classes; "
        + ", ".join(f"{n} {s} images" for s, n in splits.items())
        + "). All numbers below were measured by this pipeline on this dataset; none is copied from a paper."
    )
    doc.heading("Main results")
    headers, rows = main_results_table(records)
    doc.table(headers, rows)
    figures = paths.reports / "figures"
    doc.image(per_class_figure(records, figures / "per_class_iou.png"), "Per-class IoU, every model")
    doc.heading("MLflow runs")
    doc.table(["model", "MLflow run id", "epochs"],
              [[r["name"], r["run"].get("run_id", "–"), str(r["run"].get("epochs", "–"))] for r in records])
    doc.paragraph("Open the comparison UI on these runs with:")
    doc.code(f"mlflow ui --backend-store-uri {common.mlflow_tracking_uri(params, paths.root)}")
    return doc


@common.stage
def main(argv: Optional[list[str]] = None) -> None:
    args = common.base_parser(__doc__.splitlines()[0]).parse_args(argv)
    params = common.load_stage_params(args.params)
    paths = common.Paths(params)
    doc = build_report(params, paths)
    write_text(paths.reports / "report.md", doc.markdown(paths.reports))
    write_text(paths.reports / "report.html", doc.html())
    log.info("report written to %s", paths.reports / "report.md")


if __name__ == "__main__":
    raise SystemExit(main())
