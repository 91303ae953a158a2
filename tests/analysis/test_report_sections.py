"""The report sections of Runs v2 and the embedding analyses, each present with its data and absent
without: multi-label per-condition × per-group AUC and thresholds, the shortcut test, attribute
leakage and geometry, and the mitigation slot. Sections are built from ``compute`` results
(no report folder, few figures drawn) to stay fast."""

from __future__ import annotations

import re
from dataclasses import replace

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from cxrfair.analysis import sections as S
from cxrfair.analysis.config import AnalyzeConfig
from cxrfair.analysis.engine import compute
from cxrfair.analysis.render import build_sections, render_markdown
from cxrfair.analysis.report import ReportData, fmt
from cxrfair.core.runs import read_runs
from cxrfair.cli import main
from cxrfair.errors import CxrfairError

from .synth import ML_ATTRIBUTES, multilabel_rows, write_embedding_outputs, write_multilabel_runs, write_runs

ML_GRID = [("m", "zeroshot", 0), ("m", "linear", 0)]


@pytest.fixture(scope="module")
def ml(tmp_path_factory):
    """Multi-label runs with a drain column (automatic shortcut test) and their results."""
    d = tmp_path_factory.mktemp("mlrep") / "RUNS"
    rows = multilabel_rows(n_per_split=90)
    write_multilabel_runs(d, ML_GRID, rows)
    runs = read_runs(d)
    res = compute(runs, AnalyzeConfig(d, d.parent / "OUT", n_boot=100, figures=False, embeddings="none"))
    return d, rows, runs, res


@pytest.fixture(scope="module")
def mc(tmp_path_factory):
    """Multi-class runs (v1: sex, age_group) and their results."""
    d = tmp_path_factory.mktemp("mcrep") / "RUNS"
    write_runs(d, [("m", "zeroshot", 0), ("m", "linear", 0)], n_per_split=24)
    runs = read_runs(d)
    return d, runs, compute(runs, AnalyzeConfig(d, d.parent / "OUT", n_boot=100, figures=False, embeddings="none"))


def _ids(sections) -> list[str]:
    return [s.id for s in sections]


def _section(sections, sid):
    return next(s for s in sections if s.id == sid)


# ----------------------------------------------------------------------------- attributes and multi-label


def test_sections_loop_over_the_analysed_attributes_and_never_the_shortcut_column(ml):
    _, _, runs, res = ml
    ids = _ids(build_sections(ReportData(res, runs)))
    assert list(res.attributes) == ["sex", "age_group", "race", "sex×age"]
    for prefix in ("conditions", "fairness", "roc", "calibration"):
        assert [i for i in ids if i.startswith(prefix + "-")] == [
            f"{prefix}-sex", f"{prefix}-age_group", f"{prefix}-race", f"{prefix}-sex_x_age"]
    assert not [i for i in ids if "drain" in i]  # the shortcut metrics' "attribute" is no attribute
    assert {"thresholds", "shortcut"} <= set(ids)


def test_condition_by_group_auc_table_states_the_summary_with_intervals(ml):
    _, _, runs, res = ml
    data = ReportData(res, runs)
    sec = _section(build_sections(data, [S.conditions_by_group]), "conditions-race")
    t = sec.tables[0].df
    assert list(t.columns[:6]) == ["model", "method", "condition", "White", "Black", "Asian"]
    assert {"auc_gap", "worst_group_auc", "es_auc"} <= set(t.columns)
    assert len(t) == len(ML_GRID) * 3  # model × method × condition
    s = data.summary
    for r in t.itertuples():
        for g in ("White", "Black", "Asian"):
            want = s[(s["model"] == r.model) & (s["method"] == r.method) & (s["metric"] == "auc")
                     & (s["attribute"] == "race") & (s["group"] == g) & (s["class"] == r.condition)].iloc[0]
            assert getattr(r, g) == fmt(want["value"], want["ci_low"], want["ci_high"], want["sd"], int(want["n_seeds"]))
            assert re.match(r"^\d+\.\d \[\d+\.\d, \d+\.\d\]$", getattr(r, g))  # every cell has its interval
    # The figure: one panel per condition, one bar per group and run.
    fig = sec.figures[0].draw()
    try:
        panels = [ax for ax in fig.axes if ax.get_visible()]
        assert [ax.get_title() for ax in panels] == ["Atelectasis", "Effusion", "Pneumothorax"]
        assert len(panels[0].patches) == 3 * len(ML_GRID)
        assert len({p.get_hatch() for p in panels[0].patches}) == 3  # groups apart in greyscale
    finally:
        plt.close(fig)


def test_thresholds_table_matches_thresholds_csv(ml):
    _, _, runs, res = ml
    sec = S.thresholds(ReportData(res, runs))
    t = sec.tables[0].df.set_index("method")
    for r in res.thresholds.itertuples():
        cell = t.loc[r.method, r._5]  # column "class"
        assert cell.startswith("–" if np.isnan(r.threshold) else f"{r.threshold:.3f}")
        assert f"({r.n_val_pos}+/{r.n_val_neg}−)" in cell
    assert sec.tables[0].collapsed


def test_multilabel_findings_match_comparisons(ml):
    from .test_report import parse_findings

    _, _, runs, res = ml
    md = render_markdown(build_sections(ReportData(res, runs), [S.findings]), set(), "t", "l")
    claims = parse_findings(md)
    assert {k["metric"] for k in claims} >= {"auc_macro", "auc_gap", "worst_group_auc", "eqodds"}
    c = res.comparisons
    for k in claims:
        row = c[(c["method"] == k["method"]) & (c["metric"] == k["metric"]) & (c["attribute"] == k["attribute"])
                & (c["group"] == "") & (c["class"] == "")].iloc[0]
        for field, col in (("delta", "delta"), ("lo", "ci_low"), ("hi", "ci_high")):
            assert k[field] == pytest.approx(round(100 * row[col], 1), abs=0.051)
    assert int(re.search(r"In all, (\d+) comparisons", md)[1]) == len(claims)


# ----------------------------------------------------------------------------- shortcut


def test_shortcut_section_states_shortcut_csv_and_draws_both_panels(ml):
    _, _, runs, res = ml
    sec = S.shortcut(ReportData(res, runs))
    assert sec.id == "shortcut" and "drain" in sec.title and "Pneumothorax" in sec.title
    t = sec.tables[0].df.set_index("method")
    for r in res.shortcut.itertuples():
        assert t.loc[r.method, "AUC with"] == fmt(r.auc_with, r.auc_with_ci_low, r.auc_with_ci_high)
        assert t.loc[r.method, "AUC without"] == fmt(r.auc_without, r.auc_without_ci_low, r.auc_without_ci_high)
        assert t.loc[r.method, "difference"] == fmt(r.delta, r.ci_low, r.ci_high)
    n_clear = int(((res.shortcut["ci_low"] > 0) | (res.shortcut["ci_high"] < 0)).sum())
    assert f"excludes zero in {n_clear} of {len(res.shortcut)} runs" in sec.prose[0]
    fig = sec.figures[0].draw()
    try:
        left, right = fig.axes[:2]
        points = [ln for ln in left.lines if ln.get_linestyle() == "None"]
        assert len(points) == 2 and all(len(p.get_xdata()) == len(res.shortcut) for p in points)  # with / without per run
        assert len({p.get_marker() for p in points}) == 2  # with / without apart in greyscale
        assert len(left.get_yticklabels()) == len(res.shortcut)  # one row per run, shared with the difference panel
        assert fig.get_size_inches()[0] <= 9.0  # grows down with the runs, never wider than the page
    finally:
        plt.close(fig)


def test_no_shortcut_no_thresholds_no_condition_sections_for_multiclass(mc):
    _, runs, res = mc
    ids = _ids(build_sections(ReportData(res, runs)))
    assert not {"thresholds", "shortcut", "leakage", "geometry", "mitigation"} & set(ids)
    assert not [i for i in ids if i.startswith("conditions-")]
    assert [i for i in ids if i.startswith("fairness-")] == ["fairness-sex", "fairness-age_group", "fairness-sex_x_age"]


# ----------------------------------------------------------------------------- mitigation slot


def test_mitigation_section_renders_only_when_results_carry_it(mc):
    """Absent or empty: no section (a real mitigated run's section is tested in test_mitigation.py)."""
    _, runs, res = mc
    assert S.mitigation(ReportData(res, runs)) is None  # plain runs: Results.mitigation is None
    res2 = replace(res)
    res2.mitigation = pd.DataFrame(columns=["model", "method", "mitigation"])
    assert S.mitigation(ReportData(res2, runs)) is None  # empty


# ----------------------------------------------------------------------------- embeddings


@pytest.fixture(scope="module")
def embeddings(ml):
    d, rows, _, _ = ml
    root = d.parent / "embeddings"  # the runs folder's sibling: found by default
    attrs = {a: ML_ATTRIBUTES[a] for a in ("sex", "race")}
    write_embedding_outputs(root, "m", rows, attrs)
    write_embedding_outputs(root, "other", rows, attrs, seed=1)
    return root


def test_leakage_section_states_leakage_csv_with_the_measured_chance(ml, embeddings):
    _, _, runs, res = ml
    data = ReportData(replace(res, config=replace(res.config, embeddings="auto")), runs)
    sec = S.leakage(data)
    t = sec.tables[0].df
    assert list(t.columns) == ["model", "attribute", "linear", "mlp", "knn", "chance", "n_test"]
    leak = pd.read_csv(embeddings / "m" / "leakage" / "leakage.csv", keep_default_na=False)
    for r in leak[leak["condition"] == ""].itertuples():
        row = t[(t["model"] == "m") & (t["attribute"] == r.attribute)].iloc[0]
        assert row[r.probe] == fmt(r.auc, r.ci_low, r.ci_high)
        assert row["chance"] == fmt(0.5, 0.44, 0.56)
    assert set(t["model"]) == {"m", "other"} and "**measured**" in sec.prose[0]
    cond = sec.tables[1]
    assert cond.collapsed and set(cond.df["condition"]) == {"label=Effusion"}
    fig = sec.figures[0].draw()
    try:
        assert len(fig.axes) == 2  # one panel per model
        assert any("chance" in t.get_text() for t in fig.axes[0].get_legend().get_texts())
    finally:
        plt.close(fig)


def test_geometry_section_pca_panels_per_attribute_and_tests(ml, embeddings):
    _, _, runs, res = ml
    data = ReportData(replace(res, config=replace(res.config, embeddings=str(embeddings))), runs)
    sec = S.geometry(data)
    assert [f.name for f in sec.figures] == ["pca_m.png", "pca_other.png"]
    t = sec.tables[0].df
    assert set(t["components differing"]) == {"PC1"} and len(t) == 4  # 2 models × 2 attributes
    fig = sec.figures[0].draw()
    try:
        assert [ax.get_title() for ax in fig.axes] == ["sex", "race"]
        assert len({c.get_paths()[0].vertices.tobytes() for c in fig.axes[1].collections}) == 3  # a marker per group
    finally:
        plt.close(fig)


def test_embeddings_folder_resolution(ml, embeddings, tmp_path):
    from cxrfair.analysis.embedding_report import embeddings_root

    d, _, _, res = ml
    c = res.config
    assert embeddings_root(replace(c, embeddings="auto")) == d.parent / "embeddings"
    assert embeddings_root(replace(c, embeddings="none")) is None
    assert embeddings_root(replace(c, runs_dir=tmp_path / "RUNS", embeddings="auto")) is None  # no sibling: off
    with pytest.raises(CxrfairError, match="--embeddings .*no <model>/leakage/leakage.csv"):
        embeddings_root(replace(c, embeddings=str(tmp_path)))
    # Absent: no sections.
    data = ReportData(replace(res, config=replace(c, embeddings="none")))
    assert S.leakage(data) is None and S.geometry(data) is None


def test_cli_embeddings_option(mc, tmp_path):
    d, _, _ = mc
    r = CliRunner().invoke(main, ["analyze", str(d), "--out", str(tmp_path / "R"), "--bootstrap", "0",
                                  "--embeddings", str(tmp_path / "missing")])
    assert r.exit_code != 0 and "--embeddings" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "R").exists()  # refused before anything is written


def test_setup_lists_each_attribute_with_its_reference_group(ml):
    _, _, runs, res = ml
    md = render_markdown(build_sections(ReportData(res, runs), [S.setup]), set(), "t", "l")
    assert "- `race`: **White** (reference), Black, Asian" in md
    assert "- `age_group`: **50-65** (reference), 18-25, 25-50, 65-80, 80+" in md
    assert "- `sex×age` (the cross of sex × age_group): **M×50-65** (reference)" in md


def test_geometry_without_its_json_takes_the_groups_from_the_tests(ml, tmp_path):
    from cxrfair.analysis.embedding_report import read_geometry

    _, rows, _, _ = ml
    write_embedding_outputs(tmp_path, "m", rows, {a: ML_ATTRIBUTES[a] for a in ("sex", "race")})
    (tmp_path / "m" / "geometry" / "geometry.json").unlink()
    assert read_geometry(tmp_path / "m" / "geometry")["attributes"] == {"sex": ["M", "F"], "race": ["White", "Black", "Asian"]}
