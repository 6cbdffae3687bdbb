"""The commands the README and the documentation (README.md and every docs/*.md) print work as written:
every `dvc exp run ... -S ...` line of their shell code blocks is handed to the real DVC with ``--dry
--single-item source`` in a scratch copy of the project (DVC parses and applies each ``-S`` to params.yaml exactly as for a real run, then runs nothing: a dry run of
the whole DAG would look for the inputs of stages that have not run yet), and every ``make`` target it
names exists."""
from __future__ import annotations

import re
import shlex
import subprocess

import pytest

from conftest import ROOT, make_project, run

DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TEXT = "\n".join(path.read_text(encoding="utf-8") for path in DOCUMENTS)
FENCE = re.compile(r"^\s*```\s*(\w*)")


def code_lines() -> list[str]:
    """The lines of every shell (or unlabelled) fenced code block, each document on its own, comments cut."""
    lines, inside, shell = [], False, False
    for path in DOCUMENTS:
        for line in path.read_text(encoding="utf-8").splitlines():
            fence = FENCE.match(line)
            if fence:
                inside, shell = not inside, fence.group(1) in ("", "bash", "sh", "shell")
            elif inside and shell and line.strip():
                lines.append(line.split("  #")[0].strip())
        assert not inside, f"{path.name}: a code block is not closed"
    return lines


EXP_RUNS = [line for line in code_lines() if line.startswith("dvc exp run") and " -S " in line]


def test_readme_shows_experiment_commands_with_set_params():
    assert len(DOCUMENTS) > 5, "docs/*.md not found"
    assert len(EXP_RUNS) >= 3
    assert any("--queue" in line for line in EXP_RUNS)


@pytest.mark.parametrize("line", EXP_RUNS)
def test_readme_dvc_exp_run_line_is_accepted_by_dvc(tmp_path, line):
    project = make_project(tmp_path / "study", {}, replace={})  # the shipped params.yaml, untouched
    args = shlex.split(line)
    args = [a for a in args if a != "--queue"]
    if "-n" in args:  # a name is not needed for a dry run
        i = args.index("-n")
        del args[i:i + 2]
    dry = run(args[:3] + ["--dry", "--single-item"] + args[3:] + ["source"], project)
    assert dry.returncode == 0, f"{line}\n{dry.stderr[-2000:]}"
    assert "Invalid `--set-param`" not in dry.stderr


def test_the_broken_form_is_refused_so_the_check_means_something(tmp_path):
    project = make_project(tmp_path / "study", {}, replace={})
    dry = run(["dvc", "exp", "run", "--dry", "--single-item", "-S", "models.fcn_acf.acf.heads=4", "source"], project)
    assert dry.returncode != 0 and "not in struct" in dry.stderr


def test_every_make_target_the_readme_names_exists():
    targets = set(re.findall(r"`make ([a-z-]+)", TEXT)) | {m for line in code_lines()
                                                            for m in re.findall(r"^make ([a-z-]+)", line)}
    assert {"run", "test", "mlflow-ui", "docs"} <= targets
    for target in targets:
        dry = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True)
        assert dry.returncode == 0, f"make {target}: {dry.stderr}"
