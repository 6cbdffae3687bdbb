"""The suite's own guard (tests/conftest.py): a test that wrote study state into the checkout fails the session."""
from __future__ import annotations

import subprocess
import sys

from conftest import ROOT, study_state

# a throw-away session whose conftest loads the guard of tests/conftest.py, and one test that writes dvc.lock
PROBE_CONFTEST = f"""
import importlib.util, sys
sys.path.insert(0, {str(ROOT)!r})
spec = importlib.util.spec_from_file_location("ctxseg_test_guard", {str(ROOT / 'tests' / 'conftest.py')!r})
guard = importlib.util.module_from_spec(spec)
spec.loader.exec_module(guard)
pytest_sessionstart, pytest_sessionfinish = guard.pytest_sessionstart, guard.pytest_sessionfinish
"""


def test_study_state_guard_sees_a_write_into_the_checkout(tmp_path):
    before = study_state(tmp_path)
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "fcn.json").write_text("{}")
    (tmp_path / "ctxseg" / "__pycache__").mkdir(parents=True)
    (tmp_path / "ctxseg" / "__pycache__" / "x.pyc").write_bytes(b"")  # byte code is not study state
    after = study_state(tmp_path)
    assert before == {} and list(after) == ["metrics/fcn.json"]


def _session(tmp_path, body: str) -> subprocess.CompletedProcess:
    checkout, probe = tmp_path / "checkout", tmp_path / "probe"
    checkout.mkdir(exist_ok=True)
    probe.mkdir(exist_ok=True)
    (probe / "conftest.py").write_text(PROBE_CONFTEST)
    (probe / "test_probe.py").write_text(f"from pathlib import Path\n\ndef test_probe():\n    root = Path({str(checkout)!r})\n"
                                         + "".join(f"    {line}\n" for line in body.splitlines()))
    env = {**__import__("os").environ, "CTXSEG_GUARDED_CHECKOUT": str(checkout)}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(probe)],
                          cwd=probe, env=env, capture_output=True, text=True, timeout=300)


def test_a_session_that_writes_study_state_fails(tmp_path):
    clean = _session(tmp_path, "(root / 'notes.txt').write_text('not study state')")
    assert clean.returncode == 0, clean.stdout[-2000:]
    dirty = _session(tmp_path, "(root / 'dvc.lock').write_text('schema: 2.0')")
    assert dirty.returncode != 0, dirty.stdout[-2000:]
    assert "wrote study state into the checkout" in dirty.stdout and "dvc.lock" in dirty.stdout
