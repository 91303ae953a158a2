"""compute/analyze: seed-mean intervals, the patient bootstrap end to end, and bad input.

The interval tests rebuild the replicates by hand (loop over replicates, resample the images,
score them with scikit-learn, draw the seeds or draws of each replicate and average them, take
percentiles) and compare.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
from scipy.stats import t as t_dist
from click.testing import CliRunner
from sklearn.metrics import f1_score

from cxrfair.core import metrics as M
from cxrfair.core import multilabel as ML
from cxrfair.analysis.config import AnalyzeConfig
from cxrfair.analysis.engine import compute, in_blocks
from cxrfair.analysis.findings import findings_table
from cxrfair.analysis.runsets import check_runs, tag_of
from cxrfair.core.bootstrap import patient_counts
from cxrfair.core.runs import Run, make_predictions, read_runs, write_run
from cxrfair.cli import main
from cxrfair.errors import CxrfairError

from .delta_reference import widened_delta
from .synth import CLASSES, cohort_rows, meta_for, probs_for

R = 100


def _write(runs_dir, rows, method, seed, tag="best", model="m", skill=1.0, probs_seed=None, **extra):
    meta = meta_for(model, method, seed, tag=tag) | extra
    probs = probs_for(rows, skill=skill, seed=seed if probs_seed is None else probs_seed)
    return write_run(runs_dir, meta, make_predictions(rows, probs, CLASSES))


def _invoke(*args):
    return CliRunner().invoke(main, ["analyze", *map(str, args)])


def _one_line_error(result, pattern):
    assert result.exit_code != 0
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output, result.output
    assert re.search(pattern, result.output), result.output


# ----------------------------------------------------------------------------- seed-mean intervals


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    """Three linear seeds, one full run and three zero-shot draws on one test set of paired images."""
    d = tmp_path_factory.mktemp("seeded")
    rows = cohort_rows(48)
    # Two images per patient (the patient bootstrap matters), six patients per sex × age stratum
    # (MIN_STRATUM_PATIENTS: no stratum is pooled, so the reference below draws within sex × age).
    rows["patient_id"] = rows.index // 2
    for s in range(3):
        _write(d, rows, "linear", s, skill=1.2, probs_seed=10 + s)
        _write(d, rows, "zeroshot", s, tag=f"clip-d{s}", skill=0.6, probs_seed=20 + s, draw=s)
    _write(d, rows, "full", 0, skill=1.5, probs_seed=30)
    runs = read_runs(d)
    return runs, compute(runs, AnalyzeConfig(d, d, n_boot=R, seed=5))


def _test_arrays(run: Run):
    rows = run.split("test").sort_values("image_id", kind="stable")
    y = rows["label"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy()
    return rows, y, rows[[f"p_{c}" for c in CLASSES]].to_numpy().argmax(1)


def _slow_replicates(runs, score):
    """(R,) per run: ``score(y, pred, rows)`` on each resample, rebuilt by repeating images."""
    rows, _, _ = _test_arrays(runs[0])
    strata = (rows["sex"] + "×" + rows["age_group"]).to_numpy()
    counts = patient_counts(rows["patient_id"].astype(str).to_numpy(), strata, R, np.random.default_rng(5))
    out = []
    for run in runs:
        rows, y, pred = _test_arrays(run)
        reps = []
        for r in range(R):
            idx = np.repeat(np.arange(len(y)), counts[r].astype(int))
            reps.append(score(y[idx], pred[idx], rows.iloc[idx]))
        out.append(np.array(reps))
    return np.array(out)  # (runs, R)


def _accuracy(y, pred, rows):
    return np.mean(y == pred)


def _macro_f1_in_f(y, pred, rows):
    m = (rows["sex"] == "F").to_numpy()
    return np.nanmean(f1_score(y[m], pred[m], labels=range(len(CLASSES)), average=None, zero_division=np.nan))


def _dp_gap_sex(y, pred, rows):
    """(1/C) Σ_c |P(ŷ=c | M) − P(ŷ=c | F)|, by hand."""
    m = (rows["sex"] == "M").to_numpy()
    return np.mean([abs(np.mean(pred[m] == c) - np.mean(pred[~m] == c)) for c in range(len(CLASSES))])


def _f1_gap_sex(y, pred, rows):
    """(1/C) Σ_c (F1_M^c − F1_F^c), by hand with scikit-learn."""
    m = (rows["sex"] == "M").to_numpy()
    f = [f1_score(y[g], pred[g], labels=range(len(CLASSES)), average=None, zero_division=np.nan) for g in (m, ~m)]
    return np.nanmean(f[0] - f[1])


def test_gap_intervals_follow_the_method_table(seeded):
    """dp_gap: the hull of the percentile and basic (2v − the percentile interval) intervals, clipped at 0,
    value_bc = 2v − mean(replicates); f1_gap_abs: the signed f1_gap's hull folded at 0; accuracy:
    percentile, value_bc = value."""
    runs, res = seeded
    full = _by(runs, "full")
    rows, y, pred = _test_arrays(full[0])
    m = res.metrics[res.metrics["method"] == "full"].set_index(["metric", "attribute", "group", "class"])
    row = m.loc[("dp_gap", "sex", "", "")]
    reps = _slow_replicates(full, _dp_gap_sex)[0]
    v = _dp_gap_sex(y, pred, rows)
    q_lo, q_hi = np.percentile(reps, [2.5, 97.5])
    assert row["value"] == pytest.approx(v, abs=1e-12) and row["interval"] == "hull"
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((max(0.0, min(q_lo, 2 * v - q_hi)), max(q_hi, 2 * v - q_lo)),
                                                            abs=1e-12)
    assert row["value_bc"] == pytest.approx(max(0.0, 2 * v - reps.mean()), abs=1e-12)
    s_reps = _slow_replicates(full, _f1_gap_sex)[0]
    s = _f1_gap_sex(y, pred, rows)
    p_lo, p_hi = np.percentile(s_reps, [2.5, 97.5])
    lo, hi = min(p_lo, 2 * s - p_hi), max(p_hi, 2 * s - p_lo)
    folded = (0.0, max(-lo, hi)) if lo <= 0 <= hi else tuple(sorted((abs(lo), abs(hi))))
    row = m.loc[("f1_gap_abs", "sex", "", "")]
    assert row["interval"] == "folded" and row["value"] == pytest.approx(abs(s), abs=1e-12)
    assert (row["ci_low"], row["ci_high"]) == pytest.approx(folded, abs=1e-12)
    assert row["value_bc"] == pytest.approx(abs(2 * s - s_reps.mean()), abs=1e-12)
    acc = res.metrics[res.metrics["metric"] == "accuracy"]
    assert (acc["interval"] == "percentile").all() and (acc["value_bc"] == acc["value"]).all()
    assert any(n.startswith("Intervals (band) of ") and "dp_gap" in n for n in res.notes)
    # The band needs 3+ groups: sex (two) takes the hull, sex × age (four) the band, from its per-group values.
    crossed = next(a for a in m.index.get_level_values("attribute").unique() if "sex" in a and "age" in a)
    eo = m.loc[("eqodds", "sex", "", "")], m.loc[("eqodds", crossed, "", "")]
    assert (eo[0]["interval"], eo[1]["interval"]) == ("hull", "band") and eo[1]["ci_low"] <= eo[1]["value_bc"] <= eo[1]["ci_high"]
    assert any(n.startswith("Intervals (percentile) of ") and "accuracy" in n for n in res.notes)
    # eqodds is coverage-checked with any number of groups (the band with 3+), ece_gap with two (its debiased
    # interval, from the groups' ece_debiased rows; with four the band of their differences, unchecked), ece too.
    unchecked = [n for n in res.notes if n.startswith("The intervals of ") and "not coverage-checked" in n]
    assert len(unchecked) == 1 and "ece_gap (attributes of more than 2 groups)" in unchecked[0]
    assert "ece," not in unchecked[0] and "ece_gap_paper" not in unchecked[0]
    assert "eqodds" not in unchecked[0] and "f1_gap," not in unchecked[0]
    # es_auc too (RESULTS.md "Interval coverage, part 3"): the hull with two groups, the band's high end with four.
    assert "es_auc" not in unchecked[0]
    es = m.loc[("es_auc", "sex", "", "")], m.loc[("es_auc", crossed, "", "")]
    assert (es[0]["interval"], es[1]["interval"]) == ("hull", "band") and es[1]["ci_low"] <= es[1]["value_bc"] <= es[1]["ci_high"]
    assert m.loc[("ece_gap", "sex", "", ""), "interval"] == m.loc[("ece_gap", crossed, "", ""), "interval"] == "debiased"
    assert set(res.metrics.loc[res.metrics["metric"].isin(["ece", "ece_debiased"]), "interval"]) == {"pivot"}
    # Any interval that excludes its plug-in value is named in the notes.
    out = res.metrics[(res.metrics["value"] < res.metrics["ci_low"]) | (res.metrics["value"] > res.metrics["ci_high"])]
    for name in out["metric"].unique():
        assert any(n.startswith(f"{name}: ") and "exclude the plug-in value" in n for n in res.notes), name


def _by(runs, method):
    return sorted((r for r in runs if r.method == method), key=lambda r: r.seed)


@pytest.mark.parametrize("score, key, methods", [
    (_accuracy, ("accuracy", "", ""), (("linear", "best"), ("zeroshot", "clip"))),
    (_macro_f1_in_f, ("f1_macro", "sex", "F"), (("linear", "best"),)),  # scikit-learn is slow: one method
])
def test_seed_mean_interval_is_the_patients_interval_widened_by_the_seed_variance(seeded, score, key, methods):
    runs, res = seeded
    for method, tag in methods:
        per_seed = _slow_replicates(_by(runs, method), score)  # (3, R)
        row = res.seeds[(res.seeds["method"] == method) & (res.seeds["tag"] == tag) & (res.seeds["metric"] == key[0])
                        & (res.seeds["attribute"] == key[1]) & (res.seeds["group"] == key[2]) & (res.seeds["class"] == "")]
        assert len(row) == 1 and row["n_seeds"].item() == 3
        per_run = res.metrics[(res.metrics["method"] == method) & (res.metrics["metric"] == key[0])
                              & (res.metrics["attribute"] == key[1]) & (res.metrics["group"] == key[2])]
        mean = per_run["value"].mean()
        assert row["mean"].item() == pytest.approx(mean)
        # Patients-only percentile interval of the mean, each side widened in quadrature by t_2 · sd / √3.
        p_lo, p_hi = np.percentile(per_seed.mean(axis=0), [2.5, 97.5])
        half = t_dist.ppf(0.975, 2) * per_run["value"].std(ddof=1) / np.sqrt(3)
        assert row["ci_low"].item() == pytest.approx(mean - np.hypot(mean - p_lo, half), abs=1e-9)
        assert row["ci_high"].item() == pytest.approx(mean + np.hypot(p_hi - mean, half), abs=1e-9)
        # Not the mean of the seeds' own bounds (what the tables used to show).
        assert row["ci_low"].item() != pytest.approx(per_run["ci_low"].mean(), abs=1e-9)


def test_one_run_keeps_its_own_interval_and_says_its_seed_variance_is_unknown(seeded):
    """Every metric, by its own method: one run's seed mean is that run, so seeds.csv repeats metrics.csv's interval."""
    _, res = seeded
    s = res.seeds[res.seeds["method"] == "full"].set_index(
        ["metric", "attribute", "group", "class"])
    m = res.metrics[res.metrics["method"] == "full"].set_index(["metric", "attribute", "group", "class"])
    pd.testing.assert_series_equal(s["ci_low"], m.loc[s.index, "ci_low"], check_names=False)
    assert (s["n_seeds"] <= 1).all() and s["sd"].isna().all()
    assert any("seed variance is unknown" in n and "m full best" in n for n in res.notes)


def test_comparison_is_paired_on_patients_and_widened_by_each_seed_mean(seeded):
    """The reference is the linear probe (``runsets.REFERENCE_ORDER``), its seeds averaged on each resample;
    every other run, each zero-shot draw included, is paired with that on the patients, and the interval is
    widened by the reference's seed variance (and on a seed-mean row by the method's too, Welch)."""
    runs, res = seeded
    zs = _slow_replicates(_by(runs, "zeroshot"), _accuracy)  # (3 draws, R)
    lin = _slow_replicates(_by(runs, "linear"), _accuracy)  # (seeds, R)
    values = res.metrics[(res.metrics["metric"] == "accuracy") & (res.metrics["attribute"] == "")].set_index("run_id")["value"]
    c = res.comparisons[(res.comparisons["metric"] == "accuracy") & (res.comparisons["attribute"] == "")]
    lin_ids = [r.run_id for r in _by(runs, "linear")]
    zs_ids = [r.run_id for r in _by(runs, "zeroshot")]
    for d, run in enumerate(_by(runs, "zeroshot")):
        row = c[c["run_id"] == run.run_id]
        assert row["baseline"].item() == "linear" and row["n_baseline"].item() == len(lin_ids)
        assert row["baseline_runs"].item() == ";".join(lin_ids) and row["n_seeds"].item() == 1
        delta = values[run.run_id] - values[lin_ids].mean()
        assert row["delta"].item() == pytest.approx(delta)
        # The run is given; the reference's three seeds are a sample: its seed variance alone widens it.
        want = widened_delta(delta, zs[d] - lin.mean(axis=0), [values[lin_ids].to_numpy()])
        got = (row["ci_low"].item(), row["ci_high"].item(), row["p_value"].item())
        assert got == pytest.approx(want, abs=1e-9)
        assert row["seed_var_known"].item()
    # The seed-mean row of the zero-shot draws: both means' seed variances (3 and 3 runs).
    row = c[(c["method"] == "zeroshot") & c["seed"].isna()]
    assert row["run_id"].item() == ";".join(zs_ids) and row["n_seeds"].item() == 3
    delta = values[zs_ids].mean() - values[lin_ids].mean()
    assert row["delta"].item() == pytest.approx(delta)
    want = widened_delta(delta, zs.mean(axis=0) - lin.mean(axis=0),
                         [values[zs_ids].to_numpy(), values[lin_ids].to_numpy()])
    assert (row["ci_low"].item(), row["ci_high"].item(), row["p_value"].item()) == pytest.approx(want, abs=1e-9)
    # One run of full: no seed-mean row of its own; the reference is never compared with itself.
    assert c.loc[c["method"] == "full", "seed"].notna().all() and not (c["method"] == "linear").any()
    # The verdict and the test agree: p < 0.05 only where the interval excludes 0.
    c = res.comparisons
    assert not ((c["p_value"] < 0.05) & (c["ci_low"] <= 0) & (c["ci_high"] >= 0)).any()


def test_comparison_p_holm_is_holm_within_each_comparison_attribute_and_headline_or_detail_rows(seeded):
    _, res = seeded
    c = res.comparisons
    for (run_id, attribute, detail), rows in c.groupby([c["run_id"], c["attribute"], (c["group"] != "") | (c["class"] != "")]):
        p = rows["p_value"].to_numpy()
        ok = [i for i in range(len(p)) if np.isfinite(p[i])]
        order = sorted(ok, key=lambda i: p[i])
        want, running = {}, 0.0
        for rank, i in enumerate(order):  # Holm's step-down, one test at a time
            running = max(running, min(1.0, (len(order) - rank) * p[i]))
            want[i] = running
        got = rows["p_holm"].to_numpy()
        assert all(got[i] == pytest.approx(want[i], abs=1e-12) for i in ok), (run_id, attribute, detail)
        assert (rows["holm_m"] == len(ok)).all()
    assert (c["p_holm"] >= c["p_value"]).all()


# ----------------------------------------------------------------------------- patient bootstrap


def test_intervals_widen_with_duplicated_patients(tmp_path):
    """Three identical images per patient carry no more information than one: the patient
    bootstrap gives exactly the single-image interval; resampling images would shrink it."""
    single = cohort_rows(40, splits=("test",))
    probs = probs_for(single, seed=3)
    triple = single.loc[single.index.repeat(3)].reset_index(drop=True)
    triple["image_id"] = [f"{p:08d}_{j:03d}.png" for p in single["patient_id"] for j in range(3)]
    runs = {}
    for name, rows, p in (("single", single, probs), ("triple", triple, np.repeat(probs, 3, axis=0)),
                          ("triple_as_images", triple.assign(patient_id=np.arange(len(triple))), np.repeat(probs, 3, axis=0))):
        d = tmp_path / name
        write_run(d, meta_for("m", "linear", 0), make_predictions(rows, p, CLASSES))
        m = compute(read_runs(d), AnalyzeConfig(d, d, n_boot=R, seed=1)).metrics
        row = m[(m["metric"] == "accuracy") & (m["attribute"] == "")]
        runs[name] = (row["value"].item(), row["ci_low"].item(), row["ci_high"].item())
    assert runs["triple"] == pytest.approx(runs["single"], abs=1e-12)
    width = {k: hi - lo for k, (_, lo, hi) in runs.items()}
    assert width["triple_as_images"] < 0.8 * width["triple"]  # about 1/sqrt(3) of it


def test_empty_patient_id_is_an_error(tmp_path):
    rows = cohort_rows(8)
    rows["patient_id"] = rows["patient_id"].astype(float)
    rows.loc[rows.index[-1], "patient_id"] = np.nan
    _write(tmp_path / "RUNS", rows, "linear", 0)
    _one_line_error(_invoke(tmp_path / "RUNS", "--out", tmp_path / "R", "--bootstrap", "100"),
                    r"run m__linear__best__s0: column patient_id is empty for image")


# ----------------------------------------------------------------------------- bad input


def test_runs_of_two_cohorts_are_refused(tmp_path):
    rows = cohort_rows(8)
    _write(tmp_path / "RUNS", rows, "linear", 0)
    _write(tmp_path / "RUNS", cohort_rows(12), "full", 0, cohort_hash="f00dcafe" * 8)
    _one_line_error(_invoke(tmp_path / "RUNS", "--out", tmp_path / "R", "--bootstrap", "0"),
                    r"runs m__full__best__s0 \(cohort f00dcafef00d\) and m__linear__best__s0 \(cohort abc123\) "
                    r"come from different cohorts")
    assert not (tmp_path / "R").exists()


def _sex_recoded(rows, codes):
    return rows.assign(sex=rows["sex"].map(codes))


def test_sex_codes_male_female_are_read_as_m_f(tmp_path):
    rows = cohort_rows(16)
    _write(tmp_path / "MF", rows, "linear", 0)
    _write(tmp_path / "MF", rows, "full", 0)
    _write(tmp_path / "ONE", rows, "linear", 0)
    _write(tmp_path / "ONE", _sex_recoded(rows, {"M": "male", "F": "female"}), "full", 0)
    _write(tmp_path / "ALL", _sex_recoded(rows, {"M": "Male", "F": "FEMALE"}), "linear", 0)
    _write(tmp_path / "ALL", _sex_recoded(rows, {"M": "m", "F": "f"}), "full", 0)
    cfg = dict(n_boot=100, attributes=("sex", "age_group"))
    want = compute(read_runs(tmp_path / "MF"), AnalyzeConfig(tmp_path, tmp_path, **cfg))
    for name in ("ONE", "ALL"):
        got = compute(read_runs(tmp_path / name), AnalyzeConfig(tmp_path, tmp_path, **cfg))
        pd.testing.assert_frame_equal(got.metrics, want.metrics)
        pd.testing.assert_frame_equal(got.comparisons, want.comparisons)
        assert got.metrics.loc[got.metrics["metric"] == "eqodds", "value"].notna().all()
        assert any("column sex" in n and "→ M" in n for n in got.notes)


def test_unknown_group_code_is_a_one_line_error(tmp_path):
    rows = cohort_rows(8)
    rows.loc[rows.index[-3], "sex"] = "U"  # a test image
    _write(tmp_path / "RUNS", rows, "linear", 0)
    _one_line_error(_invoke(tmp_path / "RUNS", "--out", tmp_path / "R", "--bootstrap", "0"),
                    r"run m__linear__best__s0: predictions.csv column sex has unknown group code\(s\) \['U'\]; expected M, F")


def test_run_json_attributes_set_groups_and_reference(tmp_path):
    rows = cohort_rows(16).assign(race=lambda r: np.where(r.index % 3 == 0, "B", "A"))
    attrs = {"sex": {"groups": ["M", "F"], "reference": "F"}, "race": {"groups": ["A", "B"], "reference": "B"}}
    _write(tmp_path / "V1", rows, "linear", 0)
    _write(tmp_path / "V2", rows, "linear", 0, attributes=attrs)
    cfg = AnalyzeConfig(tmp_path, tmp_path, n_boot=0, attributes=("sex", "race"))
    v1 = compute(read_runs(tmp_path / "V1"), cfg).metrics.set_index(["metric", "attribute", "group", "class"])["value"]
    v2 = compute(read_runs(tmp_path / "V2"), cfg).metrics.set_index(["metric", "attribute", "group", "class"])["value"]
    assert v2["f1_gap", "sex", "", ""] == pytest.approx(-v1["f1_gap", "sex", "", ""])  # F − M now
    assert v2["f1_gap_abs", "sex", "", ""] == pytest.approx(v1["f1_gap_abs", "sex", "", ""])
    crossed = v2[v2.index.get_level_values("attribute") == "sex×race"].index.get_level_values("group")
    assert list(dict.fromkeys(g for g in crossed if g)) == ["F×B", "F×A", "M×B", "M×A"]  # references first
    rows.loc[rows.index[-1], "race"] = "C"
    _write(tmp_path / "BAD", rows, "linear", 0, attributes=attrs)
    with pytest.raises(CxrfairError, match=r"column race has unknown group code\(s\) \['C'\]; expected A, B"):
        compute(read_runs(tmp_path / "BAD"), cfg)
    malformed = {"sex": {"groups": ["M", "F"], "reference": "X"}}
    with pytest.raises(CxrfairError, match=r"run m__linear__best__s0: run.json attributes: sex needs"):
        _write(tmp_path / "MALFORMED", rows, "linear", 0, attributes=malformed)  # the writer refuses it
    run_dir = _write(tmp_path / "MALFORMED", rows, "linear", 0)
    meta = json.loads((run_dir / "run.json").read_text())
    (run_dir / "run.json").write_text(json.dumps(meta | {"attributes": malformed}))  # and so does the reader
    with pytest.raises(CxrfairError, match=r"run m__linear__best__s0 .*: run.json attributes: sex needs"):
        read_runs(tmp_path / "MALFORMED")


@pytest.mark.parametrize("n", [1, 20, 99, -1])
def test_too_few_replicates_are_refused(tmp_path, n):
    _write(tmp_path / "RUNS", cohort_rows(8), "linear", 0)
    r = _invoke(tmp_path / "RUNS", "--out", tmp_path / "R", "--bootstrap", n)
    assert r.exit_code != 0 and "Traceback" not in r.output and not (tmp_path / "R").exists()
    if n > 0:
        _one_line_error(r, r"--bootstrap \d+: use 0 \(point estimates, no intervals\) or at least 100")


def test_help_says_what_bootstrap_values_mean():
    out = CliRunner().invoke(main, ["analyze", "--help"]).output
    assert "0 for point estimates only" in out and "at least 100" in out and "patient" in out


def test_existing_out_is_refused_before_any_work(tmp_path):
    (tmp_path / "EMPTY").mkdir()  # reading these runs would fail: the --out check must come first
    (tmp_path / "R").mkdir()
    (tmp_path / "R" / "keep.txt").write_text("x")
    _one_line_error(_invoke(tmp_path / "EMPTY", "--out", tmp_path / "R"), r"--out .*R: already exists; pass --force")
    assert (tmp_path / "R" / "keep.txt").read_text() == "x"


@pytest.mark.parametrize("out", [".", ".."])
def test_out_must_not_replace_the_runs(tmp_path, out):
    run_dir = _write(tmp_path / "exp" / "RUNS", cohort_rows(8), "linear", 0)
    r = _invoke(tmp_path / "exp" / "RUNS", "--out", tmp_path / "exp" / "RUNS" / out, "--force")
    _one_line_error(r, r"--out .*: is or holds the runs folder")
    assert (run_dir / "run.json").is_file()


# ----------------------------------------------------------------------------- run identity


def _run(run_id, method="linear", seed=0, **meta):
    no_rows = pd.DataFrame({"image_id": [], "split": []})
    return Run({"run_id": run_id, "model": "m", "method": method, "seed": seed, "cohort_hash": "h", **meta}, no_rows,
               None)


def test_tag_comes_from_parse_run_id():
    assert tag_of(_run("m__linear+groupdro-sex__best__s1", seed=1)) == "groupdro-sex__best"
    assert tag_of(_run("m__zeroshot__clip-d2__s2", "zeroshot", 2, draw=2)) == "clip"
    assert tag_of(_run("m__zeroshot__clip-d2__s2", "zeroshot", 2)) == "clip-d2"  # no draw: a plain tag
    with pytest.raises(CxrfairError, match="does not follow"):
        tag_of(_run("hand-made-run"))


def test_check_runs_refuses_a_method_that_contradicts_the_id():
    with pytest.raises(CxrfairError, match="run.json says method 'full' but the run id says 'linear'"):
        check_runs([_run("m__linear__best__s0", method="full")])
    check_runs([_run("m__linear__best__s0"), _run("m__full__best__s0", method="full")])


def test_cohort_hash_is_read_from_run_json(tmp_path):
    """The refusal is about the recorded cohort, not the test images (which may coincide)."""
    rows = cohort_rows(8)
    a = _write(tmp_path, rows, "linear", 0)
    _write(tmp_path, rows, "full", 0)
    meta = json.loads((a / "run.json").read_text())
    (a / "run.json").write_text(json.dumps(meta | {"cohort_hash": "0123456789abcdef"}))
    with pytest.raises(CxrfairError, match="come from different cohorts"):
        compute(read_runs(tmp_path), AnalyzeConfig(tmp_path, tmp_path, n_boot=0))


@pytest.mark.parametrize("task", ["multiclass", "multilabel"])
def test_replicates_in_blocks_equal_one_call_on_all_of_them(task):
    """``compute`` scores the (R, N) counts a block of replicates at a time (bounded memory)."""
    rng = np.random.default_rng(0)
    n, groups = 90, {"sex": (rng.choice(["M", "F"], 90), ["M", "F"])}
    counts = patient_counts(np.arange(n) // 2, groups["sex"][0], 37, rng, dtype=None)
    if task == "multiclass":
        y, p = rng.integers(0, 3, n), rng.dirichlet(np.ones(3), n)
        score = lambda **kw: M.evaluate_all(y, p, ["a", "b", "c"], groups, **kw)  # noqa: E731
    else:
        y, p = (rng.random((n, 2)) < 0.4).astype(float), rng.random((n, 2))
        score = lambda **kw: ML.evaluate_multilabel(y, p, ["a", "b"], groups, np.array([0.5, 0.3]), **kw)  # noqa: E731
    whole = score(weights=counts.astype(np.float64))
    blocks = in_blocks(score, counts, chunk_bytes=8 * n * 5)  # 5 replicates a block, the last one 2
    assert blocks.keys() == whole.keys()
    for key, value in whole.items():
        np.testing.assert_array_equal(blocks[key], value, err_msg=str(key))


def test_seeds_that_disagree_widen_the_seed_mean_interval_to_cover_both(tmp_path):
    """Two seeds far apart (accuracy ~0.9 vs ~0.35): the patients-only interval of their mean is narrow
    and covers neither; the reported one, widened by the seed variance, covers both seeds' accuracies."""
    rows = cohort_rows(48)
    rows["patient_id"] = rows.index // 2
    _write(tmp_path, rows, "linear", 0, skill=3.0, probs_seed=1)
    _write(tmp_path, rows, "linear", 1, skill=0.05, probs_seed=2)
    runs = read_runs(tmp_path)
    res = compute(runs, AnalyzeConfig(tmp_path, tmp_path, n_boot=R, seed=5))
    acc = res.metrics[(res.metrics["metric"] == "accuracy") & (res.metrics["attribute"] == "")]["value"].to_numpy()
    assert acc.max() - acc.min() > 0.3
    row = res.seeds[(res.seeds["metric"] == "accuracy") & (res.seeds["attribute"] == "")].iloc[0]
    patients_only = np.percentile(_slow_replicates(_by(runs, "linear"), _accuracy).mean(axis=0), [2.5, 97.5])
    assert row["ci_high"] - row["ci_low"] > 2 * (patients_only[1] - patients_only[0])
    assert row["ci_low"] <= acc.min() and acc.max() <= row["ci_high"]
    assert not (patients_only[0] <= acc.min() or acc.max() <= patients_only[1])  # the old interval covered neither
    assert row["n_seeds"] == 2


def test_a_delta_between_seed_means_whose_seeds_disagree_holds_zero(tmp_path):
    """Two methods whose seeds are drawn alike (skill spread 0.2 to 2.0 logits, the same draw of noise, so the
    patients barely move the delta): the mean's delta is a seed accident, and its interval must hold 0 and its
    p-value stay above 0.05, where the patients-only interval excludes 0. Against the slow replicates."""
    rows = cohort_rows(48)
    rows["patient_id"] = rows.index // 2  # as ``seeded``: sex × age strata of six patients, none pooled
    for s, (lin, mlp) in enumerate(((0.2, 0.4), (1.0, 1.2), (1.8, 2.0))):
        _write(tmp_path, rows, "linear", s, skill=lin, probs_seed=7)
        _write(tmp_path, rows, "mlp", s, skill=mlp, probs_seed=7)
    runs = read_runs(tmp_path)
    res = compute(runs, AnalyzeConfig(tmp_path, tmp_path, n_boot=R, seed=5))
    values = res.metrics[(res.metrics["metric"] == "accuracy") & (res.metrics["attribute"] == "")].set_index("run_id")["value"]
    lin_ids, mlp_ids = ([r.run_id for r in _by(runs, m)] for m in ("linear", "mlp"))
    assert values[lin_ids].std() > 0.1  # the seeds disagree by far more than the patients move the delta
    c = res.comparisons
    row = c[(c["method"] == "mlp") & c["seed"].isna() & (c["metric"] == "accuracy") & (c["attribute"] == "")]
    diff = _slow_replicates(_by(runs, "mlp"), _accuracy).mean(axis=0) - _slow_replicates(_by(runs, "linear"), _accuracy).mean(axis=0)
    delta = values[mlp_ids].mean() - values[lin_ids].mean()
    assert np.percentile(diff, 2.5) > 0  # patients only: "higher", by a seed accident
    lo, hi, p = widened_delta(delta, diff, [values[mlp_ids].to_numpy(), values[lin_ids].to_numpy()])
    assert (row["ci_low"].item(), row["ci_high"].item(), row["p_value"].item()) == pytest.approx((lo, hi, p), abs=1e-9)
    assert lo < 0 < hi and p >= 0.05 and row["seed_var_known"].item()
    f = findings_table(c)
    assert f.loc[(f["method"] == "mlp") & (f["metric"] == "accuracy"), "verdict"].item() == "no clear change"


def _drop_rows_record(run_dir, edit=None):
    """Make ``run_dir`` a run written before run.json recorded rows; optionally edit its predictions."""
    meta = json.loads((run_dir / "run.json").read_text())
    meta.pop("rows")
    (run_dir / "run.json").write_text(json.dumps(meta))
    if edit is not None:
        df = pd.read_csv(run_dir / "predictions.csv", dtype={"image_id": str, "sex": str, "age_group": str})
        edit(df).to_csv(run_dir / "predictions.csv", index=False)


@pytest.mark.parametrize("edit, pattern", [
    (lambda d: d.iloc[:-7], r"missing 00000041_000.png, 00000042_000.png, .* \(7 in all\)"),
    (lambda d: d.assign(image_id=d["image_id"].replace({"00000040_000.png": "renamed.png"})),
     r"missing 00000040_000.png; extra renamed.png"),
])
def test_analyze_refuses_a_run_on_other_test_images_than_its_cohorts(tmp_path, edit, pattern):
    """Old runs (no rows record) are compared with each other: the odd one is refused, named with its file."""
    rows = cohort_rows(24)
    for method in ("zeroshot", "linear"):
        _drop_rows_record(_write(tmp_path / "RUNS", rows, method, 0))
    _drop_rows_record(_write(tmp_path / "RUNS", rows, "full", 0), edit)
    result = _invoke(tmp_path / "RUNS", "--out", tmp_path / "out", "--bootstrap", 0)
    assert result.exit_code == 1
    assert re.search(r"run m__full__best__s0: .*m__full__best__s0/predictions\.csv has other test images than 2 other "
                     r"run\(s\) of its cohort", result.output), result.output
    assert re.search(pattern, result.output), result.output
    assert "Traceback" not in result.output


def test_runs_without_a_rows_record_are_analysed_with_a_note(tmp_path):
    rows = cohort_rows(24)
    _drop_rows_record(_write(tmp_path / "RUNS", rows, "zeroshot", 0))
    _write(tmp_path / "RUNS", rows, "linear", 0)
    assert check_runs(read_runs(tmp_path / "RUNS")) == [
        "1 run(s) (m__zeroshot__best__s0) were written before run.json recorded their rows, so a cut or edited "
        "predictions.csv among them is found only by comparing its images with the other runs'"]


def test_a_baseline_of_one_run_is_flagged_seed_var_unknown_and_noted(tmp_path):
    rows = cohort_rows(48)
    _write(tmp_path, rows, "linear", 0, skill=1.0)
    for s in (0, 1):
        _write(tmp_path, rows, "mlp", s, skill=1.2)
    res = compute(read_runs(tmp_path), AnalyzeConfig(tmp_path, tmp_path, n_boot=R, seed=5))
    c = res.comparisons
    assert not c["seed_var_known"].any()  # every delta has the one-run linear probe on one side
    said = [n for n in res.notes if "seed_var_known = false" in n]
    assert len(said) == 1 and said[0].endswith(": m mlp")
    # With two baseline runs the flag is set and the note is gone.
    _write(tmp_path, rows, "linear", 1, skill=1.0)
    res = compute(read_runs(tmp_path), AnalyzeConfig(tmp_path, tmp_path, n_boot=R, seed=5))
    assert res.comparisons["seed_var_known"].all() and not [n for n in res.notes if "seed_var_known" in n]
