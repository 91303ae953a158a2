"""analyze on multi-label runs (Runs v2): values against scikit-learn, intervals against a slow
loop over replicates, thresholds on validation, attributes and their cross taken from the runs."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from sklearn.metrics import f1_score, roc_auc_score

from cxrfair.analysis.config import MIN_STRATUM_PATIENTS, AnalyzeConfig
from cxrfair.analysis.engine import METRIC_COLUMNS, compute
from cxrfair.core.bootstrap import merge_small_strata, patient_counts
from cxrfair.core.metrics import METRIC_DEFINITIONS, metric_definitions
from cxrfair.core.runs import make_predictions, read_runs, write_run
from cxrfair.cli import main
from cxrfair.errors import CxrfairError

from .delta_reference import widened_delta
from .synth import (
    CLASSES,
    CONDITIONS,
    ML_ATTRIBUTES,
    cohort_rows,
    meta_for,
    multilabel_meta,
    multilabel_probs,
    multilabel_rows,
    probs_for,
    write_multilabel_runs,
)

R, SEED = 100, 7
GRID = [("m", "zeroshot", 0), ("m", "zeroshot", 1), ("m", "linear", 0), ("m", "linear", 1)]


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    d = tmp_path_factory.mktemp("ml") / "RUNS"
    rows = multilabel_rows(80)
    write_multilabel_runs(d, GRID, rows)
    runs = read_runs(d)
    return d, rows, runs, compute(runs, AnalyzeConfig(d, d, n_boot=R, seed=SEED, shortcut="none"))


def _value(res, run_id, metric, attribute="", group="", cls=""):
    m = res.metrics
    row = m[(m["run_id"] == run_id) & (m["metric"] == metric) & (m["attribute"] == attribute)
            & (m["group"] == group) & (m["class"] == cls)]
    assert len(row) == 1, (metric, attribute, group, cls)
    return row.iloc[0]


def _sk_auc(rows, probs, cond):
    y = rows[f"y_{cond}"].to_numpy()
    ok = ~np.isnan(y)
    return roc_auc_score(y[ok], probs[ok, CONDITIONS.index(cond)]) if 0 < np.nansum(y) < ok.sum() else np.nan


def _test_rows(run):
    return run.split("test").sort_values("image_id")


def _probs(rows):
    return rows[[f"p_{c}" for c in CONDITIONS]].to_numpy()


def _max_f1_threshold(y, p):
    """Brute force: F1 (scikit-learn) of p >= t for every distinct labelled score; the highest t among the best."""
    ok = ~np.isnan(y)
    y, p = y[ok].astype(int), p[ok]
    cands = np.unique(p)
    f1s = [f1_score(y, (p >= t).astype(int), zero_division=0) for t in cands]
    return cands[np.flatnonzero(np.isclose(f1s, max(f1s)))[-1]]


def test_values_match_scikit_learn(analysed):
    _, _, runs, res = analysed
    run = next(r for r in runs if r.run_id == "m__linear__best__s0")
    rows = _test_rows(run)
    p = _probs(rows)
    for c in CONDITIONS:
        assert _value(res, run.run_id, "auc", cls=c)["value"] == pytest.approx(_sk_auc(rows, p, c))
    race = {g: _sk_auc(rows[(rows["race"] == g).to_numpy()], p[(rows["race"] == g).to_numpy()], "Effusion")
            for g in ("White", "Black", "Asian")}
    assert _value(res, run.run_id, "auc", "race", "Black", "Effusion")["value"] == pytest.approx(race["Black"])
    # Three groups: the gap is max − min; two: reference (M) − other, signed.
    assert _value(res, run.run_id, "auc_gap", "race", "", "Effusion")["value"] == pytest.approx(
        max(race.values()) - min(race.values()))
    sex = {g: _sk_auc(rows[(rows["sex"] == g).to_numpy()], p[(rows["sex"] == g).to_numpy()], "Effusion") for g in "MF"}
    assert _value(res, run.run_id, "auc_gap", "sex", "", "Effusion")["value"] == pytest.approx(sex["M"] - sex["F"])


def test_thresholds_are_chosen_on_validation_and_used_on_test(analysed):
    _, _, runs, res = analysed
    run = next(r for r in runs if r.run_id == "m__linear__best__s1")
    val, test = run.split("val"), _test_rows(run)
    th = res.thresholds[res.thresholds["run_id"] == run.run_id].set_index("class")
    assert list(th.index) == CONDITIONS
    for j, c in enumerate(CONDITIONS):
        t = _max_f1_threshold(val[f"y_{c}"].to_numpy(), val[f"p_{c}"].to_numpy())
        assert th.loc[c, "threshold"] == pytest.approx(t)
        assert th.loc[c, "n_val_pos"] == (val[f"y_{c}"] == 1).sum()
        y = test[f"y_{c}"].to_numpy()
        ok = ~np.isnan(y)
        pred = (test[f"p_{c}"].to_numpy() >= t).astype(int)
        assert _value(res, run.run_id, "f1", cls=c)["value"] == pytest.approx(f1_score(y[ok].astype(int), pred[ok]))
    c = "Pneumothorax"
    t = th.loc[c, "threshold"]
    fnr = {}
    for g in "MF":
        m = (test["sex"] == g).to_numpy() & (test[f"y_{c}"] == 1).to_numpy()
        fnr[g] = np.mean(test.loc[m, f"p_{c}"].to_numpy() < t)
    assert _value(res, run.run_id, "fnr_gap", "sex", "", c)["value"] == pytest.approx(fnr["M"] - fnr["F"])
    assert any("max" in n and "validation" in n for n in res.notes)


def _slow_auc(runs, rows, cond):
    """(runs, R): AUC of ``cond`` (scikit-learn, per resample rebuilt by repeating images) of each run."""
    strata = (rows["sex"] + "×" + rows["age_group"]).to_numpy()
    patients = rows["patient_id"].astype(str).to_numpy()
    merged, pooled = merge_small_strata(patients, strata, MIN_STRATUM_PATIENTS)
    assert pooled  # the fixture's sex × five age bins has small cells: pooling is exercised
    counts = patient_counts(patients, merged, R, np.random.default_rng(SEED))
    out = []
    for run in runs:
        test = _test_rows(run)
        y, p = test[f"y_{cond}"].to_numpy(), test[f"p_{cond}"].to_numpy()
        reps = []
        for r in range(R):
            idx = np.repeat(np.arange(len(test)), counts[r].astype(int))
            idx = idx[~np.isnan(y[idx])]
            reps.append(roc_auc_score(y[idx], p[idx]))
        out.append(reps)
    return np.array(out)


def test_intervals_seed_means_and_paired_comparison_against_a_slow_loop(analysed):
    _, rows, runs, res = analysed
    by = {r.run_id: r for r in runs}
    lin = [by["m__linear__best__s0"], by["m__linear__best__s1"]]
    zs = [by["m__zeroshot__clip-d0__s0"], by["m__zeroshot__clip-d1__s1"]]
    reps = _slow_auc(lin + zs, _test_rows(lin[0]), "Effusion")
    row = _value(res, lin[0].run_id, "auc", cls="Effusion")
    assert (row["ci_low"], row["ci_high"]) == pytest.approx(tuple(np.percentile(reps[0], [2.5, 97.5])), abs=1e-12)
    s = res.seeds[(res.seeds["metric"] == "auc") & (res.seeds["attribute"] == "")
                  & (res.seeds["class"] == "Effusion")].set_index("tag")
    # The seed mean's interval: the patients-only percentile interval of the mean replicates, each side
    # widened in quadrature by t_{S-1} sd / sqrt(S) over the seeds' own values, clipped to [0, 1].
    from scipy import stats

    per_seed = np.array([_value(res, r.run_id, "auc", cls="Effusion")["value"] for r in lin])
    mean = per_seed.mean()
    p_lo, p_hi = np.percentile(reps[:2].mean(axis=0), [2.5, 97.5])
    half = stats.t.ppf(0.975, 1) * per_seed.std(ddof=1) / np.sqrt(2)
    expected = (max(0.0, mean - np.hypot(mean - p_lo, half)), min(1.0, mean + np.hypot(p_hi - mean, half)))
    assert s.loc["best", "mean"] == pytest.approx(mean, abs=1e-12)
    assert (s.loc["best", "ci_low"], s.loc["best", "ci_high"]) == pytest.approx(expected, abs=1e-9)
    assert s.loc["clip", "n_seeds"] == 2  # the zero-shot draws averaged like seeds
    # The reference is the linear probe (runsets.REFERENCE_ORDER): its seeds averaged on each resample, the
    # paired difference's interval widened by the reference's seed variance (replicates.delta_interval).
    c = res.comparisons[(res.comparisons["metric"] == "auc") & (res.comparisons["attribute"] == "")
                        & (res.comparisons["class"] == "Effusion") & (res.comparisons["run_id"] == zs[1].run_id)]
    assert c["baseline_runs"].item() == ";".join(r.run_id for r in lin)
    zs_value = _value(res, zs[1].run_id, "auc", cls="Effusion")["value"]
    want = widened_delta(zs_value - per_seed.mean(), reps[3] - reps[:2].mean(axis=0), [per_seed])
    assert (c["ci_low"].item(), c["ci_high"].item(), c["p_value"].item()) == pytest.approx(want, abs=1e-9)
    names = set(res.comparisons["metric"])
    assert {"auc_macro", "auc", "auc_gap", "worst_group_auc", "es_auc", "fnr_gap"} <= names


def test_attributes_groups_and_cross_come_from_the_runs(analysed):
    _, _, _, res = analysed
    assert res.task == "multilabel"
    assert res.config.attributes == ("sex", "age_group", "race") and res.config.cross == ("sex", "age_group")
    assert list(res.attributes) == ["sex", "age_group", "race", "sex×age"]
    assert res.attributes["age_group"]["groups"] == ["50-65", "18-25", "25-50", "65-80", "80+"]  # reference first
    assert res.attributes["sex×age"]["of"] == ["sex", "age_group"] and len(res.attributes["sex×age"]["groups"]) == 10
    assert res.strata["attributes"] == ["sex", "age_group"] and res.strata["pooled"]
    assert set(res.metrics["attribute"]) == {"", "sex", "age_group", "race", "sex×age"}
    assert set(res.metrics.loc[res.metrics["attribute"] == "race", "group"]) == {"", "White", "Black", "Asian"}


@pytest.mark.parametrize("kwargs, crossed, strata", [
    (dict(cross=("race", "sex")), "race×sex", ["race", "sex"]),
    (dict(cross=()), None, ["sex"]),  # no cross: strata by the first attribute
    (dict(attributes=("race",)), None, ["race"]),
    (dict(attributes=("race", "sex")), "race×sex", ["race", "sex"]),  # default cross: the first two
])
def test_cross_option(analysed, kwargs, crossed, strata):
    d, _, runs, _ = analysed
    res = compute(runs[:1], AnalyzeConfig(d, d, n_boot=0, **kwargs))
    assert {a for a in set(res.metrics["attribute"]) if "×" in a} == ({crossed} if crossed else set())
    assert res.strata["attributes"] == strata
    if crossed:
        assert res.attributes[crossed]["of"] == strata and res.config.cross == tuple(strata)


def test_bad_cross_is_refused(analysed):
    d, _, runs, _ = analysed
    with pytest.raises(CxrfairError, match=r"--cross sex,view: view is not among the analysed attributes"):
        compute(runs[:1], AnalyzeConfig(d, d, n_boot=0, cross=("sex", "view")))
    with pytest.raises(CxrfairError, match=r"--cross race: give two or more"):
        AnalyzeConfig(d, d, cross=("race",))


def test_runs_must_agree_on_their_attributes(tmp_path):
    rows = multilabel_rows(20)
    write_multilabel_runs(tmp_path, [("m", "linear", 0)], rows)
    other = ML_ATTRIBUTES | {"race": {"groups": ["White", "Black", "Asian"], "reference": "Black"}}
    preds = make_predictions(rows, multilabel_probs(rows), CONDITIONS, task="multilabel", attributes=other)
    write_run(tmp_path, multilabel_meta("m", "full", 0, attributes=other), preds)
    with pytest.raises(CxrfairError, match=r"runs m__full__best__s0 and m__linear__best__s0 declare different "
                                           r"attributes \(.*race: White/Black/Asian ref Black.* vs .*ref White"):
        compute(read_runs(tmp_path), AnalyzeConfig(tmp_path, tmp_path, n_boot=0))


def test_mixed_tasks_are_refused(tmp_path):
    write_multilabel_runs(tmp_path, [("m", "linear", 0)], multilabel_rows(20))
    rows = cohort_rows(8)
    write_run(tmp_path, meta_for("m", "full", 0) | {"cohort_hash": "ml0001"}, make_predictions(rows, probs_for(rows), CLASSES))
    with pytest.raises(CxrfairError, match=r"\(multiclass\) and .* \(multilabel\) are of different tasks"):
        compute(read_runs(tmp_path), AnalyzeConfig(tmp_path, tmp_path, n_boot=0))


def test_a_run_without_validation_rows_has_nan_threshold_metrics(tmp_path):
    rows = multilabel_rows(30)
    write_multilabel_runs(tmp_path, [("m", "linear", 0)], rows[rows["split"] == "test"])
    res = compute(read_runs(tmp_path), AnalyzeConfig(tmp_path, tmp_path, n_boot=0))
    m = res.metrics.set_index(["metric", "attribute", "group", "class"])["value"]
    assert np.isnan(m["f1", "", "", "Effusion"]) and np.isnan(m["eqodds", "sex", "", ""])
    assert m["auc", "", "", "Effusion"] > 0.5
    assert any("no validation positives for Atelectasis, Effusion, Pneumothorax" in n for n in res.notes)


def test_cli_end_to_end_and_definitions(analysed, tmp_path):
    d, rows, *_ = analysed
    write_multilabel_runs(tmp_path / "RUNS", [("m", "linear", 0)], rows)  # one run, few figures: fast
    r = CliRunner().invoke(main, ["analyze", str(tmp_path / "RUNS"), "--out", str(tmp_path / "R"), "--bootstrap", "100",
                                  "--shortcut", "none", "--attributes", "race,sex", "--cross", "none"])
    assert r.exit_code == 0, r.output
    out = tmp_path / "R"
    m = pd.read_csv(out / "metrics.csv", keep_default_na=False, na_values=[""])
    assert list(m.columns) == METRIC_COLUMNS and set(m["attribute"].dropna()) == {"race", "sex"}
    assert set(m.loc[m["metric"] == "auc", "class"]) == set(CONDITIONS)
    th = pd.read_csv(out / "thresholds.csv")
    assert len(th) == len(CONDITIONS) and not (out / "shortcut.csv").exists()
    a = json.loads((out / "analysis.json").read_text())
    assert a["task"] == "multilabel" and "max" in a["threshold_rule"] and a["attributes"] == ["race", "sex"]
    assert a["attribute_groups"]["race"]["reference"] == "White" and a["shortcut"] == "none" and a["cross"] == []
    assert a["strata"]["attributes"] == ["race"]
    assert (out / "report.html").exists() and re.search(r"validation", (out / "report.md").read_text())
    names = set(m["metric"])
    assert names <= set(metric_definitions("multilabel")) and names <= set(METRIC_DEFINITIONS)
    mc = compute(read_runs(_multiclass(tmp_path)), AnalyzeConfig(tmp_path, tmp_path, n_boot=0))
    assert set(mc.metrics["metric"]) <= set(metric_definitions("multiclass")) <= set(METRIC_DEFINITIONS)
    assert METRIC_DEFINITIONS["auc"].startswith("Multi-class:") and "Multi-label:" in METRIC_DEFINITIONS["auc"]


def _multiclass(tmp_path):
    rows = cohort_rows(8)
    write_run(tmp_path / "MC", meta_for("m", "linear", 0), make_predictions(rows, probs_for(rows), CLASSES))
    return tmp_path / "MC"
