"""The dataset registry (one module per dataset) and the data layer's import graph (no cycles)."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from ctxseg.data import DataConfig, dataset_names, get_dataset, get_dataset_info
from ctxseg.data.datasets import DatasetSpec

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "ctxseg" / "data"

NUM_CLASSES = {"synthetic": 13, "ade20k": 150, "voc_aug": 21, "pascal_context": 60, "pascal_context59": 59,
               "coco_stuff164k": 171, "coco_stuff10k": 171, "cityscapes": 19, "lip": 20, "cihp": 20, "camvid": 11}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _data_modules() -> dict:
    return {_module_name(p): p for p in sorted(DATA.rglob("*.py"))}


def _imports(path: Path, modules: dict) -> set:
    """Every ctxseg.data module ``path`` imports, at module level or deferred inside a function."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                     for a in node.names]
        else:
            continue
        out.update(n for n in names if n in modules)
    return out


def test_registry_lists_every_dataset_with_its_classes():
    assert set(dataset_names()) >= set(NUM_CLASSES)
    for name in dataset_names():
        spec = get_dataset(name)
        assert isinstance(spec, DatasetSpec) and spec.name == name
        info = get_dataset_info(name)
        assert info.num_classes == len(info.class_names) == len(info.palette) > 0
        if name in NUM_CLASSES:
            assert info.num_classes == NUM_CLASSES[name], name
        assert spec.lister is not None and (spec.generate is not None or spec.instructions)


def test_unknown_dataset_name_suggests_the_closest():
    with pytest.raises(ValidationError, match="Did you mean `ade20k`"):
        DataConfig(name="ade2k")
    with pytest.raises(ValueError, match="unknown dataset 'nope'"):
        get_dataset("nope")


def test_params_reference_lists_the_registry():
    from ctxseg.config import params_reference_markdown

    row = next(ln for ln in params_reference_markdown().splitlines() if ln.startswith("| `data.name` |"))
    assert all(f"`{n}`" in row for n in dataset_names())


def test_no_dataset_name_outside_its_entry():
    """download, preprocess and transforms never test a dataset's name: hooks in the entry do."""
    for rel in ("download.py", "prepare.py", "transforms.py", "dataset.py", "sources.py", "layout.py"):
        code = ast.parse((DATA / rel).read_text())
        consts = {n.value for n in ast.walk(code) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
        assert not consts & set(dataset_names()), (rel, consts & set(dataset_names()))


def test_import_graph_has_no_cycle():
    modules = _data_modules()
    graph = {m: _imports(p, modules) - {m} for m, p in modules.items()}
    state: dict = {}
    stack: list = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycle = stack[stack.index(n):] + [n]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_no_framework_imports_in_the_data_layer():
    for path in DATA.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                for n in names:
                    assert n.split(".")[0] not in ("ray", "mlflow", "dvc"), (path, n)


def test_every_module_imports_first_in_a_fresh_interpreter():
    """Each ctxseg.data module imported first (forward and reverse order), ctxseg purged in between."""
    mods = sorted(_data_modules())
    script = (
        "import importlib, sys\n"
        f"mods = {mods!r}\n"
        "for order in (mods, mods[::-1]):\n"
        "    for m in order:\n"
        "        for k in [k for k in sys.modules if k == 'ctxseg' or k.startswith('ctxseg.')]:\n"
        "            del sys.modules[k]\n"
        "        importlib.import_module(m)\n"
        "    for m in order:\n"
        "        importlib.import_module(m)\n"
        "print('ok')\n")
    res = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-3000:]
