"""A stage never hangs: a sweep whose trials cannot get a worker (a placement group this test holds on
every CPU) ends, its trials marked ERROR in tune/results.csv and MLflow, and the stage says what was short.

Runs the real tune stage (:func:`pipeline.tune.run_all`) against this module's own local Ray instance,
started with the job settings a stage uses and a short worker start timeout.
"""
from __future__ import annotations

import copy
import csv
import threading
from pathlib import Path

import pytest

from conftest import ROOT, TINY
from ctxseg.config import deep_merge, parse_params
from pipeline import common
from pipeline.ray_cluster import ray_env

pytestmark = pytest.mark.slow

START = {"worker_start_timeout_s": 3, "worker_start_attempts": 2}


@pytest.fixture(scope="module")
def blocked_ray():
    """Local Ray with 2 CPUs, both held by a placement group nobody releases during the test."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    ray.init(address="local", num_cpus=2, log_to_driver=False,
             runtime_env=ray_env.runtime_env(ROOT, local=True, start_timeout_s=START["worker_start_timeout_s"]))
    hold = placement_group([{"CPU": 2}])
    ray.get(hold.ready(), timeout=120)
    yield
    remove_placement_group(hold)
    ray.shutdown()


def test_sweep_that_cannot_start_workers_ends_with_error_trials_and_a_reason(tmp_path, blocked_ray):
    from ctxseg.data import download_dataset, prepare_dataset
    from pipeline.tune import run_all

    params = parse_params(deep_merge(copy.deepcopy(TINY), {
        "ray": START, "train": {"max_failures": 0},
        "models": {"fcn_acf": {"context": "acf"}},
        "tune": {"enabled": True, "epochs": 1, "scheduler": "fifo", "seed_repeats": False, "cpus_per_worker": 1,
                 "sweeps": {"kxh": {"model": "fcn_acf", "search": "grid", "space": {"acf.heads": {"grid": [1, 2]}}}}},
    }))
    paths = common.Paths(params, tmp_path)
    download_dataset(params.data, paths.raw)
    prepare_dataset(params.data, paths.raw, paths.prepared)

    outcome: dict = {}

    def sweep():
        try:
            run_all(params, paths)
        except BaseException as err:  # noqa: BLE001 - handed to the test thread
            outcome["error"] = err

    worker = threading.Thread(target=sweep, daemon=True)
    worker.start()
    worker.join(timeout=600)  # a bound for a hang, not a speed limit: the failing path takes ~1 min here
    assert not worker.is_alive(), "the sweep hung waiting for workers"

    error = outcome.get("error")
    assert isinstance(error, common.StageFailed), repr(error)
    message = str(error)
    assert "2 of 2 trials failed" in message
    assert "Ray Train workers did not start" in message and "ray.worker_start_attempts" in message
    assert "asked for 1 x 1 CPU" in message and "0 of 2 CPU free" in message
    assert "placement group(s) hold or wait" in message
    assert "\n" not in message, "one line"

    rows = list(csv.DictReader((paths.tune / "results.csv").open()))
    assert [r["status"] for r in rows] == ["ERROR", "ERROR"]
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{Path(tmp_path) / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("ctxseg")
    children = client.search_runs([experiment.experiment_id], filter_string="tags.stage = 'tune' and tags.trial_id != ''")
    assert len(children) == 2
    assert all(c.info.status == "FAILED" and c.data.tags["tune_status"] == "ERROR" for c in children)
