"""analyze end to end on tiny synthetic runs: files, tables, figures, CLI and its errors."""

from __future__ import annotations

import base64
import re

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from cxrfair.analysis.analyze import METRIC_COLUMNS, AnalyzeConfig, analyze, compute
from cxrfair.analysis.report import fmt
from cxrfair.analysis.runs import read_runs
from cxrfair.cli import main

from .synth import CLASSES, write_runs

GRID = [("tiny-clip", "zeroshot", 0), ("tiny-clip", "linear", 0), ("tiny-clip", "linear", 1),
        ("tiny-clip", "full", 0), ("other", "zeroshot", 0), ("other", "lora", 0)]


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("runs") / "RUNS"
    write_runs(d, GRID, n_per_split=32)
    return d


@pytest.fixture(scope="module")
def report(runs_dir):
    out = runs_dir.parent / "REPORT"
    html_path = analyze(AnalyzeConfig(runs_dir, out, n_boot=100))
    return out, html_path


def test_metrics_csv_contract(report):
    out, _ = report
    m = pd.read_csv(out / "metrics.csv", keep_default_na=False, na_values=[""])
    assert list(m.columns) == METRIC_COLUMNS
    assert set(m["run_id"]) == {f"{a}__{b}__best__s{c}" for a, b, c in GRID}
    names = set(m["metric"])
    assert {"accuracy", "f1", "f1_macro", "auc", "auc_macro", "var_f1", "ece"} <= names
    per_attr = m[m["attribute"].notna() & m["group"].isna()]
    for attr in ("sex", "age_group", "sex×age"):
        got = set(per_attr.loc[per_attr["attribute"] == attr, "metric"])
        assert got == {"f1_gap", "f1_gap_abs", "eqodds", "eqodds_worst", "ece_gap", "ece_gap_paper", "es_auc", "fnr_gap", "dp_gap", "worst_group_accuracy"}
    assert set(m.loc[(m["metric"] == "f1") & m["attribute"].isna(), "class"]) == set(CLASSES)
    assert set(m.loc[m["attribute"] == "sex×age", "group"].dropna()) == {"M×young", "M×old", "F×young", "F×old"}
    ok = m.dropna(subset=["value", "ci_low"])
    assert (ok["ci_low"] <= ok["ci_high"]).all()
    acc = ok[ok["metric"] == "accuracy"]
    assert ((acc["ci_low"] <= acc["value"] + 1e-9) & (acc["value"] <= acc["ci_high"] + 1e-9)).all()


def test_comparisons_are_paired_differences(report):
    out, _ = report
    m = pd.read_csv(out / "metrics.csv", keep_default_na=False)
    c = pd.read_csv(out / "comparisons.csv", keep_default_na=False)
    row = c[(c["run_id"] == "tiny-clip__full__best__s0") & (c["metric"] == "eqodds") & (c["attribute"] == "sex")]
    assert len(row) == 1 and row["baseline_runs"].item() == "tiny-clip__zeroshot__best__s0"
    v = m[(m["metric"] == "eqodds") & (m["attribute"] == "sex")].set_index("run_id")["value"].astype(float)
    assert float(row["delta"].item()) == pytest.approx(v["tiny-clip__full__best__s0"] - v["tiny-clip__zeroshot__best__s0"])
    # Every seed is paired with the (here single) zero-shot run.
    assert set(c.loc[c["run_id"] == "tiny-clip__linear__best__s1", "baseline_runs"]) == {"tiny-clip__zeroshot__best__s0"}
    assert set(c["model"]) == {"tiny-clip", "other"}


def test_seeds_summary(report):
    out, _ = report
    s = pd.read_csv(out / "seeds.csv", keep_default_na=False)
    lin = s[(s["method"] == "linear") & (s["metric"] == "accuracy") & (s["attribute"] == "")]
    assert lin["n_seeds"].item() == 2 and float(lin["sd"].item()) >= 0


def test_report_files_and_embedded_figures(report):
    out, html_path = report
    assert html_path == out / "report.html"
    html = html_path.read_text()
    pngs = sorted(p.name for p in (out / "figures").iterdir())
    assert {"accuracy.png", "f1_heatmap.png", "var_f1.png", "eqodds_sex.png", "f1_by_group_sex_x_age.png"} <= set(pngs)
    embedded = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", html)
    assert len(embedded) == len(pngs)
    assert all(base64.b64decode(e)[:8] == b"\x89PNG\r\n\x1a\n" for e in embedded)
    assert "src='figures" not in html and "ece_gap_paper" in html and "15 equal-width" in html
    md = (out / "report.md").read_text()
    assert re.search(r"\| tiny-clip \| zeroshot \| \d+\.\d \[\d+\.\d, \d+\.\d\]", md)
    assert re.search(r"\| tiny-clip \| linear \| [^|]+ ±\d+\.\d \|.*\| 2 \|", md)  # two seeds: sd and count


def test_one_model_one_method_no_bootstrap(tmp_path):
    write_runs(tmp_path / "RUNS", [("solo", "linear", 0)], n_per_split=12)
    html_path = analyze(AnalyzeConfig(tmp_path / "RUNS", tmp_path / "OUT", n_boot=0, attributes=("sex",)))
    m = pd.read_csv(tmp_path / "OUT" / "metrics.csv")
    assert m["ci_low"].isna().all() and "sex×age" not in set(m["attribute"].dropna())
    assert html_path.exists() and (tmp_path / "OUT" / "figures" / "eqodds_sex.png").exists()


def test_same_seed_same_intervals(runs_dir):
    runs = read_runs(runs_dir)[:2]
    a = compute(runs, AnalyzeConfig(runs_dir, runs_dir, n_boot=100, seed=3)).metrics
    b = compute(runs, AnalyzeConfig(runs_dir, runs_dir, n_boot=100, seed=3)).metrics
    c = compute(runs, AnalyzeConfig(runs_dir, runs_dir, n_boot=100, seed=4)).metrics
    pd.testing.assert_frame_equal(a, b)
    assert not np.allclose(a["ci_low"].fillna(0), c["ci_low"].fillna(0))


def test_fmt():
    assert fmt(0.494, 0.431, 0.556) == "49.4 [43.1, 55.6]"
    assert fmt(np.nan) == "–"
    assert fmt(0.5, 0.4, 0.6, sd=0.012, n=3) == "50.0 [40.0, 60.0] ±1.2"


def _invoke(*args):
    return CliRunner().invoke(main, ["analyze", *map(str, args)])


def test_cli_writes_report_and_prints_its_path(runs_dir, tmp_path):
    r = _invoke(runs_dir, "--out", tmp_path / "R", "--bootstrap", "100", "--seed", "1")
    assert r.exit_code == 0, r.output
    assert r.output.strip().endswith("report.html") and (tmp_path / "R" / "report.html").exists()
    r = _invoke(runs_dir, "--out", tmp_path / "R", "--bootstrap", "0")
    assert r.exit_code != 0 and "--force" in r.output
    assert _invoke(runs_dir, "--out", tmp_path / "R", "--bootstrap", "0", "--force").exit_code == 0


@pytest.mark.parametrize("args, pattern", [
    (["--attributes", "sex,race"], r"run .* no attribute column race"),
    (["--split", "train"], r"run .* no rows with split == 'train'"),
])
def test_cli_errors_are_one_line(runs_dir, tmp_path, args, pattern):
    r = _invoke(runs_dir, "--out", tmp_path / "R", "--bootstrap", "0", *args)
    assert r.exit_code != 0
    assert len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output
    assert re.search(pattern, r.output)
    assert not (tmp_path / "R").exists()


def test_cli_no_runs_and_bad_probabilities(tmp_path):
    (tmp_path / "EMPTY").mkdir()
    r = _invoke(tmp_path / "EMPTY", "--out", tmp_path / "R")
    assert r.exit_code != 0 and "no runs found" in r.output and len(r.output.strip().splitlines()) == 1
    (run_dir,) = write_runs(tmp_path / "RUNS", [("m", "linear", 0)], n_per_split=8)
    df = pd.read_csv(run_dir / "predictions.csv", dtype={"image_id": str})
    df["p_Effusion"] = 0.9
    df.to_csv(run_dir / "predictions.csv", index=False)
    r = _invoke(tmp_path / "RUNS", "--out", tmp_path / "R")
    assert r.exit_code != 0 and "m__linear__best__s0" in r.output and "sum to" in r.output


def _run(run_id, method="zeroshot", seed=0, **meta):
    from cxrfair.analysis.runs import Run

    return Run({"run_id": run_id, "model": "m", "method": method, "seed": seed, **meta}, None, None)


def test_tags_group_seeds_and_zero_shot_draws():
    from cxrfair.analysis.analyze import tag_of

    assert tag_of(_run("m__linear__best__s2", "linear", 2)) == "best"
    assert tag_of(_run("m__zeroshot__gloria-d3__s3", seed=3, draw=3)) == "gloria"
    assert tag_of(_run("odd-name__zeroshot__clip-d0__s0", draw=0)) == "clip"  # sanitised model in the id


def test_primary_tag_prefers_the_probes_choice_then_val_accuracy(tmp_path):
    from .synth import cohort_rows, meta_for, probs_for
    from cxrfair.analysis.runs import make_predictions, write_run

    rows = cohort_rows(16)
    for tag, skill, chosen in (("clip", 3.0, False), ("gloria", 0.0, True)):
        for d in range(2):
            meta = meta_for("m", "zeroshot", d, tag=f"{tag}-d{d}") | {"draw": d, "prompt_set_selected": chosen}
            write_run(tmp_path, meta, make_predictions(rows, probs_for(rows, skill=skill, seed=d), CLASSES))
    runs = read_runs(tmp_path)
    res = compute(runs, AnalyzeConfig(tmp_path, tmp_path, n_boot=0))
    assert set(res.runs.loc[res.runs["primary"], "tag"]) == {"gloria"}
    assert set(res.seeds["n_seeds"]) == {2}
    for r in runs:
        r.meta.pop("prompt_set_selected")
    res = compute(runs, AnalyzeConfig(tmp_path, tmp_path, n_boot=0))
    assert set(res.runs.loc[res.runs["primary"], "tag"]) == {"clip"}  # better on val


def test_paired_bootstrap_uses_the_same_resamples(tmp_path):
    """Two methods with identical predictions differ by exactly 0 in every replicate."""
    from .synth import cohort_rows, meta_for, probs_for
    from cxrfair.analysis.runs import make_predictions, write_run

    rows = cohort_rows(24)
    preds = make_predictions(rows, probs_for(rows, skill=1.0), CLASSES)
    for method in ("zeroshot", "full"):
        write_run(tmp_path, meta_for("m", method, 0), preds.sample(frac=1, random_state=len(method)))  # row order differs
    c = compute(read_runs(tmp_path), AnalyzeConfig(tmp_path, tmp_path, n_boot=100)).comparisons
    assert len(c) > 0
    defined = c.dropna(subset=["delta"])
    assert (defined["delta"] == 0).all() and (defined["ci_low"] == 0).all() and (defined["ci_high"] == 0).all()


def test_an_attribute_with_one_level_gives_nan_gaps_not_a_crash(tmp_path):
    write_runs(tmp_path / "RUNS", [("m", "linear", 0)], n_per_split=12)
    res = compute(read_runs(tmp_path / "RUNS"), AnalyzeConfig(tmp_path, tmp_path, n_boot=100, attributes=("view",)))
    gaps = res.metrics[(res.metrics["attribute"] == "view") & (res.metrics["group"] == "")]
    assert gaps.loc[gaps["metric"] == "eqodds", "value"].isna().all()
    assert (gaps.loc[gaps["metric"] == "worst_group_accuracy", "value"] > 0).all()  # the one group is the worst
