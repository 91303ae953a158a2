"""Figures of the report. Each takes results (the summary table ``report.summary``, the curve
tables of ``curves``) and an optional ``ax`` (or ``axes`` for a grid); none computes a metric.
Values are fractions in the tables and drawn in %.

Every figure copes with any subset of models and methods (one model, no fine-tuning, NaN values)
and draws "no data" instead of failing. Error bars span the bootstrap interval [ci_low, ci_high].
Figures read in greyscale: methods and groups differ by hatch, line style and marker as well as
by colour (colours from the Okabe–Ito palette, which colour-blind readers can tell apart).
"""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")  # files only; never a display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from cxrfair.core.runs import METHODS  # noqa: E402

# One colour and hatch per method, stable across figures.
METHOD_COLORS = dict(zip(METHODS, ["#bbbbbb", "#56b4e9", "#009e73", "#e69f00", "#d55e00"]))
METHOD_HATCHES = dict(zip(METHODS, ["", "///", "\\\\\\", "xxx", "..."]))
# Groups in reference order (M, F / young, old / M×young, ...): colour, line style, marker, hatch.
GROUP_STYLES = [("#0072b2", "-", "o", ""), ("#d55e00", "--", "s", "///"), ("#009e73", ":", "^", "..."),
                ("#cc79a7", "-.", "D", "xxx"), ("#e69f00", (0, (5, 1, 1, 1)), "v", "\\\\\\"),
                ("#000000", (0, (1, 2)), "P", "++")]
DIAGONAL = dict(color="#999999", lw=0.8, ls=(0, (2, 2)))


def group_style(i: int) -> dict:
    """Line style of the i-th group: colour, line style and marker all differ."""
    color, ls, marker, _ = GROUP_STYLES[i % len(GROUP_STYLES)]
    return {"color": color, "ls": ls, "marker": marker}


def group_hatch(i: int) -> str:
    return GROUP_STYLES[i % len(GROUP_STYLES)][3]


def _ax(ax, width=7.0, height=4.0):
    if ax is None:
        _, ax = plt.subplots(figsize=(width, height), constrained_layout=True)
    return ax


def _method_rank(m: str) -> int:
    return METHODS.index(m) if m in METHODS else len(METHODS)


def _method_order(methods) -> list[str]:
    return sorted(set(methods), key=lambda m: (_method_rank(m), m))


def _no_data(ax, what: str):
    ax.text(0.5, 0.5, f"no data for {what}", ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])
    return ax


def _pct(v) -> str:
    return "–" if not np.isfinite(v) else f"{100 * v:.1f}"


def _interval_text(v, lo, hi) -> str:
    return _pct(v) + ("" if not (np.isfinite(lo) and np.isfinite(hi)) else f" [{_pct(lo)}, {_pct(hi)}]")


def grouped_bars(table: pd.DataFrame, x: str, hue: str, *, ax=None, x_order=None, hue_order=None,
                 colors=None, hatches=None, ylabel="", title=""):
    """Bars of ``value`` (in %) with interval whiskers, grouped by ``x`` and styled by ``hue``.

    Args:
        table: rows with columns x, hue, value, ci_low, ci_high (fractions).
        ax: matplotlib Axes, or None for a new figure.
        colors, hatches: {hue value: colour / hatch}; hatches keep hues apart in greyscale.

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
        ax.bar(pos, 100 * sub["value"], width, label=str(h), color=(colors or {}).get(h),
               hatch=(hatches or {}).get(h), edgecolor="black", linewidth=0.5)
        lo, hi = 100 * sub["ci_low"].to_numpy(float), 100 * sub["ci_high"].to_numpy(float)
        ok = np.isfinite(lo) & np.isfinite(hi)
        # Whiskers span the interval itself: gap metrics' point estimates can lie outside it.
        ax.errorbar(pos[ok], ((lo + hi) / 2)[ok], yerr=((hi - lo) / 2)[ok], fmt="none", ecolor="black",
                    capsize=2, lw=0.8)
    tilt = len(xs) > 4
    ax.set_xticks(np.arange(len(xs)), [str(v) for v in xs], rotation=30 if tilt else 0, ha="right" if tilt else "center")
    ax.axhline(0, color="black", lw=0.5)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(title=hue, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: never hides bars
    return ax


def _pick(summary: pd.DataFrame, metric: str, attribute: str = "", group=None, cls: str = "") -> pd.DataFrame:
    s = summary[(summary["metric"] == metric) & (summary["attribute"] == attribute) & (summary["class"] == cls)]
    return s[s["group"] == ""] if group is None else s


def _by_method(t: pd.DataFrame, ax, ylabel: str, title: str):
    return grouped_bars(t, "model", "method", ax=ax, hue_order=_method_order(t["method"]), colors=METHOD_COLORS,
                        hatches=METHOD_HATCHES, ylabel=ylabel, title=title)


def accuracy_by_model(summary: pd.DataFrame, ax=None, metric: str = "accuracy", label: str = "Accuracy"):
    """Paper Fig. 2a: accuracy (or another overall ``metric``, e.g. multi-label macro AUC) per model, one bar per method."""
    return _by_method(_pick(summary, metric), ax, f"{label} (%)", f"{label} by model and method")


def f1_heatmap(summary: pd.DataFrame, ax=None, metric: str = "f1", label: str = "F1"):
    """Paper Fig. 2b: class-wise F1 (or ``metric``, e.g. AUC) in % per model × method, cells annotated with the interval."""
    t = summary[(summary["metric"] == metric) & (summary["attribute"] == "") & (summary["class"] != "")]
    if t.empty:
        return _no_data(_ax(ax), f"class-wise {label}")
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
    ax.figure.colorbar(im, ax=ax, label=f"{label} (%)")
    ax.set_title(f"Class-wise {label} (%) [95% interval]")
    return ax


def _method_key(col: pd.Series) -> pd.Series:
    return col.map(_method_rank) if col.name == "method" else col


def var_f1_by_model(summary: pd.DataFrame, ax=None):
    """Paper Fig. 3a: Var_F1 (variance of class F1 over classes) per model and method."""
    return _by_method(_pick(summary, "var_f1"), ax, "Var_F1 × 100 (as the paper's %)",
                      "Fairness across diseases: Var_F1 (lower is fairer)")


def f1_by_group(summary: pd.DataFrame, attribute: str, ax=None):
    """Paper Fig. 3b: macro F1 within each group of ``attribute`` per model · method, with intervals."""
    t = summary[(summary["metric"] == "f1_macro") & (summary["attribute"] == attribute) & (summary["group"] != "")]
    t = t.assign(run=t["model"] + " · " + t["method"]).sort_values(["model", "method"], key=_method_key)
    groups = list(dict.fromkeys(t["group"]))
    return grouped_bars(t, "run", "group", ax=ax, hue_order=groups,
                        colors={g: group_style(i)["color"] for i, g in enumerate(groups)},
                        hatches={g: group_hatch(i) for i, g in enumerate(groups)},
                        ylabel="Macro F1 within group (%)", title=f"F1 per demographic group ({attribute})")


def fairness_by_method(summary: pd.DataFrame, metric: str, attribute: str, ax=None, label: str | None = None):
    """Paper Fig. 3c–d: a group-fairness metric per model, before (baseline) vs after fine-tuning."""
    return _by_method(_pick(summary, metric, attribute), ax, f"{label or metric} (%)", f"{label or metric} by {attribute}")


def fairness_panels(summary: pd.DataFrame, attribute: str, metrics: list[tuple[str, str]], axes=None):
    """Several group-fairness metrics of one attribute side by side, one panel each (paper Fig. 3c–d).

    Args:
        metrics: [(metric name, axis label)].
        axes: one Axes per metric, or None for a new figure.

    Returns:
        The Figure.
    """
    if axes is None:  # at most two panels a row: the figure stays within the page at full size
        ncols = min(2, max(1, len(metrics)))
        nrows = -(-max(1, len(metrics)) // ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols + 1.6, 3.0 * nrows + 0.3), squeeze=False,
                                 constrained_layout=True)
        for ax in axes.flat[len(metrics):]:
            ax.set_visible(False)
    axes = np.ravel(axes)
    for i, (ax, (metric, label)) in enumerate(zip(axes, metrics)):
        fairness_by_method(summary, metric, attribute, ax=ax, label=label)
        if i < len(metrics) - 1 and ax.get_legend():
            ax.get_legend().remove()  # one legend, on the last panel
    return axes[0].figure


# ----------------------------------------------------------------------------- curves


def _grid(axes, nrows: int, ncols: int, width: float, height: float, top: float = 0.8, bottom: float = 0.5,
          hspace: float = 0.15, left: float = 0.75, **kw):
    """(nrows, ncols) Axes: the given ones, or a new figure of panels ``width`` × ``height`` inches.

    Margins are set by hand (in inches): constrained layout over dozens of panels costs more
    than drawing them.
    """
    if axes is not None:
        return np.asarray(axes).reshape(nrows, ncols)
    right = 0.15
    w, h = left + right + width * ncols, top + bottom + height * nrows
    fig, axes = plt.subplots(nrows, ncols, figsize=(w, h), squeeze=False, **kw)
    fig.subplots_adjust(left=left / w, right=1 - right / w, bottom=bottom / h, top=1 - top / h,
                        wspace=0.12 if kw.get("sharey") else 0.3, hspace=hspace)
    return axes


def _lookup(summary: pd.DataFrame, metric: str, attribute: str) -> dict:
    """{(model, method, group, class): (value, ci_low, ci_high)} of one metric and attribute, built once per figure."""
    s = summary[(summary["metric"] == metric) & (summary["attribute"] == attribute)]
    return {(r.model, r.method, r.group, r._6): (r.value, r.ci_low, r.ci_high)
            for r in s.rename(columns={"class": "_6"}).itertuples()}


NAN3 = (np.nan, np.nan, np.nan)


def _unit_square(ax) -> None:
    """[0, 1]² with three ticks per axis: tick objects are most of a small panel's drawing time."""
    ax.set_xlim(0, 1), ax.set_ylim(0, 1)
    ax.set_xticks([0, 0.5, 1], ["0", ".5", "1"]), ax.set_yticks([0, 0.5, 1], ["0", ".5", "1"])
    ax.tick_params(labelsize=7)


def _group_legend(fig, groups: list[str], title: str) -> None:
    handles = [plt.Line2D([], [], **group_style(i), ms=5) for i in range(len(groups))]
    fig.legend(handles, groups, title=title, loc="upper right", ncols=len(groups), fontsize=8, title_fontsize=8,
               frameon=False, bbox_to_anchor=(1.0, 1.0))


def roc_by_group(roc: pd.DataFrame, summary: pd.DataFrame, model: str, attribute: str, axes=None):
    """Per-group ROC curves of one model: one panel per class (columns) and method (rows), a line per group.

    Args:
        roc: ``curves.roc_table`` rows (any models and attributes; this model's are drawn).
        summary: ``report.summary``; each panel prints the groups' AUC from it (not recomputed).
        axes: (methods, classes) Axes, or None for a new figure.

    Returns:
        The Figure.
    """
    r = roc[(roc["model"] == model) & (roc["attribute"] == attribute)]
    methods, classes = _method_order(r["method"]), list(dict.fromkeys(r["class"]))
    groups = list(dict.fromkeys(r["group"]))
    axes = _grid(axes, max(1, len(methods)), max(1, len(classes)), 1.7, 1.7, sharex=True, sharey=True)
    if r.empty:
        _no_data(axes[0, 0], f"ROC of {model} by {attribute}")
        return axes[0, 0].figure
    auc = _lookup(summary, "auc", attribute)
    curves = {k: (v["fpr"].to_numpy(), v["tpr"].to_numpy()) for k, v in r.groupby(["method", "class", "group"], sort=False)}
    for i, method in enumerate(methods):
        for j, c in enumerate(classes):
            ax = axes[i, j]
            ax.plot([0, 1], [0, 1], **DIAGONAL)
            aucs = []
            for k, g in enumerate(groups):
                if (method, c, g) in curves:
                    ax.plot(*curves[(method, c, g)], lw=1.1, markevery=20, ms=3.5, **group_style(k))
                aucs.append(f"{g} {_pct(auc.get((model, method, g, c), NAN3)[0])}")
            ax.text(0.97, 0.03, "AUC\n" + "\n".join(aucs), transform=ax.transAxes, ha="right", va="bottom", fontsize=6)
            if i == 0:
                ax.set_title(c, fontsize=9)
            if j == 0:
                ax.set_ylabel(f"{method}\nTPR", fontsize=8)
            if i == len(methods) - 1:
                ax.set_xlabel("FPR", fontsize=8)
    _unit_square(axes[0, 0])  # shared axes: once for all panels
    for ax in axes.flat:
        ax.tick_params(labelsize=7)
    fig = axes[0, 0].figure
    _group_legend(fig, groups, attribute)
    fig.suptitle(f"{model}: ROC per class by {attribute}", fontsize=10, x=0.02, ha="left")
    return fig


def reliability_by_group(rel: pd.DataFrame, summary: pd.DataFrame, model: str, attribute: str, axes=None,
                         ece_metric: str = "ece", what: str = "binned top-label ECE, 15 bins"):
    """Reliability diagrams of one model by group (top row) and each group's ECE with the gap drawn (bottom row).

    One column per method. Top: accuracy against mean confidence per confidence bin, a line per
    group, the diagonal for perfect calibration. Bottom: each group's binned ECE with its
    interval and an arrow spanning the ECE gap, labelled with the gap and its interval (all from
    ``summary``).

    Args:
        rel: ``curves.reliability_table`` rows (this model's and attribute's are drawn).
        axes: (2, methods) Axes, or None for a new figure.
        ece_metric: the per-group ECE of the bottom row (multi-label: ``ece_macro``).
        what: the calibration measure, for the title.

    Returns:
        The Figure.
    """
    r = rel[(rel["model"] == model) & (rel["attribute"] == attribute)]
    methods, groups = _method_order(r["method"]), list(dict.fromkeys(r["group"]))
    # Rows share their axes: one set of ticks per row, and ECE bars on one scale across methods.
    axes = _grid(axes, 2, max(1, len(methods)), 2.2, 2.0, bottom=0.45, hspace=0.45, sharex="row", sharey="row")
    if r.empty:
        _no_data(axes[0, 0], f"calibration of {model} by {attribute}")
        return axes[0, 0].figure
    gap, ece = _lookup(summary, "ece_gap", attribute), _lookup(summary, ece_metric, attribute)
    bins = {k: (v["confidence"].to_numpy(), v["accuracy"].to_numpy()) for k, v in r.groupby(["method", "group"], sort=False)}
    tops = []
    for j, method in enumerate(methods):
        ax = axes[0, j]
        ax.plot([0, 1], [0, 1], **DIAGONAL)
        for k, g in enumerate(groups):
            if (method, g) in bins:
                ax.plot(*bins[(method, g)], lw=1.1, ms=3.5, **group_style(k))
        ax.set_title(method, fontsize=9)
        ax.set_xlabel("predicted probability" if ece_metric != "ece" else "confidence", fontsize=8)
        tops.append(_ece_bars(axes[1, j], [ece.get((model, method, g, ""), NAN3) for g in groups], groups,
                              gap.get((model, method, "", ""), NAN3)))
    _unit_square(axes[0, 0])
    bottom = axes[1, 0]
    bottom.set_xticks(range(len(groups)), groups)
    bottom.set_xlim(-0.6, len(groups) - 0.15)
    bottom.set_ylim(0, 1.15 * max(tops))
    for ax in axes.flat:  # tick labels are each panel's own, even on shared axes
        ax.tick_params(labelsize=7)
    for ax in axes[1]:
        ax.tick_params(axis="x", labelrotation=30 if len(groups) > 2 else 0)
    axes[0, 0].set_ylabel("accuracy" if ece_metric == "ece" else "positive rate", fontsize=8)
    bottom.set_ylabel("ECE (%)", fontsize=8)
    fig = axes[0, 0].figure
    _group_legend(fig, groups, attribute)
    fig.suptitle(f"{model}: calibration by {attribute} ({what})", fontsize=10, x=0.02, ha="left")
    return fig


def _ece_bars(ax, vals: list[tuple], groups: list[str], gap: tuple) -> float:
    """Each group's ECE as a bar with its interval, and the gap between the extreme groups as an arrow.

    Args:
        vals: per group (value, ci_low, ci_high). gap: the ECE gap's (value, ci_low, ci_high).

    Returns:
        The highest point drawn (%), for a common y scale.
    """
    v, lo, hi = (np.array([100 * x[i] for x in vals], float) for i in range(3))
    for k in range(len(groups)):
        ax.bar(k, v[k], 0.6, color=group_style(k)["color"], hatch=group_hatch(k), edgecolor="black", lw=0.5)
    ok = np.isfinite(lo) & np.isfinite(hi)
    ax.errorbar(np.arange(len(groups))[ok], ((lo + hi) / 2)[ok], yerr=((hi - lo) / 2)[ok], fmt="none",
                ecolor="black", capsize=2, lw=0.8)
    if np.isfinite(v).sum() >= 2:
        x, lo_v, hi_v = len(groups) - 0.35, np.nanmin(v), np.nanmax(v)
        ax.hlines([lo_v, hi_v], -0.3, x, colors="black", linestyles=":", lw=0.7)
        ax.annotate("", xy=(x, hi_v), xytext=(x, lo_v),
                    arrowprops=dict(arrowstyle="|-|,widthA=0.3,widthB=0.3", lw=1.2, shrinkA=0, shrinkB=0))
    ax.set_title(f"ECE gap {_interval_text(*gap)}", fontsize=8)
    return float(np.nanmax(np.r_[hi[ok], v[np.isfinite(v)], 1.0]))


# ----------------------------------------------------------------------------- multi-label and shortcut


def _panel_grid(n: int, width: float, height: float, ncols: int = 3):
    """A new figure of n panels ``width`` × ``height`` inches in rows of at most ``ncols`` (extra
    panels hidden), margins set by hand (room for a legend on the right): constrained layout
    doubles the drawing time. Returns (fig, flat axes)."""
    ncols = max(1, min(ncols, n))
    nrows = -(-max(n, 1) // ncols)
    left, right, top, bottom = 0.7, 1.3, 0.4, 0.7
    w, h = left + right + width * ncols, top + (height + bottom) * nrows
    fig, axes = plt.subplots(nrows, ncols, figsize=(w, h), squeeze=False)
    fig.subplots_adjust(left=left / w, right=1 - right / w, top=1 - top / h, bottom=bottom / h, wspace=0.25,
                        hspace=bottom / height + 0.15)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, axes.flat


def auc_by_condition_group(summary: pd.DataFrame, attribute: str, metric: str = "auc", axes=None):
    """Per-condition, per-group AUC with intervals: one panel per condition, a bar per group
    (colour and hatch) for each model · method.

    Args:
        summary: ``report.summary`` rows (multi-label: ``auc`` per attribute, group and condition).
        axes: one Axes per condition, or None for a new figure.

    Returns:
        The Figure.
    """
    t = summary[(summary["metric"] == metric) & (summary["attribute"] == attribute) & (summary["group"] != "")
                & (summary["class"] != "")]
    conditions = list(dict.fromkeys(t["class"]))
    t = t.assign(run=t["model"] + " · " + t["method"]).sort_values(["model", "method"], key=_method_key)
    n_runs = max(1, t["run"].nunique())
    if axes is None:
        fig, axes = _panel_grid(len(conditions), max(3.0, 0.55 * n_runs + 1.0), 2.6)
    axes = list(np.ravel(axes))
    if t.empty:
        return _no_data(axes[0], f"{metric} by {attribute} and condition").figure
    groups = list(dict.fromkeys(t["group"]))
    for i, (ax, c) in enumerate(zip(axes, conditions)):
        grouped_bars(t[t["class"] == c], "run", "group", ax=ax, x_order=list(dict.fromkeys(t["run"])), hue_order=groups,
                     colors={g: group_style(k)["color"] for k, g in enumerate(groups)},
                     hatches={g: group_hatch(k) for k, g in enumerate(groups)},
                     ylabel=f"{metric.upper()} within group (%)" if i % 3 == 0 else "", title=c)
        ax.set_ylim(0, 105)
        ax.axhline(50, color="#999999", lw=0.7, ls=":")  # a random ranking
        ax.tick_params(labelsize=7)
        if ax.get_legend() and i < len(conditions) - 1:
            ax.get_legend().remove()  # one legend, on the last panel
    return axes[0].figure


def shortcut_panels(table: pd.DataFrame, axes=None):
    """The shortcut test across models and methods: AUC with vs without the shortcut (left, hatched
    bars with intervals) and their paired difference with its interval (right).

    Args:
        table: ``shortcut.csv`` rows (model, method, seed, column, class, auc_with[_ci_low/_ci_high],
            auc_without[...], delta, ci_low, ci_high), drawn as given.
        axes: two Axes, or None for a new figure.

    Returns:
        The Figure.
    """
    n = max(1, len(table))
    if axes is None:  # one row per run in both panels: the figure grows down, never wider than the page
        _, axes = plt.subplots(1, 2, figsize=(9.0, 0.32 * n + 1.4), constrained_layout=True, sharey=True,
                               gridspec_kw={"width_ratios": [1.4, 1]})
    left, right = axes
    if table.empty:
        _no_data(left, "the shortcut test")
        return left.figure
    t = table.sort_values(["model", "method", "seed"], key=_method_key)
    several = t.groupby(["model", "method"])["seed"].transform("nunique") > 1
    run = list(t["model"] + " · " + t["method"] + np.where(several, " s" + t["seed"].astype(str), ""))
    column, cls = str(t["column"].iloc[0]), str(t["class"].iloc[0])
    y = np.arange(len(t))
    for off, (k, v, color, marker) in zip((-0.17, 0.17), (("with", 1, "#d55e00", "s"), ("without", 0, "#0072b2", "o"))):
        val, lo, hi = (100 * t[c].to_numpy(float) for c in (f"auc_{k}", f"auc_{k}_ci_low", f"auc_{k}_ci_high"))
        left.hlines(y + off, lo, hi, color=color, lw=1.2)
        left.plot(val, y + off, marker, color=color, ms=5, ls="none", label=f"{column} = {v}")
    left.set_xlim(0, 100)
    left.set_xlabel(f"{cls} AUC (%)")
    left.set_title(f"{cls} AUC: positives with vs without {column}", fontsize=10)
    left.set_yticks(y, run, fontsize=9)
    left.set_ylim(len(t) - 0.5, -0.5)
    left.grid(True, axis="x", lw=0.3, color="0.85")
    left.legend(fontsize=9, loc="lower center", bbox_to_anchor=(0.5, 1.08), ncols=2, frameon=False)
    d, lo, hi = (100 * t[c].to_numpy(float) for c in ("delta", "ci_low", "ci_high"))
    clear = (lo > 0) | (hi < 0)
    right.axvline(0, color="#999999", lw=0.8)
    right.hlines(y, lo, hi, color="black", lw=1.0)
    right.plot(d[clear], y[clear], "o", color="black", ms=5, label="interval excludes 0")
    right.plot(d[~clear], y[~clear], "o", mfc="white", mec="black", ms=5, label="interval covers 0")
    right.set_xlabel("AUC with − without (points)")
    right.set_title("Paired difference", fontsize=10)
    right.legend(fontsize=9, loc="lower center", bbox_to_anchor=(0.5, 1.08), ncols=2, frameon=False)
    return left.figure


# ----------------------------------------------------------------------------- findings


def findings_forest(findings: pd.DataFrame, axes=None):
    """The findings as a forest plot: one panel per question, a row per compared run, the paired
    difference (points) with its interval; filled markers where the interval excludes zero.

    Args:
        findings: ``findings.findings_table`` rows (label, model, method, delta, ci_low, ci_high,
            verdict), seeds already pooled, drawn as given.
        axes: one Axes per question, or None for a new figure.

    Returns:
        The Figure.
    """
    labels = list(dict.fromkeys(findings["label"]))
    rows = list(dict.fromkeys(zip(findings["model"], findings["method"])))  # seeds pooled: one row per pair
    names = [f"{m} · {me}" for m, me in rows]
    ncols = min(4, max(1, len(labels)))
    nrows = -(-max(1, len(labels)) // ncols)
    left = 0.2 + 0.075 * max((len(n) for n in names), default=10)  # room for the row names at fontsize 8
    height = 0.24 * len(rows) + 0.5
    axes = _grid(axes, nrows, ncols, 2.2, height, top=0.35, bottom=0.45, hspace=0.75 / height, left=left,
                 sharey=True)
    if findings.empty:
        _no_data(axes[0, 0], "paired comparisons")
        return axes[0, 0].figure
    y = {r: i for i, r in enumerate(rows)}
    for ax, label in zip(axes.flat, labels):
        t = findings[findings["label"] == label]
        pos = np.array([y[k] for k in zip(t["model"], t["method"])])
        d, lo, hi = (100 * t[c].to_numpy(float) for c in ("delta", "ci_low", "ci_high"))
        clear = t["verdict"].isin(["higher", "lower", "fairer", "less fair"]).to_numpy()
        ax.axvline(0, color="#999999", lw=0.8)
        ax.hlines(pos, lo, hi, color="black", lw=1.0)
        ax.plot(d[clear], pos[clear], "o", color="black", ms=4.5)
        ax.plot(d[~clear], pos[~clear], "o", mfc="white", mec="black", ms=4.5)
        ax.set_title(label, fontsize=9)
        ax.tick_params(labelsize=8)
        ax.set_xlabel("points", fontsize=8)
    for ax in axes.flat[len(labels):]:
        ax.set_visible(False)
    axes[0, 0].set_yticks(range(len(rows)), names, fontsize=8)
    axes[0, 0].set_ylim(len(rows) - 0.5, -0.5)
    return axes[0, 0].figure


# ----------------------------------------------------------------------------- output


MIN_TEXT_PX = 10.0  # the smallest text a figure may show, in CSS pixels as displayed at its natural size
MAX_WIDTH_PX = 1100  # the widest figure: the report's column at a 1400-px window (render.CSS), shown 1:1


def smallest_text_pt(fig) -> float:
    """The smallest font size (points) of any visible, non-empty text in ``fig`` (tick labels,
    legends and annotations included); inf for a figure without text. Lays the figure out first:
    tick labels exist only then."""
    fig.canvas.draw()
    sizes = [t.get_fontsize() for t in fig.findobj(matplotlib.text.Text)
             if t.get_visible() and t.get_text().strip() and (t.axes is None or t.axes.get_visible())]
    return min(sizes, default=float("inf"))


def dpi_for(pt: float, base: int = 100) -> int:
    """The resolution at which text of ``pt`` points is at least ``MIN_TEXT_PX`` pixels: ``base``
    unless a small font needs more (the image then displays proportionally wider)."""
    return base if not np.isfinite(pt) else max(base, int(np.ceil(MIN_TEXT_PX * 72 / pt)))


def png(fig, dpi: int | None = None) -> bytes:
    """PNG bytes of a Figure (at ``dpi_for`` its smallest text unless given); the figure is closed.

    The PNG carries its smallest text size in pixels (text chunk ``cxrfair:min_text_px``), so the
    report can say how large that text is as displayed and a browser test can check it.
    """
    try:
        pt = smallest_text_pt(fig)
        dpi = dpi or dpi_for(pt)
        width, height = fig.get_size_inches()
        if width * dpi > MAX_WIDTH_PX:  # wider than the page: narrower panels, never smaller text
            fig.set_size_inches(MAX_WIDTH_PX / dpi, height)
        px = pt * dpi / 72
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi,
                    metadata={"cxrfair:min_text_px": f"{px:.2f}" if np.isfinite(px) else "inf"})
        return buf.getvalue()
    finally:
        plt.close(fig)
