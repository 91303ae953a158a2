"""The report's Mitigation section: delta tables and the utility–fairness trade-off figure.

Reads only ``Results.mitigation`` / ``Results.tradeoff`` (``mitigation.mitigation_tables``); computes
no metric. The section itself is ``analysis.sections.mitigation``, which lays these out.

The figure is readable in greyscale: mitigations differ by marker shape and line style, ERM is a
large black star, the Pareto front a thick light-grey step line behind the points.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only; never a display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from cxrfair.analysis.mitigation import STRENGTH_TAG  # noqa: E402
from cxrfair.core.mitigations import ERM, NAMES  # noqa: E402

# Marker, grey face and line style per mitigation (ERM drawn apart), in table order, stable across panels.
_LOOKS = [("o", "0.25", "--"), ("s", "0.55", ":"), ("^", "0.85", "-."), ("D", "0.4", (0, (5, 1))),
          ("v", "0.7", (0, (1, 1))), ("P", "0.1", (0, (3, 1, 1, 1))), ("X", "0.5", "-")]
_STYLES = {m: _LOOKS[i % len(_LOOKS)] for i, m in enumerate(m for m in NAMES if m != ERM)}
_FALLBACK = _LOOKS[-1]
AXIS_LABELS = {"accuracy": "Accuracy (%)", "auc_macro": "Macro AUC (%)", "eqodds": "EqOdds gap (%)"}


def _panels(tradeoff: pd.DataFrame) -> list[tuple]:
    return list(dict.fromkeys(zip(tradeoff["model"], tradeoff["method"], tradeoff["sensitive"])))


def pareto_line(points: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """x, y (in %) of the Pareto front as a step line: its points by increasing utility."""
    front = points[points["pareto"]].sort_values(["utility", "gap"])
    return 100 * front["utility"].to_numpy(), 100 * front["gap"].to_numpy()


def _interval_lines(ax, p: pd.DataFrame, color) -> None:
    """Both intervals as plain lines (an absolute gap's interval need not contain its estimate)."""
    x, y = 100 * p["utility"].to_numpy(), 100 * p["gap"].to_numpy()
    ax.hlines(y, 100 * p["utility_ci_low"], 100 * p["utility_ci_high"], colors=color, lw=1, zorder=2)
    ax.vlines(x, 100 * p["gap_ci_low"], 100 * p["gap_ci_high"], colors=color, lw=1, zorder=2)


def tradeoff_panel(points: pd.DataFrame, ax, title: str = ""):
    """One model × method × attribute: utility (x) against the gap (y), one point per strength.

    Args:
        points: rows of ``Results.tradeoff`` for one panel (fractions; drawn in %).
        ax: matplotlib Axes.

    Returns:
        The Axes.
    """
    points = points.dropna(subset=["utility", "gap"])
    if points.empty:
        ax.text(0.5, 0.5, f"no data for {title}", ha="center", va="center", transform=ax.transAxes)
        return ax
    # A strength-0 run that is itself the ERM counterpart (same utility and gap) is drawn once, as ERM.
    erm = points[points["mitigation"] == ERM]
    same = points["mitigation"].ne(ERM) & points["strength"].eq(0) & pd.Series(
        [((erm["utility"] == u) & (erm["gap"] == g)).any() for u, g in zip(points["utility"], points["gap"])],
        index=points.index)
    points = points[~same]
    x, y = pareto_line(points)
    ax.step(x, y, where="pre", color="0.8", lw=6, zorder=0, label="Pareto front")
    ax.plot(x, y, "o", ms=18, mfc="none", mec="0.6", mew=2, zorder=0)  # a ring: visible with one front point too
    placed: list[tuple[float, float]] = []  # labelled points so far: a near one's label moves down
    span = (max(np.ptp(points["utility"]), 1e-9), max(np.ptp(points["gap"]), 1e-9))
    for mitigation, p in points.groupby("mitigation", sort=False):
        p = p.sort_values("strength")
        if mitigation == ERM:
            _interval_lines(ax, p, "black")
            ax.plot(100 * p["utility"], 100 * p["gap"], "*", ms=16, color="black", mec="white", zorder=4, label="ERM")
            for r in p.itertuples() if len(p) > 1 else ():  # several ERM counterparts: say which is which
                ax.annotate(f"ERM {r.tag} ({r.solver})", (100 * r.utility, 100 * r.gap), textcoords="offset points",
                            xytext=(6, -10 - 11 * _crowd(placed, r, span)), fontsize=8)
                placed.append((r.utility, r.gap))
            continue
        marker, face, style = _STYLES.get(mitigation, _FALLBACK)
        _interval_lines(ax, p, "0.35")
        ax.plot(100 * p["utility"], 100 * p["gap"], linestyle=style, color="0.35", lw=1, zorder=1)
        ax.plot(100 * p["utility"], 100 * p["gap"], marker, ms=8, mfc=face, mec="black", ls="none", zorder=3,
                label=mitigation)
        for r in p.itertuples():
            ax.annotate(_strength_label(r), (100 * r.utility, 100 * r.gap), textcoords="offset points",
                        xytext=(6, 4 - 11 * _crowd(placed, r, span)), fontsize=8,
                        fontweight="bold" if r.selected else "normal")
            placed.append((r.utility, r.gap))
    first = points.iloc[0]
    ax.set_xlabel(AXIS_LABELS.get(first["utility_metric"], first["utility_metric"]) + " →")
    ax.set_ylabel("← " + AXIS_LABELS.get(first["gap_metric"], first["gap_metric"]))
    ax.set_title(title, fontsize=9)
    # Below the axes, never over the points (loc="best" still covers some).
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncols=2, frameon=False)
    ax.grid(True, lw=0.3, color="0.85")
    return ax


def _crowd(placed: list[tuple[float, float]], r, span: tuple[float, float]) -> int:
    """How many labelled points lie within 4% of the panel's ranges (``span``: utility, gap) of ``r``:
    its label goes below theirs."""
    su, sg = span
    return sum(abs(u - r.utility) < 0.04 * su and abs(g - r.gap) < 0.04 * sg for u, g in placed)


def _strength_label(r) -> str:
    """``0.3`` for a strength run, the tag for another (``best``), ``*`` appended where selected."""
    text = f"{r.strength:g}" if np.isfinite(r.strength) else str(r.tag)
    return text + ("*" if r.selected and STRENGTH_TAG.match(str(r.tag)) else "")


def tradeoff_figure(tradeoff: pd.DataFrame, ncols: int = 3):
    """A grid of ``tradeoff_panel``s, one per model × method × sensitive attribute. Returns the Figure."""
    panels = _panels(tradeoff) or [("", "", "")]
    ncols = min(ncols, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 4.4 * nrows), squeeze=False, constrained_layout=True)
    for ax, (model, method, sensitive) in zip(axes.ravel(), panels):
        sel = (tradeoff["model"] == model) & (tradeoff["method"] == method) & (tradeoff["sensitive"] == sensitive)
        tradeoff_panel(tradeoff[sel], ax, f"{model} · {method} · {sensitive}")
    for ax in axes.ravel()[len(panels):]:
        ax.set_axis_off()
    return fig


def _cell(value, lo, hi, signed: bool = False) -> str:
    if not np.isfinite(value):
        return "–"
    s = f"{100 * value:+.1f}" if signed else f"{100 * value:.1f}"
    return s + (f" [{100 * lo:.1f}, {100 * hi:.1f}]" if np.isfinite(lo) and np.isfinite(hi) else "")


def delta_table(mitigation: pd.DataFrame) -> pd.DataFrame:
    """The runs chosen on validation (``selected``: ``best``, post-processed runs, a fine-tuning family's
    chosen ``st<s>``): one row per model × method × mitigation × attribute, one column per metric, cells
    ``Δ [low, high]`` in points with ``*`` where the interval excludes 0, ``†`` where the ERM counterpart
    was trained by another solver or grid (``like_for_like`` false)."""
    t = mitigation[mitigation["selected"].astype(bool)]
    keys = ["model", "method", "mitigation", "sensitive"]
    # A chosen run that is its own ERM counterpart (every difference exactly 0 on every resample,
    # e.g. strength 0 chosen) compares a run with itself: left out; the section says so in words.
    zero = (t["delta"] == 0) & (t["ci_low"] == 0) & (t["ci_high"] == 0)
    t = t[~zero.groupby([t[k] for k in keys], sort=False).transform("all")]
    if t.empty:
        return pd.DataFrame()
    t = t.assign(cell=[_cell(r.delta, r.ci_low, r.ci_high, signed=True) + ("*" if r.excludes_zero else "")
                       + ("" if r.like_for_like else "†") for r in t.itertuples()])
    t = t.assign(erm=[f"{r.erm_tag} ({r.erm_solver})" for r in t.itertuples()])
    index = ["model", "method", "mitigation", "sensitive", "tag", "strength", "erm"]
    w = t.assign(strength=t["strength"].map(lambda s: f"{s:g}" if np.isfinite(s) else "–")).pivot_table(
        index=index, columns="metric", values="cell", aggfunc="first", sort=False)
    w = w[list(dict.fromkeys(t["metric"]))].rename_axis(columns=None)
    seeds = t.groupby(index[:5], sort=False)["n_seeds"].max().to_numpy()  # one row per group: same order as w
    return w.reset_index().assign(seeds=seeds)


def tradeoff_rows(tradeoff: pd.DataFrame) -> pd.DataFrame:
    """The trade-off points as strings: utility and gap with intervals (%), selected and Pareto marks."""
    if tradeoff.empty:
        return pd.DataFrame()
    return pd.DataFrame({
        "model": tradeoff["model"], "method": tradeoff["method"], "sensitive": tradeoff["sensitive"],
        "mitigation": tradeoff["mitigation"], "tag": tradeoff["tag"], "solver": tradeoff["solver"],
        "strength": tradeoff["strength"].map(lambda s: f"{s:g}" if np.isfinite(s) else "–"),
        "utility": [f"{r.utility_metric} " + _cell(r.utility, r.utility_ci_low, r.utility_ci_high)
                    for r in tradeoff.itertuples()],
        "gap": [f"{r.gap_metric} " + _cell(r.gap, r.gap_ci_low, r.gap_ci_high) for r in tradeoff.itertuples()],
        "seeds": tradeoff["n_seeds"], "selected": np.where(tradeoff["selected"], "✓", ""),
        "pareto": np.where(tradeoff["pareto"], "✓", ""),
    })


DELTA_CAPTION = ("Each mitigation minus its ERM counterpart (same model, method and seed, trained by the same "
                 "solver and grid: the strength-0 run of its own sweep, else an ERM run trained the same way; the "
                 "erm column names it), in points, averaged over the paired seeds on the same patient-bootstrap "
                 "resamples; * where the 95% interval excludes 0; † where no plain run shared the solver or grid, "
                 "so the delta also holds that change (see the notes). Gaps are those of the mitigation's "
                 "sensitive attribute; better: higher utility and worst-group values, lower absolute gaps, signed "
                 "gaps (A − A') nearer 0. Rows: the strength chosen on validation. mitigation.csv has every strength.")
TRADEOFF_CAPTION = ("One point per mitigation and strength (mean over seeds, 95% intervals), and the ERM runs the "
                    "deltas are taken against (one per solver); selected: the strength chosen on validation (never "
                    "test) — a probe sweep's `best` run, or for a fine-tuning mitigation (one run per strength) the "
                    "strength with the highest validation worst-group accuracy (multi-label: worst-group macro AUC), "
                    "mean over seeds, ties to the lower validation loss (the run's `select` rule when it records "
                    "one); pareto: no other point has utility at least as high and a gap at least as low (point "
                    "estimates). tradeoff.csv has the numbers.")
