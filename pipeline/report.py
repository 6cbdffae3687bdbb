"""DVC stage ``report``: the study's results as the papers present them.

Writes ``reports/report.md`` and a self-contained ``reports/report.html`` (images inlined), plus the
PNG figures in ``reports/figures/``; the whole ``reports/`` folder is replaced atomically.

Sections: headline (did context help, at what cost), main results (MCIBI Table 5 layout) with the
IoU of the classes only context can tell apart (synthetic benchmark), ablations (MCIBI Tables 1 and 2,
when such runs exist), sweep results from ``tune/`` (CFNet Table 3's K x H grid; m0 / alpha / beta),
complexity (MCIBI Table 3: params / FLOPs / measured CPU latency, the paper's figures beside ours),
training curves, per-class IoU and its change against the baseline, confusion matrix, a qualitative
grid (MCIBI Fig 4), the feature space (MCIBI Fig 3), MLflow runs and the Model Registry entry of the
best model (registered here: the report is the one stage that sees every model's metrics).

Inputs: ``metrics/``, ``plots/`` (evaluate), ``models/<model>/run.json`` (train), ``tune/`` (optional),
``data/prepared/<dataset>/`` and the MLflow store (optional: the report is written without it).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ctxseg.config import Params, flatten
from ctxseg.io import atomic_path
from ctxseg.report import (
    CONTEXTS,
    CONTEXT_LABEL,
    Document,
    SYMBOL,
    _as_pct,
    _finite,
    _miou,
    _num,
    _safe,
    _sweep_score,
    _value,
    add_complexity_section,
    class_deltas,
    context_class_table,
    context_classes,
    frameworks,
    fusion_table,
    headline,
    kh_grid,
    main_records,
    main_results_table,
    memory_table,
    paper_table5,
    pct,
    per_key_best,
    read_sweep,
    swept_keys,
)
from pipeline import common

log = logging.getLogger("ctxseg.report")


# ---------------------------------------------------------------------------------------------
# the document


# ---------------------------------------------------------------------------------------------
# formatting


# ---------------------------------------------------------------------------------------------
# results of the trained models


def collect_results(params: Params, paths: common.Paths) -> list[dict]:
    """One record per model of params: its resolved config, metrics/<model>.json and run.json."""
    records = []
    defaults = flatten(params.model.model_dump(mode="json"))
    for name, cfg in params.models.items():
        metrics = common.read_json(paths.metrics_file(name), f"metrics of model {name!r}",
                                   f"Run `dvc repro evaluate@{name}` first.")
        run_file = paths.model_dir(name) / "run.json"
        run = common.read_json(run_file, "", "") if run_file.is_file() else {}
        flat = flatten(cfg.model_dump(mode="json"))
        variant = {k: v for k, v in flat.items() if k not in ("framework", "context") and v != defaults.get(k)
                   and (cfg.context == "mcibi" or not k.startswith("mcibi."))
                   and (cfg.context == "acf" or not k.startswith("acf."))}
        records.append({"name": name, "framework": cfg.framework, "context": cfg.context, "config": cfg,
                        "flat": flat, "variant": variant, "metrics": metrics, "run": run,
                        "run_id": metrics.get("run_id") or run.get("run_id")})
    return records


# ---------------------------------------------------------------------------------------------
# ablations (MCIBI Tables 1 and 2)


# ---------------------------------------------------------------------------------------------
# tune results (CFNet Table 3 grid, m0 / alpha / beta)


def add_sweep_section(doc: Document, params: Params, paths: common.Paths, figures: Path) -> None:
    from ctxseg.visualize import heatmap_figure, save_png, sweep_scatter_figure

    doc.heading("Sweep results (tune)")
    results = paths.tune / "results.csv"
    if not params.report.sweeps:
        doc.paragraph("Sweep results are switched off (`report.sweeps: false`).")
        return
    if not results.is_file():
        doc.paragraph(f"No sweep results: `{results.relative_to(paths.root)}` does not exist "
                      "(run `dvc repro tune` to sweep K x H for ACF and m0 / α / β for MCIBI).")
        return
    rows = read_sweep(results)
    if not rows:
        doc.paragraph(f"No sweep results: `{results.relative_to(paths.root)}` holds no trials.")
        return
    scores = [s for s in (_sweep_score(r) for r in rows) if s is not None]
    scale = _as_pct(scores)
    statuses: dict[str, int] = {}
    for r in rows:
        statuses[r.get("status") or "?"] = statuses.get(r.get("status") or "?", 0) + 1
    keys = swept_keys(rows)
    doc.paragraph(f"{len(rows)} trials ({', '.join(f'{n} {s}' for s, n in sorted(statuses.items()))}) over "
                  f"{', '.join(f'`{k}`' for k in keys) or 'no swept key'}; a trial's score is its best validation "
                  "mIoU (early-stopped trials keep the best they reached).")
    grids = kh_grid(rows)
    for model, (ks, hs, grid) in grids.items():
        doc.table(["K (acf.mixtures) \\ H (acf.heads)"] + [str(h) for h in hs],
                  [[str(k)] + [_num(scale * v, 2) if np.isfinite(v) else "–" for v in grid[i]] for i, k in enumerate(ks)],
                  caption=f"{model}: best mIoU (%) over K mixtures × H heads (layout of CFNet Table 3)")
        doc.image(save_png(heatmap_figure(scale * grid, ks, hs, "H (acf.heads)", "K (acf.mixtures)",
                                          f"{model}: mIoU (%) over K × H"),
                           figures / f"sweep_kh_{_safe(model)}.png"),
                  f"{model}: best validation mIoU (%) per K × H")
    other = [k for k in keys if k not in ("acf.mixtures", "acf.heads")]
    series = {}
    for key in other:
        best = per_key_best(rows, key)
        if not best:
            continue
        doc.table([key, "best mIoU (%)", "trials"], [[_value(v), _num(scale * s, 2), str(n)] for v, s, n in best],
                  caption=f"mIoU against {key}" + (f" ({SYMBOL[key]})" if key in SYMBOL else ""))
        xs = [r[key] for r in rows if _finite(r.get(key)) and _sweep_score(r) is not None]
        ys = [scale * _sweep_score(r) for r in rows if _finite(r.get(key)) and _sweep_score(r) is not None]
        if xs:
            series[f"{key} ({SYMBOL[key]})" if key in SYMBOL else key] = (xs, ys)
    if series:
        doc.image(save_png(sweep_scatter_figure(series), figures / "sweep_params.png"),
                  "Every trial's validation mIoU (%) against each swept MCIBI / ACF setting")
    lines = []
    for model in sorted({r["model"] for r in rows}):
        best_row = max((r for r in rows if r["model"] == model and _sweep_score(r) is not None), key=_sweep_score,
                       default=None)
        if best_row is not None:
            setting = ", ".join(f"{k}={_value(best_row[k])}" for k in keys if best_row.get(k) is not None)
            lines.append(f"`{model}`: trial `{best_row.get('trial_id', '?')}` ({setting}), mIoU "
                         f"{_num(scale * _sweep_score(best_row))}%")
    if lines:
        doc.paragraph("Best trial per swept model (short trials: compare trials with each other, not with the main "
                      "table's fully trained models):")
        doc.bullets(lines)
    best_yaml = paths.tune / "best.yaml"
    if best_yaml.is_file():
        text = best_yaml.read_text(encoding="utf-8").strip()
        comments = [line[1:].strip() for line in text.splitlines() if line.startswith("#")]
        if comments:  # the tune stage's summary header (the full configs follow it in the file)
            doc.paragraph(f"`{best_yaml.relative_to(paths.root)}` (summary; the file holds the full model configs):")
            doc.code("\n".join(comments))
        else:
            doc.paragraph(f"`{best_yaml.relative_to(paths.root)}`:")
            doc.code(text if len(text.splitlines()) <= 40 else "\n".join(text.splitlines()[:40]) + "\n...")


# ---------------------------------------------------------------------------------------------
# complexity (MCIBI Table 3)


def complexity_rows(params: Params, num_classes: int) -> list[dict]:
    """Params / FLOPs in the paper's setting (from ctxseg.models.complexity) + our measured CPU latency."""
    import torch

    from ctxseg.inference import measure_latencies
    from ctxseg.models import complexity

    rows = complexity.complexity_table(device="meta")
    rc = params.report
    cases = {}
    for i, row in enumerate(rows):
        torch.manual_seed(i)
        head = _latency_head(complexity, row["framework"], row["context"], rc.latency_in_channels,
                             rc.latency_channels, num_classes)
        x = torch.randn(1, rc.latency_in_channels, rc.latency_size, rc.latency_size)
        soft = torch.randn(1, num_classes, rc.latency_size, rc.latency_size) if row["framework"] == "ocrnet" else None
        cases[row["module"]] = (head, (x, soft))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: steadier on a shared machine, and comparable between machines
    try:
        timings = measure_latencies(cases, warmup=1, repeats=rc.latency_repeats)
    finally:
        torch.set_num_threads(threads)
    setting = (f"1×{rc.latency_in_channels}×{rc.latency_size}×{rc.latency_size}, {rc.latency_channels} channels, "
               f"CPU, 1 thread, best of {rc.latency_repeats} round-robin runs")
    for row in rows:
        row["latency_ms"] = timings[row["module"]]["min_ms"]
        row["latency_setting"] = setting
    return rows


def _latency_head(complexity, framework: str, context: str, in_channels: int, channels: int, num_classes: int):
    """The same decode-head feature path ``complexity.measure`` counts, built on the CPU."""
    import torch

    builder = getattr(complexity, "build_head", None) or getattr(complexity, "_head", None)
    if builder is not None:
        head = builder(framework, context, in_channels, channels, num_classes)
    else:  # pragma: no cover - the complexity module changed its helpers
        from ctxseg.models import ModelConfig
        from ctxseg.models.segmentor import DecodeHead

        head = DecodeHead(ModelConfig(framework=framework, context=context, channels=channels), in_channels,
                          num_classes)
        head.classifier = torch.nn.Identity()
    if context == "mcibi":
        with torch.no_grad():
            head.memory.memory.normal_()
    return head.eval()


# ---------------------------------------------------------------------------------------------
# figures from the evaluation outputs


def training_curves(records: list[dict], params: Params, paths: common.Paths) -> dict:
    """model -> {"loss": (x, y), "val_mIoU": (epochs, values)} from MLflow (per iteration) or run.json."""
    curves: dict[str, dict] = {}
    client = None
    if params.report.training_curves_from_mlflow and any(r["run_id"] for r in records):
        client = _mlflow_client(params, paths)
    for r in records:
        history = r["run"].get("history") or []
        series: dict[str, tuple] = {}
        if client is not None and r["run_id"]:
            try:
                points = sorted(client.get_metric_history(r["run_id"], "loss"), key=lambda m: m.step)
                if points:
                    series["loss"] = ([m.step for m in points], [m.value for m in points])
            except Exception as err:  # a deleted run or an unreachable server: fall back to run.json
                log.warning("[%s] no loss history from MLflow (%s); using run.json", r["name"], err)
        if "loss" not in series and history and any("train_loss" in h for h in history):
            hs = [h for h in history if "train_loss" in h]
            series["loss"] = ([h.get("iteration", h.get("epoch")) for h in hs], [h["train_loss"] for h in hs])
        vals = [h for h in history if _finite(h.get("val_mIoU"))]
        if vals:
            series["val_mIoU"] = ([h.get("epoch", i + 1) for i, h in enumerate(vals)],
                                  [100 * h["val_mIoU"] for h in vals])
        if series:
            curves[r["name"]] = series
    return curves


_CLIENTS: dict[str, Any] = {}


def _mlflow_client(params: Params, paths: common.Paths):
    """An MLflow client for the study's tracking store, or None when it cannot be reached.

    The store is probed once per process; against a remote server retries are limited so that an
    unreachable server costs seconds, not minutes (the report is still written, without MLflow data).
    """
    import os

    uri = common.mlflow_tracking_uri(params, paths.root)
    if uri in _CLIENTS:
        return _CLIENTS[uri]
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    if uri.startswith(("http://", "https://")):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    import mlflow

    client = mlflow.MlflowClient(uri)
    try:
        client.search_experiments(max_results=1)
    except Exception as err:
        log.warning("MLflow tracking store %s cannot be reached (%s); the report goes on without it", uri, err)
        client = None
    _CLIENTS[uri] = client
    return client


def qualitative_inputs(records: list[dict], params: Params, paths: common.Paths, meta: dict):
    """Images, ground truths and the fixed-sample predictions of baseline / +MCIBI / +ACF of one framework."""
    from ctxseg.data.dataset import read_image, read_label

    mains = main_records(records)
    fws = frameworks(records)
    fw = next((f for f in fws if (f, "none") in mains), fws[0])
    columns = [mains[(fw, c)] for c in CONTEXTS if (fw, c) in mains]
    split = params.evaluate.split
    id_sets = []
    for r in columns:
        pred_dir = paths.plots / r["name"] / "predictions"
        id_sets.append({p.stem for p in pred_dir.glob("*.png")} if pred_dir.is_dir() else set())
    ids = sorted(set.intersection(*id_sets)) if id_sets else []
    ids = ids[: params.report.qualitative_images]
    images, gts, preds = [], [], {f"{r['name']} ({CONTEXT_LABEL[r['context']]})": [] for r in columns}
    for i in ids:
        image_path = paths.prepared / "images" / split / f"{i}.png"
        label_path = paths.prepared / "labels" / split / f"{i}.png"
        if not (image_path.is_file() and label_path.is_file()):
            continue
        images.append(read_image(image_path))
        gts.append(read_label(label_path))
        for r, key in zip(columns, preds):
            preds[key].append(read_label(paths.plots / r["name"] / "predictions" / f"{i}.png"))
    return fw, images, gts, preds, ids


def feature_panels(records: list[dict], paths: common.Paths) -> dict:
    """Baseline and MCIBI class-mean features (plots/<model>/features.npz) of the first framework having both."""
    mains = main_records(records)
    for fw in frameworks(records):
        pair = [mains.get((fw, "none")), mains.get((fw, "mcibi"))]
        if any(r is None for r in pair):
            continue
        panels = {}
        for r in pair:
            path = paths.plots / r["name"] / "features.npz"
            if not path.is_file():
                break
            with np.load(path) as f:
                if len(f["means"]) == 0:
                    break
                panels[f"{r['name']} ({CONTEXT_LABEL[r['context']]})"] = {
                    "means": f["means"], "classes": f["classes"],
                    "memory": f["memory"] if "memory" in f.files else None}
        if len(panels) == 2:
            return panels
    return {}


# ---------------------------------------------------------------------------------------------
# MLflow Model Registry


def register_best_model(params: Params, paths: common.Paths, records: list[dict]) -> dict:
    """Register the logged model of the best run (by single-scale mIoU) and point alias ``best`` at it.

    Idempotent: an existing version from the same run is reused. Never raises: the result says
    what happened (``status``: registered / reused / skipped / failed, and ``reason``).
    """
    scored = [r for r in records if _finite(_miou(r))]
    if not scored:
        return {"status": "skipped", "reason": "no model has a finite mIoU"}
    best = max(scored, key=_miou)
    out = {"model": best["name"], "mIoU": _miou(best), "run_id": best["run_id"]}
    if not params.report.register_model:
        return {**out, "status": "skipped", "reason": "`report.register_model` is false"}
    if not best["run_id"]:
        return {**out, "status": "skipped", "reason": f"{best['name']} has no MLflow run (models/{best['name']}/run.json)"}
    name = params.report.registered_model_name or f"ctxseg-{params.data.name}"
    out["registered_model"] = name
    try:
        import mlflow

        client = _mlflow_client(params, paths)
        if client is None:
            return {**out, "status": "failed", "reason": "the MLflow tracking store cannot be reached"}
        mlflow.set_tracking_uri(common.mlflow_tracking_uri(params, paths.root))
        experiment_id = best["run"].get("experiment_id") or client.get_run(best["run_id"]).info.experiment_id
        logged = mlflow.search_logged_models(experiment_ids=[experiment_id],
                                             filter_string=f"source_run_id = '{best['run_id']}'", output_format="list")
        if not logged:
            return {**out, "status": "skipped",
                    "reason": f"run {best['run_id']} logged no model (was `mlflow.log_model` false?)"}
        model_uri = logged[0].model_uri
        version = None
        try:
            for v in client.search_model_versions(f"name = '{name}'"):
                if v.run_id == best["run_id"] and v.source in (model_uri, f"models:/{logged[0].model_id}"):
                    version = v
                    break
        except Exception:  # the registered model does not exist yet
            version = None
        status = "reused"
        if version is None:
            version = mlflow.register_model(model_uri, name, tags={"model": best["name"], "dataset": params.data.name})
            status = "registered"
        client.set_registered_model_alias(name, "best", version.version)
        client.set_model_version_tag(name, version.version, "mIoU", f"{_miou(best):.6f}")
        client.set_model_version_tag(name, version.version, "model", best["name"])
        return {**out, "status": status, "version": str(version.version), "model_uri": model_uri,
                "uri": f"models:/{name}@best"}
    except Exception as err:
        log.warning("could not register %s in the MLflow Model Registry: %s", best["name"], err)
        return {**out, "status": "failed", "reason": f"{type(err).__name__}: {err}"}


# ---------------------------------------------------------------------------------------------
# the report


def _data_description(params: Params, meta: dict, records: list[dict]) -> str:
    splits = meta.get("splits", {})
    sizes = meta.get("image_size_range", {})
    size_text = []
    for split, rng in sizes.items():
        lo, hi = rng.get("min_hw"), rng.get("max_hw")
        if lo and hi:
            size_text.append(f"{split} {lo[0]}×{lo[1]}" + ("" if lo == hi else f" to {hi[0]}×{hi[1]}"))
    epochs = sorted({r["run"].get("epochs") for r in records if r["run"].get("epochs")})
    iterations = sorted({r["run"].get("iterations") for r in records if r["run"].get("iterations")})
    text = (f"Dataset: **{params.data.name}** ({meta['num_classes']} classes; "
            + ", ".join(f"{n} {s} images" for s, n in splits.items())
            + (f"; image sizes {', '.join(size_text)}" if size_text else "") + "). "
            f"Models trained for {', '.join(map(str, epochs)) or params.train.epochs} epoch(s)"
            + (f" ({', '.join(map(str, iterations))} iterations)" if iterations else "") + ", global batch "
            f"{params.train.batch_size}, backbone {params.model.backbone.name}; scored on the "
            f"`{params.evaluate.split}` split ({records[0]['metrics'].get('num_images', '?')} images). ")
    if params.data.name == "synthetic":
        text += ("This is the embedded synthetic co-occurrence benchmark, far smaller than the papers' datasets: "
                 "the numbers show whether context helps on a task built to need it, and are not comparable "
                 "with the papers' ADE20K / Cityscapes / COCO-Stuff results. ")
    text += ("Every number in this report was measured by this pipeline, except the columns explicitly "
             "labelled as the paper's in the complexity table.")
    return text


def build_report(params: Params, paths: common.Paths, out_dir: Optional[Path] = None) -> Document:
    """Build the document; figures go to ``<out_dir>/figures`` (default ``reports/figures``)."""
    from ctxseg.visualize import (
        confusion_figure,
        feature_space_figure,
        per_class_delta_figure,
        per_class_iou_figure,
        qualitative_grid_figure,
        save_png,
        training_curves_figure,
    )

    started = time.perf_counter()
    records = collect_results(params, paths)
    meta = common.dataset_meta(paths)
    figures = (out_dir or paths.reports) / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    doc = Document(params.report.title)
    doc.paragraph(_data_description(params, meta, records))

    complexity = None
    if params.report.complexity:
        try:
            complexity = complexity_rows(params, int(meta["num_classes"]))
        except Exception as err:  # the models engineer's module changed shape: report the rest
            log.warning("complexity table skipped: %s", err)

    doc.heading("Did the context modules help, and at what cost?")
    lines = headline(records, complexity)
    if lines:
        doc.bullets(lines)
        doc.paragraph("Single training run per model: differences of about a point or less can be seed noise."
                      + (" Costs are params / FLOPs of the context module in MCIBI Table 3's setting and CPU "
                         "latency measured here (see the complexity table)." if complexity else ""))
    else:
        doc.paragraph("No context model (MCIBI or ACF) in this study.")

    doc.heading("Main results (MCIBI Table 5 layout)")
    headers, rows = paper_table5(records)
    doc.table(headers, rows, caption="mIoU (%) single-scale / multi-scale + flip; Δ against the framework's "
                                     "baseline, in mIoU points")
    headers, rows = main_results_table(records)
    doc.table(headers, rows, caption="Every model (single scale unless marked ms+flip)")
    ctx_table = context_class_table(records, meta)
    if ctx_table:
        groups = (meta.get("synthetic") or {}).get("groups") or {}
        doc.table(*ctx_table, caption="IoU (%) of the classes that look alike and are told apart only by "
                                      "co-occurring objects elsewhere in the image ("
                                      + "; ".join(f"{g}: {', '.join(m)}" for g, m in groups.items()) + ")")
    scales = next((r["metrics"]["ms_flip"].get("scales") for r in records if "ms_flip" in r["metrics"]), None)
    if scales:
        doc.paragraph(f"Multi-scale + flip: scales {scales}, horizontal flip "
                      f"{'on' if params.evaluate.flip else 'off'}; {params.evaluate.mode} inference.")

    doc.heading("Ablations")
    shown = False
    if "fusion" in params.report.ablations:
        for fw, heads, body in fusion_table(records):
            doc.table(heads, body, caption=f"{fw}: fusion of R and C_bi (MCIBI Table 1)")
            shown = True
    if "memory" in params.report.ablations:
        for fw, heads, body in memory_table(records):
            doc.table(heads, body, caption=f"{fw}: memory initialisation / update / momentum / RCL (MCIBI Table 2)")
            shown = True
    if not shown:
        doc.paragraph("No ablation runs in this study (" + (", ".join(params.report.ablations) or "none enabled")
                      + "). Add MCIBI models that differ in `mcibi.fusion` (Table 1) or in `mcibi.init`, "
                      "`mcibi.update`, `mcibi.momentum_power`, `mcibi.rcl` (Table 2) under `models:` to get them.")

    add_sweep_section(doc, params, paths, figures)
    if complexity:
        add_complexity_section(doc, complexity)

    doc.heading("Training and per-class results")
    curves = training_curves(records, params, paths)
    if curves:
        doc.image(save_png(training_curves_figure(curves), figures / "training_curves.png"),
                  "Training loss and validation mIoU (%) per model")
    doc.image(save_png(per_class_iou_figure({r["name"]: r["metrics"]["per_class_iou"] for r in records},
                                            "Per-class IoU (single scale): baseline vs context models"),
                       figures / "per_class_iou.png"), "Per-class IoU (%), every model")
    base_name, deltas = class_deltas(records)
    if deltas:
        doc.image(save_png(per_class_delta_figure(deltas, base_name, context_classes(meta)),
                           figures / "per_class_delta.png"),
                  f"Per-class IoU change of the context models against {base_name} (bold: classes only context "
                  "can tell apart)" if context_classes(meta) else
                  f"Per-class IoU change of the context models against {base_name}")
    best = max((r for r in records if _finite(_miou(r))), key=_miou, default=None)
    if best is not None:
        confusion_file = paths.plots / best["name"] / "confusion.json"
        if confusion_file.is_file():
            cm = common.read_json(confusion_file, "", "")
            doc.image(save_png(confusion_figure(np.asarray(cm["matrix"]), cm["classes"],
                                                f"{best['name']}: confusion (row-normalised)"),
                               figures / "confusion.png"),
                      f"Confusion matrix of the best model, {best['name']} (rows: ground truth, % of the class)")

    if params.report.qualitative_images:
        doc.heading("Qualitative results (MCIBI Fig 4 layout)")
        fw, images, gts, preds, ids = qualitative_inputs(records, params, paths, meta)
        if images:
            doc.image(save_png(qualitative_grid_figure(images, gts, preds, meta["palette"], ids),
                               figures / "qualitative.png"),
                      f"{params.evaluate.split} images, ground truth and single-scale predictions ({fw}); "
                      "black = ignore")
        else:
            doc.paragraph("No prediction images to show (set `evaluate.num_visualisations` > 0).")

    if params.report.feature_space:
        doc.heading("Feature space (MCIBI Fig 3)")
        panels = feature_panels(records, paths)
        if panels:
            doc.image(save_png(feature_space_figure(panels, meta["class_names"], meta["palette"]),
                               figures / "feature_space.png"),
                      "PCA of per-image class-mean features at the classifier input; stars = MCIBI memory entries")
            doc.paragraph("Each dot is one class in one image. With MCIBI, features of a class should gather "
                          "around its dataset-level memory entry.")
        else:
            doc.paragraph("Needs a baseline and an MCIBI model of the same framework with "
                          "`evaluate.feature_images` > 0.")

    doc.heading("MLflow runs")
    uri = common.mlflow_tracking_uri(params, paths.root)
    local_ui = uri.startswith("sqlite") or uri.startswith("file")
    base = "http://127.0.0.1:5000" if local_ui else uri.rstrip("/")
    doc.table(["model", "MLflow run id", "epochs", "final val mIoU (%)", "run page (with the UI running)"],
              [[r["name"], r["run_id"] or "–", str(r["run"].get("epochs", "–")),
                pct((r["run"].get("history") or [{}])[-1].get("val_mIoU")),
                f"{base}/#/experiments/{r['run']['experiment_id']}/runs/{r['run_id']}"
                if r["run_id"] and r["run"].get("experiment_id") else "–"] for r in records])
    registry = register_best_model(params, paths, records)
    if registry.get("status") in ("registered", "reused"):
        doc.paragraph(f"Best model by mIoU: `{registry['model']}` ({pct(registry['mIoU'])}%), registered as "
                      f"`{registry['registered_model']}` version {registry['version']} with alias `best` "
                      f"(load it with `mlflow.pytorch.load_model(\"{registry['uri']}\")`).")
    else:
        doc.paragraph(f"Best model by mIoU: `{registry.get('model', '–')}`; not registered in the Model Registry: "
                      f"{registry.get('reason', 'n/a')}.")
    doc.paragraph("Open the MLflow UI on these runs (experiment "
                  f"`{params.mlflow.experiment}`; runs are named `<dataset>/<framework>+<context>`):")
    ui = f"mlflow ui --backend-store-uri {uri}" if uri.startswith("sqlite") else f"open {uri}"
    doc.code(ui + ("\n# or: make mlflow-ui" if uri.startswith("sqlite") else ""))
    log.info("report built in %.1f s", time.perf_counter() - started)
    return doc


def write_report(params: Params, paths: common.Paths) -> Path:
    """Build and write ``reports/`` as a whole (atomically: a failure leaves the previous report)."""
    with atomic_path(paths.reports) as tmp:
        tmp.mkdir(parents=True)
        doc = build_report(params, paths, out_dir=tmp)
        (tmp / "report.md").write_text(doc.markdown(tmp), encoding="utf-8")
        (tmp / "report.html").write_text(doc.html(), encoding="utf-8")
    return paths.reports / "report.md"


@common.stage
def main(argv: Optional[list[str]] = None) -> None:
    args = common.base_parser(__doc__.splitlines()[0]).parse_args(argv)
    params = common.load_stage_params(args.params)
    paths = common.Paths(params)
    out = write_report(params, paths)
    log.info("report written to %s and %s", out, out.with_suffix(".html"))


if __name__ == "__main__":
    raise SystemExit(main())
