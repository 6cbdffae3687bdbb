"""DVC stage ``report``: the study's results as the papers present them.

Writes ``reports/report.md`` and a self-contained ``reports/report.html`` (images inlined), plus the
PNG figures in ``reports/figures/``; the whole ``reports/`` folder is replaced atomically.

Sections: headline (did context help, at what cost), main results (MCIBI Table 5 layout) with the
IoU of the classes only context can tell apart (from the dataset's meta.json), ablations (MCIBI
Tables 1 and 2, when such runs exist), sweep results from ``tune/`` (CFNet Table 3's K x H grid;
m0 / alpha / beta), complexity (MCIBI Table 3 and the trained models' own cost), training curves,
per-class IoU and its change against the baseline, confusion matrix, a qualitative grid (MCIBI
Fig 4), the feature space (MCIBI Fig 3), MLflow runs and the Model Registry entry that the
``register`` stage wrote to ``registry/best.json``.

The document is built by :func:`ctxseg.study.build_report`; this stage adds what only MLflow knows
(per-iteration loss histories, optional: the report is written without a reachable store).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

from ctxseg.config import Params
from ctxseg.io import atomic_path
from ctxseg.report import Document
from ctxseg.study import LOSS_KEY, StudyLayout, build_report, collect_results
from pipeline import common
from pipeline.mlflow_tracking import mlflow_store
from pipeline.mlflow_tracking.model_store import reachable_client

log = logging.getLogger("ctxseg.report")


def loss_histories(params: Params, paths: common.Paths, records: list[dict]) -> dict[str, dict]:
    """model -> {"loss_o": (steps, values), "loss_aux": ..., ...}: every loss term (``loss_*``) each
    model's first seed logged in its MLflow run, per iteration; {} without MLflow (the report then uses
    run.json)."""
    if not params.report.training_curves_from_mlflow or not any(r["run"].get("run_id") for r in records):
        return {}
    client = reachable_client(params, paths)
    if client is None:
        return {}
    out: dict[str, dict] = {}
    for r in records:
        run_id = r["run"].get("run_id")
        if not run_id:
            continue
        try:
            keys = sorted(k for k in client.get_run(run_id).data.metrics if k.startswith("loss_")) or [LOSS_KEY]
            for key in keys:
                points = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
                if points:
                    out.setdefault(r["name"], {})[key] = ([m.step for m in points], [m.value for m in points])
        except Exception as err:  # a deleted run or an unreachable server: fall back to run.json
            log.warning("[%s] no loss history from MLflow (%s); using run.json", r["name"], err)
            out.pop(r["name"], None)
    return out


def read_registry(layout: StudyLayout) -> Optional[dict]:
    path = layout.registry_file
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def make_report(params: Params, paths: common.Paths, out_dir: Optional[Path] = None) -> Document:
    """The report document; figures go to ``<out_dir>/figures`` (default ``reports/figures``)."""
    layout = StudyLayout.from_paths(paths)
    histories = loss_histories(params, paths, collect_results(params, layout))
    return build_report(params, layout, (out_dir or paths.reports) / "figures", histories=histories,
                        registry=read_registry(layout), tracking_uri=mlflow_store.tracking_uri(params, paths.root))


def write_report(params: Params, paths: common.Paths) -> Path:
    """Build and write ``reports/`` as a whole (atomically: a failure leaves the previous report)."""
    with atomic_path(paths.reports) as tmp:
        tmp.mkdir(parents=True)
        doc = make_report(params, paths, out_dir=tmp)
        (tmp / "report.md").write_text(doc.markdown(tmp), encoding="utf-8")
        (tmp / "report.html").write_text(doc.html(), encoding="utf-8")
    return paths.reports / "report.md"


@common.stage
def main(argv: Optional[list[str]] = None) -> None:
    args = common.base_parser(__doc__.splitlines()[0]).parse_args(argv)
    params = common.load_stage_params(args.params)
    out = write_report(params, common.Paths(params))
    log.info("report written to %s and %s", out, out.with_suffix(".html"))


if __name__ == "__main__":
    raise SystemExit(main())
