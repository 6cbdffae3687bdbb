"""The recording behind "every stage declares every param it reads" (the check itself runs on the real
``dvc repro`` in test_pipeline_e2e.py). Recording patches the config classes, so it runs in a child
process and the rest of the suite reads params unpatched."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from params_declared import covered, undeclared_reads

ROOT = Path(__file__).resolve().parents[1]

READER = """
from ctxseg.config import load_params, params_to_dict, parse_params
params = load_params({params!r})
params.train.epochs                         # train.epochs
params.model_config_of("fcn_acf").acf.heads  # models.fcn_acf.acf.heads (not all of `models`)
params.data.augment                         # a block: not a read of every key in it
params.data.augment.crop_size               # data.augment.crop_size
params.evaluate.scales                      # a list is a value
params.train.epochs                         # recorded once
worker = parse_params(params_to_dict(params))  # as a Ray worker rebuilds params
worker.scaling.num_workers
"""


def record(tmp_path: Path, stage: str, enabled: bool = True) -> Path:
    folder = tmp_path / "reads"
    env = {"PATH": "/usr/bin:/bin", "DVC_STAGE": stage}
    if enabled:
        env["CTXSEG_PARAM_READS"] = str(folder)
    subprocess.run([sys.executable, "-c", READER.format(params=str(ROOT / "params.yaml"))], cwd=ROOT, env=env,
                   check=True)
    return folder


def test_reads_are_recorded_per_stage_as_dotted_leaf_keys(tmp_path):
    folder = record(tmp_path, "train@fcn_acf")
    files = list(folder.glob("*.txt"))
    assert len(files) == 1 and files[0].name.startswith("train@fcn_acf.")
    lines = files[0].read_text().splitlines()
    assert lines == ["train.epochs", "models.fcn_acf.acf.heads", "data.augment.crop_size", "evaluate.scales",
                     "scaling.num_workers"]


def test_nothing_is_recorded_when_off(tmp_path):
    folder = record(tmp_path, "train@fcn", enabled=False)
    assert not folder.exists()


def test_block_declarations_cover_their_keys():
    assert covered("train.amp", {"train"})
    assert covered("models.fcn.acf.heads", {"models.fcn"})
    assert not covered("models.fcn_acf.acf.heads", {"models.fcn"})
    assert not covered("data.eval_short_side", {"data.name", "data.augment"})


def test_run_settings_need_no_declaration(tmp_path):
    folder = tmp_path / "reads"
    folder.mkdir()
    (folder / "train@fcn.1.txt").write_text("ray.num_cpus\nmlflow.experiment\ntrain.epochs\n")
    lock = tmp_path / "dvc.lock"
    lock.write_text(yaml.safe_dump({"schema": "2.0", "stages": {"train@fcn": {"cmd": "x", "params": {
        "params.yaml": {"seed": 0}}}}}))
    assert undeclared_reads(lock, folder) == {"train@fcn": ["train.epochs"]}


def test_undeclared_reads_names_stage_and_key(tmp_path):
    folder = record(tmp_path, "evaluate@fcn_acf")
    lock = tmp_path / "dvc.lock"
    lock.write_text(yaml.safe_dump({"schema": "2.0", "stages": {"evaluate@fcn_acf": {"cmd": "x", "params": {
        "params.yaml": {"train": {}, "models.fcn_acf": {}, "data.augment": {}, "evaluate": {}}}}}}))
    assert undeclared_reads(lock, folder) == {"evaluate@fcn_acf": ["scaling.num_workers"]}
