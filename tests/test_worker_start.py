"""A stage never hangs: a sweep whose trials cannot get their resources (a placement group this test holds
on every CPU) ends after the worker start timeout, its MLflow run FAILED and resumable, and the stage says
what was short (Tune alone would wait for ever).

Runs the real tune stage (:func:`pipeline.tune.run_all`) against this module's own local Ray instance,
started with the job settings a stage uses and a short worker start timeout.
"""
from __future__ import annotations

import copy
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


def test_sweep_whose_trials_cannot_start_ends_with_a_reason(tmp_path, blocked_ray):
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
    assert message.startswith("Tune trials did not start") and "ray.worker_start_attempts" in message
    assert "asked for 1 x 1 CPU" in message and "0 of 2 CPU free" in message
    assert "placement group(s) hold or wait" in message
    assert "\n" not in message, "one line"

    assert not (paths.tune / "results.csv").exists()
    record = common.read_json(paths.tune / "ray" / "kxh" / "sweep.json", "", "")
    assert record["status"] == "running", "the next `dvc repro` resumes the sweep"
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{Path(tmp_path) / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("ctxseg")
    assert client.get_run(record["parent_run_id"]).info.status == "FAILED"
    children = client.search_runs([experiment.experiment_id], filter_string="tags.stage = 'tune' and tags.trial_id != ''")
    assert children == [], "no trial started, so none has a run"
