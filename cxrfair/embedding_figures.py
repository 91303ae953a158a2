"""Figures of the embedding analyses (leakage and geometry). Each takes results (a table or
arrays) and an optional ``ax``/``axes``; none computes anything it draws.

Figures are readable in greyscale: every group or probe has its own marker or hatch, not only
its own colour. Error bars span the bootstrap interval [ci_low, ci_high].

Drawn by two owners that may not import each other: the embedding analyses
(``cxrfair.probe.embeddings``: leakage.png, pca.png, centroids.png) and the report
(``cxrfair.analysis.embedding_report``: its leakage and PCA figures, from the CSVs). Hence a leaf
at the top of the package: matplotlib, numpy and pandas only, nothing of cxrfair.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only; never a display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
HATCHES = ("", "//", "..", "xx", "\\\\", "++")
# Colour-blind-safe (Okabe-Ito), ordered so neighbours also differ in lightness.
COLORS = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000")


def _ax(ax, width=6.0, height=4.0):
    if ax is None:
        _, ax = plt.subplots(figsize=(width, height), constrained_layout=True)
    return ax


def _no_data(ax, what: str):
    ax.text(0.5, 0.5, f"no data for {what}", ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])
    return ax


def save(fig, path) -> None:
    """Write a PNG and close the figure."""
    fig.savefig(path, dpi=150)
    plt.close(fig)


def leakage_bars(table: pd.DataFrame, *, condition: str = "", ax=None):
    """Test AUC per attribute (groups of bars) and probe (hatched bars) with interval whiskers;
    the chance level of each bar as a grey band (chance_low..chance_high) with a dash at
    chance_auc.

    Args:
        table: ``leakage.csv`` rows (attribute, condition, probe, auc, ci_low, ci_high,
            chance_auc, chance_low, chance_high); rows of other conditions are ignored.
        condition: which condition to draw ("" = all images).

    Returns:
        The Axes.
    """
    ax = _ax(ax)
    rows = table[(table["condition"].fillna("") == condition) & table["auc"].notna()]
    if rows.empty:
        return _no_data(ax, "leakage" + (f" within {condition}" if condition else ""))
    attrs, probes = list(dict.fromkeys(rows["attribute"])), list(dict.fromkeys(rows["probe"]))
    width = 0.8 / len(probes)
    for j, probe in enumerate(probes):
        sub = rows[rows["probe"] == probe].set_index("attribute").reindex(attrs)
        pos = np.arange(len(attrs)) + (j - (len(probes) - 1) / 2) * width
        ax.bar(pos, sub["auc"], width, color=COLORS[j % len(COLORS)], hatch=HATCHES[j % len(HATCHES)],
               edgecolor="black", lw=0.5, label=probe)
        lo, hi = sub["ci_low"].to_numpy(float), sub["ci_high"].to_numpy(float)
        ax.errorbar(pos, (lo + hi) / 2, yerr=(hi - lo) / 2, fmt="none", ecolor="black", capsize=2, lw=0.8)
        c_lo, c_hi, c = (sub[k].to_numpy(float) for k in ("chance_low", "chance_high", "chance_auc"))
        ok = np.isfinite(c)
        ax.bar(pos[ok], (c_hi - c_lo)[ok], width * 0.9, bottom=c_lo[ok], color="0.6", alpha=0.6, zorder=3,
               label="chance (permutation)" if j == 0 else None)
        ax.hlines(c[ok], pos[ok] - width * 0.45, pos[ok] + width * 0.45, colors="black", linestyles="--", lw=0.8, zorder=4)
    ax.set_xticks(np.arange(len(attrs)), attrs)
    low = np.nanmin(np.r_[rows["ci_low"].to_numpy(float), rows["chance_low"].to_numpy(float), 0.5])
    ax.set_ylim(max(0.0, low - 0.05), 1.0)
    ax.set_ylabel("test ROC-AUC (attribute from embedding)")
    model = ", ".join(dict.fromkeys(rows["model"].astype(str))) if "model" in rows else ""
    ax.set_title(f"Attribute leakage{' within ' + condition if condition else ''}" + (f": {model}" if model else ""))
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return ax


def pca_panels(scores: np.ndarray, attributes: dict, explained=None, *, axes=None, title: str = ""):
    """PC1 vs PC2 of one PCA fit, one panel per attribute, points marked by group.

    Every panel draws the same ``scores`` (one projection), only the grouping differs.

    Args:
        scores: (N, 2) principal-component scores.
        attributes: name -> (labels (N,) group of each point, NaN/None = missing; groups in
            legend order).
        explained: (2,) explained variance ratios, shown on the axes, or None.
        axes: a sequence of Axes, one per attribute, or None for a new figure.

    Returns:
        The Figure.
    """
    names = list(attributes)
    if axes is None:
        n = max(len(names), 1)
        _, axes = plt.subplots(1, n, figsize=(4.2 * n, 4.0), constrained_layout=True, squeeze=False)
        axes = axes[0]
    scores = np.asarray(scores, dtype=float)
    size = 12 if len(scores) <= 2000 else 4
    for ax, name in zip(axes, names):
        labels, groups = attributes[name]
        labels = pd.Series(labels, dtype=object)
        for j, g in enumerate(groups):
            m = (labels == g).to_numpy()
            ax.scatter(scores[m, 0], scores[m, 1], s=size, marker=MARKERS[j % len(MARKERS)], alpha=0.7, linewidths=0.3,
                       facecolors=COLORS[j % len(COLORS)], edgecolors="black", label=f"{g} (n={int(m.sum())})")
        ax.set_title(name)
        ax.set_xlabel(_pc_label(1, explained))
        ax.set_ylabel(_pc_label(2, explained))
        ax.legend(fontsize=7, markerscale=1.5)
    if not names:
        _no_data(axes[0], "PCA (no attribute)")
    fig = axes[0].figure
    if title:
        fig.suptitle(title)
    return fig


def _pc_label(k: int, explained) -> str:
    if explained is None:
        return f"PC{k}"
    return f"PC{k} ({100 * float(explained[k - 1]):.1f}% of variance)"


def centroid_bars(table: pd.DataFrame, *, top: int = 20, ax=None):
    """The ``top`` dimensions with the largest standardised |centroid difference| of one group
    pair, drawn signed (group minus reference) with interval whiskers.

    Args:
        table: ``centroids.csv`` rows of one (attribute, group) pair: dim, diff, ci_low, ci_high
            (interval of diff), rank (1 = largest |diff|).

    Returns:
        The Axes.
    """
    ax = _ax(ax, 5.0, 3.6)
    rows = table.dropna(subset=["diff"]).sort_values("rank").head(top)
    if rows.empty:
        return _no_data(ax, "centroid differences")
    pos = np.arange(len(rows))
    diff = rows["diff"].to_numpy(float)
    ax.bar(pos, diff, 0.7, color=np.where(diff >= 0, COLORS[0], COLORS[1]), hatch=None, edgecolor="black", lw=0.5)
    lo, hi = rows["ci_low"].to_numpy(float), rows["ci_high"].to_numpy(float)
    ax.errorbar(pos, (lo + hi) / 2, yerr=(hi - lo) / 2, fmt="none", ecolor="black", capsize=2, lw=0.8)
    ax.axhline(0, color="black", lw=0.5)
    ax.set_xticks(pos, [str(d) for d in rows["dim"]], rotation=90, fontsize=7)
    ax.set_xlabel(f"embedding dimension (top {len(rows)} by |difference|)")
    first = rows.iloc[0]
    ax.set_ylabel("standardised mean difference")
    ax.set_title(f"{first['attribute']}: {first['group']} minus {first['reference']}", fontsize=9)
    return ax


def centroid_panels(table: pd.DataFrame, *, top: int = 20):
    """``centroid_bars`` for every (attribute, group) pair of ``centroids.csv``, one panel each.

    Returns:
        The Figure.
    """
    pairs = list(dict.fromkeys(zip(table["attribute"], table["group"])))
    n = max(len(pairs), 1)
    cols = min(n, 3)
    rows_ = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows_, cols, figsize=(5.0 * cols, 3.6 * rows_), constrained_layout=True, squeeze=False)
    for ax, (attr, group) in zip(axes.ravel(), pairs):
        centroid_bars(table[(table["attribute"] == attr) & (table["group"] == group)], top=top, ax=ax)
    for ax in axes.ravel()[len(pairs):]:
        ax.set_axis_off()
    if not pairs:
        _no_data(axes[0, 0], "centroid differences")
    return fig
