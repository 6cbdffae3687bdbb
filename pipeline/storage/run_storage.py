"""Where a training run keeps its checkpoints: ``<storage>/<run name>/checkpoint_epoch_NNNN/state.pt``,
``storage`` a local folder, a shared mount or any ``pyarrow.fs`` URI (``s3://...``)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from ctxseg.checkpoint import CHECKPOINT_FILE, load_training_checkpoint
from pipeline.storage.filesystems import filesystem

log = logging.getLogger("ctxseg.train")


def checkpoint_dir_name(epoch: int) -> str:
    return f"checkpoint_epoch_{epoch:04d}"


def _checkpoint_dirs(storage: str, ray_name: str) -> tuple:
    """(filesystem, paths of the run's ``checkpoint_epoch_*`` folders, oldest first)."""
    import pyarrow.fs as pafs

    fs, base = filesystem(storage)
    found = fs.get_file_info(pafs.FileSelector(f"{base}/{ray_name}", allow_not_found=True))
    return fs, sorted(i.path for i in found if i.type == pafs.FileType.Directory
                      and i.base_name.startswith("checkpoint_epoch_"))


def _read(fs, folder: str) -> dict:
    """The training state of one checkpoint folder; raises if it is incomplete (cut short by a full
    disk or a kill: the file is missing or does not load)."""
    import io

    import torch

    with fs.open_input_file(f"{folder}/{CHECKPOINT_FILE}") as fh:
        return torch.load(io.BytesIO(fh.read()), map_location="cpu", weights_only=True)


def newest_checkpoint(storage: str, ray_name: str, recorded) -> Optional[dict]:
    """The checkpoint furthest along that exists *now*: the newest complete ``checkpoint_epoch_*``
    folder of the run's storage (newer than Ray's record when a driver stopped between writing a
    checkpoint and Ray recording it; Ray may also have deleted older ones), else Ray's record.
    Incomplete folders met on the way are removed: they will never be completed."""
    fs, folders = _checkpoint_dirs(storage, ray_name)
    for folder in reversed(folders):
        try:
            return _read(fs, folder)
        except Exception as err:
            log.warning("removing incomplete checkpoint %s (%s)", folder, err.__class__.__name__)
            _delete(fs, folder)
    return checkpoint_payload(recorded)


def checkpoint_payload(recorded) -> Optional[dict]:
    """The training state of a checkpoint Ray recorded (a ``ray.train`` / ``ray.tune`` ``Checkpoint``),
    None when there is none or it cannot be read (Ray's own record is left to Ray)."""
    if recorded is None:
        return None
    try:
        with recorded.as_directory() as local:
            return load_training_checkpoint(Path(local))
    except Exception as err:
        log.warning("skipping incomplete checkpoint %s (%s)", recorded.path, err.__class__.__name__)
        return None


def last_checkpoint_name(storage: str, ray_name: str) -> Optional[str]:
    _, folders = _checkpoint_dirs(storage, ray_name)
    return folders[-1].rsplit("/", 1)[-1] if folders else None


def _delete(fs, folder: str) -> None:
    try:
        fs.delete_dir(folder)
    except (FileNotFoundError, OSError):
        pass


def clear_storage(storage: str, ray_name: str) -> None:
    """Remove a run's checkpoints (its config changed, or it had finished)."""
    fs, base = filesystem(storage)
    _delete(fs, f"{base}/{ray_name}")


def remove_incomplete_checkpoints(storage: str, ray_name: str) -> list[str]:
    """Delete the run's checkpoint folders whose state cannot be read (cut short by a full disk or a
    kill); return their names. A complete checkpoint is never touched."""
    fs, folders = _checkpoint_dirs(storage, ray_name)
    removed = []
    for folder in folders:
        try:
            _read(fs, folder)
        except Exception:
            _delete(fs, folder)
            removed.append(folder.rsplit("/", 1)[-1])
    return removed
