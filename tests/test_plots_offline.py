"""`dvc plots show` / `dvc plots diff` pages load nothing from the network.

dvc-render's default page pulls vega, vega-lite and vega-embed from cdn.jsdelivr.net, so offline the
per-class IoU charts vanish. `.dvc/config` points DVC at `.dvc/offline_plots.html`
(scripts/build_plots_template.py), which carries the three libraries inline. These tests run the real
`dvc plots show` / `dvc plots diff` in a throw-away git + DVC repo and inspect the page DVC writes:
no external resource load (script/img src, link href, CSS @import/url(), literal URLs handed to
import/fetch/importScripts/Worker/XHR), every plot's vegaEmbed call present, the libraries inline and
unaltered, the PNG plots local files. The same checker is shown to flag DVC's default template.
"""
from __future__ import annotations

import hashlib
import html.parser
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DVC = str(Path(sys.executable).with_name("dvc"))
TEMPLATE = ROOT / ".dvc" / "offline_plots.html"
LIBS = ("vega", "vega-lite", "vega-embed")


def _builder():
    spec = importlib.util.spec_from_file_location("build_plots_template", ROOT / "scripts" / "build_plots_template.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ----------------------------------------------------------------------------- the checker

# An attribute value that makes the browser fetch something: a scheme other than data:/blob:, or
# protocol-relative. (Anchors like href="#", relative paths such as static/x.png are local.)
_EXTERNAL = re.compile(r"^\s*(?://|(?!data:|blob:)[a-zA-Z][a-zA-Z0-9+.-]*:)")
_URL_ATTRS = {"src", "href", "srcset", "data", "poster", "action", "formaction", "background",
              "xlink:href", "manifest", "ping", "imagesrcset"}
_Q = r"[\"'`]"
_EXT_LIT = rf"{_Q}\s*(?:[a-zA-Z][a-zA-Z0-9+.-]*:)?//"  # a string literal that starts with an absolute URL
# Resource loads in JavaScript with a literal absolute URL. Deliberately not "any URL string": the
# vega bundles contain URL strings that load nothing (XML namespaces, the vega schema id, the
# "Open in Vega Editor" link).
_JS_LOADS = [
    re.compile(rf"\bimport\s*\(\s*{_EXT_LIT}"),                       # dynamic import("https://…")
    re.compile(rf"\bimport\b[^;()]*?\bfrom\s*{_EXT_LIT}"),            # import x from "https://…"
    re.compile(rf"\bimport\s*{_EXT_LIT}"),                            # import "https://…"
    re.compile(rf"\bfetch\s*\(\s*{_EXT_LIT}"),
    re.compile(rf"\bimportScripts\s*\(\s*{_EXT_LIT}"),
    re.compile(rf"\bnew\s+(?:Shared)?Worker\s*\(\s*{_EXT_LIT}"),
    re.compile(rf"\.open\s*\(\s*{_Q}[A-Za-z]+{_Q}\s*,\s*{_EXT_LIT}"),  # XMLHttpRequest.open("GET", "https://…")
    re.compile(rf"\.(?:src|href)\s*=\s*{_EXT_LIT}"),                   # el.src = "https://…"
]
_CSS_LOADS = re.compile(r"(?:@import\s+|url\(\s*)[\"']?\s*(?:[a-zA-Z][a-zA-Z0-9+.-]*:)?//", re.I)
_SPEC = re.compile(r"var spec = (\{.*?\});\s*vegaEmbed\('#([^']+)', spec\);", re.S)


class _Page(html.parser.HTMLParser):
    """Collects attribute URLs, inline script/style text and the inline library blocks of a page."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.loads: list[str] = []      # external loads found, as "<tag attr=value>"
        self.imgs: list[str] = []       # every <img src>
        self.scripts: list[tuple[dict, str]] = []  # (attrs, text) of every <script>
        self.styles: list[str] = []
        self._open: tuple[str, dict] | None = None
        self._text: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = {k: (v or "") for k, v in attrs}
        for name, value in a.items():
            if name in _URL_ATTRS:
                values = [part.strip().split(" ")[0] for part in value.split(",")] if "srcset" in name else [value]
                self.loads += [f"<{tag} {name}={v}>" for v in values if _EXTERNAL.match(v)]
        if tag == "meta" and a.get("http-equiv", "").lower() == "refresh":
            m = re.search(r"url\s*=\s*(\S+)", a.get("content", ""), re.I)
            if m and _EXTERNAL.match(m.group(1).strip("'\"")):
                self.loads.append(f"<meta refresh {m.group(1)}>")
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        if tag in ("script", "style"):
            self._open, self._text = (tag, a), []

    def handle_data(self, data):
        if self._open:
            self._text.append(data)

    def handle_endtag(self, tag):
        if self._open and tag == self._open[0]:
            text = "".join(self._text)
            if tag == "script":
                self.scripts.append((self._open[1], text))
            else:
                self.styles.append(text)
            self._open = None


def parse_page(page: str) -> _Page:
    p = _Page()
    p.feed(page)
    p.close()
    return p


def external_loads(page: str) -> list[str]:
    """Everything in ``page`` that would make a browser go to the network."""
    p = parse_page(page)
    found = list(p.loads)
    for attrs, text in p.scripts:
        found += [f"<script> {rx.pattern}: {m.group(0)[:80]}" for rx in _JS_LOADS for m in rx.finditer(text)]
    for text in p.styles:
        found += [f"<style> {m.group(0)}" for m in _CSS_LOADS.finditer(text)]
    for spec_text, div in _SPEC.findall(page):
        found += [f"spec {div} data.url={u}" for u in _data_urls(json.loads(spec_text)) if _EXTERNAL.match(u)]
    return found


def _data_urls(node) -> list[str]:
    """Every "url" in a vega(-lite) spec (data.url, image marks): what vega would load."""
    if isinstance(node, dict):
        own = [node["url"]] if isinstance(node.get("url"), str) else []
        return own + [u for v in node.values() for u in _data_urls(v)]
    if isinstance(node, list):
        return [u for v in node for u in _data_urls(v)]
    return []


def inline_libs(page: str) -> dict[str, str]:
    """name -> text of each inline library block whose text matches the sha256 it was built with."""
    out = {}
    for attrs, text in parse_page(page).scripts:
        name, code = attrs.get("data-inline-lib"), text.lstrip("\n")
        if name and "src" not in attrs and hashlib.sha256(code.encode()).hexdigest() == attrs.get("data-sha256"):
            out[name] = code
    return out


# ----------------------------------------------------------------------------- a scratch repo

PER_CLASS = [{"class": "road", "iou": 0.91}, {"class": "car", "iou": 0.72}, {"class": "sky", "iou": 0.50}]
PNG = bytes.fromhex(  # a 1x1 PNG
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360000002000001e221bc330000000049454e44ae426082"
)
DVC_YAML = """\
plots:
  - plots/fcn/per_class_iou.json:
      x: iou
      y: class
      template: bar_horizontal
  - plots/fcn_acf/per_class_iou.json:
      x: iou
      y: class
      template: bar_horizontal
  - plots/fcn/confusion.png
"""
N_VEGA = 2
ENV = {"DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t.invalid",
       "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t.invalid"}


def _run(cmd, cwd):
    import os

    res = subprocess.run(cmd, cwd=cwd, env={**os.environ, **ENV}, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"{cmd}: {res.stdout[-2000:]}\n{res.stderr[-2000:]}"
    return res


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A minimal git + DVC repo with the project's .dvc/config and template, one commit of plots."""
    d = tmp_path_factory.mktemp("plots_repo")
    _run(["git", "init", "-q"], d)
    _run([DVC, "init", "-q"], d)
    shutil.copy2(ROOT / ".dvc" / "config", d / ".dvc" / "config")
    shutil.copy2(TEMPLATE, d / ".dvc" / TEMPLATE.name)
    for m in ("fcn", "fcn_acf"):
        (d / "plots" / m).mkdir(parents=True)
        (d / "plots" / m / "per_class_iou.json").write_text(json.dumps(PER_CLASS))
    (d / "plots" / "fcn" / "confusion.png").write_bytes(PNG)
    (d / "dvc.yaml").write_text(DVC_YAML)
    _run(["git", "add", "-A"], d)
    _run(["git", "commit", "-q", "-m", "plots"], d)
    # a workspace change, so that `plots diff` has two revisions to draw
    (d / "plots" / "fcn" / "per_class_iou.json").write_text(json.dumps([dict(r, iou=r["iou"] / 2) for r in PER_CLASS]))
    return d


def _show(repo: Path, out: str, *extra: str) -> str:
    _run([DVC, "plots", "show", "-o", out, *extra], repo)
    return (repo / out / "index.html").read_text(encoding="utf-8")


def _assert_offline(page: str, page_dir: Path, revs: int):
    assert external_loads(page) == []
    libs = inline_libs(page)
    assert list(libs) == list(LIBS), "vega, vega-lite, vega-embed inline, unaltered, in load order"
    assert 't.version="5.' in libs["vega"] and ".vega={}" in libs["vega"]
    assert ".vegaLite={}" in libs["vega-lite"] and ".vegaEmbed=" in libs["vega-embed"]
    specs = _SPEC.findall(page)
    assert sorted(div for _, div in specs) == ["plots_fcn_acf_per_class_iou_json", "plots_fcn_per_class_iou_json"]
    first_embed = page.index("vegaEmbed('#")
    assert all(page.index(f'data-inline-lib="{n}"') < first_embed for n in LIBS), "libraries load before the plots"
    for spec_text, _ in specs:
        spec = json.loads(spec_text)
        assert spec["$schema"].endswith("/vega-lite/v5.json")
        assert {r["class"] for r in spec["data"]["values"]} == {"road", "car", "sky"}
    # DVC writes image plots as files under <out>/static and links them relatively
    imgs = parse_page(page).imgs
    assert len(imgs) == revs
    for src in imgs:
        assert src.startswith("data:") or (not _EXTERNAL.match(src) and not src.startswith("/")), src
        if not src.startswith("data:"):
            assert (page_dir / src).is_file(), src


def test_template_is_wired_and_consistent():
    from configobj import ConfigObj

    assert ConfigObj(str(ROOT / ".dvc" / "config"))["plots"]["html_template"] == TEMPLATE.name
    text = TEMPLATE.read_text(encoding="utf-8")
    assert text.count("{plot_divs}") == 1 and text.count("{refresh_tag}") == 1 and "{scripts}" not in text
    builder = _builder()
    libs = inline_libs(text)
    assert list(libs) == list(LIBS) == [p.name for p in builder.PACKAGES]
    tags = {a["data-inline-lib"]: a for a, _ in parse_page(text).scripts if "data-inline-lib" in a}
    for pkg in builder.PACKAGES:
        assert tags[pkg.name]["data-version"] == pkg.version
        assert tags[pkg.name]["data-tarball-sha256"] == pkg.tarball_sha256
        builder.check_inline_safe(pkg.name, libs[pkg.name])  # no DVC placeholder, nothing that ends a <script>
        assert "sourceMappingURL" not in libs[pkg.name]
    assert [p.version.split(".")[0] for p in builder.PACKAGES] == ["5", "5", "6"]  # the majors dvc-render uses
    # licence notices kept
    assert text.count("Redistribution and use in source and binary forms") == 3
    assert "University of Washington Interactive Data Lab" in text
    assert external_loads(text) == []


def test_plots_show_is_offline(repo):
    page = _show(repo, "out_show")  # template from .dvc/config, as a user gets it
    _assert_offline(page, repo / "out_show", revs=1)


def test_plots_diff_is_offline(repo):
    _run([DVC, "plots", "diff", "HEAD", "-o", "out_diff"], repo)
    page = (repo / "out_diff" / "index.html").read_text(encoding="utf-8")
    _assert_offline(page, repo / "out_diff", revs=2)
    revs = {r["rev"] for spec_text, _ in _SPEC.findall(page) for r in json.loads(spec_text)["data"]["values"]}
    assert revs == {"HEAD", "workspace"}


def test_checker_flags_dvc_default_template(repo):
    """The same checks fail on the page DVC writes with its own template (CDN <script src>)."""
    from dvc_render.html import PAGE_HTML

    assert "{scripts}" in PAGE_HTML
    (repo / "default_template.html").write_text(PAGE_HTML)
    page = _show(repo, "out_default", "--html-template", "default_template.html")
    loads = external_loads(page)
    assert loads and all("cdn.jsdelivr.net" in x for x in loads)
    assert {re.search(r"npm/([a-z-]+)@", x).group(1) for x in loads} == set(LIBS)
    assert inline_libs(page) == {}
    with pytest.raises(AssertionError):
        _assert_offline(page, repo / "out_default", revs=1)


@pytest.mark.parametrize(
    "snippet",
    [
        '<link rel="stylesheet" href="https://example.org/a.css">',
        '<img src="//example.org/a.png">',
        '<script type="module">import x from "https://example.org/m.js";</script>',
        "<script>fetch('https://example.org/d.json')</script>",
        "<style>@import url(http://example.org/a.css);</style>",
        '<img srcset="a.png 1x, https://example.org/b.png 2x">',
    ],
)
def test_checker_catches_other_loads(snippet):
    assert external_loads(f"<html><head>{snippet}</head><body></body></html>")


def test_checker_ignores_urls_that_load_nothing():
    page = ('<html><body><a href="#">x</a><img src="static/a.png"><img src="data:image;base64,AAAA">'
            '<script>var ns="http://www.w3.org/2000/svg", e="https://vega.github.io/editor/";</script></body></html>')
    assert external_loads(page) == []


_NODE_DRIVER = r"""
const fs = require("fs"), vm = require("vm");
const { libs, specs } = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
const quiet = new console.Console(process.stderr);
const ctx = vm.createContext({ console: quiet, structuredClone, setTimeout, clearTimeout, setInterval, clearInterval });
for (const [name, code] of libs) vm.runInContext(code, ctx, { filename: name });
(async () => {
  const out = { vega: ctx.vega.version, vegaLite: ctx.vegaLite.version, vegaEmbed: typeof ctx.vegaEmbed, bars: [] };
  for (const spec of specs) {
    const view = new ctx.vega.View(ctx.vega.parse(ctx.vegaLite.compile(spec).spec), { renderer: "none" });
    const svg = await view.toSVG();
    out.bars.push((svg.match(/aria-roledescription="bar"/g) || []).length);
  }
  process.stdout.write(JSON.stringify(out));
})().catch((e) => { console.error(e && e.stack || e); process.exit(1); });
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="needs node to execute the inlined JavaScript")
def test_inlined_vega_renders_the_specs_dvc_writes(repo, tmp_path):
    """Execute the libraries exactly as they sit in DVC's page, compile every spec, draw it to SVG."""
    page = _show(repo, "out_node")
    payload = {"libs": list(inline_libs(page).items()), "specs": [json.loads(s) for s, _ in _SPEC.findall(page)]}
    (tmp_path / "page.json").write_text(json.dumps(payload))
    (tmp_path / "render.js").write_text(_NODE_DRIVER)
    res = subprocess.run(["node", str(tmp_path / "render.js"), str(tmp_path / "page.json")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout)
    builder = _builder()
    assert [out["vega"], out["vegaLite"]] == [p.version for p in builder.PACKAGES[:2]]
    assert out["vegaEmbed"] == "function"
    assert out["bars"] == [len(PER_CLASS)] * N_VEGA
