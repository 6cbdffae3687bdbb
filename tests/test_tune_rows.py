"""Sweep result rows read from Ray Tune's results (no Ray needed: the results are stand-ins), and the
MLflow children reconciled with them."""
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


def test_a_trial_that_errored_before_reporting_is_named_by_its_tune_id():
    frame = pd.DataFrame({"val_mIoU": []})
    errored = SimpleNamespace(metrics={}, metrics_dataframe=frame, config={"acf.heads": 1}, error=RuntimeError("x"),
                              path="/s/kxh/tuner/run_trial_457b1_00003_3_acf_heads=1_2026-12-07_14-27-03")
    [row] = result_rows([errored], PARAMS, SWEEP, "kxh")
    assert row["trial_id"] == "457b1_00003" and row["status"] == "ERROR"


def test_children_tell_tunes_truth_and_a_discarded_attempt_is_deleted(tmp_path):
    """Each row's MLflow child ends as Tune says; a child of a trial no Tuner knows (an attempt cut
    short before Tune's first snapshot, started afresh) is KILLED, tagged DISCARDED and soft-deleted."""
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    from pipeline.ray_cluster.tune_trial import reconcile_children

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("ctxseg")
    parent = client.create_run(experiment).info.run_id
    child = {t: client.create_run(experiment, tags={"mlflow.parentRunId": parent, "trial_id": t}).info.run_id
             for t in ("aaaaa_00000", "aaaaa_00001", "fffff_00000")}
    rows = [{"trial_id": "aaaaa_00000", "status": "STOPPED", "epochs": 1},
            {"trial_id": "aaaaa_00001", "status": "ERROR", "epochs": 0}]
    reconcile_children(client, experiment, parent, rows)
    assert [r["mlflow_run_id"] for r in rows] == [child["aaaaa_00000"], child["aaaaa_00001"]]
    stopped, errored, gone = (client.get_run(child[t]) for t in ("aaaaa_00000", "aaaaa_00001", "fffff_00000"))
    assert stopped.info.status == "FINISHED" and stopped.data.tags["tune_status"] == "STOPPED"
    assert errored.info.status == "FAILED" and errored.data.tags["tune_status"] == "ERROR"
    assert gone.info.status == "KILLED" and gone.data.tags["tune_status"] == "DISCARDED"
    assert gone.info.lifecycle_stage == "deleted"
    listed = client.search_runs([experiment], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    assert {r.info.run_id for r in listed} == {child["aaaaa_00000"], child["aaaaa_00001"]}
    every = client.search_runs([experiment], run_view_type=ViewType.ALL)
    assert child["fffff_00000"] in {r.info.run_id for r in every}, "soft-deleted: still restorable"
