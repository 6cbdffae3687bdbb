"""Figures and images of the evaluation and the report: pure NumPy / torch / matplotlib (Agg backend).

Every ``*_figure`` function returns a matplotlib ``Figure``; :func:`save_png` writes it atomically and
closes it. Image helpers (:func:`overlay`, :func:`palette_png`) work on ``uint8`` arrays.

Numerical helpers used by the figures (and tested on their own):

* :func:`class_mean_features` — per-image, per-class mean of a feature map (the points of MCIBI Fig 3);
* :func:`pca_2d` — a 2-D PCA projection by SVD (deterministic sign).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ctxseg.data.info import colorize
from ctxseg.io import atomic_path


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: str | Path, dpi: int = 110) -> Path:
    """Write ``fig`` to ``path`` as PNG atomically, then close it."""
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi)
    finally:
        pyplot().close(fig)
    return path


def series_colours(names: Sequence[str]) -> dict[str, tuple]:
    """One fixed colour per name (tab10, then tab20, in the given order): pass the same mapping to
    every figure so that a model has the same colour everywhere."""
    plt = pyplot()
    cmap = plt.get_cmap("tab10") if len(names) <= 10 else plt.get_cmap("tab20")
    return {name: tuple(cmap(i % cmap.N)) for i, name in enumerate(names)}


def colour_name(rgb: Sequence[int]) -> str:
    """A plain-words name of an RGB colour (0-255), e.g. ``"blue"``, ``"light blue"``, ``"dark green"``.

    Used where two classes have similar colours (the synthetic dataset's sea and lake are two blues):
    the legend and caption then say which is which in words, not only by a swatch."""
    import colorsys

    r, g, b = (float(c) / 255.0 for c in rgb[:3])
    hue, light, sat = colorsys.rgb_to_hls(r, g, b)
    if sat < 0.2 or max(r, g, b) - min(r, g, b) < 0.08:
        return "white" if light > 0.9 else "black" if light < 0.12 else "light grey" if light > 0.65 else \
            "dark grey" if light < 0.35 else "grey"
    deg = 360.0 * hue
    names = ((15, "red"), (40, "orange"), (70, "yellow"), (160, "green"), (195, "cyan"), (260, "blue"),
             (295, "purple"), (345, "pink"), (361, "red"))
    name = next(n for bound, n in names if deg < bound)
    if name == "orange" and light < 0.35:
        name = "brown"
    return ("dark " if light < 0.3 and name != "brown" else "light " if light > 0.65 else "") + name


def _title_colour(colours: Optional[Mapping], name: str):
    """The model colour of a panel / column titled with a model name (black when unknown)."""
    return (colours or {}).get(name, "black")


def _colour(palette: Sequence, k: int) -> tuple:
    if palette and k < len(palette):
        return tuple(c / 255.0 for c in palette[k])
    return pyplot().get_cmap("tab20")(k % 20)


# --------------------------------------------------------------------------------------------- images


def palette_png(label: np.ndarray, palette: Sequence) -> "PIL.Image.Image":  # noqa: F821
    """A P-mode PNG image of a class-id map: shows the palette colours, and its pixel values are the ids."""
    from PIL import Image

    img = Image.fromarray(np.asarray(label, dtype=np.uint8), mode="P")
    flat = np.zeros((256, 3), dtype=np.uint8)
    flat[: len(palette)] = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
    img.putpalette(flat.reshape(-1).tolist())
    return img


def overlay(image: np.ndarray, mask_rgb: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a colour mask over an RGB image: ``(1 - alpha)·image + alpha·mask`` (uint8)."""
    if image.shape != mask_rgb.shape:
        raise ValueError(f"image shape {image.shape} != mask shape {mask_rgb.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    out = (1.0 - alpha) * image.astype(np.float32) + alpha * mask_rgb.astype(np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------- numbers


def class_mean_features(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                        ignore_index: int = 255) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-image class means of a ``[B, C, h, w]`` feature map under ``[B, H, W]`` labels.

    The labels are resized to the feature resolution with nearest-neighbour sampling (as MCIBI does
    for its memory update). Returns ``(means [N, C], classes [N], image_index [N])``, one row per
    (image, class present in that image).
    """
    if features.ndim != 4 or labels.ndim != 3 or features.shape[0] != labels.shape[0]:
        raise ValueError(f"features [B,C,h,w] and labels [B,H,W] expected, got {tuple(features.shape)} "
                         f"and {tuple(labels.shape)}")
    b, c, h, w = features.shape
    small = F.interpolate(labels[:, None].float(), size=(h, w), mode="nearest")[:, 0].long()
    feats = features.detach().float().permute(0, 2, 3, 1).reshape(b, h * w, c)
    small = small.reshape(b, h * w)
    means, classes, images = [], [], []
    for i in range(b):
        lab = small[i]
        keep = (lab != ignore_index) & (lab >= 0) & (lab < num_classes)
        lab, f = lab[keep], feats[i][keep]
        if lab.numel() == 0:
            continue
        sums = torch.zeros(num_classes, c, dtype=f.dtype).index_add_(0, lab, f)
        counts = torch.bincount(lab, minlength=num_classes)
        present = counts.nonzero().squeeze(1)
        means.append((sums[present] / counts[present, None].to(f.dtype)).numpy())
        classes.append(present.numpy())
        images.append(np.full(len(present), i))
    if not means:
        return np.zeros((0, c), np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(means), np.concatenate(classes).astype(np.int64), np.concatenate(images).astype(np.int64)


def pca_2d(x: np.ndarray, fit: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
    """Project ``x`` [N, C] on the first two principal axes of ``fit`` (default ``x``).

    Returns ``(coords [N, 2], explained_variance_ratio [2])``. Axis signs are fixed so that the
    largest-magnitude loading of each axis is positive (deterministic across runs).
    """
    fit = x if fit is None else fit
    fit = np.asarray(fit, dtype=np.float64)
    mean = fit.mean(0, keepdims=True)
    centred = fit - mean
    if centred.shape[0] < 2:
        return np.zeros((len(x), 2)), np.zeros(2)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    axes = vt[:2]
    signs = np.sign(axes[np.arange(len(axes)), np.abs(axes).argmax(1)])
    axes = axes * np.where(signs == 0, 1, signs)[:, None]
    var = s**2
    ratio = var[:2] / var.sum() if var.sum() > 0 else np.zeros(2)
    coords = (np.asarray(x, dtype=np.float64) - mean) @ axes.T
    if coords.shape[1] < 2:  # one feature dimension: pad the second axis
        coords = np.concatenate([coords, np.zeros((len(coords), 2 - coords.shape[1]))], 1)
        ratio = np.concatenate([ratio, np.zeros(2 - len(ratio))])
    return coords, ratio


# --------------------------------------------------------------------------------------------- figures


def _grouped_class_bars(series: Mapping[str, Mapping[str, Optional[float]]], colours: Optional[Mapping] = None):
    """Horizontal bars, one group per class and one bar per series (fractions drawn as %; None/NaN = no bar)."""
    plt = pyplot()
    names = list(series)
    classes = list(next(iter(series.values()))) if series else []
    n = max(len(names), 1)
    height = 0.8 / n
    fig, ax = plt.subplots(figsize=(7.5, max(2.5, 0.22 * len(classes) * max(1, n / 1.5) + 1)))
    y = np.arange(len(classes))
    for i, name in enumerate(names):
        values = [series[name].get(c) for c in classes]
        values = [np.nan if v is None or (isinstance(v, float) and math.isnan(v)) else 100 * v for v in values]
        ax.barh(y + i * height, values, height, label=name, color=(colours or {}).get(name))
    ax.set_yticks(y + 0.4 - height / 2, classes)
    return fig, ax


def per_class_iou_figure(series: Mapping[str, Mapping[str, Optional[float]]], title: str = "Per-class IoU",
                         colours: Optional[Mapping] = None):
    """Grouped horizontal bars: one group per class, one bar per model (IoU in %; missing = no bar)."""
    fig, ax = _grouped_class_bars(series, colours)
    ax.invert_yaxis()
    ax.set_xlabel("IoU (%)")
    ax.set_xlim(0, 100)
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def per_class_delta_figure(deltas: Mapping[str, Mapping[str, Optional[float]]], baseline: str,
                           highlight: Sequence[str] = (), colours: Optional[Mapping] = None):
    """Per-class IoU change (points) of each context model against ``baseline``; ``highlight``ed
    classes (e.g. those only context can tell apart) get bold labels."""
    names = list(deltas)
    fig, ax = _grouped_class_bars(deltas, colours)
    for label in ax.get_yticklabels():
        if label.get_text() in highlight:
            label.set_fontweight("bold")
    ax.invert_yaxis()
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel(f"IoU change vs {baseline} (points)")
    ax.set_title(f"Per-class IoU change against {baseline}")
    ax.grid(axis="x", alpha=0.3)
    if names:
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def confusion_figure(matrix: np.ndarray, class_names: Sequence[str], title: str = "Confusion matrix",
                     normalize: bool = True):
    """Heatmap of a confusion matrix (rows = ground truth, columns = prediction), row-normalised by default."""
    plt = pyplot()
    m = np.asarray(matrix, dtype=np.float64)
    if normalize:
        m = m / np.maximum(m.sum(1, keepdims=True), 1)
    k = len(class_names)
    side = max(4.0, 0.38 * k + 2)
    fig, ax = plt.subplots(figsize=(side + 1, side))
    im = ax.imshow(m, cmap="Blues", vmin=0, vmax=1 if normalize else None)
    ax.set_xticks(range(k), class_names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(k), class_names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("ground truth")
    if k <= 25:
        for t in range(k):
            for p in range(k):
                if m[t, p] >= 0.005 if normalize else m[t, p] > 0:
                    text = f"{100 * m[t, p]:.0f}" if normalize else f"{int(m[t, p])}"
                    ax.text(p, t, text, ha="center", va="center", fontsize=6,
                            color="white" if (m[t, p] > 0.5 * (m.max() or 1)) else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class" if normalize else "pixels")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def training_curves_figure(curves: Mapping[str, Mapping], colours: Optional[Mapping] = None, *,
                           shared_term: str = "loss_o", term_labels: Optional[Mapping[str, str]] = None,
                           x_label: str = "iteration", rising: Sequence[str] = (), shared_title: Optional[str] = None):
    """Training curves that compare like with like: three panels, one line per model.

    ``curves[model] = {"terms": {term: (x, y)}, "val_mIoU": (epochs, %)}``.

    * left: ``shared_term`` (L_O, the CE of the final prediction, which every model has), the only
      loss that is the same quantity for every model;
    * middle: every other term, unweighted, as logged (the auxiliary CE for every model; MCIBI's
      L_W and L_M only for MCIBI), one line style per term and each model's colour, labelled
      ``model: term``. Totals are not drawn: they sum different terms for different models;
    * right: validation mIoU per epoch; models in ``rising`` (still rising at their last epoch) get
      "still rising" at their last point.

    ``colours`` maps a model to its colour (the same mapping as every other figure of the report).
    """
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()
    labels = dict(term_labels or {})
    logged = set(t for c in curves.values() for t in c.get("terms", {}))
    others = [t for t in labels if t in logged and t != shared_term] + sorted(logged - set(labels) - {shared_term})
    everyone = [t for t in others if all(t in c.get("terms", {}) for c in curves.values() if "terms" in c)]
    panels = ([("shared", (shared_title or labels.get(shared_term, shared_term)) + "\n(every model: like for like)")]
              if any(shared_term in c.get("terms", {}) for c in curves.values()) else [])
    if others:
        some = [t for t in others if t not in everyone]
        panels.append(("others", "other terms, unweighted: " + ", ".join(labels.get(t, t) for t in everyone)
                       + (" (every model)" if everyone else "")
                       + ("\n" + ", ".join(labels.get(t, t) for t in some) + " (only where a model has them)"
                          if some else "")))
    if any("val_mIoU" in c for c in curves.values()):
        panels.append(("val", "validation mIoU (%)"))
    panels = panels or [("val", "validation mIoU (%)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.0 * len(panels), 3.7), squeeze=False)
    styles = ["-", "--", ":", "-."]
    for ax, (kind, title) in zip(axes[0], panels):
        for name, series in curves.items():
            colour = (colours or {}).get(name)
            terms = series.get("terms", {})
            if kind == "shared" and shared_term in terms:
                x, y = terms[shared_term]
                ax.plot(x, y, marker="o" if len(x) <= 30 else None, markersize=3, label=name, color=colour)
            elif kind == "others":
                for term in others:
                    if term in terms:
                        x, y = terms[term]
                        ax.plot(x, y, ls=styles[others.index(term) % len(styles)], lw=1.3, color=colour,
                                label=f"{name}: {labels.get(term, term)}")
            elif kind == "val" and "val_mIoU" in series:
                x, y = series["val_mIoU"]
                ax.plot(x, y, marker="o", markersize=3, label=name, color=colour)
                if name in rising and len(x) >= 2:
                    ax.annotate(f"still rising ({y[-1] - y[-2]:+.1f})", (x[-1], y[-1]), xytext=(-6, 0),
                                textcoords="offset points", ha="right", va="bottom", fontsize=7,
                                color=colour or "black")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch" if kind == "val" else x_label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7 if kind != "others" else 6)
    fig.tight_layout()
    return fig


def qualitative_grid_figure(images: Sequence[np.ndarray], ground_truths: Sequence[np.ndarray],
                            predictions: Mapping[str, Sequence[Optional[np.ndarray]]], palette: Sequence,
                            row_titles: Optional[Sequence[str]] = None,
                            class_names: Optional[Sequence[str]] = None, *, colours: Optional[Mapping] = None,
                            column_models: Optional[Mapping[str, str]] = None,
                            named_colours: Sequence[str] = ()):
    """MCIBI Fig 4 layout: rows = images; columns = image, ground truth, then one column per model.

    With ``class_names``, a legend under the grid names the colour of every class shown (ground truth
    or prediction) and black = ignore; classes in ``named_colours`` (look-alike classes with similar
    colours, e.g. sea and lake) also get their colour in words (:func:`colour_name`). A model column's
    title and frame take the model's colour from ``colours`` (``column_models`` maps a column title to
    its model name).
    """
    from matplotlib.patches import Patch

    plt = pyplot()
    cols = 2 + len(predictions)
    rows = len(images)
    shown = sorted({int(k) for a in list(ground_truths) + [p for ps in predictions.values() for p in ps if p is not None]
                    for k in np.unique(a) if k < len(palette)})
    ncol = max(cols, 4)
    legend_rows = math.ceil((len(shown) + 1) / ncol) if class_names else 0
    legend_h = 0.26 * legend_rows + 0.15 if legend_rows else 0.0
    fig = plt.figure(figsize=(1.9 * cols, 1.95 * rows + 0.35 + legend_h))
    grid = fig.add_gridspec(rows + (1 if legend_rows else 0), cols,
                            height_ratios=[1.9] * rows + ([legend_h] if legend_rows else []))
    titles = ["image", "ground truth"] + list(predictions)
    for r in range(rows):
        cells = [images[r], colorize(ground_truths[r], palette)]
        for name in predictions:
            pred = predictions[name][r]
            cells.append(None if pred is None else colorize(pred, palette))
        for c, cell in enumerate(cells):
            ax = fig.add_subplot(grid[r, c])
            ax.set_xticks([])
            ax.set_yticks([])
            model = (column_models or {}).get(titles[c], titles[c]) if c >= 2 else None
            if model is not None and colours and model in colours:
                for spine in ax.spines.values():
                    spine.set_edgecolor(colours[model])
                    spine.set_linewidth(2.5)
            if cell is None:
                ax.text(0.5, 0.5, "n/a", ha="center", va="center", transform=ax.transAxes)
            else:
                ax.imshow(cell, interpolation="nearest")
            if r == 0:
                ax.set_title(titles[c], fontsize=9, color=_title_colour(colours, model) if model else "black",
                             fontweight="bold" if model else "normal")
            if c == 0 and row_titles:
                ax.set_ylabel(row_titles[r], fontsize=7)
    if legend_rows:
        lax = fig.add_subplot(grid[rows, :])
        lax.axis("off")
        handles = [Patch(facecolor=np.asarray(palette[k]) / 255.0, edgecolor="0.3",
                         label=legend_label(k, class_names, palette, named_colours)) for k in shown]
        handles.append(Patch(facecolor="black", edgecolor="0.3", label="ignore"))
        lax.legend(handles=handles, loc="center", ncol=ncol, fontsize=8, frameon=False, handlelength=1.6,
                   handleheight=1.1, columnspacing=1.2)
    fig.tight_layout(pad=0.4, h_pad=0.3, w_pad=0.3)
    return fig


def legend_label(k: int, class_names: Sequence[str], palette: Sequence, named_colours: Sequence[str] = ()) -> str:
    """A class's legend entry: its name, and its colour in words when it is one of ``named_colours``."""
    name = class_names[k] if k < len(class_names) else str(k)
    return f"{name} ({colour_name(palette[k])})" if name in named_colours and k < len(palette) else name


def feature_space_figure(panels: Mapping[str, dict], class_names: Sequence[str], palette: Sequence,
                         colours: Optional[Mapping] = None):
    """MCIBI Fig 3: per model a 2-D PCA of per-image class means of the pixel representation R,
    coloured by class.

    ``panels[title] = {"model": name, "means": [N, C], "classes": [N], "memory": [K, C] or None}``; the
    means and the memory must be in one space (the evaluate stage stores MCIBI's R, the features the
    memory averages). The PCA of each panel is fitted on that model's own points (the models' feature
    spaces differ); memory entries, projected with the same axes, are drawn as large black-edged
    stars in their class's colour. Panel titles take the model's colour from ``colours``.
    """
    plt = pyplot()
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(4.6 * max(len(panels), 1), 4.2), squeeze=False)
    seen: dict[int, object] = {}
    for ax, (name, data) in zip(axes[0], panels.items()):
        means = np.asarray(data["means"], dtype=np.float64)
        classes = np.asarray(data["classes"])
        memory = data.get("memory")
        if len(means) == 0:
            ax.text(0.5, 0.5, "no features", ha="center", va="center", transform=ax.transAxes)
            continue
        coords, ratio = pca_2d(means)
        for k in np.unique(classes):
            sel = classes == k
            h = ax.scatter(coords[sel, 0], coords[sel, 1], s=14, color=_colour(palette, int(k)), alpha=0.8,
                           edgecolors="0.35", linewidths=0.3)
            seen.setdefault(int(k), h)
        if memory is not None and len(memory):
            mem_xy, _ = pca_2d(np.asarray(memory, dtype=np.float64), fit=means)
            for k, (x, y) in enumerate(mem_xy):
                ax.scatter([x], [y], s=140, marker="*", color=_colour(palette, k), edgecolors="black", linewidths=0.8)
            ax.scatter([], [], s=140, marker="*", color="white", edgecolors="black", label="memory entry")
            ax.legend(fontsize=7, loc="best")
        ax.set_title(f"{name}", fontsize=10, color=_title_colour(colours, data.get("model", name)), fontweight="bold")
        ax.set_xlabel(f"PC1 ({100 * ratio[0]:.0f}% var.)")
        ax.set_ylabel(f"PC2 ({100 * ratio[1]:.0f}% var.)")
        ax.grid(alpha=0.2)
    if seen:
        fig.legend([seen[k] for k in sorted(seen)], [class_names[k] if k < len(class_names) else str(k)
                                                     for k in sorted(seen)],
                   loc="lower center", ncol=min(len(seen), 7), fontsize=7, markerscale=1.5)
        fig.tight_layout(rect=(0, 0.06 + 0.03 * (len(seen) // 7), 1, 1))
    else:
        fig.tight_layout()
    return fig


def heatmap_figure(grid: np.ndarray, row_labels: Sequence, col_labels: Sequence, xlabel: str, ylabel: str,
                   title: str, fmt: str = "{:.1f}", notes: Optional[Sequence[Sequence[str]]] = None,
                   title_colour: Any = "black"):
    """Annotated heatmap (e.g. the K x H mIoU grid of CFNet Table 3); NaN cells are blank.

    ``notes[i][j]`` (e.g. how many epochs the cell's trial ran) is printed under the value."""
    plt = pyplot()
    g = np.asarray(grid, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(1.1 * len(col_labels) + 2.2, 0.8 * len(row_labels) + 1.6))
    im = ax.imshow(np.ma.masked_invalid(g), cmap="viridis")
    ax.set_xticks(range(len(col_labels)), [str(c) for c in col_labels])
    ax.set_yticks(range(len(row_labels)), [str(r) for r in row_labels])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    finite = g[np.isfinite(g)]
    mid = (finite.min() + finite.max()) / 2 if finite.size else 0
    for i in range(g.shape[0]):
        for j in range(g.shape[1]):
            if np.isfinite(g[i, j]):
                note = notes[i][j] if notes is not None else ""
                ax.text(j, i, fmt.format(g[i, j]) + (f"\n{note}" if note else ""), ha="center", va="center",
                        fontsize=9 if not note else 8, color="black" if g[i, j] > mid else "white")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_title(title, color=title_colour)
    fig.tight_layout()
    return fig


def sweep_scatter_figure(series: Mapping[str, tuple], ylabel: str = "mIoU (%)", colours: Optional[Mapping] = None):
    """One panel per swept key: every trial's mIoU against the key's value, the best per value joined.

    ``series[key] = (x, y, stopped_early, models[, epochs])``: a trial is drawn in its model's colour
    (``colours``, the report's one mapping), filled when it ran every epoch and hollow when ASHA stopped
    it early; with ``epochs``, each point is labelled with the epochs its trial ran ("2 ep")."""
    plt = pyplot()
    keys = list(series)
    fig, axes = plt.subplots(1, max(len(keys), 1), figsize=(3.8 * max(len(keys), 1), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        x, y = (np.asarray(v, dtype=np.float64) for v in series[key][:2])
        stopped = np.asarray(series[key][2] if len(series[key]) > 2 else [False] * len(x), dtype=bool)
        models = list(series[key][3]) if len(series[key]) > 3 else [""] * len(x)
        epochs = list(series[key][4]) if len(series[key]) > 4 else []
        for xi, yi, e in zip(x, y, epochs):
            if e is not None and np.isfinite(e):
                ax.annotate(f"{int(e)} ep", (xi, yi), xytext=(4, -9), textcoords="offset points", fontsize=6,
                            color="0.3")
        for model in dict.fromkeys(models):
            colour = (colours or {}).get(model, "0.3")
            sel = np.asarray([m == model for m in models])
            done, cut = sel & ~stopped, sel & stopped
            if done.any():
                ax.scatter(x[done], y[done], s=22, color=colour, label=f"{model}: ran every epoch".lstrip(": "))
            if cut.any():
                ax.scatter(x[cut], y[cut], s=22, facecolors="none", edgecolors=colour, linewidths=1.3,
                           label=f"{model}: stopped early (ASHA)".lstrip(": "))
        if len(x):
            xs = np.unique(x)
            best = [np.nanmax(y[x == v]) for v in xs]
            ax.plot(xs, best, color="0.45", lw=1, ls="--", label="best per value", zorder=0)
            ax.legend(fontsize=6)
        ax.set_xlabel(key)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def class_spread(means: np.ndarray, classes: np.ndarray, memory: Optional[np.ndarray] = None) -> dict:
    """How tightly per-image class features gather, in the full feature space (what Fig 3 is meant to show).

    ``to_centre``: mean distance of a point to its class's mean point; ``to_memory``: mean distance
    of a point to its class's memory entry (when ``memory`` is given); ``between_centres``: mean
    distance between class means (the scale to compare the two with); ``nearest_memory_own``: the
    share of points whose nearest memory entry (among the classes present) is their own class's.
    """
    means = np.asarray(means, dtype=np.float64)
    classes = np.asarray(classes)
    present = np.unique(classes)
    centres = {int(k): means[classes == k].mean(0) for k in present}
    to_centre = float(np.mean([np.linalg.norm(m - centres[int(k)]) for m, k in zip(means, classes)])) if len(means) else float("nan")
    c = np.stack(list(centres.values())) if centres else np.zeros((0, means.shape[1] if means.ndim == 2 else 0))
    pair = [np.linalg.norm(c[i] - c[j]) for i in range(len(c)) for j in range(i + 1, len(c))]
    out = {"to_centre": to_centre, "between_centres": float(np.mean(pair)) if pair else float("nan")}
    if memory is not None and len(memory):
        mem = np.asarray(memory, dtype=np.float64)
        out["to_memory"] = float(np.mean([np.linalg.norm(m - mem[int(k)]) for m, k in zip(means, classes)
                                          if int(k) < len(mem)]))
        rows = np.asarray([int(k) for k in present if int(k) < len(mem)])
        if len(rows):
            dist = np.linalg.norm(means[:, None, :] - mem[rows][None], axis=2)
            out["nearest_memory_own"] = float(np.mean(rows[dist.argmin(1)] == classes))
    return out
