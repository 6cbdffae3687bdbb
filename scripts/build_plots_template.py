"""Build ``.dvc/offline_plots.html``: a DVC plots HTML template with vega inlined.

Why: ``dvc plots show`` / ``dvc plots diff`` write ``dvc_plots/index.html`` whose vega
plots (the per-class IoU bars) load vega, vega-lite and vega-embed from cdn.jsdelivr.net
(dvc_render's ``VegaRenderer.SCRIPTS``, injected at the template's ``{scripts}``
placeholder). Offline those charts vanish and only the PNG plots show. This template has
no ``{scripts}`` placeholder, so DVC injects no CDN tags, and carries the three libraries
inline instead. ``.dvc/config`` points DVC at it::

    [plots]
        html_template = offline_plots.html      # relative to the .dvc directory

Where the JavaScript comes from: the npm registry tarballs below, the same major
versions DVC 3.x / dvc-render 1.x loads from the CDN (vega 5, vega-lite 5, vega-embed 6;
dvc-render pins vega@5.20.2, vega-lite@5.2.0, vega-embed@6.18.2). We take the newest
release of each of those majors: vega 5.33.1 (the 5.x long-term-support release that
carries the expression-sandbox fix, GHSA-7f2v-3qq3-vvjf), vega-lite 5.23.0 (peer
dependency ``vega ^5.24.0``) and vega-embed 6.29.0 (peer ``vega ^5.21.0``). The specs
dvc-render generates declare ``$schema .../vega-lite/v5.json``.

    package     version  tarball (https://registry.npmjs.org/...)       file inlined
    vega        5.33.1   vega/-/vega-5.33.1.tgz                         build/vega.min.js
    vega-lite   5.23.0   vega-lite/-/vega-lite-5.23.0.tgz               build/vega-lite.min.js
    vega-embed  6.29.0   vega-embed/-/vega-embed-6.29.0.tgz             build/vega-embed.min.js

sha256 of each tarball, verified before anything is read from it (the registry's own
``dist.integrity`` sha512 of each was also checked when these pins were taken):

    vega-5.33.1.tgz        1b8504b6731c5311be3269c4d84ca996a5cc293bc772283293ede20c490e16c3
    vega-lite-5.23.0.tgz   e4cbfdd8f6f1abe381c59cd558fd6a559c12b1496bfdf2e0c3295263a40fe4da
    vega-embed-6.29.0.tgz  ecf1ee709c2bac9e0a4ead6908114b05b62c71493e10a8a4308109bb070f8eb1

The inlined text is the file from the tarball minus its trailing ``//# sourceMappingURL``
comment (the .map file is not shipped). Each ``<script>`` tag records the package, version,
tarball sha256 and the sha256 of its inlined text; tests/test_plots_offline.py checks them.
The licence notices (all three are BSD-3-Clause, University of Washington Interactive Data
Lab) are kept in an HTML comment at the top of the template, with the list of third-party
packages the upstream bundles contain. The vega tarball ships no LICENSE file, so its notice
is the LICENSE of the vega repository at tag v5.33.1, held below.

The build refuses JavaScript that contains a DVC placeholder (``{plot_divs}``, ``{scripts}``,
``{refresh_tag}``: dvc-render ``str.replace``-s those over the whole page) or text that would
end or confuse an inline ``<script>`` element (``</script``, ``<!--``, ``<script``); none of
the pinned files does. There is no safe context-free rewrite of such text in minified code,
so a future version that has it needs a look by hand.

Regenerate (needs the npm registry, or the three tarballs in a folder)::

    .venv/bin/python scripts/build_plots_template.py                    # download, verify, write
    .venv/bin/python scripts/build_plots_template.py --tarball-dir DIR  # offline, from DIR/*.tgz
    .venv/bin/python scripts/build_plots_template.py --check            # compare with the file

To move to other versions, edit PACKAGES (version and tarball sha256) and this docstring.
The output is deterministic: the same tarballs give the same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path
from typing import NamedTuple

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = REPO_ROOT / ".dvc" / "offline_plots.html"
REGISTRY = "https://registry.npmjs.org"

# Placeholders dvc-render's HTML.embed() replaces by str.replace over the whole template.
DVC_PLACEHOLDERS = ("{plot_divs}", "{scripts}", "{refresh_tag}")
# Text that must not appear inside an inline <script> element (HTML script-data parsing).
SCRIPT_BREAKERS = ("</script", "<!--", "<script")


class Package(NamedTuple):
    name: str
    version: str
    tarball_sha256: str
    build_file: str  # path inside the tarball, below package/

    @property
    def tarball_name(self) -> str:
        return f"{self.name}-{self.version}.tgz"

    @property
    def url(self) -> str:
        return f"{REGISTRY}/{self.name}/-/{self.tarball_name}"


# Order matters: vega-lite's UMD build reads the global `vega`, vega-embed reads `vega` and
# `vegaLite`, and the plot divs DVC writes call the global `vegaEmbed`.
PACKAGES = (
    Package(
        "vega",
        "5.33.1",
        "1b8504b6731c5311be3269c4d84ca996a5cc293bc772283293ede20c490e16c3",
        "build/vega.min.js",
    ),
    Package(
        "vega-lite",
        "5.23.0",
        "e4cbfdd8f6f1abe381c59cd558fd6a559c12b1496bfdf2e0c3295263a40fe4da",
        "build/vega-lite.min.js",
    ),
    Package(
        "vega-embed",
        "6.29.0",
        "ecf1ee709c2bac9e0a4ead6908114b05b62c71493e10a8a4308109bb070f8eb1",
        "build/vega-embed.min.js",
    ),
)

# Third-party code inside the upstream minified bundles (from the packages' dependency
# lists at these versions); the upstream .min.js files carry no licence comments of their own.
BUNDLED_THIRD_PARTY = {
    "vega": "d3-array, d3-color, d3-delaunay, d3-dispatch, d3-dsv, d3-force, d3-format, "
    "d3-geo, d3-geo-projection, d3-hierarchy, d3-interpolate, d3-path, d3-quadtree, "
    "d3-scale, d3-scale-chromatic, d3-shape, d3-time, d3-time-format, d3-timer, internmap, "
    "delaunator, topojson-client (ISC); robust-predicates (Unlicense)",
    "vega-lite": "json-stringify-pretty-compact (MIT); tslib (0BSD)",
    "vega-embed": "vega-themes, vega-tooltip, vega-schema-url-parser, vega-interpreter "
    "(BSD-3-Clause); fast-json-patch, json-stringify-pretty-compact (MIT); semver (ISC); "
    "tslib (0BSD)",
}

# LICENSE of github.com/vega/vega at tag v5.33.1 (the npm tarball has no LICENSE file).
VEGA_LICENSE = """\
Copyright (c) 2015-2023, University of Washington Interactive Data Lab
All rights reserved.

Redistribution and use in source and binary forms, with or without
modification, are permitted provided that the following conditions are met:

1. Redistributions of source code must retain the above copyright notice, this
   list of conditions and the following disclaimer.

2. Redistributions in binary form must reproduce the above copyright notice,
   this list of conditions and the following disclaimer in the documentation
   and/or other materials provided with the distribution.

3. Neither the name of the copyright holder nor the names of its contributors
  may be used to endorse or promote products derived from this software
  without specific prior written permission.

THIS SOFTWARE IS PROVIDED BY THE COPYRIGHT HOLDERS AND CONTRIBUTORS "AS IS"
AND ANY EXPRESS OR IMPLIED WARRANTIES, INCLUDING, BUT NOT LIMITED TO, THE
IMPLIED WARRANTIES OF MERCHANTABILITY AND FITNESS FOR A PARTICULAR PURPOSE ARE
DISCLAIMED. IN NO EVENT SHALL THE COPYRIGHT OWNER OR CONTRIBUTORS BE LIABLE
FOR ANY DIRECT, INDIRECT, INCIDENTAL, SPECIAL, EXEMPLARY, OR CONSEQUENTIAL
DAMAGES (INCLUDING, BUT NOT LIMITED TO, PROCUREMENT OF SUBSTITUTE GOODS OR
SERVICES; LOSS OF USE, DATA, OR PROFITS; OR BUSINESS INTERRUPTION) HOWEVER
CAUSED AND ON ANY THEORY OF LIABILITY, WHETHER IN CONTRACT, STRICT LIABILITY,
OR TORT (INCLUDING NEGLIGENCE OR OTHERWISE) ARISING IN ANY WAY OUT OF THE USE
OF THIS SOFTWARE, EVEN IF ADVISED OF THE POSSIBILITY OF SUCH DAMAGE.
"""


class BuildError(RuntimeError):
    pass


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fetch_tarball(pkg: Package, tarball_dir: Path | None, download_dir: Path) -> bytes:
    """The tarball's bytes, from tarball_dir if given, else downloaded; sha256-verified."""
    if tarball_dir is not None:
        path = tarball_dir / pkg.tarball_name
        if not path.is_file():
            raise BuildError(f"{path} not found (expected {pkg.url})")
        data = path.read_bytes()
    else:
        with urllib.request.urlopen(pkg.url, timeout=120) as resp:  # noqa: S310 (fixed https URL)
            data = resp.read()
        (download_dir / pkg.tarball_name).write_bytes(data)
    got = sha256_hex(data)
    if got != pkg.tarball_sha256:
        raise BuildError(
            f"{pkg.tarball_name}: sha256 {got} does not match the pinned {pkg.tarball_sha256}"
        )
    return data


def read_member(tarball: bytes, member: str) -> str | None:
    with tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz") as tf:
        try:
            f = tf.extractfile(f"package/{member}")
        except KeyError:
            return None
        return None if f is None else f.read().decode("utf-8")


def strip_source_map(js: str) -> str:
    lines = js.rstrip("\n").split("\n")
    if lines and lines[-1].startswith("//# sourceMappingURL="):
        lines.pop()
    return "\n".join(lines).rstrip() + "\n"


def check_inline_safe(label: str, text: str) -> None:
    for bad in DVC_PLACEHOLDERS:
        if bad in text:
            raise BuildError(
                f"{label} contains the DVC placeholder {bad!r}; dvc-render would str.replace it"
            )
    low = text.lower()
    for bad in SCRIPT_BREAKERS:
        if bad in low:
            raise BuildError(f"{label} contains {bad!r}, which breaks an inline <script>")


def license_comment(licenses: dict[str, str]) -> str:
    parts = [
        "<!--",
        "This page inlines vega, vega-lite and vega-embed so that DVC plots render offline.",
        "Generated by scripts/build_plots_template.py from the npm registry tarballs named",
        "on each script tag below; do not edit by hand, regenerate instead.",
        "",
    ]
    for pkg in PACKAGES:
        parts += [
            f"==== {pkg.name} {pkg.version} ({pkg.url}) - BSD-3-Clause ====",
            f"Bundled third-party code: {BUNDLED_THIRD_PARTY[pkg.name]}.",
            "",
            licenses[pkg.name].rstrip("\n"),
            "",
        ]
    parts.append("-->")
    text = "\n".join(parts)
    if "-->" in text[4:-3] or "--!>" in text:
        raise BuildError("a licence text would end the HTML comment early")
    for bad in DVC_PLACEHOLDERS:
        if bad in text:
            raise BuildError(f"the licence notices contain the DVC placeholder {bad!r}")
    return text


def build(tarball_dir: Path | None = None) -> str:
    """The template text. Downloads (or reads) and verifies the pinned tarballs."""
    scripts: list[str] = []
    licenses: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for pkg in PACKAGES:
            tarball = fetch_tarball(pkg, tarball_dir, Path(tmp))
            js = read_member(tarball, pkg.build_file)
            if js is None:
                raise BuildError(f"{pkg.tarball_name} has no package/{pkg.build_file}")
            js = strip_source_map(js)
            check_inline_safe(f"{pkg.tarball_name}:{pkg.build_file}", js)
            licenses[pkg.name] = read_member(tarball, "LICENSE") or VEGA_LICENSE
            scripts.append(
                f'<script data-inline-lib="{pkg.name}" data-version="{pkg.version}"'
                f' data-tarball-sha256="{pkg.tarball_sha256}"'
                f' data-sha256="{sha256_hex(js.encode("utf-8"))}">\n{js}</script>'
            )
    page = "\n".join(
        [
            "<!DOCTYPE html>",
            "<html>",
            "<head>",
            '<meta charset="utf-8">',
            "{refresh_tag}",
            "<title>DVC Plot</title>",
            license_comment(licenses),
            *scripts,
            "<style>",
            "    table {",
            "        border-spacing: 15px;",
            "    }",
            "</style>",
            "</head>",
            "<body>",
            "{plot_divs}",
            "</body>",
            "</html>",
            "",
        ]
    )
    counts = {p: page.count(p) for p in DVC_PLACEHOLDERS}
    if counts != {"{plot_divs}": 1, "{scripts}": 0, "{refresh_tag}": 1}:
        raise BuildError(f"unexpected placeholder counts in the template: {counts}")
    return page


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    ap.add_argument(
        "--tarball-dir",
        type=Path,
        help="read <name>-<version>.tgz from this folder instead of the npm registry",
    )
    ap.add_argument(
        "--check", action="store_true", help="exit 1 if --output differs from a fresh build"
    )
    args = ap.parse_args(argv)
    try:
        page = build(args.tarball_dir)
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    data = page.encode("utf-8")
    if args.check:
        same = args.output.is_file() and args.output.read_bytes() == data
        print(f"{args.output}: {'up to date' if same else 'DIFFERS from a fresh build'}")
        return 0 if same else 1
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_bytes(data)
    print(f"wrote {args.output} ({len(data)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
