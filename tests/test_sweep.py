"""ctxseg.sweep: the sweep's plain-data logic (trial params, seed repeats, noise verdict, best.yaml)."""
from __future__ import annotations

import csv
import io
import math

import yaml

from ctxseg.config import parse_params
from ctxseg.sweep import (best_command, best_configs, best_yaml_text, noise_level, noise_verdict, repeat_targets,
                          results_csv, trial_params)

PARAMS = parse_params({
    "models": {"fcn_acf": {"context": "acf"}},
    "tune": {"epochs": 4, "sweeps": {"kxh": {"model": "fcn_acf", "search": "grid", "space": {
        "acf.mixtures": {"grid": [1, 2]}, "acf.heads": {"grid": [1, 2]}}}}},
})


def row(trial, miou, k, h, epochs=4, repeat_of="", seed=0):
    return {"sweep": "kxh", "trial_id": trial, "model": "fcn_acf", "status": "COMPLETED", "epochs": epochs,
            "iterations": 8 * epochs, "final_mIoU": miou, "best_mIoU": miou, "seed": seed, "repeat_of": repeat_of,
            "mlflow_run_id": "", "acf.mixtures": k, "acf.heads": h}


GRID = [row("t0", 0.30, 1, 1), row("t1", 0.34, 1, 2), row("t2", 0.20, 2, 1, epochs=2), row("t3", float("nan"), 2, 2)]


def test_trial_params_apply_overrides_epochs_and_seed():
    from ctxseg.config import params_to_dict

    tp = trial_params(params_to_dict(PARAMS), PARAMS, PARAMS.tune.sweeps["kxh"], {"acf.heads": 2}, epochs=2, seed=7)
    assert tp.models["fcn_acf"].acf.heads == 2 and tp.train.epochs == 2 and tp.seed == 7 and tp.train.val_every == 1
    plain = trial_params(params_to_dict(PARAMS), PARAMS, PARAMS.tune.sweeps["kxh"], {"acf.heads": 1})
    assert plain.train.epochs == 4 and plain.seed == PARAMS.seed


def test_repeat_targets_are_the_best_and_worst_finished_trials():
    assert [r["trial_id"] for r in repeat_targets(GRID)] == ["t1", "t2"]
    assert repeat_targets(GRID[:1]) == [] and repeat_targets([GRID[0], GRID[3]]) == []
    # repeats themselves are never chosen again
    assert [r["trial_id"] for r in repeat_targets(GRID + [row("r0", 0.9, 1, 2, repeat_of="t1")])] == ["t1", "t2"]


def test_noise_level_and_verdict():
    assert noise_level(GRID) is None
    assert "cannot be told apart" in noise_verdict(None)
    noisy = GRID + [row("r0", 0.25, 1, 2, repeat_of="t1", seed=1), row("r1", 0.22, 2, 1, epochs=2, repeat_of="t2", seed=1)]
    level = noise_level(noisy)
    assert math.isclose(level["grid_spread"], 0.34 - 0.20) and math.isclose(level["seed_spread"], 0.09)
    verdict = noise_verdict(level)
    assert "14.00" in verdict and "9.00" in verdict and "not distinguishable at this budget" in verdict
    quiet = GRID + [row("r0", 0.341, 1, 2, repeat_of="t1", seed=1), row("r1", 0.199, 2, 1, repeat_of="t2", seed=1)]
    assert "exceeds twice the seed noise" in noise_verdict(noise_level(quiet))


def test_best_ignores_repeats_and_best_yaml_is_params_vocabulary():
    rows = GRID + [row("r0", 0.99, 2, 1, repeat_of="t2", seed=1)]  # a lucky repeat must not win
    best, overrides = best_configs(PARAMS, rows)
    assert overrides == {"fcn_acf": {"acf.mixtures": 1, "acf.heads": 2}}
    assert best_command(overrides) == "dvc exp run -S '++models.fcn_acf.acf.mixtures=1' -S '++models.fcn_acf.acf.heads=2'"
    text = best_yaml_text(PARAMS, rows)
    parse_params(yaml.safe_load(text))
    assert "kxh: Grid spread" in text and "trial t1" in text


def test_results_csv_has_seed_and_repeat_columns():
    text = results_csv(GRID[:1] + [row("r0", 0.3, 1, 1, repeat_of="t0", seed=1)], ["acf.mixtures", "acf.heads"])
    got = list(csv.DictReader(io.StringIO(text)))
    assert [(r["trial_id"], r["seed"], r["repeat_of"]) for r in got] == [("t0", "0", ""), ("r0", "1", "t0")]
