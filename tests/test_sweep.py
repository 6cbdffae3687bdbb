"""ctxseg.sweep: the sweep's plain-data logic (trial params, seed repeats, noise verdict, best.yaml)."""
from __future__ import annotations

import csv
import io
import math

import yaml

from ctxseg.config import parse_params
from ctxseg.sweep import (best_command, best_is_distinguishable, best_configs, best_yaml_text, noise_level, noise_verdict, repeat_targets,
                          results_csv, trial_params)

PARAMS = parse_params({
    "models": {"fcn_acf": {"context": "acf"}},
    "tune": {"enabled": True, "epochs": 4, "sweeps": {"kxh": {"model": "fcn_acf", "search": "grid", "space": {
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


def test_repeat_targets_are_the_best_and_worst_full_length_trials():
    # t2 ran 2 of 4 epochs (stopped early): not a like-for-like worst; t3 has no score
    assert [r["trial_id"] for r in repeat_targets(GRID)] == ["t1", "t0"]
    assert repeat_targets(GRID[:1]) == [] and repeat_targets([GRID[0], GRID[3]]) == []
    # repeats themselves are never chosen again
    assert [r["trial_id"] for r in repeat_targets(GRID + [row("r0", 0.9, 1, 2, repeat_of="t1")])] == ["t1", "t0"]


def test_noise_level_compares_like_with_like():
    """The grid's spread is taken over the trials that ran every epoch (not against an early-stopped one), and
    seed noise over repeats at equal epochs: sd = sqrt(mean(d^2) / 2), 95% band t(df = pairs) sqrt(2) sd."""
    from scipy.stats import t

    assert noise_level(GRID) is None
    assert "cannot be told apart" in noise_verdict(None)
    noisy = GRID + [row("r0", 0.25, 1, 2, repeat_of="t1", seed=1), row("r1", 0.33, 1, 1, repeat_of="t0", seed=1)]
    level = noise_level(noisy)
    assert math.isclose(level["grid_spread"], 0.34 - 0.30), "t2 (2 epochs, 0.20) is not compared with 4-epoch trials"
    sd = math.sqrt((0.09 ** 2 + 0.03 ** 2) / 2 / 2)
    assert math.isclose(level["seed_sd"], sd) and math.isclose(level["seed_spread"], 0.09)
    assert math.isclose(level["half_width"], t.ppf(0.975, 2) * math.sqrt(2) * sd)
    verdict = noise_verdict(level)
    assert "4.00" in verdict and "all 4 epochs" in verdict and "not distinguishable at this budget" in verdict
    assert not best_is_distinguishable(level)
    wide = [row("t0", 0.30, 1, 1), row("t1", 0.50, 1, 2), row("t4", 0.31, 2, 2),
            row("r0", 0.501, 1, 2, repeat_of="t1", seed=1), row("r1", 0.299, 1, 1, repeat_of="t0", seed=1)]
    assert "lead is more than seed noise" in noise_verdict(noise_level(wide)) and best_is_distinguishable(noise_level(wide))
    # a wide grid whose top two are close: no single best
    close = wide + [row("t5", 0.4995, 2, 1)]
    assert "not distinguishable from the next" in noise_verdict(noise_level(close))
    assert not best_is_distinguishable(noise_level(close))


def test_best_ignores_repeats_and_best_yaml_is_params_vocabulary():
    rows = GRID + [row("r0", 0.99, 2, 1, repeat_of="t2", seed=1)]  # a lucky repeat must not win
    best, overrides = best_configs(PARAMS, rows)
    assert overrides == {"fcn_acf": {"acf.mixtures": 1, "acf.heads": 2}}
    assert best_command(overrides) == "dvc exp run -S '++models.fcn_acf.acf.mixtures=1' -S '++models.fcn_acf.acf.heads=2'"
    text = best_yaml_text(PARAMS, rows)
    parse_params(yaml.safe_load(text))
    assert "kxh: No seed repeats ran" in text and "trial t1" in text
    # the evidence does not support the choice, so the command is no recommendation
    assert "NOT A RECOMMENDATION for sweep(s) kxh" in text and "#   dvc exp run" not in text
    supported = GRID[:2] + [row("t4", 0.10, 2, 2), row("r0", 0.341, 1, 2, repeat_of="t1", seed=1),
                            row("r1", 0.101, 2, 2, repeat_of="t4", seed=1)]
    strong = best_yaml_text(PARAMS, supported)
    assert "NOT A RECOMMENDATION" not in strong and f"#   {best_command(best_configs(PARAMS, supported)[1])}" in strong
    off = best_yaml_text(PARAMS.model_copy(update={"tune": PARAMS.tune.model_copy(update={"enabled": False})}), rows)
    assert off.startswith("# Sweeps are off") and yaml.safe_load(off) is None


def test_results_csv_has_seed_and_repeat_columns():
    text = results_csv(GRID[:1] + [row("r0", 0.3, 1, 1, repeat_of="t0", seed=1)], ["acf.mixtures", "acf.heads"])
    got = list(csv.DictReader(io.StringIO(text)))
    assert [(r["trial_id"], r["seed"], r["repeat_of"]) for r in got] == [("t0", "0", ""), ("r0", "1", "t0")]
