"""Multi-node placement: a simulated 2-node Ray cluster runs the 2 DDP ranks on different nodes."""
from __future__ import annotations

import copy

import pytest

from conftest import TINY
from ctxseg.config import deep_merge, parse_params
from pipeline import common
from pipeline.train import train_model

pytestmark = pytest.mark.slow


def test_two_workers_spread_over_two_nodes(tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    from ctxseg.data import download_dataset, prepare_dataset

    params = parse_params(deep_merge(copy.deepcopy(TINY), {
        "models": {"spread": {"context": "none"}},
        "scaling": {"num_workers": 2, "cpus_per_worker": 1},
        "train": {"epochs": 1},
        "ray": {"storage_path": str(tmp_path / "shared_storage")},  # one file system for both "nodes"
    }))
    paths = common.Paths(params, tmp_path)
    download_dataset(params.data, paths.raw)
    prepare_dataset(params.data, paths.raw, paths.prepared)

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    try:
        ray.init(address=cluster.address)
        cluster.wait_for_nodes()
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        summary = train_model(params, "spread", paths)
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert summary["history"][-1]["num_nodes"] == 2
    assert summary["ray_run"].startswith(str(tmp_path / "shared_storage" / "spread"))
    assert (tmp_path / "models" / "spread" / "model.pt").is_file()
