"""Mitigation analysis: paired deltas against a plain per-replicate reference, pairing rules, Pareto
flags against brute force, the trade-off figure, and a real ``cxrfair postprocess`` run end to end.

The references redraw the analysis' patient-bootstrap counts with the bootstrap functions
(tested in test_bootstrap.py), turn each replicate into explicit resample indices and score the
two runs' resampled predictions with metrics written here in plain numpy (and scikit-learn's
roc_auc_score for multi-label), one replicate at a time.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from cxrfair.analysis import mitigation as MIT
from cxrfair.analysis.analyze import AnalyzeConfig, analyze, compute
from cxrfair.analysis.bootstrap import merge_small_strata, patient_counts
from cxrfair.analysis.mitigation_figures import DELTA_CAPTION, TRADEOFF_CAPTION, mitigation_section, tradeoff_png
from cxrfair.analysis.runs import RunKey, make_predictions, read_runs, write_run
from cxrfair.cli import main
from cxrfair.errors import CxrfairError

from .synth import CLASSES, ML_ATTRIBUTES, cohort_rows, meta_for, multilabel_meta, multilabel_probs, multilabel_rows, probs_for

N_BOOT = 100


def _write(runs_dir, rows, seed, skill, draw, mitigation="erm", sensitive=None, tag="best", strength=None,
           model="m1", method="linear", **extra):
    key = RunKey(model, method, tag, seed, mitigation, sensitive)
    meta = meta_for(model, method, seed) | {"run_id": key.run_id, "mitigation": mitigation, "sensitive": sensitive,
                                            "strength": strength} | extra
    return write_run(runs_dir, meta, make_predictions(rows, probs_for(rows, skill=skill, seed=draw), CLASSES))


def _compute(runs_dir, **kw):
    return compute(read_runs(runs_dir), AnalyzeConfig(runs_dir, runs_dir.parent / "out", n_boot=N_BOOT,
                                                      figures=False, **kw))


# ----------------------------------------------------------------------------- plain references


def _nanmean(x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(x, axis=0)


def _ratio(a, b):
    return a / b if b else np.nan


def _class_rates(y, pred, c):
    tp, fp = np.sum((pred == c) & (y == c)), np.sum((pred == c) & (y != c))
    fn, tn = np.sum((pred != c) & (y == c)), np.sum((pred != c) & (y != c))
    return _ratio(2 * tp, 2 * tp + fp + fn), _ratio(tp, tp + fn), _ratio(fp, fp + tn)


def _plain_multiclass(y, p, sex) -> dict:
    """accuracy, f1_macro, f1_gap, f1_gap_abs, eqodds, worst_group_accuracy (reference M vs F) by counting."""
    pred = p.argmax(1)
    C = p.shape[1]
    rates = {g: np.array([_class_rates(y[sex == g], pred[sex == g], c) for c in range(C)]) for g in ("M", "F")}
    f1_all = np.array([_class_rates(y, pred, c)[0] for c in range(C)])
    gap = _nanmean(rates["M"][:, 0] - rates["F"][:, 0])
    eq = (_nanmean(np.abs(rates["M"][:, 1] - rates["F"][:, 1])) + _nanmean(np.abs(rates["M"][:, 2] - rates["F"][:, 2]))) / 2
    acc = {g: np.mean(pred[sex == g] == y[sex == g]) for g in ("M", "F")}
    return {"accuracy": np.mean(pred == y), "f1_macro": _nanmean(f1_all), "f1_gap": gap, "f1_gap_abs": abs(gap),
            "eqodds": eq, "worst_group_accuracy": min(acc.values())}


def _resample_indices(rows: pd.DataFrame, strata: np.ndarray) -> list[np.ndarray]:
    """The analysis' replicates of one test set (its first draw with seed 0) as explicit index arrays."""
    patients = rows["patient_id"].astype(str).to_numpy()
    merged, _ = merge_small_strata(patients, strata, 5)
    counts = patient_counts(patients, merged, N_BOOT, np.random.default_rng(0))
    return [np.repeat(np.arange(len(rows)), c.astype(int)) for c in counts]


def _test_arrays(run_dir):
    run = read_runs(run_dir.parent)
    run = next(r for r in run if r.path == run_dir)
    rows = run.split("test").sort_values("image_id", kind="stable")
    y = rows["label"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy()
    return rows, y, rows[[f"p_{c}" for c in CLASSES]].to_numpy(float)


def test_multiclass_deltas_match_a_plain_per_replicate_reference(tmp_path):
    runs = tmp_path / "runs"
    rows = cohort_rows(80)
    pairs = []
    for s in (0, 1):
        erm = _write(runs, rows, s, 1.0, s)
        mit = _write(runs, rows, s, 1.3, 10 + s, "groupdro", "sex", "best", 0.5)
        pairs.append((mit, erm))
    res = _compute(runs)
    got = res.mitigation.set_index("metric")

    test_rows, _, _ = _test_arrays(pairs[0][1])
    strata = (test_rows["sex"] + "×" + test_rows["age_group"]).to_numpy()
    idx = _resample_indices(test_rows, strata)
    sex = test_rows["sex"].to_numpy()
    names = list(MIT.GAP_METRICS["multiclass"]) + list(MIT.UTILITY_METRICS["multiclass"])
    point, reps = [], []
    for mit, erm in pairs:
        (_, y, p_m), (_, _, p_e) = _test_arrays(mit), _test_arrays(erm)
        a, b = _plain_multiclass(y, p_m, sex), _plain_multiclass(y, p_e, sex)
        point.append([a[n] - b[n] for n in names])
        per_rep = []
        for i in idx:
            a, b = _plain_multiclass(y[i], p_m[i], sex[i]), _plain_multiclass(y[i], p_e[i], sex[i])
            per_rep.append([a[n] - b[n] for n in names])
        reps.append(per_rep)
    point, reps = _nanmean(np.array(point)), _nanmean(np.array(reps))  # seed mean, replicate by replicate
    lo, hi = np.nanquantile(reps, [0.025, 0.975], axis=0)
    for j, n in enumerate(names):
        assert got.loc[n, "delta"] == pytest.approx(point[j], abs=1e-12), n
        assert got.loc[n, "ci_low"] == pytest.approx(lo[j], abs=1e-12), n
        assert got.loc[n, "ci_high"] == pytest.approx(hi[j], abs=1e-12), n
        assert got.loc[n, "excludes_zero"] == bool(lo[j] > 0 or hi[j] < 0)
    assert set(got["n_seeds"]) == {2} and set(got["erm_tag"]) == {"best"}
    assert got.loc["accuracy", "mitigated"] - got.loc["accuracy", "erm"] == pytest.approx(got.loc["accuracy", "delta"])
    assert (got["strength"] == 0.5).all() and (got["sensitive"] == "sex").all()
    assert list(res.mitigation.columns) == MIT.MITIGATION_COLUMNS


def _plain_auc(y, p) -> float:
    """P(score of a positive > score of a negative) + half the ties, over every pair."""
    pos, neg = p[y == 1], p[y == 0]
    return float(((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean())


def test_multilabel_auc_delta_matches_a_plain_per_replicate_reference(tmp_path):
    from sklearn.metrics import roc_auc_score

    runs = tmp_path / "runs"
    rows = multilabel_rows()
    made = []
    for j, (mitigation, sensitive) in enumerate((("erm", None), ("reweight", "race"))):
        key = RunKey("m1", "mlp", "best", 0, mitigation, sensitive)
        meta = multilabel_meta("m1", "mlp", 0) | {"run_id": key.run_id, "mitigation": mitigation,
                                                  "sensitive": sensitive, "strength": 1.0 if j else None}
        preds = make_predictions(rows, multilabel_probs(rows, skill=0.8 + 0.6 * j, seed=300 + j),
                                 ["Atelectasis", "Effusion", "Pneumothorax"], task="multilabel", attributes=ML_ATTRIBUTES)
        made.append(write_run(runs, meta, preds))
    res = _compute(runs)
    got = res.mitigation.set_index("metric")
    assert set(got.index) == {"auc_macro", "auc_gap", "eqodds", "worst_group_auc"}
    assert (got["sensitive"] == "race").all()

    run = {r.run_id: r for r in read_runs(runs)}
    test = [run[p.name].split("test").sort_values("image_id", kind="stable") for p in made]
    strata = (test[0]["sex"] + "×" + test[0]["age_group"]).to_numpy()

    def macro(t, i):
        out = []
        for c in ("Atelectasis", "Effusion", "Pneumothorax"):
            y, p = t[f"y_{c}"].to_numpy(float)[i], t[f"p_{c}"].to_numpy(float)[i]
            keep = ~np.isnan(y)
            out.append(_plain_auc(y[keep], p[keep]))
        return np.mean(out)

    every = np.arange(len(test[0]))
    y, p = test[0]["y_Effusion"].to_numpy(float), test[0]["p_Effusion"].to_numpy(float)
    assert _plain_auc(y[y == y], p[y == y]) == pytest.approx(roc_auc_score(y[y == y], p[y == y]))  # the reference itself
    deltas = [macro(test[1], i) - macro(test[0], i) for i in _resample_indices(test[0], strata)]
    assert got.loc["auc_macro", "delta"] == pytest.approx(macro(test[1], every) - macro(test[0], every), abs=1e-12)
    lo, hi = np.quantile(deltas, [0.025, 0.975])
    assert (got.loc["auc_macro", "ci_low"], got.loc["auc_macro", "ci_high"]) == pytest.approx((lo, hi), abs=1e-12)


# ----------------------------------------------------------------------------- pairing


def test_pairing_strengths_missing_counterpart_and_primary(tmp_path):
    runs = tmp_path / "runs"
    rows = cohort_rows(40)
    for s in (0, 1):
        _write(runs, rows, s, 0.8, s)
        # Mitigated runs score higher on validation, yet ERM stays the primary tag of m1 linear.
        _write(runs, rows, s, 2.0, 10 + s, "groupdro", "sex", "best", 0.3)
        _write(runs, rows, s, 2.0, 10 + s, "groupdro", "sex", "st0.3", 0.3)
        _write(runs, rows, s, 1.0, 20 + s, "groupdro", "sex", "st3", 3.0)
    _write(runs, rows, 5, 1.0, 30, "reweight", "sex", "best", 1.0)  # no erm seed 5
    _write(runs, rows, 0, 1.0, 40, "fairot", "sex", "best", 1.0, model="m2")  # no erm m2 at all
    res = _compute(runs)
    m = res.mitigation
    assert set(zip(m["mitigation"], m["tag"])) == {("groupdro", "best"), ("groupdro", "st0.3"), ("groupdro", "st3")}
    assert set(m["erm_tag"]) == {"best"} and set(m["n_seeds"]) == {2}
    assert any("m1__linear+reweight-sex__best__s5 has no ERM counterpart" in n for n in res.notes)
    assert any("m2__linear+fairot-sex__best__s0 has no ERM counterpart" in n for n in res.notes)
    prim = res.runs[res.runs["primary"]]
    assert set(prim.loc[prim["model"] == "m1", "tag"]) == {"best"}
    assert set(prim.loc[prim["model"] == "m2", "tag"]) == {"fairot-sex__best"}  # no erm: the mitigated run is shown
    assert any(n.startswith("m2 linear: no erm run; the tables show its mitigated runs fairot-sex__best") for n in res.notes)

    t = res.tradeoff
    assert list(t.columns) == MIT.TRADEOFF_COLUMNS
    assert list(zip(t["mitigation"], t["tag"])) == [("erm", "best"), ("groupdro", "st0.3"), ("groupdro", "st3")]
    assert list(t["selected"]) == [False, True, False]
    assert np.array_equal(t["pareto"].to_numpy(), MIT.pareto_front(t["utility"], t["gap"]))
    erm_acc = res.seeds.query("model == 'm1' and method == 'linear' and tag == 'best' and metric == 'accuracy' "
                              "and attribute == ''")
    assert t.loc[0, "utility"] == pytest.approx(float(erm_acc["mean"].iloc[0]))
    assert t.loc[0, "utility_ci_low"] == pytest.approx(float(erm_acc["ci_low"].iloc[0]))


def test_no_mitigated_runs_gives_none_and_unanalysed_attribute_is_a_note(tmp_path):
    runs = tmp_path / "runs"
    rows = cohort_rows(24)
    _write(runs, rows, 0, 1.0, 0)
    assert _compute(runs).mitigation is None and _compute(runs).tradeoff is None
    _write(runs, rows, 0, 1.0, 1, "reweight", "sex", "best", 1.0)
    res = _compute(runs, attributes=("age_group",))
    assert res.mitigation.empty and res.tradeoff.empty
    assert any("targets sex, which is not analysed" in n for n in res.notes)
    assert mitigation_section(res, figures=False)[0][0][2].empty


def test_strengths_differing_over_seeds_leave_strength_empty_with_a_note(tmp_path):
    runs = tmp_path / "runs"
    rows = cohort_rows(24)
    for s, strength in ((0, 0.1), (1, 1.0)):
        _write(runs, rows, s, 1.0, s)
        _write(runs, rows, s, 1.2, 10 + s, "groupdro", "sex", "best", strength)
    res = _compute(runs)
    assert res.mitigation["strength"].isna().all()
    assert any("differ in strength over seeds" in n for n in res.notes)


def test_mitigated_run_of_another_cohort_is_refused(tmp_path):
    runs = tmp_path / "runs"
    rows = cohort_rows(24)
    _write(runs, rows, 0, 1.0, 0)
    _write(runs, rows, 0, 1.0, 1, "reweight", "sex", "best", 1.0, cohort_hash="other9")
    with pytest.raises(CxrfairError, match="different cohorts"):
        _compute(runs)


# ----------------------------------------------------------------------------- Pareto


def _pareto_brute(u, g):
    out = []
    for i in range(len(u)):
        if np.isnan(u[i]) or np.isnan(g[i]):
            out.append(False)
            continue
        out.append(not any(not (np.isnan(u[j]) or np.isnan(g[j])) and u[j] >= u[i] and g[j] <= g[i]
                           and (u[j] > u[i] or g[j] < g[i]) for j in range(len(u))))
    return np.array(out)


@pytest.mark.parametrize("seed", range(20))
def test_pareto_front_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 12))
    u, g = np.round(rng.random(n), 1), np.round(rng.random(n), 1)  # rounding makes ties
    u[rng.random(n) < 0.1] = np.nan
    assert np.array_equal(MIT.pareto_front(u, g), _pareto_brute(u, g))


# ----------------------------------------------------------------------------- figure and postprocess end to end


def _non_blank(png: bytes) -> bool:
    import io

    import matplotlib.image as mpimg

    img = mpimg.imread(io.BytesIO(png), format="png")
    return img.shape[0] > 100 and img.shape[1] > 100 and np.unique(img.reshape(-1, img.shape[-1]), axis=0).shape[0] > 10


def test_tradeoff_figure_renders_panels_and_nan_points():
    t = pd.DataFrame([
        ("m1", "linear", "sex", "erm", np.nan, "best", 2, "accuracy", 0.6, 0.55, 0.65, "eqodds", 0.1, 0.05, 0.2, False, True),
        ("m1", "linear", "sex", "groupdro", 0.1, "st0.1", 2, "accuracy", 0.58, 0.5, 0.64, "eqodds", 0.05, 0.02, 0.1, True, True),
        ("m1", "linear", "sex", "groupdro", 1.0, "st1", 2, "accuracy", np.nan, np.nan, np.nan, "eqodds", 0.04, 0.0, 0.1, False, False),
        ("m2", "mlp", "age_group", "thresholds", 0.02, "best", 1, "accuracy", 0.5, np.nan, np.nan, "eqodds", 0.2, np.nan, np.nan, True, True),
    ], columns=MIT.TRADEOFF_COLUMNS)
    assert _non_blank(tradeoff_png(t))


def _postprocessed(tmp_path):
    """An ERM run and its ``cxrfair postprocess`` (thresholds, sex) run; returns (runs folder, ERM run folder)."""
    runs = tmp_path / "runs"
    erm = _write(runs, cohort_rows(40), 0, 1.0, 0)
    got = CliRunner().invoke(main, ["postprocess", str(erm), "--sensitive", "sex"])
    assert got.exit_code == 0, got.output
    return runs, erm


def test_postprocessed_run_is_paired_with_its_source(tmp_path):
    from cxrfair.analysis import sections
    from cxrfair.analysis.report import ReportData

    runs, erm = _postprocessed(tmp_path)
    res = _compute(runs)
    m = res.mitigation.set_index("metric")
    assert set(m["mitigation"]) == {"thresholds"} and set(m["erm_tag"]) == {"best"} and (m["strength"] == 0.02).all()
    v = res.metrics[(res.metrics["metric"] == "accuracy") & (res.metrics["attribute"] == "")].set_index("run_id")["value"]
    assert m.loc["accuracy", "delta"] == pytest.approx(v["m1__linear+thresholds-sex__best__s0"] - v[erm.name])
    sec = sections.mitigation(ReportData(res, read_runs(runs)))
    assert [t.caption for t in sec.tables] == [DELTA_CAPTION, TRADEOFF_CAPTION]
    assert "thresholds" in sec.tables[0].df.to_string() and [f.name for f in sec.figures] == ["mitigation_tradeoff.png"]
    assert _non_blank(tradeoff_png(res.tradeoff))


@pytest.mark.slow
def test_postprocessed_run_is_compared_in_the_report(tmp_path):
    runs, erm = _postprocessed(tmp_path)
    out = tmp_path / "report"
    analyze(AnalyzeConfig(runs, out, n_boot=N_BOOT))
    m = pd.read_csv(out / "mitigation.csv").set_index("metric")
    assert set(m["mitigation"]) == {"thresholds"} and set(m["erm_tag"]) == {"best"}
    assert (m["strength"] == 0.02).all()
    metrics = pd.read_csv(out / "metrics.csv", keep_default_na=False, na_values=[""])
    pick = metrics[(metrics["metric"] == "eqodds") & (metrics["attribute"] == "sex")].set_index("run_id")["value"]
    assert m.loc["eqodds", "delta"] == pytest.approx(pick["m1__linear+thresholds-sex__best__s0"] - pick[erm.name])
    assert m["ci_low"].notna().all()
    t = pd.read_csv(out / "tradeoff.csv")
    assert list(t["mitigation"]) == ["erm", "thresholds"]
    assert "## Mitigation" in (out / "report.md").read_text()
    assert _non_blank((out / "figures" / "mitigation_tradeoff.png").read_bytes())
