"""The report's few-shot curves: a utility metric against K, one line per group.

Reads only ``Results.fewshot`` (``fewshot.fewshot_table``); computes no metric. The section itself
is ``analysis.sections.fewshot``. Conventions of ``figures``: values in %, error bars the
interval of the seed mean, groups differ by colour, line style and marker (``figures.group_style``).
The x axis is categorical: K = 1, 5, 10, ... evenly spaced, then ``all`` (the probe on the whole
training split, an open marker not joined to the curve). Zero-shot is not a point at K = 0 (no
image was trained on, and it is another classifier, not the probe's limit): it is drawn as a
thin horizontal reference line per group, in the group's colour.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only; never a display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from cxrfair.analysis.fewshot import ZERO_SHOT  # noqa: E402
from cxrfair.analysis.figures import group_style  # noqa: E402

LABELS = {"accuracy": "Accuracy (%)", "auc_macro": "Macro AUC (%)", "f1_macro": "Macro F1 (%)"}
OVERALL = "all images"  # the legend name of the whole split (attribute "")


def _curve_rows(t: pd.DataFrame, metric: str, attribute: str) -> pd.DataFrame:
    """``metric`` overall (group ``OVERALL``) and within each group of ``attribute``."""
    rows = t[(t["metric"] == metric) & ((t["attribute"] == attribute) | (t["attribute"] == ""))]
    return rows.assign(group=rows["group"].where(rows["attribute"] != "", OVERALL))


def fewshot_panel(t: pd.DataFrame, model: str, method: str, metric: str, attribute: str, ax) -> list[str]:
    """One model × probe: ``metric`` (%) against K per group, ``all`` at the right, zero-shot lines.

    Args:
        t: ``Results.fewshot``. ax: matplotlib Axes.

    Returns:
        The groups drawn, in legend order (overall first).
    """
    rows = _curve_rows(t[t["model"] == model], metric, attribute)
    probe, zs = rows[rows["method"] == method], rows[rows["method"] == ZERO_SHOT]
    ks = sorted(int(k) for k in probe["shots"].dropna().unique())
    has_all = probe["shots"].isna().any()
    groups = list(dict.fromkeys([OVERALL, *probe["group"]]))
    for i, g in enumerate(groups):
        # Group i keeps the colour it has in every other figure (group_style(0) = the reference group).
        style = group_style(i - 1) if g != OVERALL else {"color": "#000000", "ls": "-", "marker": "o"}
        curve = probe[(probe["group"] == g) & probe["shots"].notna()].set_index("shots").reindex(ks)
        dodge = 0.06 * (i - (len(groups) - 1) / 2)  # overlapping error bars side by side
        x = np.arange(len(ks)) + dodge
        y, lo, hi = (100 * curve[c].to_numpy(dtype=float) for c in ("mean", "ci_low", "ci_high"))
        ax.errorbar(x, y, yerr=[y - lo, hi - y], capsize=2, lw=1.4, ms=4, label=g, **style)
        whole = probe[(probe["group"] == g) & probe["shots"].isna()]
        if has_all and len(whole):
            w = whole.iloc[0]
            ax.errorbar([len(ks) + dodge], [100 * w["mean"]], yerr=[[100 * (w["mean"] - w["ci_low"])], [100 * (w["ci_high"] - w["mean"])]],
                        capsize=2, ls="none", marker=style["marker"], mfc="white", color=style["color"], ms=5)
        z = zs[zs["group"] == g]
        if len(z):
            ax.axhline(100 * z["mean"].iloc[0], color=style["color"], lw=0.8, ls=(0, (1, 2)), alpha=0.9)
    ax.set_xticks(range(len(ks) + has_all), [str(k) for k in ks] + (["all"] if has_all else []))
    ax.set_xlabel("training images per class (K)")
    ax.set_ylabel(LABELS.get(metric, metric))
    ax.set_title(f"{model} · {method}", fontsize=9)
    ax.grid(axis="y", lw=0.4, alpha=0.5)
    return groups


def fewshot_figure(t: pd.DataFrame, attribute: str, metrics: tuple[str, ...]):
    """One row of panels per model × few-shot probe, one column per utility metric; returns the Figure."""
    panels = list(dict.fromkeys(zip(t.loc[t["method"] != ZERO_SHOT, "model"], t.loc[t["method"] != ZERO_SHOT, "method"])))
    metrics = [m for m in metrics if (t["metric"] == m).any()]
    fig, axes = plt.subplots(len(panels), len(metrics), figsize=(4.4 * len(metrics) + 0.4, 3.1 * len(panels) + 0.9),
                             squeeze=False, constrained_layout=True)
    groups: list[str] = []
    for r, (model, method) in enumerate(panels):
        for c, metric in enumerate(metrics):
            groups = fewshot_panel(t, model, method, metric, attribute, axes[r, c]) or groups
    handles, labels = axes[0, 0].get_legend_handles_labels()
    handles.append(plt.Line2D([], [], color="0.3", lw=0.8, ls=(0, (1, 2))))
    labels.append("zero-shot (reference line)")
    fig.legend(handles, labels, title=attribute, loc="outside lower center", ncols=min(len(labels), 4), fontsize=8,
               title_fontsize=8, frameon=False)
    return fig
