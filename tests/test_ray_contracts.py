"""Where the pipeline works around Ray's own behaviour (the pinned version), checked against Ray itself:
a sweep interrupted before Tune's first experiment snapshot starts afresh instead of "restoring" trials
without a config (Tune's ``tuner.pkl`` does not hold the param space), and a stage that owns its local
Ray starts no placement-group cleaner actor."""
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


def test_a_stage_owned_trainer_starts_every_default_callback_but_the_placement_group_cleaner(tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    from pipeline.ray_cluster.ray_train import without_placement_group_cleaner

    def kinds(trainer) -> set:
        return {type(callback) for callback in trainer._create_default_callbacks()}

    args = dict(train_loop_per_worker=lambda config: None, scaling_config=ScalingConfig(num_workers=1),
                run_config=RunConfig(name="t", storage_path=str(tmp_path)))
    stock, owned = kinds(TorchTrainer(**args)), kinds(without_placement_group_cleaner(TorchTrainer)(**args))
    assert PlacementGroupCleanerCallback in stock  # Ray still has it: otherwise this subclass is moot
    assert owned == stock - {PlacementGroupCleanerCallback}
