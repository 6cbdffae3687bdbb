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


def test_docs_params_reference_is_generated_from_the_schema():
    """Every params key is documented in docs/params.md; regenerate with `python -m ctxseg.config --docs docs/params.md`."""
    from ctxseg.config import REFERENCE_DOC, REFERENCE_END, REFERENCE_START, params_reference_markdown

    assert REFERENCE_DOC == "docs/params.md" and REFERENCE_DOC in REFERENCE_START
    page = (ROOT / REFERENCE_DOC).read_text(encoding="utf-8")
    block = page[page.index(REFERENCE_START) + len(REFERENCE_START): page.index(REFERENCE_END)]
    assert block.strip() == params_reference_markdown().strip(), (
        "docs/params.md is stale: run `.venv/bin/python -m ctxseg.config --docs docs/params.md`"
    )
    assert f"python -m ctxseg.config --docs {REFERENCE_DOC}" in page  # the page says how to regenerate it
    assert REFERENCE_START not in (ROOT / "README.md").read_text(encoding="utf-8")  # one place only
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


# ------------------------------------------------------------------------------- hostile params (#14)


def test_empty_params_file_is_refused(tmp_path):
    for text in ("", "\n", "# only a comment\n", "---\n"):
        p = tmp_path / "params.yaml"
        p.write_text(text)
        with pytest.raises(ConfigError, match="params.yaml: the file is empty"):
            load_params(p)


def test_duplicate_keys_are_refused_with_both_lines(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("train:\n  epochs: 3\n  lr: 0.01\n  epochs: 40\n")
    with pytest.raises(ConfigError) as info:
        load_params(p)
    msg = str(info.value)
    assert "line 4: key 'epochs' is given twice" in msg and "first on line 2" in msg
    p.write_text("seed: 1\ntrain: {}\nseed: 2\n")  # at the top level too
    with pytest.raises(ConfigError, match="key 'seed' is given twice"):
        load_params(p)
    p.write_text("train: {epochs: 3}\nmodel: {epochs: 3}\n")  # the same key in two sections is not a duplicate
    with pytest.raises(ConfigError, match="`model.epochs`: unknown key"):
        load_params(p)


def test_duplicate_key_in_a_preset_is_refused(tmp_path):
    from ctxseg.config import apply_preset

    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: 10\n  epochs: 20\n")
    with pytest.raises(ConfigError, match="bad.yaml: line 3: key 'epochs' is given twice"):
        apply_preset(ROOT / "params.yaml", bad)


@pytest.mark.parametrize("name", ["fcn\n", "fcn\r", "fcn\x00", "fc\tn", " fcn", "fcn/x", ".hidden", "", "fcn\u2028"])
def test_model_and_sweep_names_with_control_characters_are_refused(name):
    raw = shipped()
    raw["models"][name] = {}
    with pytest.raises(ConfigError, match="model name .* must start with a letter or digit"):
        parse_params(raw)
    raw = shipped()
    sweep = next(iter(raw["tune"]["sweeps"].values()))
    raw["tune"]["sweeps"] = {name: sweep}
    with pytest.raises(ConfigError, match="sweep name .* must start with a letter or digit"):
        parse_params(raw)


def test_good_model_names_still_pass():
    raw = shipped()
    raw["models"]["ocr-2.v1_b"] = {}
    assert "ocr-2.v1_b" in parse_params(raw).models


@pytest.mark.parametrize("name", ["../../x", "..", ".", "a/b", "a\\b", "/abs", "exp\n", " exp", "exp\x00"])
def test_experiment_name_cannot_leave_the_artifact_root(name):
    raw = shipped()
    raw["mlflow"]["experiment"] = name
    with pytest.raises(ConfigError) as info:
        parse_params(raw)
    msg = str(info.value)
    assert "`mlflow.experiment`" in msg and "experiment name" in msg


def test_plain_experiment_names_pass():
    raw = shipped()
    raw["mlflow"]["experiment"] = "camvid study 2"
    assert parse_params(raw).mlflow.experiment == "camvid study 2"


def test_code_upload_keeps_every_module_and_leaves_out_data_models_and_stores():
    """The runtime_env working_dir excludes, applied by Ray's own matcher: nothing of ctxseg/ or pipeline/
    is left behind (an unanchored "data" once dropped ctxseg/data), and nothing but code is shipped."""
    from ray._private.runtime_env.packaging import _get_excludes

    from pipeline.ray_cluster.ray_env import UPLOAD_EXCLUDES

    excluded = _get_excludes(ROOT, UPLOAD_EXCLUDES)
    code = [p for pkg in ("ctxseg", "pipeline") for p in (ROOT / pkg).rglob("*.py") if "__pycache__" not in p.parts]
    assert len(code) > 50 and not [p for p in code if excluded(p)]
    for rel in ("data/prepared/synthetic/meta.json", "models/fcn/model.pt", "mlflow.db", "mlartifacts/1/x",
                "tune/ray/kxh/sweep.json", "metrics/fcn.json", ".venv/bin/python", "tests/test_config.py",
                "ctxseg/__pycache__/config.cpython-311.pyc", ".git/HEAD", ".dvc/cache/files/md5/00/x"):
        assert excluded(ROOT / rel), rel
