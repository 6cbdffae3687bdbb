"""Which params keys a process reads: the evidence behind the check that every DVC stage declares them.

DVC re-runs a stage only when a parameter it *declares* in ``dvc.yaml`` changes. A stage that reads
``data.eval_short_side`` without declaring it keeps stale outputs when the value changes. This module
records every params key read through the typed config (attribute access on :class:`ctxseg.config.Params`
and the models inside it) while ``$CTXSEG_PARAM_READS`` names a folder; the test suite runs the real
``dvc repro`` with it set and compares the keys each stage read with what ``dvc.lock`` says the stage
depends on (``tests/test_params_declared.py``).

Off (the variable unset) nothing is patched and reading params costs what it always did. On, the
config classes' ``__getattribute__`` record the dotted key of each field read, unless the value is a
config block or a mapping of blocks (reading ``params.models`` to reach ``models.fcn.context`` is not a
read of every model). Each process appends the keys it reads, once each, to
``<folder>/<stage>.<pid>.txt``; ``<stage>`` is DVC's ``$DVC_STAGE`` (Ray workers inherit it from the
stage that started their Ray).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator, Optional

from pydantic import BaseModel

ENV_VAR = "CTXSEG_PARAM_READS"

_paths: dict[int, str] = {}  # id(config block) -> its dotted key ("" for the root)
_blocks: dict[int, BaseModel] = {}  # keeps every watched block alive, so an id is never reused
_seen: set[str] = set()
_patched: set[type] = set()


def enabled() -> bool:
    return bool(os.environ.get(ENV_VAR))


def watch(params: BaseModel) -> None:
    """Record, from now on, every params key read through ``params`` (a no-op unless :func:`enabled`)."""
    if not enabled():
        return
    for block, key in _walk(params, ""):
        _paths[id(block)] = key
        _blocks[id(block)] = block
        if type(block) not in _patched:
            _patch(type(block))


def read_keys(folder: Path) -> dict[str, set[str]]:
    """The keys each stage read, from the files of a recording folder: ``{stage: {dotted keys}}``."""
    found: dict[str, set[str]] = {}
    for path in Path(folder).glob("*.txt"):
        stage = path.name.rsplit(".", 2)[0]
        found.setdefault(stage, set()).update(line for line in path.read_text().splitlines() if line)
    return found


def _walk(block: BaseModel, key: str) -> Iterator[tuple[BaseModel, str]]:
    yield block, key
    for name in type(block).model_fields:
        value = block.__dict__.get(name)
        child = f"{key}.{name}" if key else name
        if isinstance(value, BaseModel):
            yield from _walk(value, child)
        elif isinstance(value, dict):
            for entry, item in value.items():
                if isinstance(item, BaseModel):
                    yield from _walk(item, f"{child}.{entry}")


def _is_block(value: Any) -> bool:
    if isinstance(value, BaseModel):
        return True
    return isinstance(value, dict) and any(isinstance(v, BaseModel) for v in value.values())


def _patch(cls: type) -> None:
    inherited = cls.__getattribute__
    fields = frozenset(cls.model_fields)

    def __getattribute__(self: Any, name: str) -> Any:
        value = inherited(self, name)
        if name in fields and not _is_block(value):
            key: Optional[str] = _paths.get(id(self))
            if key is not None:
                _record(f"{key}.{name}" if key else name)
        return value

    cls.__getattribute__ = __getattribute__  # type: ignore[method-assign]
    _patched.add(cls)


def _record(key: str) -> None:
    if key in _seen:
        return
    _seen.add(key)
    folder = Path(os.environ[ENV_VAR])
    folder.mkdir(parents=True, exist_ok=True)
    stage = (os.environ.get("DVC_STAGE") or "no-stage").replace("/", "_")
    with open(folder / f"{stage}.{os.getpid()}.txt", "a", encoding="utf-8") as out:
        out.write(key + "\n")
