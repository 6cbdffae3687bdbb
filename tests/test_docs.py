"""The documentation: README.md stays a short read whose links resolve, and the site under docs/ builds with
`mkdocs build --strict` (what `make docs` runs), which fails on a broken link or anchor and a missing nav
page. The Tune settings the docs quote are the ones params.yaml and the schema hold."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import yaml

from conftest import ROOT

README = (ROOT / "README.md").read_text(encoding="utf-8")
DOCS = ROOT / "docs"
# The report's picture, added with the results of a measured run; README.md may link it before it exists.
PENDING = {"docs/assets/report.png"}
PAGES = {"index.md", "getting-started.md", "study.md", "datasets.md", "cluster.md", "sweeps.md", "experiments.md",
         "faults.md", "params.md", "performance.md", "papers.md"}


def nav_pages(nav) -> list[str]:
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, dict):
        return [p for value in nav.values() for p in nav_pages(value)]
    return [p for item in nav or [] for p in nav_pages(item)]


def test_site_builds_strictly(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    built = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
                            "--site-dir", str(tmp_path / "site")], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=120)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    for page in PAGES:
        assert (tmp_path / "site" / page.replace(".md", ".html")).is_file(), page


def test_nav_names_every_page_and_each_exists():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    assert config["theme"]["name"] == "material" and config["strict"] is True
    pages = nav_pages(config["nav"])
    assert PAGES <= set(pages), PAGES - set(pages)
    for page in pages:
        assert (DOCS / page).is_file(), f"mkdocs.yml nav names docs/{page}, which does not exist"


def test_readme_is_a_short_read():
    lines = README.splitlines()
    assert len(lines) < 150, f"README.md has {len(lines)} lines; move the detail into docs/"
    assert "make run" in README and "make test" in README and "source .venv/bin/activate" in README
    assert "<!-- results:start -->" in README and "<!-- results:end -->" in README


def test_every_relative_link_of_the_readme_resolves():
    links = re.findall(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", README)
    relative = [link.split("#")[0] for link in links if not re.match(r"[a-z][a-z0-9+.-]*:|#", link)]
    assert any(link.startswith("docs/") for link in relative), "README.md links no docs page"
    for link in relative:
        if link in PENDING and not (ROOT / link).exists():
            continue
        assert (ROOT / link).exists(), f"README.md links {link}, which does not exist"
    linked = {link[len("docs/"):] for link in relative if link.startswith("docs/")}
    assert PAGES - {"index.md"} <= linked, f"README.md links no {sorted(PAGES - {'index.md'} - linked)}"


def test_the_sweep_settings_the_docs_quote_are_params_yaml_and_the_schema():
    """docs/sweeps.md shows the `tune` block of params.yaml; each "(schema default: X)" is the schema's default."""
    from ctxseg.config import TuneConfig

    text = (DOCS / "sweeps.md").read_text(encoding="utf-8")
    block = next(b for b in re.findall(r"```yaml\n(.*?)```", text, flags=re.S) if b.startswith("tune:"))
    shown = yaml.safe_load(block)["tune"]
    shipped = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))["tune"]
    assert shown == shipped
    defaults = re.findall(r"^\s+(\w+):.*\(schema default: ([^)]+)\)", block, flags=re.M)
    assert {"epochs", "grace_period", "enabled"} <= {key for key, _ in defaults}
    for key, value in defaults:
        assert TuneConfig.model_fields[key].default == yaml.safe_load(value), key
