"""params.yaml validation: typos, wrong types and out-of-range values stop with a precise message."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ctxseg.config import ConfigError, Params, load_params, parse_params

ROOT = Path(__file__).resolve().parents[1]


def shipped() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_shipped_params_validate_and_resolve_model_defaults():
    params = load_params(ROOT / "params.yaml")
    assert isinstance(params, Params)
    assert params.models, "at least one model is listed"
    for cfg in params.models.values():
        # every model entry inherits the shared `model` section
        assert cfg.backbone.name == params.model.backbone.name


def test_typo_key_names_key_and_suggests_fix():
    raw = shipped()
    raw["train"]["epcohs"] = 3
    with pytest.raises(ConfigError) as info:
        parse_params(raw)
    msg = str(info.value)
    assert "`train.epcohs`: unknown key" in msg
    assert "Did you mean `train.epochs`?" in msg
    assert "Allowed keys here:" in msg and "batch_size" in msg


def test_typo_in_nested_model_override():
    raw = shipped()
    raw["models"]["fcn"]["mcibi"] = {"fusoin": "add"}
    with pytest.raises(ConfigError) as info:
        parse_params(raw)
    msg = str(info.value)
    assert "`models.fcn.mcibi.fusoin`: unknown key" in msg
    assert "Did you mean `models.fcn.mcibi.fusion`?" in msg


def test_wrong_type_names_key_and_value():
    raw = shipped()
    raw["train"]["batch_size"] = "eight"
    with pytest.raises(ConfigError) as info:
        parse_params(raw)
    msg = str(info.value)
    assert "`train.batch_size` = 'eight'" in msg
    assert "integer" in msg


def test_out_of_range_value_names_bound():
    raw = shipped()
    raw["train"]["lr"] = -0.1
    with pytest.raises(ConfigError) as info:
        parse_params(raw)
    msg = str(info.value)
    assert "`train.lr` = -0.1" in msg
    assert "greater than 0" in msg


def test_bad_choice_lists_allowed_values():
    raw = shipped()
    raw["models"]["fcn"]["framework"] = "unet"
    with pytest.raises(ConfigError) as info:
        parse_params(raw)
    msg = str(info.value)
    assert "`models.fcn.framework` = 'unet'" in msg
    assert "'pspnet'" in msg and "'ocrnet'" in msg


def test_every_problem_is_reported_at_once():
    raw = shipped()
    raw["train"]["epochs"] = 0
    raw["evaluate"]["stride"] = "x"
    raw["bogus_section"] = {}
    with pytest.raises(ConfigError) as info:
        parse_params(raw)
    msg = str(info.value)
    assert "3 invalid setting(s)" in msg
    assert "`train.epochs` = 0" in msg and "`evaluate.stride`" in msg and "`bogus_section`: unknown key" in msg


def test_bad_model_name_rejected():
    raw = shipped()
    raw["models"]["../escape"] = {}
    with pytest.raises(ConfigError, match="model name '../escape'"):
        parse_params(raw)


def test_cross_field_check():
    raw = shipped()
    raw["train"]["min_lr"] = 1.0
    with pytest.raises(ConfigError, match=r"`train`.*min_lr \(1.0\) must be below lr"):
        parse_params(raw)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)


def test_stage_exits_before_work_on_bad_params(tmp_path, monkeypatch, capfd):
    """A stage given bad params fails with exit code 2 and the message, and writes nothing."""
    from pipeline import download

    raw = shipped()
    raw["data"]["synthetic"]["num_train"] = -5
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    code = download.main(["--params", str(tmp_path / "params.yaml")])
    assert code == 2
    assert "`data.synthetic.num_train` = -5" in capfd.readouterr().err
    assert not (tmp_path / "data").exists()


def test_readme_params_reference_is_generated_from_the_schema():
    """Every params key is documented in README.md; regenerate with `python -m ctxseg.config --readme README.md`."""
    from ctxseg.config import REFERENCE_END, REFERENCE_START, params_reference_markdown

    readme = (ROOT / "README.md").read_text()
    block = readme[readme.index(REFERENCE_START) + len(REFERENCE_START): readme.index(REFERENCE_END)]
    assert block.strip() == params_reference_markdown().strip(), (
        "README params reference is stale: run `.venv/bin/python -m ctxseg.config --readme README.md`"
    )
    for key in ("train.epochs", "tune.sweeps.<name>.space", "model.mcibi.alpha", "model.acf.heads", "data.source"):
        assert f"`{key}`" in block


@pytest.mark.parametrize("preset", sorted((ROOT / "presets").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_dataset_preset_validates_against_the_schema(preset):
    from ctxseg.config import apply_preset

    merged = apply_preset(ROOT / "params.yaml", preset)
    params = parse_params(merged)
    assert params.data.name != "synthetic", "a preset switches to its real dataset"
    assert params.scaling.use_gpu is True and params.train.amp == "bf16"
    assert params.data.augment.scale_range[1] >= 1.25


def test_preset_typo_is_rejected(tmp_path):
    from ctxseg.config import apply_preset

    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {epoch: 10}\n")
    with pytest.raises(ConfigError, match="`train.epoch`: unknown key. Did you mean `train.epochs`"):
        apply_preset(ROOT / "params.yaml", bad)
