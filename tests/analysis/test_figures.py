"""Figures draw given results into a given ax, tell methods and groups apart without colour,
and draw the numbers they are given (not their own)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from cxrfair.analysis import figures as FG  # noqa: E402
from cxrfair.analysis.curves import reliability_table, roc_table  # noqa: E402
from cxrfair.core.runs import Run, make_predictions  # noqa: E402

from .synth import CLASSES, cohort_rows, probs_for  # noqa: E402

METHODS = ["zeroshot", "linear", "lora"]


def _summary_row(model, method, metric, attribute="", group="", cls="", value=0.5, lo=0.4, hi=0.6):
    return {"model": model, "method": method, "metric": metric, "attribute": attribute, "group": group,
            "class": cls, "value": value, "ci_low": lo, "ci_high": hi, "sd": np.nan, "n_seeds": 1}


@pytest.fixture(scope="module")
def data():
    rows = cohort_rows(32)
    runs = [Run({"run_id": f"m__{me}__best__s0", "model": "m", "method": me, "seed": 0, "classes": CLASSES},
                make_predictions(rows, probs_for(rows, skill=0.5 + j, seed=j), CLASSES), None)
            for j, me in enumerate(METHODS)]
    s = []
    for j, me in enumerate(METHODS):
        s.append(_summary_row("m", me, "accuracy", value=0.3 + 0.1 * j))
        s.append(_summary_row("m", me, "ece_gap", "sex", value=0.05 + 0.01 * j, lo=0.01, hi=0.2))
        for g in ("M", "F"):
            s.append(_summary_row("m", me, "f1_macro", "sex", g, value=0.4 + 0.1 * j + (g == "M") * 0.05))
            s.append(_summary_row("m", me, "ece", "sex", g, value=0.1 + (g == "F") * 0.07, lo=0.05, hi=0.25))
            for c in CLASSES:
                s.append(_summary_row("m", me, "auc", "sex", g, c, value=0.6 + 0.01 * j))
    return pd.DataFrame(s), roc_table(runs, "test", ("sex",)), reliability_table(runs, "test", ("sex",))


def test_method_bars_differ_by_hatch_not_only_colour(data):
    summary, _, _ = data
    fig, ax = plt.subplots()
    assert FG.accuracy_by_model(summary, ax=ax) is ax  # draws into the given ax
    hatches = {c.get_label(): {p.get_hatch() for p in c.patches} for c in ax.containers if hasattr(c, "patches")}
    assert set(hatches) == set(METHODS)
    assert len({h.pop() for h in hatches.values()}) == len(METHODS)
    heights = sorted(p.get_height() for c in ax.containers if hasattr(c, "patches") for p in c.patches)
    assert heights == pytest.approx([30.0, 40.0, 50.0])  # the summary's values, in %
    plt.close(fig)


def test_group_bars_differ_by_hatch(data):
    summary, _, _ = data
    fig, ax = plt.subplots()
    FG.f1_by_group(summary, "sex", ax=ax)
    bars = [c for c in ax.containers if hasattr(c, "patches")]
    assert [c.get_label() for c in bars] == ["M", "F"]
    assert bars[0].patches[0].get_hatch() != bars[1].patches[0].get_hatch()
    assert len(ax.lines) + len(ax.collections) > 0  # interval whiskers
    plt.close(fig)


def _line_styles(ax) -> list[tuple]:
    return [(ln.get_linestyle(), ln.get_marker()) for ln in ax.lines if ln.get_marker() not in ("None", None, "")]


def test_roc_panels_one_per_class_and_method_a_line_per_group(data):
    summary, roc, _ = data
    fig, axes = plt.subplots(len(METHODS), len(CLASSES), squeeze=False)
    assert FG.roc_by_group(roc, summary, "m", "sex", axes=axes) is fig
    for i, me in enumerate(METHODS):
        for j, c in enumerate(CLASSES):
            styles = _line_styles(axes[i, j])
            assert len(styles) == 2 and len(set(styles)) == 2  # M, F: line style and marker both differ
            assert len({s[0] for s in styles}) == 2 and len({s[1] for s in styles}) == 2
            curve = roc[(roc["method"] == me) & (roc["class"] == c) & (roc["group"] == "F")]
            drawn = [ln for ln in axes[i, j].lines if ln.get_marker() not in ("None", None, "")][1]
            np.testing.assert_allclose(drawn.get_ydata(), curve["tpr"])  # the table's points, as given
            assert "AUC" in axes[i, j].texts[0].get_text() and f"M {60 + i:.1f}" in axes[i, j].texts[0].get_text()
    plt.close(fig)


def test_reliability_draws_the_ece_gap_from_the_summary(data):
    summary, _, rel = data
    fig = FG.reliability_by_group(rel, summary, "m", "sex")
    axes = np.array(fig.axes[: 2 * len(METHODS)]).reshape(2, len(METHODS))
    for j, me in enumerate(METHODS):
        assert len(set(_line_styles(axes[0, j]))) == 2
        bottom = axes[1, j]
        assert [round(p.get_height(), 6) for p in bottom.patches] == [10.0, 17.0]  # group ECE, in %
        assert len({p.get_hatch() for p in bottom.patches}) == 2
        assert bottom.get_title() == f"ECE gap {100 * (0.05 + 0.01 * j):.1f} [1.0, 20.0]"
        arrows = [t for t in bottom.texts if getattr(t, "arrow_patch", None) is not None]
        assert len(arrows) == 1 and arrows[0].xy[1] == pytest.approx(17.0) and arrows[0].xyann[1] == pytest.approx(10.0)
    plt.close(fig)


def test_figures_without_data_say_so(data):
    summary, roc, rel = data
    for draw in (lambda: FG.roc_by_group(roc.iloc[:0], summary, "m", "sex"),
                 lambda: FG.reliability_by_group(rel.iloc[:0], summary, "m", "sex")):
        fig = draw()
        assert any("no data" in t.get_text() for ax in fig.axes for t in ax.texts)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(7.0, 4.0), constrained_layout=True)
    FG.accuracy_by_model(summary.iloc[:0], ax=ax)
    png = FG.png(fig)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_findings_forest_draws_each_comparison_as_given():
    from cxrfair.analysis.findings import findings_table

    cols = ["model", "baseline", "method", "seed", "metric", "attribute", "group", "class", "delta", "ci_low", "ci_high"]
    c = pd.DataFrame([("m", "zeroshot", me, 0, "accuracy", "", "", "", d, lo, hi)
                      for me, d, lo, hi in (("linear", 0.1, 0.05, 0.15), ("lora", 0.02, -0.01, 0.05))]
                     + [("m", "zeroshot", "lora", 0, "eqodds", "sex", "", "", -0.03, -0.06, -0.01)], columns=cols)
    fig = FG.findings_forest(findings_table(c))
    acc, eq = fig.axes[0], fig.axes[1]
    assert acc.get_title() == "accuracy" and eq.get_title() == "sex EqOdds"
    filled, hollow = [ln for ln in acc.lines if ln.get_marker() == "o"]
    assert filled.get_xdata().tolist() == pytest.approx([10.0]) and filled.get_ydata().tolist() == [0]
    assert hollow.get_xdata().tolist() == pytest.approx([2.0]) and hollow.get_mfc() == "white"  # includes zero
    segs = acc.collections[0].get_segments()
    assert [tuple(s[:, 0]) for s in segs] == [pytest.approx((5.0, 15.0)), pytest.approx((-1.0, 5.0))]
    assert [t.get_text() for t in acc.get_yticklabels()] == ["m · linear", "m · lora"]  # one seed each: not named
    plt.close(fig)


# ----------------------------------------------------------------------------- legibility


def _legend_boxes(fig):
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    return [lg.get_window_extent(r) for lg in legends], [ax.get_window_extent(r) for ax in fig.axes if ax.get_visible()]


def test_png_records_its_smallest_text_and_raises_the_resolution_for_small_fonts():
    import io

    from PIL import Image

    fig, ax = plt.subplots(figsize=(4, 3))
    ax.plot([0, 1], [0, 1])
    ax.set_title("title", fontsize=12)
    ax.tick_params(labelsize=6)  # the smallest text: tick labels
    ax.text(0.5, 0.5, "", fontsize=2)  # empty text draws nothing and does not count
    assert FG.smallest_text_pt(fig) == 6
    im = Image.open(io.BytesIO(FG.png(fig)))
    dpi = int(np.ceil(FG.MIN_TEXT_PX * 72 / 6))  # the test's own rule: 6 pt at >= 10 px
    assert im.width == pytest.approx(4 * dpi, abs=1)
    recorded = float(im.info["cxrfair:min_text_px"])
    assert recorded == pytest.approx(6 * dpi / 72, abs=0.01) and recorded >= FG.MIN_TEXT_PX
    wide, ax = plt.subplots(figsize=(20, 2))
    ax.set_title("t", fontsize=10)
    assert Image.open(io.BytesIO(FG.png(wide))).width <= FG.MAX_WIDTH_PX  # narrower, same text size


def test_no_legend_covers_a_panel(data):
    summary = data[0]
    figs = [FG.accuracy_by_model(summary).figure, FG.f1_by_group(summary, "sex").figure,
            FG.fairness_panels(summary, "sex", [("ece_gap", "ECE gap"), ("ece_gap", "again"), ("ece_gap", "3")])]
    try:
        for fig in figs:
            legends, panels = _legend_boxes(fig)
            assert legends
            for lg in legends:
                assert not any(lg.overlaps(p) for p in panels), fig.axes[0].get_title()
    finally:
        for fig in figs:
            plt.close(fig)


@pytest.mark.slow  # draws every figure of a report (~30 s on a shared core)
def test_no_legend_covers_a_panel_in_any_report_figure(tmp_path):
    """Every figure a multi-class report with seeds and five methods draws (embedding figures aside)."""
    from cxrfair.analysis.config import AnalyzeConfig
    from cxrfair.analysis.engine import compute
    from cxrfair.analysis.render import build_sections
    from cxrfair.analysis.report import ReportData
    from cxrfair.core.runs import read_runs

    from .synth import write_runs

    write_runs(tmp_path / "runs", [("m", me, s) for me in ("zeroshot", "linear", "mlp", "lora", "full") for s in (0, 1)],
               n_per_split=24)
    runs = read_runs(tmp_path / "runs")
    res = compute(runs, AnalyzeConfig(tmp_path / "runs", tmp_path / "out", n_boot=100, figures=False, embeddings="none"))
    drawn = 0
    for section in build_sections(ReportData(res, runs)):
        for f in section.figures:
            fig = f.draw()
            try:
                legends, panels = _legend_boxes(fig)
                assert not [lg for lg in legends if any(lg.overlaps(p) for p in panels)], f.name
                drawn += 1
            finally:
                plt.close(fig)
    assert drawn >= 10
