"""A sweep interrupted before Tune's first experiment snapshot starts afresh instead of "restoring"
trials without a config (Tune's ``tuner.pkl`` does not hold the param space)."""
from __future__ import annotations

from pipeline.tune import restorable


def test_a_tuner_without_a_snapshot_is_not_restorable_and_one_with_a_snapshot_is(tmp_path):
    from ray import tune

    tune.Tuner(lambda config: None, param_space={"k": tune.grid_search([1, 2])},
               run_config=tune.RunConfig(name="tuner", storage_path=str(tmp_path)))
    path = tmp_path / "tuner"
    assert (path / "tuner.pkl").is_file()
    assert tune.Tuner.can_restore(str(path))  # Tune's own check: the file Tune writes at construction
    assert not restorable(str(path), None)    # ours: no snapshot yet, so nothing to resume
    (path / "experiment_state-2026-12-07_14-27-03.json").write_text("{}")
    assert restorable(str(path), None)
    assert not restorable(str(tmp_path / "missing"), None)
