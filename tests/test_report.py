"""The report builds from fabricated evaluate / train / tune outputs and shows every table."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ctxseg.config import parse_params
from ctxseg.evaluation import headline_metrics
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
    "pspnet_acf": ({"framework": "pspnet", "context": "acf"}, 0.49, 0.515),
}

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


def fabricate(root: Path, *, sweep: bool = True, **report) -> tuple:
    settings = {"latency_in_channels": 16, "latency_size": 8, "latency_channels": 16, "latency_repeats": 1,
                "register_model": False, "qualitative_images": 2, **report}
    params = parse_params({"models": {k: v[0] for k, v in MODELS.items()}, "report": settings,
                           "mlflow": {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}"}})
    paths = common.Paths(params, root=root)
    make_prepared(paths.prepared, n=2, size=16)
    meta = json.loads((paths.prepared / "meta.json").read_text())
    meta["synthetic"] = {"groups": {"water": ["sea", "lake"]}}  # look-alikes told apart only by context
    (paths.prepared / "meta.json").write_text(json.dumps(meta))
    rng = np.random.default_rng(0)
    for i, (name, (_, miou, ms)) in enumerate(MODELS.items()):
        per_class = {c: miou + 0.01 * k for k, c in enumerate(CLASSES)}
        metrics = {"model": name, "mIoU": miou, "pixAcc": 0.8, "mAcc": 0.5, "per_class_iou": per_class,
                   "num_images": 2, "num_params": 1_500_000,
                   "ms_flip": {"mIoU": ms, "pixAcc": 0.81, "mAcc": 0.51, "scales": [0.75, 1.0], "flip": True}}
        paths.metrics.mkdir(parents=True, exist_ok=True)
        paths.metrics_file(name).write_text(json.dumps(headline_metrics(metrics)))  # what DVC shows
        (paths.metrics / f"{name}.details.json").write_text(json.dumps(metrics))  # what report/register read
        run_dir = paths.model_dir(name)
        run_dir.mkdir(parents=True, exist_ok=True)
        history = [{"epoch": e, "iteration": 5 * e, "train_loss": 2.0 / e, "val_mIoU": miou * e / 2} for e in (1, 2)]
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

    params, paths = fabricate(tmp_path)
    md_path = write_report(params, paths)
    md = md_path.read_text()

    # main results, MCIBI Table 5 layout: mIoU (single / ms+flip) and deltas against the fcn baseline
    assert "Main results (MCIBI Table 5 layout)" in md
    assert "| fcn | 40.00 / 42.00 | 45.00 / 47.00 | +5.00 / +5.00 | 43.00 / 44.00 | +3.00 / +2.00 |" in md
    assert "| pspnet | 50.00 / 52.00 | – | – | 49.00 / 51.50 | -1.00 / -0.50 |" in md
    assert "`pspnet_acf` (pspnet +ACF): -1.00 mIoU points over `pspnet`" in md and "**hurt** here" in md
    assert "| fcn | fcn | none | default | 40.00 |" in md
    assert "| fcn_mcibi_add | fcn | mcibi | mcibi.fusion=add | 41.00 | +1.00 |" in md
    # the classes only context can tell apart
    assert "(water: sea, lake)" in md
    assert "| fcn | 40.00 | 41.00 | 40.50 |  |" in md and "| fcn_mcibi | 45.00 | 46.00 | 45.50 | +5.00 |" in md
    # the headline answers the question, with the cost
    assert "`fcn_mcibi` (fcn +MCIBI): +5.00 mIoU points over `fcn`" in md and "GFLOPs" in md
    # MCIBI Table 1: the three fusions, ordered add / weighted add / concat, with the baseline
    assert "MCIBI Table 1" in md
    t1 = md[md.index("MCIBI Table 1"):md.index("MCIBI Table 2")]
    assert t1.index("add (R + C_bi)") < t1.index("weighted add") < t1.index("concat (Eq 4)")
    assert "| fcn_mcibi_weighted | weighted add | 42.00 | +2.00 | – |" in t1
    # MCIBI Table 2: update mean and RCL off
    t2 = md[md.index("MCIBI Table 2"):]
    assert "| fcn_mcibi_mean | random | mean | poly (p=0.9) | ✗ | 44.00 | +4.00 | – |" in t2
    # sweep: the K x H grid keeps the best trial per cell (t3/t4 -> 40.00); the failed trial is blank
    assert "CFNet Table 3" in md
    assert "| 2 | 36.00 | 40.00 |" in md and "| 1 | 31.00 | – |" in md
    assert "8 trials (5 COMPLETED, 1 ERROR, 2 STOPPED)" in md
    assert "| 0.5 | 44.00 | 1 |" in md and "| 0.9 | 42.00 | 2 |" in md  # mIoU against m0
    assert "mIoU against mcibi.alpha" in md and "mIoU against mcibi.beta" in md
    assert "`fcn_acf`: trial `t4` (acf.mixtures=2, acf.heads=4), mIoU 40.00%" in md
    assert "`fcn_mcibi`: trial `t7` (mcibi.momentum=0.5, mcibi.alpha=0.4, mcibi.beta=1), mIoU 44.00%" in md
    # the seed repeats (r1, r2) are not grid cells: (1, 1) keeps t1's 31.00 above; they give the noise level
    assert "| t4 | 40.00 | 37.00 | -3.00 |" in md and "| t1 | 31.00 | 33.00 | +2.00 |" in md
    assert ("`acf_kxh`: Grid spread 9.00 mIoU points; seed-to-seed spread of the repeated configurations 3.00. "
            "The grid's spread exceeds twice the seed noise") in md
    assert "`mcibi_loss`: No seed repeats ran" in md
    assert "acf.heads: 4" in md  # tune/best.yaml
    # complexity: ours in both conventions beside the paper's figures, labelled as such
    assert "Complexity (MCIBI Table 3)" in md and "paper: params (M)" in md and "V100" in md
    assert "GFLOPs (2/MAC, with attention)" in md and "GMACs (layers only)" in md and "paper: GMACs" in md
    # ours: params, GFLOPs, GMACs, measured latency; then the paper's params, GMACs and V100 time
    assert re.search(r"\| DCA \| 15\.16 \| 773\.8 \| 248\.2 \| [\d.]+ \| 14\.82 \| 242\.8 \| 47\.6 \|", md)
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
    assert "<table>" in html and "40.00 / 42.00" in html
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
    assert "## Complexity" not in md and "GFLOPs" not in md
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
