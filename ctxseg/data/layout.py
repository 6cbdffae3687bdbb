"""Walking a raw dataset folder: the helpers every dataset's lister uses, and what a lister returns.

A lister never stops at the first bad pair: it returns every pair it could form plus a list of
``(file, problem)`` for every image without a label, every label without an image and every file
name that cannot be a sample id, so the user sees all of them in one message.
"""
from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from ctxseg.data.types import LabelDecoder, LayoutError, Sample

__all__ = [
    "IMAGE_EXTS", "Listing", "walk_dirs", "find_dirs", "find_dir", "images_in", "read_ids",
    "pair_by_stem", "unpaired_labels", "sample_id_problem", "check_sample_ids", "shown_path", "format_problems",
]

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")

Problem = Tuple[str, str]


@dataclass
class Listing:
    """What a dataset's lister found: the pairs, how to decode their labels, extra ``meta.json``
    entries, and every problem of the listing (missing / unpaired labels, bad names).

    Unpacks as ``samples, decoder, extra`` (the form :func:`ctxseg.data.sources.list_samples` had)."""

    samples: List[Sample]
    decoder: LabelDecoder
    extra: Dict[str, Any] = field(default_factory=dict)
    problems: List[Problem] = field(default_factory=list)

    def __iter__(self) -> Iterator[Any]:
        return iter((self.samples, self.decoder, self.extra))


def walk_dirs(root: Path, max_depth: int) -> Iterable[Path]:
    """Folders under ``root`` breadth first, hidden ones skipped, ``max_depth`` levels deep."""
    frontier = [root]
    for _ in range(max_depth + 1):
        nxt = []
        for d in sorted(frontier):
            yield d
            try:
                nxt.extend(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))
            except OSError:
                continue
        frontier = nxt


def find_dirs(root: Path, markers: Sequence[str], max_depth: int = 5) -> List[Path]:
    """All folders under ``root`` (breadth first) that contain every relative path in ``markers``."""
    return [d for d in walk_dirs(root, max_depth) if all((d / m).exists() for m in markers)]


def find_dir(root: Path, markers: Sequence[str], what: str, dataset: str, instructions: str,
             max_depth: int = 5) -> Path:
    """The first folder holding ``markers``, or a :class:`LayoutError` saying what to get."""
    hits = find_dirs(root, markers, max_depth)
    if not hits:
        raise LayoutError(
            f"{dataset}: cannot find {what} under {root} (looked for a folder containing "
            f"{', '.join(markers)}). Expected: {instructions}. Put the archive(s) or the "
            f"extracted folder at data.source, or extract them under {root}.")
    return hits[0]


def images_in(d: Path) -> Dict[str, Path]:
    """``stem -> path`` of the image files directly in ``d``."""
    return {p.stem: p for p in sorted(d.iterdir()) if p.suffix in IMAGE_EXTS and p.is_file()}


def read_ids(path: Path) -> List[str]:
    """The first word of every non-empty line of a split list."""
    return [ln.split()[0] for ln in path.read_text().splitlines() if ln.strip()]


def pair_by_stem(split: str, images: Dict[str, Path], labels: Dict[str, Path], problems: List[Problem],
                 label_suffix: str = "", check_unpaired: bool = True) -> List[Sample]:
    """Pair images and labels of one split by file stem; every image without a label (and, with
    ``check_unpaired``, every label without an image) is added to ``problems``."""
    out: List[Sample] = []
    for stem, ip in images.items():
        lp = labels.get(stem + label_suffix)
        if lp is None:
            problems.append((str(ip), f"image in split {split!r} has no label file (expected a label with "
                                      f"stem {stem + label_suffix!r}); the dataset is incomplete: re-extract "
                                      f"it or remove the image"))
            continue
        out.append(Sample(split, stem, ip, lp))
    if check_unpaired:
        problems.extend(unpaired_labels(labels, {stem + label_suffix for stem in images}, split))
    return out


def unpaired_labels(labels: Dict[str, Path], used: Iterable[str], split: str = "") -> List[Problem]:
    """A problem for every label whose key is not in ``used`` (a label without an image)."""
    used = set(used)
    where = f" in split {split!r}" if split else ""
    return [(str(p), f"label{where} has no image (no image with a matching name); add the image or remove "
                     f"the label") for k, p in sorted(labels.items()) if k not in used]


def _control_chars(text: str) -> List[str]:
    return [c for c in text if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp")]


def shown_path(path: Any) -> str:
    """A file name as a message shows it: quoted (escapes visible) when it holds control characters or
    surrounding white space, so a newline in a name cannot break or forge a line of the listing."""
    text = str(path)
    name = text.rsplit("/", 1)[-1]
    return repr(text) if _control_chars(text) or name != name.strip() else text


def format_problems(problems: Sequence[Problem], limit: int = 20) -> str:
    """``(file, problem)`` pairs as indented lines, the first ``limit`` of them and a count of the rest."""
    lines = [f"  {shown_path(f)}: {m}" for f, m in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"  ... and {len(problems) - limit} more")
    return "\n".join(lines)


def sample_id_problem(sample_id: str) -> Optional[str]:
    """Why ``sample_id`` cannot be a file name in the prepared layout / a line of ``<split>.txt``."""
    if sample_id in ("", ".", ".."):
        return f"invalid sample id {sample_id!r}"
    if "/" in sample_id or "\\" in sample_id:
        return f"invalid sample id {sample_id!r} (contains a path separator)"
    bad = _control_chars(sample_id)
    if bad:
        return (f"invalid sample id {sample_id!r}: the file name contains control characters "
                f"({', '.join(repr(c) for c in sorted(set(bad)))}); rename the file")
    if sample_id != sample_id.strip():
        return f"invalid sample id {sample_id!r}: the file name starts or ends with white space; rename the file"
    return None


def check_sample_ids(samples: Sequence[Sample]) -> List[Problem]:
    """Bad and duplicate ids (per split) of ``samples``, as ``(file, problem)``."""
    seen: Dict[Tuple[str, str], Any] = {}
    problems: List[Problem] = []
    for s in samples:
        why = sample_id_problem(s.id)
        if why:
            problems.append((str(s.image), why))
        key = (s.split, s.id)
        if key in seen:
            problems.append((str(s.image), f"duplicate id {s.id!r} in split {s.split!r} (also {seen[key]})"))
        seen[key] = s.image
    return problems
