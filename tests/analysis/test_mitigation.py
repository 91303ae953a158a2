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
from cxrfair.analysis.analyze import analyze
from cxrfair.analysis.config import AnalyzeConfig
from cxrfair.analysis.engine import compute
from cxrfair.core.bootstrap import merge_small_strata, patient_counts
from cxrfair.analysis.figures import png
from cxrfair.analysis.mitigation_figures import DELTA_CAPTION, TRADEOFF_CAPTION, delta_table, tradeoff_figure
from cxrfair.core.runs import RunKey, make_predictions, read_runs, write_run
from cxrfair.cli import main
from cxrfair.errors import CxrfairError

from .delta_reference import widened_delta
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
    per_pair, reps = np.array(point), np.array(reps)  # (pairs, K) point deltas; (pairs, R, K)
    point = _nanmean(per_pair)
    # The pairs' resample-r deltas averaged (patients only), the interval widened by the seed variance of the
    # mean of the 2 per-pair deltas (t_1 · sd / √2, in quadrature), the p-value its inversion.
    reps = np.array([_nanmean(reps[:, r]) for r in range(N_BOOT)])
    p_ref = []
    for j, n in enumerate(names):
        lo, hi, p = widened_delta(point[j], reps[:, j], [per_pair[:, j]])
        assert got.loc[n, "delta"] == pytest.approx(point[j], abs=1e-12), n
        assert got.loc[n, "ci_low"] == pytest.approx(lo, abs=1e-9), n
        assert got.loc[n, "ci_high"] == pytest.approx(hi, abs=1e-9), n
        assert got.loc[n, "excludes_zero"] == bool(lo > 0 or hi < 0)
        assert got.loc[n, "p_value"] == pytest.approx(p, abs=1e-9), n
        p_ref.append(got.loc[n, "p_value"])
    assert got["seed_var_known"].all()
    # Holm over the group's metrics, by its step-down loop.
    order, running = sorted(range(len(names)), key=lambda j: p_ref[j]), 0.0
    for rank, j in enumerate(order):
        running = max(running, min(1.0, (len(names) - rank) * p_ref[j]))
        assert got.loc[names[j], "p_holm"] == pytest.approx(running, abs=1e-12)
    assert set(got["holm_m"]) == {len(names)} and set(got["unlike_reason"]) == {""}
    assert set(got["n_seeds"]) == {2} and set(got["erm_tag"]) == {"best"}
    assert got.loc["accuracy", "mitigated"] - got.loc["accuracy", "erm"] == pytest.approx(got.loc["accuracy", "delta"])
    assert (got["strength"] == 0.5).all() and (got["sensitive"] == "sex").all()
    assert list(res.mitigation.columns) == MIT.MITIGATION_COLUMNS


def test_mitigation_delta_whose_seeds_disagree_holds_zero(tmp_path):
    """Two seeds whose (mitigated, ERM) pairs move in opposite directions by far more than the patients move
    either (skills 0.3 → 1.9 and 1.9 → 0.8, the same draw of noise): the mean delta is a seed accident, so its interval
    holds 0, its p-value stays above 0.05 and it is not ``excludes_zero``, where the patients-only interval
    excludes 0. Against the plain per-replicate reference."""
    runs = tmp_path / "runs"
    rows = cohort_rows(80)
    pairs = []
    for s, (erm_skill, mit_skill) in enumerate(((0.3, 1.9), (1.9, 0.8))):
        erm = _write(runs, rows, s, erm_skill, 7)
        mit = _write(runs, rows, s, mit_skill, 7, "groupdro", "sex", "best", 0.5)
        pairs.append((mit, erm))
    got = _compute(runs).mitigation.set_index("metric").loc["accuracy"]
    test_rows, _, _ = _test_arrays(pairs[0][1])
    idx = _resample_indices(test_rows, (test_rows["sex"] + "×" + test_rows["age_group"]).to_numpy())
    per_pair, reps = [], []
    for mit, erm in pairs:
        (_, y, p_m), (_, _, p_e) = _test_arrays(mit), _test_arrays(erm)
        right_m, right_e = p_m.argmax(1) == y, p_e.argmax(1) == y
        per_pair.append(right_m.mean() - right_e.mean())
        reps.append([right_m[i].mean() - right_e[i].mean() for i in idx])
    assert abs(per_pair[0] - per_pair[1]) > 0.3  # the seeds disagree
    diff = np.mean(reps, axis=0)  # (R,) the pairs' mean delta per resample, patients only
    assert np.percentile(diff, 2.5) > 0 or np.percentile(diff, 97.5) < 0  # patients only: a "change"
    lo, hi, p = widened_delta(float(np.mean(per_pair)), diff, [np.array(per_pair)])
    assert (got["ci_low"], got["ci_high"], got["p_value"]) == pytest.approx((lo, hi, p), abs=1e-9)
    assert lo < 0 < hi and p >= 0.05 and not got["excludes_zero"] and got["seed_var_known"]


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
    from cxrfair.analysis import sections
    from cxrfair.analysis.report import ReportData

    assert sections.mitigation(ReportData(res, read_runs(runs))) is None  # nothing compared: no section


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


# ----------------------------------------------------------------------------- like-for-like pairing (solver and grid)

LBFGS = {"solver": "lbfgs", "hyperparameters": {"l2": 1e-4, "max_iter": 100, "grid": {"l2": [1e-5, 1e-4]}}}


def _adamw(strengths=None, lrs=(3e-3,)) -> dict:
    grid = {"lr": list(lrs), "weight_decay": [0.0, 0.01]} | ({"strength": list(strengths)} if strengths else {})
    return {"solver": "adamw", "hyperparameters": {"lr": lrs[0], "weight_decay": 0.0, "epochs": 50, "batch_size": 64,
                                                   "grid": grid}}


def _sweep(runs, rows, seed, mitigation, strengths, best, draw, **meta):
    """A probe mitigation sweep of one seed: a ``best`` run (strength ``best``) and one ``st<s>`` run per strength."""
    _write(runs, rows, seed, 1.1, draw, mitigation, "sex", "best", best, **meta)
    for j, st in enumerate(strengths):
        _write(runs, rows, seed, 1.0 + 0.1 * j, draw + 1 + j, mitigation, "sex", f"st{st:g}", st, **meta)


def _by(m, mitigation, tag):
    return m[(m["mitigation"] == mitigation) & (m["tag"] == tag)].iloc[0]


def test_adamw_mitigations_pair_with_an_adamw_strength_zero_run_not_the_lbfgs_erm(tmp_path):
    runs = tmp_path / "runs"
    rows = cohort_rows(24)
    for s in (0, 1):
        _write(runs, rows, s, 1.0, s, **LBFGS)
        _sweep(runs, rows, s, "fairot", (0.0, 0.3), 0.3, 10 + 10 * s, **_adamw((0.0, 0.3)))
        _sweep(runs, rows, s, "groupdro", (0.01, 0.1), 0.1, 50 + 10 * s, **_adamw((0.01, 0.1)))
        _sweep(runs, rows, s, "reweight", (0.0, 1.0), 1.0, 90 + 10 * s, **LBFGS)
    res = _compute(runs)
    m = res.mitigation
    # fairot and groupdro (AdamW): fairot's own st0 run, the AdamW ERM point of the same grid.
    for mitigation in ("fairot", "groupdro"):
        row = _by(m, mitigation, "best")
        assert (row.erm_tag, row.solver, row.erm_solver, row.like_for_like) == ("fairot-sex__st0", "adamw", "adamw", True)
        assert row.erm_run == "m1__linear+fairot-sex__st0__s0;m1__linear+fairot-sex__st0__s1"
    # reweight (L-BFGS): its own st0 run comes first, before the plain ERM run.
    assert _by(m, "reweight", "best").erm_tag == "reweight-sex__st0" and _by(m, "reweight", "best").like_for_like
    # The st0 run is never its own counterpart: its fellow AdamW st0 is not there, so the L-BFGS erm run, flagged.
    row = _by(m, "fairot", "st0")
    assert (row.erm_tag, row.erm_solver, bool(row.like_for_like)) == ("best", "lbfgs", False)
    unlike = [n for n in res.notes if "like_for_like false" in n]
    assert len(unlike) == 1 and unlike[0].startswith("mitigation: m1 linear fairot-sex st0 (adamw")  # once for both seeds
    assert "against ERM best (lbfgs" in unlike[0] and "change of solver and grid alone" in unlike[0]
    # The delta is against the run it names: mitigated − that counterpart, per seed, averaged.
    v = res.metrics[(res.metrics["metric"] == "accuracy") & (res.metrics["attribute"] == "")].set_index("run_id")["value"]
    want = np.mean([v[f"m1__linear+groupdro-sex__best__s{s}"] - v[f"m1__linear+fairot-sex__st0__s{s}"] for s in (0, 1)])
    assert _by(m[m["metric"] == "accuracy"], "groupdro", "best").delta == pytest.approx(want, abs=1e-12)
    # The trade-off shows both ERM points the deltas used, with their solvers.
    t = res.tradeoff
    erm = t[t["mitigation"] == "erm"]
    assert list(zip(erm["tag"], erm["solver"])) == [("best", "lbfgs"), ("fairot-sex__st0", "adamw"),
                                                    ("reweight-sex__st0", "lbfgs")]
    # Probe sweeps chose while training: the report's deltas are their best runs, once each.
    assert sorted(delta_table(m)["mitigation"]) == ["fairot", "groupdro", "reweight"]
    assert set(m.loc[m["selected"], "tag"]) == {"best"}
    assert set(t.loc[t["selected"] & (t["mitigation"] == "fairot"), "tag"]) == {"st0.3"}


def test_a_plain_adamw_erm_run_is_preferred_and_another_grid_is_flagged(tmp_path):
    runs = tmp_path / "runs"
    rows = cohort_rows(24)
    _write(runs, rows, 0, 1.0, 0, **LBFGS)
    _write(runs, rows, 0, 1.0, 1, tag="adamw", **_adamw())  # a plain AdamW ERM run on the same grid
    _write(runs, rows, 0, 1.0, 2, "fairot", "sex", "st0", 0.0, **_adamw((0.0,)))  # fine, but an erm run comes first
    _write(runs, rows, 0, 1.2, 3, "groupdro", "sex", "best", 0.1, **_adamw((0.1,)))
    _write(runs, rows, 0, 1.2, 4, "adversarial", "sex", "best", 0.1, **_adamw((0.1,), lrs=(1e-2,)))  # another grid
    res = _compute(runs)
    m = res.mitigation
    assert (_by(m, "groupdro", "best").erm_run, bool(_by(m, "groupdro", "best").like_for_like)) == ("m1__linear__adamw__s0", True)
    row = _by(m, "adversarial", "best")
    assert (row.erm_run, row.erm_solver, bool(row.like_for_like)) == ("m1__linear__best__s0", "lbfgs", False)
    assert "†" in delta_table(m).set_index("mitigation").loc["adversarial", "accuracy"]
    assert any(n.startswith("mitigation: m1 linear adversarial-sex best (adamw") and "mixes that change" in n
               for n in _compute(runs).notes)
    assert "†" not in delta_table(m).set_index("mitigation").loc["groupdro", "accuracy"]


def test_a_sweeps_st0_is_preferred_to_its_best_run_that_chose_strength_zero(tmp_path):
    runs = tmp_path / "runs"
    rows = cohort_rows(24)
    _write(runs, rows, 0, 1.0, 0, **LBFGS)
    _write(runs, rows, 0, 1.0, 1, "fairot", "sex", "best", 0.0, **_adamw((0.0, 0.3)))  # chose 0: plain training
    _write(runs, rows, 0, 1.0, 1, "fairot", "sex", "st0", 0.0, **_adamw((0.0, 0.3)))
    _write(runs, rows, 0, 1.2, 3, "groupdro", "sex", "best", 0.1, **_adamw((0.1,)))
    m = _compute(runs).mitigation
    assert _by(m, "groupdro", "best").erm_run == "m1__linear+fairot-sex__st0__s0"
    assert _by(m, "fairot", "best").erm_run == "m1__linear+fairot-sex__st0__s0"  # its own st0: delta 0, as it should
    assert _by(m[m["metric"] == "accuracy"], "fairot", "best").delta == 0
    # The st0 run is its sweep's ERM point: not paired with its own best (the same configuration) but, with no
    # other AdamW plain run, with the L-BFGS one, flagged; the trade-off's ERM points are those two.
    assert (_by(m, "fairot", "st0").erm_run, bool(_by(m, "fairot", "st0").like_for_like)) == ("m1__linear__best__s0", False)
    t = _compute(runs).tradeoff
    assert t.loc[t["mitigation"] == "erm", "tag"].tolist() == ["best", "fairot-sex__st0"]


def test_solver_and_erm_likeness_from_run_json():
    from cxrfair.core.runs import Run

    def ev(run_id, **meta):
        return type("E", (), {"run": Run({"run_id": run_id, "method": run_id.split("__")[1].split("+")[0], **meta},
                                         pd.DataFrame(), None)})()

    assert MIT.solver_of(ev("m__lora+groupdro-sex__st1__s0").run) == "adamw"  # fine-tuning records none
    assert MIT.solver_of(ev("m__linear__best__s0", solver="lbfgs").run) == "lbfgs"
    assert MIT.is_erm_like(ev("m__linear+fairot-sex__st0__s0", strength=0.0))
    assert not MIT.is_erm_like(ev("m__linear+fairot-sex__st0.1__s0", strength=0.1))
    assert not MIT.is_erm_like(ev("m__linear+groupdro-sex__st0__s0", strength=0.0))  # η = 0 keeps q uniform: cell-balanced, not ERM
    assert not MIT.is_erm_like(ev("m__linear+adversarial-sex__st0__s0", strength=0.0, adversary={"kind": "projection"}))
    assert MIT.is_erm_like(ev("m__linear+adversarial-sex__st0__s0", strength=0.0, adversary={"kind": "grl"}))


@pytest.mark.slow
def test_real_probe_runs_pair_groupdro_with_the_adamw_strength_zero_run(tmp_path):
    """Runs written by `cxrfair probe` (their own run.json solver and grid): the L-BFGS ERM run stays the
    primary tag, yet groupdro (AdamW) is compared with reweight's AdamW strength-0 run of the same grid.
    (~1 min of three sweeps' compilation; the synthetic-run tests above check the same rules fast.)"""
    from tests.probe.synth import make_cache

    cache = make_cache(tmp_path / "c.h5")[0]
    runs = tmp_path / "runs"
    grid = ["--epochs", "2", "--batch-size", "16", "--seeds", "2", "--lr", "1e-2", "--weight-decay", "0"]
    for args in (["--max-iter", "20"],
                 ["--mitigation", "reweight", "--sensitive", "sex", "--strength", "0,1", "--solver", "adamw", *grid],
                 ["--mitigation", "groupdro", "--sensitive", "sex", "--strength", "0.1", *grid]):
        got = CliRunner().invoke(main, ["probe", "linear", "--cache", str(cache), "--out", str(runs), *args])
        assert got.exit_code == 0, got.output
    res = compute(read_runs(runs), AnalyzeConfig(runs, tmp_path / "out", n_boot=0, figures=False))
    m = res.mitigation
    row = _by(m, "groupdro", "best")
    assert (row.erm_tag, row.solver, row.erm_solver, bool(row.like_for_like)) == ("reweight-sex__st0", "adamw", "adamw", True)
    assert _by(m, "reweight", "st1").erm_tag == "reweight-sex__st0"
    assert (m["like_for_like"] == (m["solver"] == m["erm_solver"])).all()  # one grid here: only the solver can differ
    assert set(res.runs.loc[res.runs["primary"], "tag"]) == {"best"}


# ----------------------------------------------------------------------------- strength chosen on validation


def _plain_validation(run_dir, sensitive="sex") -> tuple[float, float]:
    """(worst-group validation accuracy, validation cross-entropy) of one run, by counting."""
    run = next(r for r in read_runs(run_dir.parent) if r.path == run_dir)
    val = run.split("val")
    y = val["label"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy()
    p = val[[f"p_{c}" for c in CLASSES]].to_numpy(float)
    right = p.argmax(1) == y
    worst = min(right[(val[sensitive] == g).to_numpy()].mean() for g in val[sensitive].unique())
    return worst, float(np.mean([-np.log(p[i, y[i]]) for i in range(len(y))]))


def _finetune_sweep(runs, rows, strengths, draw0):
    made = {}
    for j, st in enumerate(strengths):
        for s in (0, 1):
            made[st, s] = _write(runs, rows, s, 0.6 + 0.3 * j, draw0 + 10 * j + s, "groupdro", "sex", f"st{st:g}", st,
                                 method="lora")
    return made


@pytest.mark.parametrize("draw0", [0, 7, 21])
def test_finetune_strength_is_chosen_on_validation_worst_group_like_a_reference(tmp_path, draw0):
    runs = tmp_path / "runs"
    rows = cohort_rows(24)
    for s in (0, 1):
        _write(runs, rows, s, 1.0, 100 + s, method="lora")
    strengths = (0.01, 0.1, 1.0)
    made = _finetune_sweep(runs, rows, strengths, draw0)
    res = _compute(runs)
    scores = {st: np.mean([_plain_validation(made[st, s]) for s in (0, 1)], axis=0) for st in strengths}
    want = sorted(strengths, key=lambda st: (-scores[st][0], scores[st][1]))[0]
    t = res.tradeoff[res.tradeoff["mitigation"] == "groupdro"]
    assert list(t.loc[t["selected"], "strength"]) == [want]
    m = res.mitigation
    assert set(m.loc[m["selected"], "tag"]) == {f"st{want:g}"}
    assert list(delta_table(m)["tag"]) == [f"st{want:g}"]  # the report's deltas: the chosen strength only
    assert any(f"strength {want:g} (st{want:g}) chosen on validation by worst_group" in n for n in res.notes)


def test_a_single_finetune_strength_is_its_own_choice(tmp_path):
    runs = tmp_path / "runs"
    rows = cohort_rows(24)
    _write(runs, rows, 0, 1.0, 0, method="lora")
    _write(runs, rows, 0, 1.2, 1, "fairot", "sex", "st1", 1.0, method="lora")
    res = _compute(runs)
    assert list(res.mitigation["selected"].unique()) == [True] and list(delta_table(res.mitigation)["tag"]) == ["st1"]
    assert res.tradeoff.loc[res.tradeoff["mitigation"] == "fairot", "selected"].tolist() == [True]
    assert not any("chosen on validation" in n for n in res.notes)  # nothing was chosen


def test_finetune_strength_choice_reads_validation_never_test(tmp_path):
    runs = tmp_path / "runs"
    rows = cohort_rows(24)
    _write(runs, rows, 0, 1.0, 0, method="lora")
    val = (rows["split"] == "val").to_numpy()
    y = rows["label"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy()
    perfect = np.full((len(rows), len(CLASSES)), 0.02)
    perfect[np.arange(len(rows)), y] = 0.94
    wrong = np.roll(perfect, 1, axis=1)
    for st, probs in ((0.1, np.where(val[:, None], perfect, wrong)), (1.0, np.where(val[:, None], wrong, perfect))):
        key = RunKey("m1", "lora", f"st{st:g}", 0, "groupdro", "sex")
        meta = meta_for("m1", "lora", 0) | {"run_id": key.run_id, "mitigation": "groupdro", "sensitive": "sex", "strength": st}
        write_run(runs, meta, make_predictions(rows, probs, CLASSES))
    t = _compute(runs).tradeoff.set_index("tag")
    assert bool(t.loc["st0.1", "selected"]) and not bool(t.loc["st1", "selected"])  # test favours st1; val picks st0.1


@pytest.mark.parametrize("seed", range(10))
def test_select_index_is_the_probe_sweeps_rule(seed):
    from cxrfair.probe.sweep import SELECTIONS, select_config

    rng = np.random.default_rng(seed)
    k = int(rng.integers(1, 7))
    means = {"loss": np.round(rng.random(k), 1), "accuracy": np.round(rng.random(k), 2),
             "worst_group": np.round(rng.random(k), 1), "gap": np.round(rng.random(k), 1)}  # rounding makes ties
    for select in SELECTIONS:
        assert MIT.select_index(means, select) == select_config(means, select), select


def test_validation_scores_against_sklearn(tmp_path):
    from sklearn.metrics import log_loss, roc_auc_score

    runs = tmp_path / "runs"
    rows = cohort_rows(40)
    path = _write(runs, rows, 0, 0.8, 3)
    run = next(iter(read_runs(runs)))
    val = run.split("val")
    y = val["label"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy()
    p = val[[f"p_{c}" for c in CLASSES]].to_numpy(float)
    got = MIT.validation_scores(run, "sex")
    worst, _ = _plain_validation(path)
    assert got["loss"] == pytest.approx(log_loss(y, p, labels=range(len(CLASSES))))
    assert got["worst_group"] == pytest.approx(worst)
    acc = [np.mean(p[(val["sex"] == g).to_numpy()].argmax(1) == y[(val["sex"] == g).to_numpy()]) for g in "MF"]
    assert got["gap"] == pytest.approx(max(acc) - min(acc)) and got["accuracy"] == pytest.approx(np.mean(p.argmax(1) == y))

    ml_runs = tmp_path / "ml"
    mrows = multilabel_rows()
    key = RunKey("m1", "lora", "st1", 0, "groupdro", "race")
    meta = multilabel_meta("m1", "lora", 0) | {"run_id": key.run_id, "mitigation": "groupdro", "sensitive": "race",
                                               "strength": 1.0}
    conds = ["Atelectasis", "Effusion", "Pneumothorax"]
    write_run(ml_runs, meta, make_predictions(mrows, multilabel_probs(mrows, skill=0.8, seed=5), conds,
                                              task="multilabel", attributes=ML_ATTRIBUTES))
    run = next(iter(read_runs(ml_runs)))
    val = run.split("val")
    Y, P = val[[f"y_{c}" for c in conds]].to_numpy(float), val[[f"p_{c}" for c in conds]].to_numpy(float)
    got = MIT.validation_scores(run, "race")

    def macro(rows_):
        return np.mean([roc_auc_score(Y[rows_ & ~np.isnan(Y[:, c]), c], P[rows_ & ~np.isnan(Y[:, c]), c])
                        for c in range(len(conds))])

    race = val["race"].astype("string").fillna("").to_numpy()
    per = [macro(race == g) for g in set(race) if g != ""]
    assert got["worst_group"] == pytest.approx(min(per)) and got["accuracy"] == pytest.approx(macro(np.ones(len(Y), bool)))
    bce = [np.mean([-(Y[i, c] * np.log(P[i, c]) + (1 - Y[i, c]) * np.log(1 - P[i, c]))
                    for c in range(len(conds)) if not np.isnan(Y[i, c])]) for i in range(len(Y)) if (~np.isnan(Y[i])).any()]
    assert got["loss"] == pytest.approx(np.mean(bce))


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
        ("m1", "linear", "sex", "erm", np.nan, "best", "lbfgs", 2, "accuracy", 0.6, 0.55, 0.65, "eqodds", 0.1, 0.05, 0.2, False, True),
        ("m1", "linear", "sex", "erm", np.nan, "fairot-sex__st0", "adamw", 2, "accuracy", 0.59, 0.55, 0.65, "eqodds", 0.08,
         0.05, 0.2, False, True),
        ("m1", "linear", "sex", "groupdro", 0.1, "st0.1", "adamw", 2, "accuracy", 0.58, 0.5, 0.64, "eqodds", 0.05, 0.02, 0.1, True, True),
        ("m1", "linear", "sex", "groupdro", 1.0, "st1", "adamw", 2, "accuracy", np.nan, np.nan, np.nan, "eqodds", 0.04, 0.0, 0.1, False, False),
        ("m2", "mlp", "age_group", "thresholds", 0.02, "best", "lbfgs", 1, "accuracy", 0.5, np.nan, np.nan, "eqodds", 0.2, np.nan, np.nan, True, True),
    ], columns=MIT.TRADEOFF_COLUMNS)
    assert _non_blank(png(tradeoff_figure(t), dpi=110))


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
    assert _non_blank(png(sec.figures[0].draw()))  # the figure the report draws


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


# ----------------------------------------------------------------------------- same selection rule


def _select(rule: str) -> dict:
    """run.json of an L-BFGS probe chosen by ``rule``: the words the probe writes (``hyperparameters.selection``)."""
    from cxrfair.probe.sweep import SELECTION_TEXT  # numpy only at import (jax loads lazily)

    return {"solver": "lbfgs", "hyperparameters": LBFGS["hyperparameters"] | {"selection": SELECTION_TEXT[rule]}}


def _balanced_rows():
    rows = cohort_rows(48)  # sex × class cells of equal size in every split
    assert rows.groupby(["split", "sex", "label"]).size().nunique() == 1
    return rows


def test_a_mitigated_sweep_chosen_by_another_rule_than_its_erm_is_not_like_for_like(tmp_path):
    """The demo's case: reweight is a no-op on a cohort balanced in every sex × class cell, but its sweep,
    chosen by worst-group accuracy, picked another L2 than the ERM sweep chosen by loss. The delta (not 0:
    other predictions) must not pass as the mitigation's effect: Δ = 0 or like_for_like false."""
    runs, rows = tmp_path / "runs", _balanced_rows()
    for s in (0, 1):
        _write(runs, rows, s, 1.0, s, **_select("loss"))
        _write(runs, rows, s, 1.0, 10 + s, "reweight", "sex", "best", 1.0, select="worst_group", **_select("worst_group"))
    res = _compute(runs)
    m = res.mitigation
    assert (m["delta"].abs() > 0).any()
    assert ((m["delta"] == 0) | ~m["like_for_like"]).all()
    assert set(m["like_for_like"]) == {False} and set(m["unlike_reason"]) == {"selection"}
    note = next(n for n in res.notes if "like_for_like false" in n)
    assert "selected by highest validation worst-group" in note and "selected by lowest validation loss" in note
    assert "shares its selection" in note


def test_a_strength_zero_run_chosen_by_the_same_rule_is_the_like_for_like_counterpart(tmp_path):
    """With strength 0 in the grid (reweight's zero is ERM), the st0 run is ERM chosen by the mitigation's own
    rule: it is preferred to the loss-chosen ERM run, and a no-op mitigation that chose it has Δ = 0."""
    runs, rows = tmp_path / "runs", _balanced_rows()
    for s in (0, 1):
        _write(runs, rows, s, 1.0, s, **_select("loss"))
        meta = {"select": "worst_group", **_select("worst_group")}
        # Equal cells: every strength trains the same objective; the sweep's ties go to the first strength, 0.
        _write(runs, rows, s, 1.0, 10 + s, "reweight", "sex", "best", 0.0, **meta)
        _write(runs, rows, s, 1.0, 10 + s, "reweight", "sex", "st0", 0.0, **meta)
        _write(runs, rows, s, 1.0, 10 + s, "reweight", "sex", "st1", 1.0, **meta)
    m = _compute(runs).mitigation
    for tag in ("best", "st1"):
        rows_ = m[m["tag"] == tag]
        assert set(rows_["erm_tag"]) == {"reweight-sex__st0"} and rows_["like_for_like"].all()
        assert (rows_["delta"] == 0).all() and (rows_["p_value"] == 1).all() and (rows_["unlike_reason"] == "").all()
    # st0 itself is compared with the loss-chosen ERM run: the change of selection rule alone, flagged.
    st0 = m[m["tag"] == "st0"]
    assert set(st0["like_for_like"]) == {False} and set(st0["unlike_reason"]) == {"selection"}


def _balanced_cache(path):
    """A probe cache whose every split has equal sex × class cells (10 train images per cell)."""
    from cxrfair.extract.cache import write_cache
    from tests.probe.synth import CLASSES as PROBE_CLASSES, clusters, make_cache

    sizes = {"train": 120, "val": 48, "test": 48}
    _, x, y, text = make_cache(path.with_suffix(".tmp.h5"), sizes=sizes)
    table = []
    for split in ("train", "val", "test"):
        for i, label in enumerate(y[split]):  # label = i % 6: sex alternates every 6 images
            k = len(table)
            table.append({"image_id": f"{k:08d}_000.png", "path": f"{k:08d}_000.png", "patient_id": k,
                          "label": PROBE_CLASSES[int(label)], "sex": "MF"[(i // 6) % 2], "age": 40 + k % 40,
                          "age_group": "young" if (i // 12) % 2 == 0 else "old", "split": split})
    table = pd.DataFrame(table)
    assert (table.groupby(["split", "sex", "label"]).size().groupby("split").nunique() == 1).all()
    write_cache(path, image_embeddings=np.concatenate([x["train"], x["val"], x["test"]]), cohort_table=table,
                classes=PROBE_CLASSES, text=text,
                attrs={"model": "tiny-clip", "weights_id": "test", "cohort_hash": "c0ffee" * 10, "logit_scale": 100.0})
    return path


@pytest.mark.slow
@pytest.mark.parametrize("strengths", ["0.5,1", "0,0.5,1"])
def test_real_reweight_probe_on_a_balanced_cohort_is_zero_or_not_like_for_like(tmp_path, strengths):
    """`cxrfair probe` runs: ERM chosen by loss, reweight by worst_group (its default) on equal sex × class
    cells, where reweighting changes nothing. Every reweight row has Δ = 0 on the argmax metrics or says
    like_for_like false; with strength 0 in the grid the rows of `best` are like for like and Δ = 0.
    (~1 min: two L-BFGS sweeps' compilation.)"""
    cache = _balanced_cache(tmp_path / "c.h5")
    runs = tmp_path / "runs"
    for args in ([], ["--mitigation", "reweight", "--sensitive", "sex", "--strength", strengths]):
        got = CliRunner().invoke(main, ["probe", "linear", "--cache", str(cache), "--out", str(runs), "--seeds", "2",
                                        "--l2", "1e-4,1e-2,1", "--max-iter", "30", *args])
        assert got.exit_code == 0, got.output
    m = compute(read_runs(runs), AnalyzeConfig(runs, tmp_path / "out", n_boot=100, figures=False)).mitigation
    assert ((m["delta"].abs() < 1e-12) | ~m["like_for_like"]).all(), m[["tag", "metric", "delta", "like_for_like"]]
    best = m[m["tag"] == "best"]
    if strengths.startswith("0,"):
        assert best["like_for_like"].all() and (best["delta"].abs() < 1e-12).all()
    else:
        assert set(best["unlike_reason"]) == {"selection"}
