"""A finished study read back from its files, and the report built from it.

The contract folders (``metrics/``, ``plots/``, ``models/<model>/run.json``, ``tune/``,
``registry/best.json``, ``data/prepared/<dataset>/``) are read into *records*
(:func:`collect_results`), then :func:`build_report` lays out the document of
:mod:`ctxseg.report` with the figures of :mod:`ctxseg.visualize`. What only MLflow knows (per-step
loss histories, the tracking URI) is passed in by the caller: nothing here imports MLflow.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ctxseg.config import Params, flatten
from ctxseg.errors import UserError
from ctxseg.models.heads import head_names
from ctxseg.report import (
    CONTEXT_LABEL,
    CONTEXTS,
    Document,
    add_complexity_section,
    add_sweep_section,
    add_trained_cost_table,
    class_deltas,
    complexity_rows,
    context_class_table,
    context_classes,
    context_groups,
    fusion_table,
    frameworks,
    headline,
    main_records,
    main_results_table,
    memory_table,
    miou_of,
    paper_table5,
    pct,
    seeds_note,
    trained_cost_rows,
    finite,
)

log = logging.getLogger(__name__)

__all__ = ["StudyLayout", "ReportInputError", "REGISTRY_RECORD", "collect_results", "read_json", "dataset_note",
           "loss_curves", "qualitative_inputs", "feature_panels", "build_report", "LOSS_KEY", "TERM_LABEL",
           "still_rising", "rising_note", "model_colours", "column_title"]

REGISTRY_RECORD = Path("registry") / "best.json"  # written by the register stage, read by the report
# The like-for-like training loss: every model's segmentation CE on its final prediction (the
# totals differ in their terms: MCIBI adds L_W and L_M, ACF and the baseline do not).
LOSS_KEY = "loss_o"
# What each logged loss term is (unweighted values; the objective weighs them, Eq 19)
TERM_LABEL = {"loss_o": "L_O", "loss_aux": "L_aux", "loss_w": "L_W", "loss_m": "L_M"}
TERM_MEANING = {"loss_o": "the CE of the final prediction", "loss_aux": "the CE of the auxiliary head (×0.4 in the "
                "objective)", "loss_w": "MCIBI's CE of H1(R) (Eq 16, ×α)",
                "loss_m": "MCIBI's representation consistent learning on the memory (Eq 17, ×β)"}
RISING_TOLERANCE = 0.5  # mIoU points over the last validation interval above which a curve is "still rising"


class ReportInputError(UserError, FileNotFoundError):
    """A file the report needs is missing; the message names it and the stage that writes it."""


@dataclasses.dataclass(frozen=True)
class StudyLayout:
    """Where a study's outputs are (absolute paths)."""

    root: Path
    prepared: Path
    metrics: Path
    plots: Path
    models: Path
    tune: Path

    @classmethod
    def from_paths(cls, paths: Any) -> "StudyLayout":
        """From any object with the attributes of the same names (the pipeline's ``common.Paths``)."""
        return cls(**{f.name: Path(getattr(paths, f.name)) for f in dataclasses.fields(cls)})

    def metrics_file(self, name: str) -> Path:
        """The DVC metrics file: headline numbers only (:func:`ctxseg.evaluation.headline_metrics`)."""
        return self.metrics / f"{name}.json"

    def details_file(self, name: str) -> Path:
        """The full evaluation record (per-class IoU, ms+flip block, run id, ...) the report reads."""
        from ctxseg.evaluation import details_file

        return details_file(self.metrics, name)

    def run_file(self, name: str, seed: int) -> Path:
        """One seed's training record (``models/<model>/seeds/<seed>/run.json``)."""
        return self.models / name / "seeds" / str(seed) / "run.json"

    @property
    def registry_file(self) -> Path:
        return self.root / REGISTRY_RECORD


def read_json(path: Path, what: str, fix: str) -> Any:
    if not path.is_file():
        raise ReportInputError(f"{path}: {what} not found. {fix}")
    return json.loads(path.read_text(encoding="utf-8"))


def collect_results(params: Params, layout: StudyLayout) -> list[dict]:
    """One record per model of params: its resolved config, its evaluation record and a run.json.

    ``record["metrics"]`` is ``metrics/<model>.details.json`` (the full record over seeds: the means of the
    headline numbers, ``per_class_iou`` and ``ms_flip``, ``sd``, each seed's numbers under ``seeds``,
    ``num_params``, ``run_id``, ...), not the DVC metrics file, which holds the headline numbers only.
    ``record["run"]`` is the first seed's run.json (its curves stand for the model's in the figures) and
    ``record["run_id"]`` the model's parent MLflow run, which groups its seeds."""
    records = []
    defaults = flatten(params.model.model_dump(mode="json"))
    for name, cfg in params.models.items():
        metrics = read_json(layout.details_file(name), f"evaluation record of model {name!r}",
                            f"Run `dvc repro evaluate@{name}` first.")
        seeds = [s["seed"] for s in metrics.get("seeds", [])] or params.seeds
        run_file = layout.run_file(name, seeds[0])
        run = json.loads(run_file.read_text(encoding="utf-8")) if run_file.is_file() else {}
        flat = flatten(cfg.model_dump(mode="json"))
        # options of a context head other than the model's own do not make it a variant
        other_heads = {h for h in head_names() if h != cfg.context}
        variant = {k: v for k, v in flat.items() if k not in ("framework", "context") and v != defaults.get(k)
                   and k.split(".", 1)[0] not in other_heads}
        records.append({"name": name, "framework": cfg.framework, "context": cfg.context, "config": cfg,
                        "flat": flat, "variant": variant, "metrics": metrics, "run": run,
                        "run_id": metrics.get("run_id") or run.get("run_id")})
    return records


def dataset_note(meta: dict) -> str:
    """What the report says about the dataset's comparability: ``meta["report_note"]``, else for a
    dataset prepared with a generated design (``meta["synthetic"]``, until the key is renamed) the
    standard caveat, else nothing."""
    if meta.get("report_note"):
        return str(meta["report_note"]).strip() + " "
    if meta.get("synthetic"):
        return ("This is the embedded synthetic co-occurrence benchmark, far smaller than the papers' datasets: "
                "the numbers show whether context helps on a task built to need it, and are not comparable "
                "with the papers' ADE20K / Cityscapes / COCO-Stuff results. ")
    return ""


def _data_description(params: Params, meta: dict, records: list[dict]) -> str:
    splits = meta.get("splits", {})
    size_text = []
    for split, rng in meta.get("image_size_range", {}).items():
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
    return text + dataset_note(meta) + ("Every number in this report was measured by this pipeline, except the "
                                        "columns explicitly labelled as the paper's in the complexity table.")


def eval_image_size(meta: dict, split: str) -> Optional[list[int]]:
    """The largest image size of ``split`` recorded in meta.json (the FLOPs of the trained-cost table)."""
    rng = (meta.get("image_size_range") or {}).get(split) or {}
    return rng.get("max_hw")


def loss_curves(records: list[dict], histories: dict[str, dict[str, tuple]]) -> dict[str, dict]:
    """model -> {"terms": {term: (x, y)}, "source": text, "val_mIoU": (epochs, %)}.

    ``terms`` are the loss terms the model logged, each on its own (``loss_o``, ``loss_aux``, and for
    MCIBI ``loss_w``, ``loss_m``; see :data:`TERM_LABEL`), never the total, which sums different terms
    for different models. ``histories[model][term] = (steps, values)`` are per-iteration histories from
    the tracking store (optional); a model without them falls back to run.json's per-epoch means
    (``train_loss_o``, ...) at each epoch's last iteration.
    """
    curves: dict[str, dict] = {}
    for r in records:
        history = r["run"].get("history") or []
        series: dict[str, Any] = {}
        own = histories.get(r["name"], {})
        terms = {k: tuple(v) for k, v in own.items() if k.startswith("loss_") and v and len(v[0])}
        source = "per iteration (MLflow)"
        if not terms:
            keys = dict.fromkeys(k for h in history for k in h if k.startswith("train_loss_"))
            for key in keys:
                hs = [h for h in history if finite(h.get(key))]
                terms[key[len("train_"):]] = ([h.get("iteration", h.get("epoch")) for h in hs], [h[key] for h in hs])
            source = "per-epoch means (run.json)"
        if terms:
            series["terms"], series["source"] = terms, source
        vals = [h for h in history if finite(h.get("val_mIoU"))]
        if vals:
            series["val_mIoU"] = ([h.get("epoch", i + 1) for i, h in enumerate(vals)],
                                  [100 * h["val_mIoU"] for h in vals])
        if series:
            curves[r["name"]] = series
    return curves


def last_gain(epochs_values: tuple) -> Optional[tuple[Any, Any, float]]:
    """(previous epoch, last epoch, mIoU points gained between them) of a validation curve in %, or None."""
    xs, ys = epochs_values
    if len(ys) < 2:
        return None
    return xs[-2], xs[-1], float(ys[-1] - ys[-2])


def still_rising(epochs_values: tuple, tolerance: float = RISING_TOLERANCE) -> bool:
    """True when a validation curve (mIoU in %) gained more than ``tolerance`` points over its last
    validation interval: it has not flattened, and longer training would likely change the result."""
    gain = last_gain(epochs_values)
    return gain is not None and gain[2] > tolerance


def rising_note(curves: dict[str, dict], tolerance: float = RISING_TOLERANCE) -> Optional[str]:
    """The report's sentence on which validation curves are still rising at their last epoch (with the
    numbers), or that all have flattened; None without validation curves."""
    gains = {n: last_gain(c["val_mIoU"]) for n, c in curves.items() if "val_mIoU" in c}
    gains = {n: g for n, g in gains.items() if g is not None}
    if not gains:
        return None
    rising = {n: g for n, g in gains.items() if g[2] > tolerance}
    if not rising:
        return (f"Every validation curve has flattened: none gained more than {tolerance:g} mIoU points over its "
                "last validation interval (" + ", ".join(f"`{n}` {g[2]:+.2f}" for n, g in gains.items()) + ").")
    return ("**Still rising at the last epoch** (validation mIoU gained more than "
            f"{tolerance:g} points over the last validation interval, so the curve has not flattened): "
            + ", ".join(f"`{n}` {g[2]:+.2f} points (epoch {g[0]} → {g[1]}, to {curves[n]['val_mIoU'][1][-1]:.2f}%)"
                        for n, g in rising.items())
            + ". Longer training (`train.epochs`) would likely raise their numbers: their comparison is not final."
            + (" Flattened: " + ", ".join(f"`{n}` ({g[2]:+.2f})" for n, g in gains.items() if n not in rising) + "."
               if len(rising) < len(gains) else ""))


def curves_caption(curves: dict[str, dict]) -> str:
    """The training-curves caption: which panel shows what, and what each loss term drawn is."""
    terms = [k for k in dict.fromkeys(t for c in curves.values() for t in c.get("terms", {}))]
    sources = sorted({c["source"] for c in curves.values() if "source" in c})
    if not terms:
        return ("Validation mIoU (%) per epoch. No loss curves: the runs recorded no per-term loss history (only "
                "totals, which sum different terms for different models and are not comparable).")
    others = [t for t in terms if t != LOSS_KEY]
    return ("Left: L_O, the loss term every model has (like for like)"
            + ("; middle: the other terms, unweighted, each in its model's colour and its own line style"
               if others else "") + "; right: validation mIoU (%) per epoch. "
            + "; ".join(f"{TERM_LABEL.get(k, k)} = {TERM_MEANING.get(k, k)}" for k in
                        [k for k in TERM_LABEL if k in terms] + [k for k in terms if k not in TERM_LABEL])
            + f". Losses {' and '.join(sources)}; the totals are not drawn, as they sum different terms for "
            "different models.")


def column_title(record: dict) -> str:
    """The title of a model's column / panel in the figures: ``name (+CONTEXT)``."""
    return f"{record['name']} ({CONTEXT_LABEL.get(record['context'], record['context'])})"


def qualitative_inputs(records: list[dict], layout: StudyLayout, split: str, limit: int):
    """Images, ground truths and the fixed-sample predictions of baseline / +MCIBI / +ACF of one framework."""
    from ctxseg.data.dataset import image_file, read_image, read_label

    meta_path = layout.prepared / "meta.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
    mains = main_records(records)
    fws = frameworks(records)
    fw = next((f for f in fws if (f, "none") in mains), fws[0])
    columns = [mains[(fw, c)] for c in CONTEXTS if (fw, c) in mains]
    id_sets = []
    for r in columns:
        pred_dir = layout.plots / r["name"] / "predictions"
        id_sets.append({p.stem for p in pred_dir.glob("*.png")} if pred_dir.is_dir() else set())
    ids = (sorted(set.intersection(*id_sets)) if id_sets else [])[:limit]
    images, gts, preds = [], [], {column_title(r): [] for r in columns}
    shown = []
    for i in ids:
        image_path = image_file(layout.prepared, meta, split, i)  # the original .jpg / .png
        label_path = layout.prepared / "labels" / split / f"{i}.png"
        if not (image_path.is_file() and label_path.is_file()):
            continue
        images.append(read_image(image_path))
        gts.append(read_label(label_path))
        shown.append(i)
        for r, key in zip(columns, preds):
            preds[key].append(read_label(layout.plots / r["name"] / "predictions" / f"{i}.png"))
    return fw, images, gts, preds, shown


def feature_panels(records: list[dict], layout: StudyLayout) -> dict:
    """Baseline and MCIBI class-mean features (plots/<model>/features.npz) of the first framework having both."""
    mains = main_records(records)
    for fw in frameworks(records):
        pair = [mains.get((fw, "none")), mains.get((fw, "mcibi"))]
        if any(r is None for r in pair):
            continue
        panels = {}
        for r in pair:
            path = layout.plots / r["name"] / "features.npz"
            if not path.is_file():
                break
            with np.load(path) as f:
                if len(f["means"]) == 0:
                    break
                panels[column_title(r)] = {
                    "model": r["name"], "means": f["means"], "classes": f["classes"],
                    "memory": f["memory"] if "memory" in f.files else None}
        if len(panels) == 2:
            return panels
    return {}


def model_colours(records: list[dict]) -> dict[str, tuple]:
    """One colour per model, the same in every figure (the order of ``models`` in params)."""
    from ctxseg.visualize import series_colours

    return series_colours([r["name"] for r in records])


def build_report(params: Params, layout: StudyLayout, figures: Path, *, histories: Optional[dict] = None,
                 registry: Optional[dict] = None, tracking_uri: str = "") -> Document:
    """The whole report document; figures are written to ``figures``."""
    from ctxseg import visualize as viz

    started = time.perf_counter()
    records = collect_results(params, layout)
    meta = read_json(layout.prepared / "meta.json", "prepared dataset", "Run `dvc repro preprocess` first.")
    colours = model_colours(records)
    figures.mkdir(parents=True, exist_ok=True)
    rc = params.report
    doc = Document(rc.title)
    doc.paragraph(_data_description(params, meta, records))

    complexity = None
    if rc.complexity:
        try:
            complexity = complexity_rows(rc.latency_in_channels, rc.latency_size, rc.latency_channels,
                                         rc.latency_repeats, int(meta["num_classes"]))
        except Exception as err:  # the models' complexity module changed shape: report the rest
            log.warning("complexity table skipped: %s", err)
    size = eval_image_size(meta, params.evaluate.split)
    trained = trained_cost_rows(records, size, rc.latency_repeats) if rc.complexity else None

    doc.heading("Did the context modules help, and at what cost?")
    lines = headline(records, complexity, trained)
    if lines:
        doc.bullets(lines)
        doc.paragraph(seeds_note(records)
                      + (" Costs are params / multiply-adds of the context module in MCIBI Table 3's setting and CPU "
                         "latency measured here (see the complexity section), then the whole model's params, "
                         "FLOPs and CPU latency per image as trained here." if complexity else ""))
    else:
        doc.paragraph("No context model (MCIBI or ACF) in this study.")

    doc.heading("Main results (MCIBI Table 5 layout)")
    doc.table(*paper_table5(records), caption="single-scale mIoU (%), mean ± sd over seeds; Δ against the "
                                              "framework's baseline in mIoU points, its 95% interval over seeds "
                                              "and the verdict (multi-scale + flip in the next table)")
    doc.table(*main_results_table(records), caption="Every model over its seeds (single scale unless marked "
                                                    "ms+flip): mean ± sd, each seed's mIoU, Δ [95% CI] and verdict")
    ctx_table = context_class_table(records, meta)
    if ctx_table:
        doc.table(*ctx_table, caption="IoU (%) of the classes that look alike and are told apart only by "
                                      "co-occurring objects elsewhere in the image ("
                                      + "; ".join(f"{g}: {', '.join(m)}" for g, m in context_groups(meta).items()) + ")")
    scales = next((r["metrics"]["ms_flip"].get("scales") for r in records if "ms_flip" in r["metrics"]), None)
    if scales:
        doc.paragraph(f"Multi-scale + flip: scales {scales}, horizontal flip "
                      f"{'on' if params.evaluate.flip else 'off'}; {params.evaluate.mode} inference.")

    _ablations(doc, records, rc.ablations)
    add_sweep_section(doc, layout.tune / "results.csv", layout.tune / "best.yaml", figures, layout.root, rc.sweeps,
                      colours=colours)
    if trained or complexity:
        doc.heading("Complexity")
    if trained:
        add_trained_cost_table(doc, trained, size)
    if complexity:
        add_complexity_section(doc, complexity)

    doc.heading("Training and per-class results")
    curves = loss_curves(records, histories or {})
    if curves:
        rising = [n for n, c in curves.items() if "val_mIoU" in c and still_rising(c["val_mIoU"])]
        figure = viz.training_curves_figure(curves, colours, shared_term=LOSS_KEY, term_labels=TERM_LABEL,
                                            rising=rising, shared_title="L_O: CE of the final prediction")
        doc.image(viz.save_png(figure, figures / "training_curves.png"), curves_caption(curves))
        note = rising_note(curves)
        if note:
            doc.paragraph(note)
    doc.image(viz.save_png(viz.per_class_iou_figure({r["name"]: r["metrics"]["per_class_iou"] for r in records},
                                                    "Per-class IoU (single scale): baseline vs context models",
                                                    colours=colours),
                           figures / "per_class_iou.png"), "Per-class IoU (%), every model")
    base_name, deltas = class_deltas(records)
    if deltas:
        doc.image(viz.save_png(viz.per_class_delta_figure(deltas, base_name, context_classes(meta), colours=colours),
                               figures / "per_class_delta.png"),
                  f"Per-class IoU change of the context models against {base_name} (bold: classes only context "
                  "can tell apart)" if context_classes(meta) else
                  f"Per-class IoU change of the context models against {base_name}")
    best = max((r for r in records if finite(miou_of(r))), key=miou_of, default=None)
    if best is not None and (layout.plots / best["name"] / "confusion.json").is_file():
        cm = json.loads((layout.plots / best["name"] / "confusion.json").read_text(encoding="utf-8"))
        doc.image(viz.save_png(viz.confusion_figure(np.asarray(cm["matrix"]), cm["classes"],
                                                    f"{best['name']}: confusion (row-normalised)"),
                               figures / "confusion.png"),
                  f"Confusion matrix of the best model, {best['name']} (rows: ground truth, % of the class)")

    if rc.qualitative_images:
        doc.heading("Qualitative results (MCIBI Fig 4 layout)")
        fw, images, gts, preds, ids = qualitative_inputs(records, layout, params.evaluate.split, rc.qualitative_images)
        if images:
            lookalike = context_classes(meta)
            figure = viz.qualitative_grid_figure(images, gts, preds, meta["palette"], ids,
                                                 class_names=meta["class_names"], colours=colours,
                                                 column_models={column_title(r): r["name"] for r in records},
                                                 named_colours=lookalike)
            doc.image(viz.save_png(figure, figures / "qualitative.png"),
                      qualitative_caption(params.evaluate.split, len(images), fw, list(preds), meta, lookalike))
        else:
            doc.paragraph("No prediction images to show (set `evaluate.num_visualisations` > 0).")

    if rc.feature_space:
        _feature_space(doc, records, layout, meta, figures, colours)

    _mlflow_section(doc, params, records, registry, tracking_uri, layout.root)
    log.info("report built in %.1f s", time.perf_counter() - started)
    return doc


def qualitative_caption(split: str, n: int, framework: str, columns: list[str], meta: dict,
                        lookalike: list[str]) -> str:
    """The qualitative grid's caption: what each column is (every model column named, as titled) and
    the colours of the look-alike classes in words (e.g. sea = blue, lake = light blue)."""
    from ctxseg.visualize import colour_name

    names, palette = meta.get("class_names", []), meta.get("palette", [])
    coloured = {c: colour_name(palette[names.index(c)]) for c in lookalike
                if c in names and names.index(c) < len(palette)}
    groups = "; ".join(" vs ".join(f"{c} = {coloured[c]}" for c in members if c in coloured)
                       for members in context_groups(meta).values() if any(c in coloured for c in members))
    return (f"{n} {split} image{'s' if n != 1 else ''} (one per row, id at the left), the ground truth, then the "
            f"single-scale prediction of each of the {len(columns)} {framework} model{'s' if len(columns) != 1 else ''}"
            f" shown, one column each: {', '.join(columns)} (column titles and frames in each model's colour). "
            "Class colours as in the legend under the grid; black = ignore."
            + (f" Look-alike classes told apart only by context: {groups}." if groups else ""))


def _ablations(doc: Document, records: list[dict], enabled: list[str]) -> None:
    doc.heading("Ablations")
    shown = False
    if "fusion" in enabled:
        for fw, heads, body in fusion_table(records):
            doc.table(heads, body, caption=f"{fw}: fusion of R and C_bi (MCIBI Table 1)")
            shown = True
    if "memory" in enabled:
        for fw, heads, body in memory_table(records):
            doc.table(heads, body, caption=f"{fw}: memory initialisation / update / momentum / RCL (MCIBI Table 2)")
            shown = True
    if not shown:
        doc.paragraph("No ablation runs in this study (" + (", ".join(enabled) or "none enabled")
                      + "). Add MCIBI models that differ in `mcibi.fusion` (Table 1) or in `mcibi.init`, "
                      "`mcibi.update`, `mcibi.momentum_power`, `mcibi.rcl` (Table 2) under `models:` to get them.")


def _feature_space(doc: Document, records: list[dict], layout: StudyLayout, meta: dict, figures: Path,
                   colours: Optional[dict] = None) -> None:
    from ctxseg import visualize as viz

    doc.heading("Feature space (MCIBI Fig 3)")
    panels = feature_panels(records, layout)
    if not panels:
        doc.paragraph("Needs a baseline and an MCIBI model of the same framework with `evaluate.feature_images` > 0.")
        return
    doc.image(viz.save_png(viz.feature_space_figure(panels, meta["class_names"], meta["palette"], colours),
                           figures / "feature_space.png"),
              "PCA of per-image class means of the pixel representation R (the 3×3 conv features of stage 4, "
              "before any context: the baseline's classifier input, MCIBI's R of Eq 3), one panel per model, "
              "each fitted on its own points; stars = MCIBI's memory entries, running class averages of R "
              "(Eq 6-10) and so in the same space, projected with the MCIBI panel's axes")
    doc.paragraph(feature_space_text(panels))


def feature_space_text(panels: dict) -> str:
    """What the feature-space figure shows, measured in the full feature space (not the 2-D projection):
    how tightly each class gathers and, for MCIBI, whether the points sit around their memory entry."""
    from ctxseg.visualize import class_spread

    parts = []
    verdicts = []
    for name, p in panels.items():
        s = class_spread(p["means"], p["classes"], p.get("memory"))
        text = (f"{name}: a dot is on average {s['to_centre']:.3g} from its class centre (class centres are "
                f"{s['between_centres']:.3g} apart)")
        if s.get("to_memory") is not None:
            share = s.get("nearest_memory_own")
            text += f", {s['to_memory']:.3g} from its class's memory entry" + (
                f", and {100 * share:.0f}% of the dots are nearer their own class's memory entry than any other's"
                if share is not None else "")
            gathers = (share is not None and share >= 0.5 and s["to_memory"] <= 0.5 * s["between_centres"])
            verdicts.append(f"In {name} the dots {'do' if gathers else 'do not'} gather around their class's memory "
                            "entry" + (" (most are nearest their own entry, within half the distance between "
                                       "class centres)." if gathers else
                                       ": the memory entries sit apart from their class's points at this training "
                                       "length, so the stars are not cluster centres here."))
        parts.append(text)
    return ("Each dot is one class in one image. With MCIBI, a class's features should gather around its "
            "dataset-level memory entry. Measured in the full feature space (not the 2-D projection): "
            + "; ".join(parts) + ". " + " ".join(verdicts)).strip()


def _mlflow_section(doc: Document, params: Params, records: list[dict], registry: Optional[dict],
                    tracking_uri: str, layout_root: Optional[Path] = None) -> None:
    doc.heading("MLflow runs")
    local_ui = tracking_uri.startswith(("sqlite", "file"))
    base = "http://127.0.0.1:5000" if local_ui else tracking_uri.rstrip("/")
    doc.table(["model", "MLflow run id (the model's; its seeds are nested in it)", "epochs",
               "final val mIoU (%, first seed)", "run page (with the UI running)"],
              [[r["name"], r["run_id"] or "–", str(r["run"].get("epochs", "–")),
                pct((r["run"].get("history") or [{}])[-1].get("val_mIoU")),
                f"{base}/#/experiments/{r['run']['experiment_id']}/runs/{r['run_id']}"
                if r["run_id"] and r["run"].get("experiment_id") else "–"] for r in records])
    registry = registry or {"status": "missing", "reason": f"`{REGISTRY_RECORD}` does not exist (run `dvc repro "
                                                           "register`)"}
    if registry.get("status") in ("registered", "reused"):
        seed = f", seed {registry['seed']} of its {registry['seeds']} with {pct(registry['mIoU'])}%" \
            if registry.get("seeds") else ""
        doc.paragraph(f"Best model by mean mIoU: `{registry['model']}` ({pct(registry.get('mean_mIoU', registry['mIoU']))}%"
                      f"{seed}), registered as "
                      f"`{registry['registered_model']}` version {registry['version']} with alias `best` (predict "
                      f"with it: `ctxseg-predict --model {registry['uri']} --input <images> --output <folder>`).")
    else:
        doc.paragraph(f"Best model by mIoU: `{registry.get('model', '–')}`; not registered in the Model Registry: "
                      f"{registry.get('reason', 'n/a')}.")
    doc.paragraph(f"Open the MLflow UI on these runs (experiment `{params.mlflow.experiment}`; runs are named "
                  "`<dataset>/<framework>+<context>`):")
    in_repo = tracking_uri == f"sqlite:///{(layout_root / 'mlflow.db').as_posix()}" if layout_root else False
    if tracking_uri.startswith("sqlite"):  # `make mlflow-ui` finds the store wherever the repo now lies
        store = "sqlite:///mlflow.db" if in_repo else tracking_uri  # the repo's own store: a relative URI
        doc.code(f"make mlflow-ui    # from the repo root\n# or: mlflow ui --backend-store-uri {store}")
    else:
        doc.code(f"open {tracking_uri}")
