"""ctxseg's two file formats, written and read in this one module.

**Training checkpoint** — a folder holding ``state.pt``: the model's ``state_dict`` (the MCIBI memory
buffer included), the optimiser, the AMP scaler, :class:`ctxseg.engine.TrainState` and every random
generator (see :func:`ctxseg.engine.checkpoint_payload`). ``state.pt`` is written to a temporary name
and renamed, so a folder either holds a complete checkpoint or none.

**Model file** (``models/<model>/seeds/<seed>/model.pt``) — what inference needs and nothing else: the weights, the
model config, the class count and names, the dataset and the model name, plus a format tag. It is
self-contained: the config is stored with ``backbone.pretrained`` cleared (the ImageNet file it was
initialised from is recorded under ``pretrained_from``), so evaluate, predict and the registry never
read the pretrained file again.

Both are plain tensors and containers, read with ``torch.load(weights_only=True)``: loading a file can
never execute code stored in it.
"""
from __future__ import annotations

import dataclasses
import logging
import pickle
from pathlib import Path
from typing import Any, Optional, Union

import torch

from ctxseg.errors import UserError
from ctxseg.io import atomic_path

log = logging.getLogger(__name__)

__all__ = [
    "CHECKPOINT_FILE", "MODEL_FORMAT", "ModelFile", "ModelFileError", "write_model_file", "read_model_file",
    "load_model", "save_training_checkpoint", "load_training_checkpoint",
]

CHECKPOINT_FILE = "state.pt"
MODEL_FORMAT = "ctxseg.model/1"


class ModelFileError(UserError):
    """A model or checkpoint file cannot be used; the message names the file and the fix."""


@dataclasses.dataclass
class ModelFile:
    """The contents of a ``model.pt``."""

    weights: dict
    model_config: dict
    num_classes: int
    class_names: Optional[list] = None
    dataset: Optional[str] = None
    model_name: Optional[str] = None
    pretrained_from: Optional[str] = None
    source: str = ""

    def payload(self) -> dict:
        plain = dataclasses.asdict(self)
        plain.pop("source")
        return {"format": MODEL_FORMAT, "model": plain.pop("weights"), **plain}


def write_model_file(path: Path, *, weights: dict, model_config: dict, num_classes: int,
                     class_names: Optional[list] = None, dataset: Optional[str] = None,
                     model_name: Optional[str] = None) -> ModelFile:
    """Write a self-contained model file atomically; return what was written."""
    config = {**model_config, "backbone": dict(model_config.get("backbone") or {})}
    pretrained = config["backbone"].pop("pretrained", None)
    config["backbone"]["pretrained"] = None
    record = ModelFile(weights={k: v.detach().cpu() for k, v in weights.items()}, model_config=config,
                       num_classes=int(num_classes), class_names=list(class_names) if class_names else None,
                       dataset=dataset, model_name=model_name, pretrained_from=pretrained, source=str(path))
    with atomic_path(Path(path)) as tmp:
        torch.save(record.payload(), tmp)
    return record


def _unpickler_detail(err: BaseException) -> str:
    """The one informative line of torch's weights-only refusal (it also suggests weights_only=False,
    which must never be followed for an untrusted file)."""
    skip = ("Weights only load failed", "Check the documentation", "Please file an issue")
    for ln in (ln.strip() for ln in str(err).splitlines()):
        ln = ln.removeprefix("WeightsUnpickler error:").strip()
        if ln and not ln.startswith(skip):
            return ln
    return type(err).__name__


def read_model_file(path: Union[str, Path], expected_classes: Optional[int] = None) -> ModelFile:
    """Read a model file (``weights_only=True``); refuse anything that is not one, naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: trained model not found. Run `dvc repro train` first, or pass the "
                             "models/<model>/seeds/<seed>/model.pt it writes.")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # a pickle holding more than tensors and plain containers
        raise ModelFileError(f"{path}: refused: it holds objects other than weights and plain data, which a ctxseg "
                             f"model file never does (a tampered or foreign file; {_unpickler_detail(err)}). It was "
                             "not loaded and nothing in it ran. Use a model.pt written by the train stage.") from None
    except Exception as err:  # truncated file, not a torch file at all
        raise ModelFileError(f"{path}: cannot be read as a ctxseg model file ({err}). Re-run the train stage "
                             "to write it again.") from None
    missing = [k for k in ("model", "model_config", "num_classes") if not isinstance(payload, dict) or k not in payload]
    if missing:
        raise ModelFileError(f"{path}: not a ctxseg model file (missing {missing}); expected the "
                             "models/<model>/seeds/<seed>/model.pt written by the train stage")
    record = ModelFile(weights=payload["model"], model_config=payload["model_config"],
                       num_classes=int(payload["num_classes"]), class_names=payload.get("class_names"),
                       dataset=payload.get("dataset"), model_name=payload.get("model_name"),
                       pretrained_from=payload.get("pretrained_from"), source=str(path))
    if expected_classes is not None and record.num_classes != expected_classes:
        raise ModelFileError(
            f"{path}: the model predicts {record.num_classes} classes but the dataset has {expected_classes}. "
            "Retrain it on this dataset (dvc repro train) or pick the matching dataset in params.yaml (data.name)."
        )
    return record


def load_model(source: Union[str, Path, ModelFile], device: Union[str, torch.device] = "cpu",
               expected_classes: Optional[int] = None) -> tuple[torch.nn.Module, ModelFile]:
    """Rebuild the trained segmentor of a model file, in eval mode, on ``device``."""
    from ctxseg.models import ModelConfig, build_segmentor

    record = source if isinstance(source, ModelFile) else read_model_file(source, expected_classes)
    config = dict(record.model_config)
    config["backbone"] = {**(config.get("backbone") or {}), "pretrained": None}  # weights come from the file
    cfg = ModelConfig.model_validate(config)
    model = build_segmentor(cfg, record.num_classes)
    try:
        model.load_state_dict(record.weights)
    except RuntimeError as err:  # size mismatch / missing keys: the file's weights and its config disagree
        lines = str(err).strip().splitlines()
        raise ModelFileError(
            f"{record.source}: the weights do not fit the model described in the same file "
            f"({record.num_classes} classes, {cfg.framework}+{cfg.context}): "
            f"{' '.join(lines[1:3]) if len(lines) > 1 else lines[0]}. Re-run the train stage.") from None
    return model.to(device).eval(), record


def save_training_checkpoint(directory: Path, payload: dict) -> Path:
    """Write ``payload`` as ``<directory>/state.pt``; complete before it is visible."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / CHECKPOINT_FILE
    with atomic_path(target) as tmp:
        torch.save(payload, tmp)
    return target


def load_training_checkpoint(directory: Path, device: Union[str, torch.device] = "cpu") -> dict[str, Any]:
    """The training state saved in a checkpoint folder (tensors and plain data only)."""
    return torch.load(Path(directory) / CHECKPOINT_FILE, map_location=device, weights_only=True)
