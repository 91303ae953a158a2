"""Findings: which comparisons are stated, their verdicts, and the sentences' wording."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cxrfair.analysis import findings as F

COLS = ["model", "baseline", "method", "seed", "metric", "attribute", "group", "class", "delta", "ci_low", "ci_high"]


def _comparisons(rows) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=COLS)


def _row(metric, attribute="", delta=0.1, lo=0.05, hi=0.15, method="lora", seed=0, group="", model="m"):
    return (model, "zeroshot", method, seed, metric, attribute, group, "", delta, lo, hi)


@pytest.mark.parametrize("lo, hi, better, expected", [
    (0.01, 0.2, "higher", "higher"), (-0.2, -0.01, "higher", "lower"),
    (0.01, 0.2, "lower", "less fair"), (-0.2, -0.01, "lower", "fairer"),
    (0.01, 0.2, "", "higher"), (-0.2, -0.01, "", "lower"),
    (-0.1, 0.1, "higher", "no clear change"), (0.0, 0.1, "lower", "no clear change"),
    (np.nan, 0.1, "lower", "undefined"),
])
def test_verdict(lo, hi, better, expected):
    assert F.verdict(lo, hi, better) == expected


def test_questions_prefer_the_gap_magnitude_and_read_two_group_signed_gaps_as_signed():
    groups = [_row("accuracy", "sex", group=g) for g in ("M", "F")] + [
        _row("accuracy", "sex×age", group=g) for g in ("M×young", "M×old", "F×young", "F×old")]
    c = _comparisons([_row("accuracy"), _row("var_f1"), _row("f1_gap", "sex"), _row("eqodds", "sex"),
                      _row("f1_gap", "sex×age"), _row("eqodds", "sex×age"), *groups])
    qs = {(q.metric, q.attribute): q for q in F.questions(c)}
    assert list(qs) == [("accuracy", ""), ("var_f1", ""), ("f1_gap", "sex"), ("eqodds", "sex"),
                        ("f1_gap", "sex×age"), ("eqodds", "sex×age")]
    assert qs[("f1_gap", "sex")].kind == "signed" and qs[("f1_gap", "sex")].better == ""
    assert qs[("f1_gap", "sex×age")].better == "lower"  # max − min over four groups: a magnitude
    with_abs = _comparisons([*c.itertuples(index=False), _row("f1_gap_abs", "sex")])
    qs = {(q.metric, q.attribute): q for q in F.questions(with_abs)}
    assert ("f1_gap_abs", "sex") in qs and ("f1_gap", "sex") not in qs and qs[("f1_gap_abs", "sex")].label == "sex |F1 gap|"


def test_findings_table_takes_numbers_from_comparisons_in_method_order():
    c = _comparisons([_row("accuracy", method="full", delta=0.3, lo=0.2, hi=0.4),
                      _row("accuracy", method="linear", delta=-0.02, lo=-0.1, hi=0.05),
                      _row("eqodds", "sex", method="linear", delta=0.04, lo=0.01, hi=0.08),
                      _row("eqodds", "sex", method="linear", group="M", delta=9.0)])  # per-group rows are not stated
    t = F.findings_table(c)
    assert list(zip(t["method"], t["metric"])) == [("linear", "accuracy"), ("linear", "eqodds"), ("full", "accuracy")]
    assert t["delta"].tolist() == [-0.02, 0.04, 0.3]
    assert t["verdict"].tolist() == ["no clear change", "less fair", "higher"]


def test_findings_pool_seeds_once_per_model_and_method_or_take_the_seed_aggregate():
    per_seed = _comparisons([_row("accuracy", seed=0, delta=0.1, lo=0.05, hi=0.15),
                             _row("accuracy", seed=1, delta=0.2, lo=-0.01, hi=0.3)])
    t = F.findings_table(per_seed)
    assert len(t) == 1 and t["n_seeds"].item() == 2
    assert t["delta"].item() == pytest.approx(0.15)  # the mean over seeds
    assert (t["ci_low"].item(), t["ci_high"].item()) == (-0.01, 0.3)  # the union of the seeds' intervals
    assert t["verdict"].item() == "no clear change"  # seed 1 does not exclude zero: no verdict
    (s,) = F.sentences(t)
    assert "(2 seeds pooled)" in s and "seed 0" not in s
    both = _comparisons([_row("accuracy", seed=0), _row("accuracy", seed=1, delta=0.12, lo=0.02, hi=0.2)])
    assert F.findings_table(both)["verdict"].item() == "higher"  # every seed agrees
    # Identical seeds are one finding, not two (the demo's linear and MLP seeds are identical).
    same = _comparisons([_row("accuracy", seed=0), _row("accuracy", seed=1)])
    assert len(F.findings_table(same)) == 1
    agg = _comparisons([*per_seed.itertuples(index=False), _row("accuracy", seed=np.nan, delta=0.15, lo=0.1, hi=0.2)])
    t = F.findings_table(agg)
    assert len(t) == 1 and t["delta"].item() == 0.15 and t["n_seeds"].item() == 0 and t["verdict"].item() == "higher"
    assert "seed" not in F.sentences(t)[0]


def test_fairness_verdicts_are_withheld_at_chance_for_the_method_and_against_a_baseline_at_chance():
    c = _comparisons([_row("accuracy", method="linear"), _row("eqodds", "sex", method="linear", lo=-0.2, hi=-0.01),
                      _row("accuracy", method="full"), _row("eqodds", "sex", method="full", lo=-0.2, hi=-0.01)])
    t = F.findings_table(c, at_chance={("m", "linear")})
    v = dict(zip(zip(t["method"], t["metric"]), t["verdict"]))
    assert v[("linear", "accuracy")] == "higher"  # utility is still stated
    assert v[("linear", "eqodds")] == F.AT_CHANCE and v[("full", "eqodds")] == "fairer"
    t = F.findings_table(c, at_chance={("m", "zeroshot")})  # the baseline (_row's) at chance: nothing judged
    assert set(t.loc[t["metric"] == "eqodds", "verdict"]) == {F.AT_CHANCE}
    assert "not judged: not shown above chance in 2" in F.summary_lines(t, 0.95)[1]


def test_holm_adjusted_verdicts_sit_beside_unadjusted_ones_when_comparisons_carry_them():
    c = _comparisons([_row("accuracy", method="linear"), _row("eqodds", "sex", method="linear", lo=-0.2, hi=-0.01),
                      _row("accuracy", method="full", seed=0), _row("accuracy", method="full", seed=1)])
    c = c.assign(p_value=[0.001, 0.02, 0.001, 0.004], p_holm=[0.004, 0.06, 0.003, 0.02])
    t = F.findings_table(c, alpha=0.05)
    v = {(r.method, r.metric): (r.verdict, r.verdict_holm, r.p_holm) for r in t.itertuples()}
    assert v[("linear", "accuracy")][:2] == ("higher", "higher")
    assert v[("linear", "eqodds")][:2] == ("fairer", "no clear change")  # survives unadjusted only
    assert v[("full", "accuracy")][2] == 0.02  # pooled seeds: the largest adjusted p
    sentence = F.sentences(t)[0]
    assert "EqOdds +10.0 [−20.0, −1.0] (**fairer**; Holm: no clear change)" in sentence  # _row delta, test intervals
    lines = F.summary_lines(t, 0.95)
    assert "after Holm: fairer" not in lines[1] and "after Holm: no clear change in 1" in lines[1]
    assert "Holm-adjusted verdicts" in lines[-1]
    assert "Holm" not in " ".join(F.summary_lines(F.findings_table(c.drop(columns=["p_value", "p_holm"])), 0.95))


def test_sentence_wording():
    c = _comparisons([_row("accuracy", delta=0.102, lo=0.061, hi=0.14),
                      _row("f1_gap", "sex", delta=-0.008, lo=-0.052, hi=0.039),
                      _row("eqodds", "sex", delta=0.0, lo=-0.01, hi=0.01),
                      *[_row("accuracy", "sex", group=g) for g in ("M", "F")]])
    (s,) = F.sentences(F.findings_table(c))
    assert s == ("**m, LoRA vs zero-shot**: accuracy +10.2 points [6.1, 14.0] (**higher**); by sex: "
                 "F1 gap (signed) −0.8 [−5.2, 3.9] (no clear change), EqOdds 0.0 [−1.0, 1.0] (no clear change).")


def test_summary_counts_and_multiplicity():
    c = _comparisons([_row("accuracy", method=m, lo=lo, hi=hi) for m, lo, hi in
                      (("linear", 0.01, 0.2), ("lora", -0.1, 0.1), ("full", 0.02, 0.3))]
                     + [_row("eqodds", "sex", method="full", lo=-0.2, hi=-0.01)])
    lines = F.summary_lines(F.findings_table(c), level=0.95)
    assert lines[0] == "**Accuracy**: higher in 2, no clear change in 1 (of 3 comparisons)."
    assert lines[1] == "**Fairness** (EqOdds by sex): fairer in 1 (of 1 comparisons)."
    assert "In all, 4 comparisons (3 model × method pairs, seeds pooled" in lines[2]
    assert "not corrected for multiplicity" in lines[2] and "about 0.2 of the 4" in lines[2]


def test_number_formatting():
    assert F.number(0.1024, signed=True) == "+10.2"
    assert F.number(-0.0081, signed=True) == "−0.8"
    assert F.number(-0.0001, signed=True) == "0.0" and F.number(np.nan) == "–"


def test_no_comparisons_no_findings():
    t = F.findings_table(pd.DataFrame(columns=COLS))
    assert t.empty and F.sentences(t) == [] and F.summary_lines(t, 0.95) == []


def test_a_worst_group_score_reads_as_fairer_when_it_rises():
    assert F.verdict(0.01, 0.05, "higher", fairness=True) == "fairer"
    assert F.verdict(-0.05, -0.01, "higher", fairness=True) == "less fair"
    assert F.verdict(0.01, 0.05, "higher") == "higher"  # utility
