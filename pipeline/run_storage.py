"""Where a training run keeps its checkpoints: ``<storage>/<run name>/checkpoint_epoch_NNNN/state.pt``,
``storage`` a local folder, a shared mount or any ``pyarrow.fs`` URI (``s3://...``)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from ctxseg.checkpoint import CHECKPOINT_FILE, load_training_checkpoint

log = logging.getLogger("ctxseg.train")


def checkpoint_dir_name(epoch: int) -> str:
    return f"checkpoint_epoch_{epoch:04d}"


def filesystem(storage: str):
    """(pyarrow filesystem, path on it) of a storage location."""
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri(storage) if "://" in storage else (pafs.LocalFileSystem(), storage)


def newest_checkpoint(storage: str, ray_name: str, recorded) -> Optional[dict]:
    """The checkpoint furthest along that exists *now*: the newest complete ``checkpoint_epoch_*``
    folder of the run's storage (newer than Ray's record when a driver stopped between writing a
    checkpoint and Ray recording it; Ray may also have deleted older ones), else Ray's record."""
    import pyarrow.fs as pafs
    from ray.train import Checkpoint

    fs, base = filesystem(storage)
    found = fs.get_file_info(pafs.FileSelector(f"{base}/{ray_name}", allow_not_found=True))
    names = sorted((i.base_name for i in found if i.type == pafs.FileType.Directory
                    and i.base_name.startswith("checkpoint_epoch_")), reverse=True)
    candidates = [Checkpoint(f"{base}/{ray_name}/{n}", filesystem=fs) for n in names]
    for checkpoint in candidates + ([recorded] if recorded is not None else []):
        try:
            with checkpoint.as_directory() as local:
                return load_training_checkpoint(Path(local))
        except Exception as err:  # partly written (disk full, killed mid-copy): try the one before
            log.warning("removing incomplete checkpoint %s (%s)", checkpoint.path, err.__class__.__name__)
            if checkpoint in candidates:  # ours, never to be completed; Ray's own record is left to Ray
                try:
                    fs.delete_dir(checkpoint.path)
                except (FileNotFoundError, OSError):
                    pass
    return None


def last_checkpoint_name(storage: str, ray_name: str) -> Optional[str]:
    import pyarrow.fs as pafs

    fs, base = filesystem(storage)
    found = fs.get_file_info(pafs.FileSelector(f"{base}/{ray_name}", allow_not_found=True))
    names = sorted(i.base_name for i in found if i.base_name.startswith("checkpoint_epoch_"))
    return names[-1] if names else None


def clear_storage(storage: str, ray_name: str) -> None:
    """Remove a run's checkpoints (its config changed, or it had finished)."""
    fs, base = filesystem(storage)
    try:
        fs.delete_dir(f"{base}/{ray_name}")
    except (FileNotFoundError, OSError):
        pass


def remove_incomplete_checkpoints(storage: str, ray_name: str) -> list[str]:
    """Delete the run's checkpoint folders whose state cannot be read (cut short by a full disk or a
    kill); return their names. A complete checkpoint is never touched."""
    import pyarrow.fs as pafs

    fs, base = filesystem(storage)
    found = fs.get_file_info(pafs.FileSelector(f"{base}/{ray_name}", allow_not_found=True))
    removed = []
    for info in found:
        if info.type != pafs.FileType.Directory or not info.base_name.startswith("checkpoint_epoch_"):
            continue
        try:
            with fs.open_input_file(f"{info.path}/{CHECKPOINT_FILE}") as fh:
                import io

                import torch

                torch.load(io.BytesIO(fh.read()), map_location="cpu", weights_only=True)
        except Exception:
            fs.delete_dir(info.path)
            removed.append(info.base_name)
    return removed

