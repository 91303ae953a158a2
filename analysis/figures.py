"""Figures of the report. Each takes the summary table (``report.summary``) and an optional ``ax``;
none computes a metric. Values are fractions in the table and drawn in %.

Every figure copes with any subset of models and methods (one model, no fine-tuning, NaN values)
and draws "no data" instead of failing. Error bars span the bootstrap interval [ci_low, ci_high].
"""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")  # files only; never a display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from cxrfair.analysis.runs import METHODS  # noqa: E402

# One colour per method, stable across figures.
METHOD_COLORS = dict(zip(METHODS, ["#7f7f7f", "#1f77b4", "#2ca02c", "#ff7f0e", "#d62728"]))


def _ax(ax, width=7.0, height=4.0):
    if ax is None:
        _, ax = plt.subplots(figsize=(width, height), constrained_layout=True)
    return ax


def _method_order(methods) -> list[str]:
    return sorted(set(methods), key=lambda m: (METHODS.index(m) if m in METHODS else len(METHODS), m))


def _no_data(ax, what: str):
    ax.text(0.5, 0.5, f"no data for {what}", ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])
    return ax


def grouped_bars(table: pd.DataFrame, x: str, hue: str, *, ax=None, x_order=None, hue_order=None,
                 colors=None, ylabel="", title=""):
    """Bars of ``value`` (in %) with interval whiskers, grouped by ``x`` and coloured by ``hue``.

    Args:
        table: rows with columns x, hue, value, ci_low, ci_high (fractions).
        ax: matplotlib Axes, or None for a new figure.

    Returns:
        The Axes.
    """
    ax = _ax(ax)
    table = table.dropna(subset=["value"])
    if table.empty:
        return _no_data(ax, title or ylabel)
    xs = x_order or list(dict.fromkeys(table[x]))
    hues = hue_order or list(dict.fromkeys(table[hue]))
    width = 0.8 / len(hues)
    for j, h in enumerate(hues):
        sub = table[table[hue] == h].set_index(x).reindex(xs)
        pos = np.arange(len(xs)) + (j - (len(hues) - 1) / 2) * width
        color = (colors or {}).get(h)
        ax.bar(pos, 100 * sub["value"], width, label=str(h), color=color)
        lo, hi = 100 * sub["ci_low"].to_numpy(float), 100 * sub["ci_high"].to_numpy(float)
        ok = np.isfinite(lo) & np.isfinite(hi)
        # Whiskers span the interval itself: gap metrics' point estimates can lie outside it.
        ax.errorbar(pos[ok], ((lo + hi) / 2)[ok], yerr=((hi - lo) / 2)[ok], fmt="none", ecolor="black",
                    capsize=2, lw=0.8)
    ax.set_xticks(np.arange(len(xs)), [str(v) for v in xs], rotation=30 if len(xs) > 4 else 0, ha="right" if len(xs) > 4 else "center")
    ax.axhline(0, color="black", lw=0.5)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(title=hue, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: never hides bars
    return ax


def _pick(summary: pd.DataFrame, metric: str, attribute: str = "", group=None, cls: str = "") -> pd.DataFrame:
    s = summary[(summary["metric"] == metric) & (summary["attribute"] == attribute) & (summary["class"] == cls)]
    return s[s["group"] == ""] if group is None else s


def accuracy_by_model(summary: pd.DataFrame, ax=None):
    """Paper Fig. 2a: accuracy per model, one bar per method."""
    t = _pick(summary, "accuracy")
    return grouped_bars(t, "model", "method", ax=ax, hue_order=_method_order(t["method"]), colors=METHOD_COLORS,
                        ylabel="Accuracy (%)", title="Accuracy by model and method")


def f1_heatmap(summary: pd.DataFrame, ax=None):
    """Paper Fig. 2b: class-wise F1 (%) per model × method, cells annotated with the interval."""
    t = summary[(summary["metric"] == "f1") & (summary["attribute"] == "")]
    if t.empty:
        return _no_data(_ax(ax), "class-wise F1")
    t = t.assign(row=t["model"] + " · " + t["method"])
    rows = list(dict.fromkeys(t.sort_values(["model", "method"], key=_method_key)["row"]))
    classes = list(dict.fromkeys(t["class"]))
    grid = t.pivot_table(index="row", columns="class", values=["value", "ci_low", "ci_high"], dropna=False).reindex(rows)
    ax = _ax(ax, width=1.4 * len(classes) + 3, height=0.45 * len(rows) + 1.5)
    im = ax.imshow(100 * grid["value"][classes].to_numpy(float), cmap="viridis", vmin=0, vmax=100, aspect="auto")
    for i, r in enumerate(rows):
        for j, c in enumerate(classes):
            v, lo, hi = (100 * grid[k][c].iloc[i] for k in ("value", "ci_low", "ci_high"))
            text = "–" if np.isnan(v) else f"{v:.1f}" + ("" if np.isnan(lo) else f"\n[{lo:.0f}, {hi:.0f}]")
            ax.text(j, i, text, ha="center", va="center", fontsize=7, color="white" if not v > 60 else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.figure.colorbar(im, ax=ax, label="F1 (%)")
    ax.set_title("Class-wise F1 (%) [95% interval]")
    return ax


def _method_key(col: pd.Series) -> pd.Series:
    if col.name == "method":
        return col.map(lambda m: METHODS.index(m) if m in METHODS else len(METHODS))
    return col


def var_f1_by_model(summary: pd.DataFrame, ax=None):
    """Paper Fig. 3a: Var_F1 (variance of class F1 over classes) per model and method."""
    t = _pick(summary, "var_f1")
    return grouped_bars(t, "model", "method", ax=ax, hue_order=_method_order(t["method"]), colors=METHOD_COLORS,
                        ylabel="Var_F1 × 100 (as the paper's %)", title="Fairness across diseases: Var_F1 (lower is fairer)")


def f1_by_group(summary: pd.DataFrame, attribute: str, ax=None):
    """Paper Fig. 3b: macro F1 within each group of ``attribute`` per model · method."""
    t = summary[(summary["metric"] == "f1_macro") & (summary["attribute"] == attribute) & (summary["group"] != "")]
    t = t.assign(run=t["model"] + " · " + t["method"]).sort_values(["model", "method"], key=_method_key)
    return grouped_bars(t, "run", "group", ax=ax, ylabel="Macro F1 within group (%)",
                        title=f"F1 per demographic group ({attribute})")


def fairness_by_method(summary: pd.DataFrame, metric: str, attribute: str, ax=None, label: str | None = None):
    """Paper Fig. 3c–d: a group-fairness metric per model, before (baseline) vs after fine-tuning."""
    t = _pick(summary, metric, attribute)
    return grouped_bars(t, "model", "method", ax=ax, hue_order=_method_order(t["method"]), colors=METHOD_COLORS,
                        ylabel=f"{label or metric} (%)",
                        title=f"{label or metric} by {attribute}: zero-shot (before) vs adapted (after)")


def to_png(draw, *args, width=7.0, height=4.0, **kwargs) -> bytes:
    """Draw one figure with ``draw(*args, ax=..., **kwargs)`` and return PNG bytes (figure closed)."""
    fig, ax = plt.subplots(figsize=(width, height), constrained_layout=True)
    try:
        draw(*args, ax=ax, **kwargs)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        return buf.getvalue()
    finally:
        plt.close(fig)
