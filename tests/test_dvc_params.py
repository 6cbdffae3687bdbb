"""params.yaml survives DVC's own writer: ``dvc exp run -S key=value`` rewrites the whole file (ruamel,
YAML 1.2: quotes dropped, nulls written empty), and every stage must read back the same values.

The overrides go through :func:`dvc.utils.hydra.apply_overrides`, the function ``dvc exp run -S`` and
``dvc exp run --queue -S`` call on params.yaml, so the file written here is byte for byte DVC's.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from dvc.utils.hydra import apply_overrides

from ctxseg.config import flatten, load_params, params_to_dict, read_yaml

ROOT = Path(__file__).resolve().parents[1]


def hydra_value(value: Any) -> str:
    """``value`` as a user types it after ``-S key=``: plain words unquoted (``off``, ``fcn``), the rest
    in Hydra's grammar."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        plain = value and all(c.isalnum() or c in "_-./" for c in value)
        return value if plain else "'" + value.replace("'", "\\'") + "'"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {hydra_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(type(value))


def leaf_overrides(tree: dict, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) for every leaf of params.yaml. A mapping whose keys hold a dot (a sweep's
    ``space: {acf.mixtures: ...}``) cannot be addressed key by key in Hydra's grammar: it is set whole."""
    out = []
    for key, value in tree.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value and not any("." in str(k) for k in value):
            out += leaf_overrides(value, dotted)
        else:
            out.append((dotted, value))
    return out


SHIPPED = read_yaml(ROOT / "params.yaml")
LEAVES = leaf_overrides(SHIPPED)


def test_every_leaf_of_the_shipped_params_is_listed():
    keys = {k for k, _ in LEAVES}
    assert {"train.amp", "data.source", "models.fcn_acf.context", "tune.sweeps.acf_kxh.space",
            "evaluate.scales", "report.title"} <= keys
    assert len(keys) > 90


@pytest.mark.parametrize("key,value", LEAVES, ids=[k for k, _ in LEAVES])
def test_dvc_set_param_round_trip_keeps_every_value(tmp_path, key, value):
    params_file = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params_file)
    before = params_to_dict(load_params(params_file))
    apply_overrides(str(params_file), [f"{key}={hydra_value(value)}"])
    assert params_file.read_text() != (ROOT / "params.yaml").read_text(), "DVC rewrote the file"
    after = params_to_dict(load_params(params_file))
    assert flatten(after) == flatten(before)


def test_off_without_quotes_is_the_string_off(tmp_path):
    """The case that broke every stage: DVC writes ``amp: off``; YAML 1.1 would read False."""
    params_file = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params_file)
    apply_overrides(str(params_file), ["train.epochs=3"])
    text = params_file.read_text()
    assert "amp: off" in text and 'amp: "off"' not in text
    assert yaml.safe_load(text)["train"]["amp"] is False  # what PyYAML's YAML 1.1 reading would give
    params = load_params(params_file)
    assert params.train.amp == "off" and params.train.epochs == 3


def test_yaml_1_2_booleans_only(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("a: off\nb: yes\nc: on\nd: n\ne: true\nf: False\ng: null\nh: ~\ni:\n")
    assert read_yaml(path) == {"a": "off", "b": "yes", "c": "on", "d": "n", "e": True, "f": False,
                               "g": None, "h": None, "i": None}


def test_printed_add_or_set_form_reaches_a_model_without_that_block(tmp_path):
    """``models.fcn_acf`` has no ``acf`` block in params.yaml, so DVC refuses ``-S models.fcn_acf.acf.heads=4``
    ("not in struct"); ``++`` adds or sets it, and works a second time too."""
    params_file = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params_file)
    from dvc.exceptions import InvalidArgumentError

    with pytest.raises(InvalidArgumentError):
        apply_overrides(str(params_file), ["models.fcn_acf.acf.heads=4"])
    apply_overrides(str(params_file), ["++models.fcn_acf.acf.heads=4"])
    apply_overrides(str(params_file), ["++models.fcn_acf.acf.mixtures=1"])
    params = load_params(params_file)
    assert (params.models["fcn_acf"].acf.heads, params.models["fcn_acf"].acf.mixtures) == (4, 1)
    assert params.models["fcn_acf"].acf.output == params.model.acf.output, "the rest still inherits"
    apply_overrides(str(params_file), ["++models.fcn_acf.acf.heads=2"])
    assert load_params(params_file).models["fcn_acf"].acf.heads == 2
