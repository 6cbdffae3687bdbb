"""The report builds from fabricated evaluate / train / tune outputs and shows every table."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
from PIL import Image

from ctxseg.config import parse_params
from ctxseg.evaluation import headline_metrics, seeds_record
from pipeline import common
from test_evaluate import CLASSES, make_prepared

# model -> (overrides, single-scale mIoU, ms+flip mIoU)
MODELS = {
    "fcn": ({"context": "none"}, 0.40, 0.42),
    "fcn_mcibi": ({"context": "mcibi"}, 0.45, 0.47),
    "fcn_acf": ({"context": "acf"}, 0.43, 0.44),
    "fcn_mcibi_add": ({"context": "mcibi", "mcibi": {"fusion": "add"}}, 0.41, 0.43),
    "fcn_mcibi_weighted": ({"context": "mcibi", "mcibi": {"fusion": "weighted_add"}}, 0.42, 0.44),
    "fcn_mcibi_mean": ({"context": "mcibi", "mcibi": {"update": "mean", "rcl": False}}, 0.44, 0.45),
    "pspnet": ({"framework": "pspnet", "context": "none"}, 0.50, 0.52),
    "pspnet_acf": ({"framework": "pspnet", "context": "acf", "channels": 32}, 0.49, 0.515),
}
FLAT = "pspnet"  # its validation curve has flattened; every other model's is still rising
SEEDS = {0: -0.01, 1: 0.0, 2: 0.01}  # seed -> offset of every score: mean as in MODELS, sd 1 point

# the layout pipeline/tune.py writes: fixed columns, then one column per swept key (empty when not swept)
SWEEP_CSV = """sweep,trial_id,model,status,epochs,iterations,final_mIoU,best_mIoU,seed,repeat_of,mlflow_run_id,acf.mixtures,acf.heads,mcibi.momentum,mcibi.alpha,mcibi.beta
acf_kxh,t1,fcn_acf,COMPLETED,4,10,0.30,0.31,0,,0123456789abcdef0123456789abcdef,1,1,,,
acf_kxh,t2,fcn_acf,COMPLETED,4,10,0.35,0.36,0,,,2,1,,,
acf_kxh,t3,fcn_acf,COMPLETED,4,10,0.37,0.38,0,,,2,4,,,
acf_kxh,t4,fcn_acf,STOPPED,2,4,0.33,0.40,0,,,2,4,,,
acf_kxh,t5,fcn_acf,ERROR,0,0,nan,nan,0,,,1,4,,,
acf_kxh,r1,fcn_acf,COMPLETED,2,4,0.36,0.37,1,t4,,2,4,,,
acf_kxh,r2,fcn_acf,COMPLETED,4,10,0.33,0.33,1,t1,,1,1,,,
mcibi_loss,t6,fcn_mcibi,COMPLETED,4,10,0.41,0.42,0,,,,,0.9,0.4,1.0
mcibi_loss,t7,fcn_mcibi,COMPLETED,4,10,0.43,0.44,0,,,,,0.5,0.4,1.0
mcibi_loss,t8,fcn_mcibi,STOPPED,2,4,0.39,0.40,0,,,,,0.9,0.8,0.5
"""


def fabricate(root: Path, *, sweep: bool = True, mlflow: Optional[dict] = None, seeds: Optional[dict] = None,
              **report) -> tuple:
    seeds = SEEDS if seeds is None else seeds
    settings = {"latency_in_channels": 16, "latency_size": 8, "latency_channels": 16, "latency_repeats": 1,
                "register_model": False, "qualitative_images": 2, **report}
    store = {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}"} if mlflow is None else mlflow
    params = parse_params({"seeds": list(seeds), "models": {k: v[0] for k, v in MODELS.items()}, "report": settings,
                           "mlflow": store})
    paths = common.Paths(params, root=root)
    make_prepared(paths.prepared, n=2, size=16)
    meta = json.loads((paths.prepared / "meta.json").read_text())
    meta["synthetic"] = {"groups": {"water": ["sea", "lake"]}}  # look-alikes told apart only by context
    meta["image_size_range"] = {"val": {"min_hw": [16, 16], "max_hw": [16, 16]}}
    (paths.prepared / "meta.json").write_text(json.dumps(meta))
    rng = np.random.default_rng(0)
    for i, (name, (_, miou, ms)) in enumerate(MODELS.items()):
        per_seed = []
        for seed, off in seeds.items():
            per_class = {c: miou + off + 0.01 * k for k, c in enumerate(CLASSES)}
            per_seed.append({"model": name, "seed": seed, "mIoU": miou + off, "pixAcc": 0.8, "mAcc": 0.5,
                             "per_class_iou": per_class, "per_class_acc": per_class, "num_images": 2,
                             "num_params": 1_500_000, "ms_flip": {
                                 "mIoU": ms + off, "pixAcc": 0.81, "mAcc": 0.51, "per_class_iou": per_class,
                                 "scales": [0.75, 1.0], "flip": True}})
        metrics = seeds_record(per_seed)
        paths.metrics.mkdir(parents=True, exist_ok=True)
        paths.metrics_file(name).write_text(json.dumps(headline_metrics(metrics)))  # what DVC shows
        (paths.metrics / f"{name}.details.json").write_text(json.dumps(metrics))  # what report/register read
        run_dir = paths.seed_dir(name, 0)
        run_dir.mkdir(parents=True, exist_ok=True)
        history = [{"epoch": e, "iteration": 5 * e, "train_loss": 2.0 / e + (9.0 if "mcibi" in name else 0.0),
                    "train_loss_o": 1.0 / e, "train_loss_aux": 1.2 / e,
                    **({"train_loss_w": 1.1 / e, "train_loss_m": 2.5 / e} if "mcibi" in name else {}),
                    "val_mIoU": miou if name == FLAT else miou * e / 2} for e in (1, 2)]
        (run_dir / "run.json").write_text(json.dumps({"run_id": None, "history": history, "epochs": 2}))
        plots = paths.plots / name
        (plots / "predictions").mkdir(parents=True, exist_ok=True)
        for image_id in ("val_000", "val_001"):
            pred = rng.integers(0, len(CLASSES), (16, 16)).astype(np.uint8)
            Image.fromarray(pred, mode="L").save(plots / "predictions" / f"{image_id}.png")
        (plots / "confusion.json").write_text(json.dumps({"classes": CLASSES, "matrix": np.eye(4, dtype=int).tolist()}))
        arrays = {"means": rng.normal(size=(6, 8)).astype(np.float32), "classes": np.array([0, 1, 2, 0, 1, 3]),
                  "image_index": np.array([0, 0, 0, 1, 1, 1])}
        if "mcibi" in name:
            arrays["memory"] = rng.normal(size=(4, 8)).astype(np.float32)
        np.savez(plots / "features.npz", **arrays)
    if sweep:
        paths.tune.mkdir(parents=True, exist_ok=True)
        (paths.tune / "results.csv").write_text(SWEEP_CSV)
        (paths.tune / "best.yaml").write_text("fcn_acf:\n  acf.mixtures: 2\n  acf.heads: 4\n")
    return params, paths


def test_report_builds_every_table_from_fabricated_outputs(tmp_path):
    from pipeline.report import write_report

    params, paths = fabricate(tmp_path, mlflow={})  # the repo's own default store
    md_path = write_report(params, paths)
    md = md_path.read_text()
    # the MLflow UI line names the repo's store relative to the repo, so it stays true in a copy
    assert "make mlflow-ui" in md and "--backend-store-uri sqlite:///mlflow.db" in md and str(tmp_path) not in md

    # main results, MCIBI Table 5 layout: mean ± sd over 3 seeds (sd 1 point) and deltas against the fcn
    # baseline with their 95% Welch intervals (scipy.stats.ttest_ind(equal_var=False) gives +5 [+2.73, +7.27])
    # and the verdict the interval gives: a 1-point drop at 1-point seed noise is no verdict, no threshold
    assert "Main results (MCIBI Table 5 layout)" in md
    assert ("| fcn | 40.00 ± 1.00 | 45.00 ± 1.00 | +5.00 [+2.73, +7.27] helped | 43.00 ± 1.00 | "
            "+3.00 [+0.73, +5.27] helped |") in md
    assert "| pspnet | 50.00 ± 1.00 | – | – | 49.00 ± 1.00 | -1.00 [-3.27, +1.27] not distinguishable |" in md
    assert ("`pspnet_acf` (pspnet +ACF): -1.00 [-3.27, +1.27] mIoU points over `pspnet` single-scale (50.00 ± 1.00 "
            "→ 49.00 ± 1.00, 3 seeds)") in md and "**not distinguishable with 3 seeds**" in md
    assert "| fcn | fcn | none | default | 3 | 40.00 ± 1.00 | 0: 39.00, 1: 40.00, 2: 41.00 |  |" in md
    assert ("| fcn_mcibi_add | fcn | mcibi | mcibi.fusion=add | 3 | 41.00 ± 1.00 | 0: 40.00, 1: 41.00, 2: 42.00 | "
            "+1.00 [-1.27, +3.27] not distinguishable |") in md
    assert "Welch's t" in md and "no fixed threshold" in md
    # the classes only context can tell apart: their mean per seed, then the interval over seeds
    assert "(water: sea, lake)" in md
    assert "| fcn | 40.00 | 41.00 | 40.50 ± 1.00 |  |" in md
    assert "| fcn_mcibi | 45.00 | 46.00 | 45.50 ± 1.00 | +5.00 [+2.73, +7.27] helped |" in md
    # the headline answers the question, with the cost, each in a named counting convention
    assert "`fcn_mcibi` (fcn +MCIBI): +5.00 [+2.73, +7.27] mIoU points over `fcn`" in md and "**helped**" in md
    assert "GMACs (multiply-adds of the layers, the paper's convention)" in md
    assert "GFLOPs per image (2 FLOPs per multiply-add, attention products included)" in md
    # MCIBI Table 1: the three fusions, ordered add / weighted add / concat, with the baseline
    assert "MCIBI Table 1" in md
    t1 = md[md.index("MCIBI Table 1"):md.index("MCIBI Table 2")]
    assert t1.index("add (R + C_bi)") < t1.index("weighted add") < t1.index("concat (Eq 4)")
    assert "| fcn_mcibi_weighted | weighted add | 42.00 ± 1.00 | +2.00 [-0.27, +4.27] not distinguishable | – |" in t1
    # MCIBI Table 2: update mean and RCL off
    t2 = md[md.index("MCIBI Table 2"):]
    assert "| fcn_mcibi_mean | random | mean | poly (p=0.9) | ✗ | 44.00 ± 1.00 | +4.00 [+1.73, +6.27] helped | – |" in t2
    # sweep: the K x H grid keeps the best trial per cell (t3/t4 -> 40.00); the failed trial is blank
    assert "CFNet Table 3" in md
    # every score carries the epochs its trial ran: t4's 40.00 was reached in 2 of 4 epochs (ASHA)
    assert "| 2 | 36.00 (4 ep) | 40.00 (2 ep, stopped early) |" in md and "| 1 | 31.00 (4 ep) | – |" in md
    assert "8 trials (5 COMPLETED, 1 ERROR, 2 STOPPED)" in md
    assert "(`fcn_acf`: 2, 4 epochs; `fcn_mcibi`: 2, 4 epochs)" in md
    assert "| 0.5 | 44.00 (4 ep) | 1 |" in md and "| 0.9 | 42.00 (4 ep) | 2 |" in md  # mIoU against m0
    assert "| 0.8 | 40.00 (2 ep, stopped early) | 1 |" in md  # mIoU against alpha: t8 stopped at 2 epochs
    # every trial, one row each, with the epochs it ran
    assert "| t4 | fcn_acf | 2 | 4 | 40.00 | 2 ep, stopped early | STOPPED |" in md
    assert "| t3 | fcn_acf | 2 | 4 | 38.00 | 4 ep | COMPLETED |" in md
    assert "| t5 | fcn_acf | 1 | 4 | – | 0 ep, failed | ERROR |" in md
    assert "| t8 | fcn_mcibi | 0.9 | 0.8 | 0.5 | 40.00 | 2 ep, stopped early | STOPPED |" in md
    assert "mIoU against mcibi.alpha" in md and "mIoU against mcibi.beta" in md
    assert "`fcn_acf`: trial `t4` (acf.mixtures=2, acf.heads=4), mIoU 40.00% after 2 ep, stopped early" in md
    assert "`fcn_mcibi`: trial `t7` (mcibi.momentum=0.5, mcibi.alpha=0.4, mcibi.beta=1), mIoU 44.00%" in md
    # the seed repeats (r1, r2) are not grid cells: (1, 1) keeps t1's 31.00 above; they give the noise level,
    # like for like: t4 and its repeat r1 ran 2 of 4 epochs, so only t1 / r2 and the 4-epoch trials count
    # (spread 38 - 31 = 7, not 40 - 31 = 9); sd = 2 / sqrt(2) = 1.41; band t(0.975, 1) * 2 = 25.41
    assert "| t1 | 31.00 | 33.00 | +2.00 | 4 |" in md and "| t4 | 40.00 | 37.00 |" not in md
    assert ("`acf_kxh`: Among the 3 trials that ran all 4 epochs the grid spans 7.00 mIoU points and the best "
            "leads the next by 2.00; seed noise from 1 repeat(s) at equal epochs: sd 1.41 points per trial, so two "
            "configurations must differ by more than ±25.41 points") in md
    assert "The configurations are not distinguishable at this budget." in md
    assert "`mcibi_loss`: No seed repeats ran" in md
    assert "acf.heads: 4" in md  # tune/best.yaml
    # complexity of the models trained here, as configured: params, FLOPs and CPU latency on one val image
    assert "## Complexity" in md and "CPU latency (ms, 16×16)" in md
    cost = md[md.index("## Complexity"):md.index("### Complexity (MCIBI Table 3)")]
    assert re.search(r"\| fcn \| resnet_tiny \| 64 \| 1\.50 \|  \| [\d.]+ \|  \| [\d.]+ \|  \|", cost), cost
    assert re.search(r"\| pspnet_acf \| resnet_tiny \| 32 \| 1\.50 \| \+0\.00 \| [\d.]+ \| -[\d.]+ \| [\d.]+ \| [+-][\d.]+ \|",
                     cost), cost  # 32 channels as configured: fewer FLOPs than its 64-channel baseline
    assert "ms CPU latency per image" in md  # in the headline, as trained here
    # complexity: ours in both conventions beside the paper's figures, labelled as such
    assert "### Complexity (MCIBI Table 3)" in md and "paper: params (M)" in md and "V100" in md
    assert "GFLOPs (2/MAC, with attention)" in md and "GMACs (layers only)" in md and "paper: GMACs" in md
    # ours: params, GFLOPs, GMACs, measured latency; then the paper's params, GMACs and V100 time
    assert re.search(r"\| DCA \| 15\.16 \| 765\.3 \| 243\.9 \| [\d.]+ \| 14\.82 \| 242\.8 \| 47\.6 \|", md)
    assert re.search(r"\| PPM \| 23\.07 \| 618\.6 \| 309\.3 \| [\d.]+ \| 23\.07 \| 309\.4 \| 29\.6 \|", md)
    assert "| CCNet (paper only) | – | – | – | – | 23.92 | 397.4 | 56.9 |" in md
    assert re.search(r"\| OCR \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \| n/a \| n/a \| n/a \|", md)
    # figures exist and are referenced
    figures = paths.reports / "figures"
    for name in ("training_curves", "per_class_iou", "per_class_delta", "confusion", "qualitative", "feature_space", "sweep_params",
                 "sweep_kh_fcn_acf"):
        assert (figures / f"{name}.png").read_bytes()[:4] == b"\x89PNG", name
        assert f"figures/{name}.png" in md
    html = (paths.reports / "report.html").read_text()
    assert html.startswith("<!doctype html>")
    assert html.count("data:image/png;base64,") == 8
    assert "<table>" in html and "40.00 ± 1.00" in html
    # honest about the data
    assert "2 val images" in md and "not comparable" in md
    assert "not registered" in md


def test_report_without_sweep_or_ablations(tmp_path):
    from pipeline.report import write_report

    params, paths = fabricate(tmp_path, sweep=False, ablations=[], complexity=False, feature_space=False,
                              qualitative_images=0)
    md = write_report(params, paths).read_text()
    assert "No sweep results" in md
    assert "MCIBI Table 1" not in md and "MCIBI Table 2" not in md
    assert "No ablation runs" in md
    assert "Complexity" not in md and "GFLOPs" not in md
    assert not (paths.reports / "figures" / "feature_space.png").exists()


def test_missing_metrics_is_a_clear_error_and_keeps_the_old_report(tmp_path):
    from pipeline.report import write_report

    params, paths = fabricate(tmp_path, sweep=False, complexity=False)
    write_report(params, paths)
    before = (paths.reports / "report.md").read_text()
    (paths.metrics / "fcn_acf.details.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"fcn_acf\.details\.json.*dvc repro evaluate@fcn_acf"):
        write_report(params, paths)
    assert (paths.reports / "report.md").read_text() == before


def test_sweep_csv_without_required_columns_is_refused(tmp_path):
    from ctxseg.config import ConfigError
    from ctxseg.report import read_sweep

    bad = tmp_path / "results.csv"
    bad.write_text("trial,score\n1,0.5\n")
    with pytest.raises(ConfigError, match="missing column"):
        read_sweep(bad)


def test_sweep_without_trials_says_so(tmp_path):
    from pipeline.report import write_report

    params, paths = fabricate(tmp_path, complexity=False, feature_space=False, qualitative_images=0)
    header = SWEEP_CSV.splitlines()[0]
    (paths.tune / "results.csv").write_text(header + "\n")  # what tune writes with `tune.sweeps: {}`
    md = write_report(params, paths).read_text()
    assert "No sweep results: `tune/results.csv` holds no trials." in md
    assert "CFNet Table 3" not in md


def _spy(monkeypatch, module, names: list[str]) -> dict:
    """Wrap figure functions of ``module``: record each call's arguments and returned figure."""
    calls: dict = {n: [] for n in names}
    for name in names:
        real = getattr(module, name)

        def wrapper(*args, _real=real, _name=name, **kwargs):
            fig = _real(*args, **kwargs)
            calls[_name].append({"args": args, "kwargs": kwargs, "fig": fig})
            return fig

        monkeypatch.setattr(module, name, wrapper)
    return calls


def test_one_colour_per_model_in_every_figure(tmp_path, monkeypatch):
    """Every figure that shows models gets the same model -> colour mapping and draws each model in it."""
    from matplotlib.colors import to_rgba

    import ctxseg.visualize as viz
    from ctxseg.study import StudyLayout, collect_results, model_colours
    from pipeline.report import write_report

    params, paths = fabricate(tmp_path, complexity=False)
    figures = ["training_curves_figure", "per_class_iou_figure", "per_class_delta_figure", "qualitative_grid_figure",
               "feature_space_figure", "sweep_scatter_figure", "heatmap_figure"]
    originals = {n: getattr(viz, n) for n in figures}
    calls = _spy(monkeypatch, viz, figures)
    write_report(params, paths)
    expected = model_colours(collect_results(params, StudyLayout.from_paths(paths)))
    assert len(set(expected.values())) == len(MODELS)  # one distinct colour per model
    mappings = []
    for name in figures:
        assert len(calls[name]) >= 1, name
        for call in calls[name]:
            sig = originals[name].__code__.co_varnames
            mapping = call["kwargs"].get("colours")
            if mapping is None and "colours" in sig[:len(call["args"])]:
                mapping = call["args"][sig.index("colours")]
            if name == "heatmap_figure":
                assert to_rgba(call["kwargs"]["title_colour"]) == to_rgba(expected["fcn_acf"])
                continue
            assert mapping == expected, name
            mappings.append(mapping)
    assert all(m is mappings[0] for m in mappings)  # literally one mapping object

    def rgba(c):
        return tuple(round(v, 4) for v in to_rgba(c))

    # ... and each figure draws a model in that colour
    fig = calls["training_curves_figure"][0]["fig"]
    for ax in fig.axes:
        for line in ax.get_lines():
            model = line.get_label().split(":")[0]
            if model in expected:
                assert rgba(line.get_color()) == rgba(expected[model]), (ax.get_title(), line.get_label())
    bars = calls["per_class_iou_figure"][0]["fig"].axes[0]
    for container in bars.containers:
        assert rgba(container.patches[0].get_facecolor()) == rgba(expected[container.get_label()])
    grid = calls["qualitative_grid_figure"][0]["fig"]
    titled = {ax.get_title(): ax.title.get_color() for ax in grid.axes if ax.get_title()}
    for title in ("fcn (baseline)", "fcn_mcibi (+MCIBI)", "fcn_acf (+ACF)"):
        assert rgba(titled[title]) == rgba(expected[title.split(" ")[0]]), title
    space = calls["feature_space_figure"][0]["fig"]
    assert {ax.get_title(): rgba(ax.title.get_color()) for ax in space.axes if ax.get_title()} == {
        "fcn (baseline)": rgba(expected["fcn"]), "fcn_mcibi (+MCIBI)": rgba(expected["fcn_mcibi"])}
    scatter = calls["sweep_scatter_figure"][0]["fig"]
    for ax in scatter.axes:
        for coll in ax.collections:
            model = coll.get_label().split(":")[0]
            colour = coll.get_facecolor() if len(coll.get_facecolor()) and coll.get_facecolor()[0][3] > 0 \
                else coll.get_edgecolor()
            assert rgba(colour[0]) == rgba(expected[model]), coll.get_label()


def test_qualitative_grid_legend_and_caption_match_what_it_shows(tmp_path, monkeypatch):
    import ctxseg.visualize as viz
    from pipeline.report import write_report

    params, paths = fabricate(tmp_path, sweep=False, complexity=False, feature_space=False)
    calls = _spy(monkeypatch, viz, ["qualitative_grid_figure"])
    md = write_report(params, paths).read_text()
    fig = calls["qualitative_grid_figure"][0]["fig"]
    columns = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert columns == ["image", "ground truth", "fcn (baseline)", "fcn_mcibi (+MCIBI)", "fcn_acf (+ACF)"]
    legend = [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
    # every class shown is named, the look-alike blues with their colour in words, and ignore
    assert legend == ["sea (blue)", "lake (light blue)", "ship", "swan", "ignore"]
    caption = md[md.index("## Qualitative"):md.index("## Feature space") if "## Feature space" in md else None]
    caption = caption[caption.index("*") + 1:]
    for title in columns[2:]:
        assert title in caption  # the caption names every model column it shows, not one
    assert "each of the 3 fcn models" in caption and "sea = blue vs lake = light blue" in caption


def test_loss_panel_compares_like_with_like_and_still_rising_note(tmp_path, monkeypatch):
    import ctxseg.visualize as viz
    from pipeline.report import write_report

    params, paths = fabricate(tmp_path, sweep=False, complexity=False, feature_space=False, qualitative_images=0)
    calls = _spy(monkeypatch, viz, ["training_curves_figure"])
    md = write_report(params, paths).read_text()
    fig = calls["training_curves_figure"][0]["fig"]
    shared, others, val = fig.axes
    assert shared.get_title().startswith("L_O: CE of the final prediction")
    # left: L_O of every model (1.0 / epoch), never a total (which differs: MCIBI's adds L_W and L_M)
    assert {ln.get_label(): list(ln.get_ydata()) for ln in shared.get_lines()} == {n: [1.0, 0.5] for n in MODELS}
    labels = {ln.get_label(): list(ln.get_ydata()) for ln in others.get_lines()}
    assert labels["fcn_mcibi: L_W"] == [1.1, 0.55] and labels["fcn_mcibi: L_M"] == [2.5, 1.25]
    assert labels["fcn: L_aux"] == [1.2, 0.6] and "fcn: L_W" not in labels
    assert not any(max(y) > 3 for y in labels.values())  # no total (2 + 9 for MCIBI) anywhere
    assert "L_W = MCIBI's CE of H1(R)" in md and "the totals are not drawn" in md
    # the note names the rising curves with their last gain, and not the flat one
    note = md[md.index("**Still rising at the last epoch**"):]
    note = note[:note.index("\n")]
    assert "`fcn` +20.00 points (epoch 1 → 2, to 40.00%)" in note
    assert "Flattened: `pspnet` (+0.00)" in note
    rising = note[:note.index("Flattened")]
    assert "`pspnet`" not in rising and all(f"`{n}`" in rising for n in MODELS if n != FLAT)
    annotated = {t.get_text() for t in val.texts}
    assert annotated == {"still rising (+20.0)", "still rising (+22.5)", "still rising (+21.5)",
                         "still rising (+20.5)", "still rising (+21.0)", "still rising (+22.0)",
                         "still rising (+24.5)"}


def test_no_still_rising_note_when_every_curve_is_flat(tmp_path):
    from pipeline.report import write_report

    params, paths = fabricate(tmp_path, sweep=False, complexity=False, feature_space=False, qualitative_images=0)
    for run_file in paths.models.glob("*/seeds/*/run.json"):
        run = json.loads(run_file.read_text())
        for h in run["history"]:
            h["val_mIoU"] = 0.4 + 0.002 * h["epoch"]  # +0.2 points in the last epoch: flattened
        run_file.write_text(json.dumps(run))
    md = write_report(params, paths).read_text()
    assert "Still rising" not in md
    assert "Every validation curve has flattened: none gained more than 0.5 mIoU points" in md


def test_a_one_seed_study_reports_numbers_and_says_it_gives_no_verdict(tmp_path):
    from pipeline.report import write_report

    params, paths = fabricate(tmp_path, sweep=False, complexity=False, feature_space=False, qualitative_images=0,
                              seeds={0: 0.0})
    md = write_report(params, paths).read_text()
    assert "One seed per model" in md and "no verdict can be given" in md
    assert "**no verdict (one seed gives no estimate of the noise)**" in md
    assert "| fcn | 40.00 | 45.00 | +5.00 no verdict (1 seed) |" in md  # the number, never a verdict
    assert "helped" not in md and "hurt" not in md
