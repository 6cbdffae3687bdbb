"""Sweep result rows read from Ray Tune's results (no Ray needed: the results are stand-ins)."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pandas as pd

from ctxseg.config import parse_params
from pipeline.ray_cluster.tune_trial import result_rows

PARAMS = parse_params({"models": {"fcn_acf": {"context": "acf"}}, "tune": {"epochs": 3, "sweeps": {
    "kxh": {"model": "fcn_acf", "search": "grid", "space": {"acf.heads": {"grid": [1, 2]}}}}}})
SWEEP = PARAMS.tune.sweeps["kxh"]


def result(trial: str, frame, last: dict, heads: int = 1, error=None):
    return SimpleNamespace(metrics={"trial_id": trial, **last}, metrics_dataframe=frame,
                           config={"acf.heads": heads}, path=f"/x/{trial}", error=error)


def test_best_is_the_best_epoch_and_a_restored_trial_keeps_its_last_report():
    grid = [
        result("t0", pd.DataFrame({"val_mIoU": [0.2, 0.5, 0.4]}), {"val_mIoU": 0.4, "epoch": 3, "iteration": 6}),
        # restored by Tuner.restore, then stopped by ASHA: no metric in its dataframe, only the last report
        result("t1", None, {"val_mIoU": 0.27, "epoch": 2, "iteration": 4}, heads=2),
        result("t2", pd.DataFrame({"val_mIoU": [float("nan")]}), {"epoch": 0}, error=RuntimeError("boom")),
    ]
    rows = {r["trial_id"]: r for r in result_rows(grid, PARAMS, SWEEP, "kxh")}
    assert rows["t0"]["best_mIoU"] == 0.5 and rows["t0"]["status"] == "COMPLETED"
    assert rows["t1"]["best_mIoU"] == 0.27 and rows["t1"]["status"] == "STOPPED" and rows["t1"]["acf.heads"] == 2
    assert math.isnan(rows["t2"]["best_mIoU"]) and rows["t2"]["status"] == "ERROR"
    assert rows["t2"]["error"] == "boom"
