"""The shortcut test (issue 14, point 3): AUC of a class on (positives with the shortcut + all
negatives) vs (positives without it + all negatives), against scikit-learn on the two subsets
and, for the paired interval, against a slow loop over resamples."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from sklearn.metrics import roc_auc_score

from cxrfair.analysis.config import MIN_STRATUM_PATIENTS, AnalyzeConfig
from cxrfair.analysis.engine import compute
from cxrfair.analysis.shortcut import SHORTCUT_COLUMNS
from cxrfair.core.bootstrap import merge_small_strata, patient_counts
from cxrfair.core.runs import make_predictions, read_runs, write_run
from cxrfair.cli import main
from cxrfair.errors import CxrfairError

from .synth import CLASSES, cohort_rows, meta_for, multilabel_rows, probs_for, write_multilabel_runs

R, SEED = 100, 3


@pytest.fixture(scope="module")
def ml(tmp_path_factory):
    d = tmp_path_factory.mktemp("sc") / "RUNS"
    rows = multilabel_rows(100, seed=1)
    write_multilabel_runs(d, [("m", "zeroshot", 0), ("m", "linear", 0)], rows)
    runs = read_runs(d)
    return d, runs, compute(runs, AnalyzeConfig(d, d, n_boot=R, seed=SEED, attributes=("sex",)))


def _subsets(test: pd.DataFrame, cls: str, positive: np.ndarray, negative: np.ndarray):
    """Index arrays of the 'with' and 'without' subsets, built from their definition."""
    drain = test["drain"].to_numpy()
    return (np.flatnonzero((positive & (drain == 1)) | negative), np.flatnonzero((positive & (drain == 0)) | negative))


def _ml_subsets(test, cls="Pneumothorax"):
    y = test[f"y_{cls}"].to_numpy()
    return _subsets(test, cls, y == 1, y == 0), y


def test_aucs_and_counts_match_scikit_learn_on_the_two_subsets(ml):
    _, runs, res = ml
    assert res.config.shortcut == "drain" and res.config.shortcut_class == "Pneumothorax"  # automatic
    assert list(res.shortcut.columns) == SHORTCUT_COLUMNS and len(res.shortcut) == 2
    for run in runs:
        test = run.split("test").sort_values("image_id")
        (w, wo), y = _ml_subsets(test)
        p = test["p_Pneumothorax"].to_numpy()
        row = res.shortcut.set_index("run_id").loc[run.run_id]
        assert row["auc_with"] == pytest.approx(roc_auc_score(y[w], p[w]))
        assert row["auc_without"] == pytest.approx(roc_auc_score(y[wo], p[wo]))
        assert row["delta"] == pytest.approx(row["auc_with"] - row["auc_without"])
        drain = test["drain"].to_numpy()
        assert row["n_pos_with"] == ((y == 1) & (drain == 1)).sum() and row["n_pos_without"] == ((y == 1) & (drain == 0)).sum()
        assert row["n_pos_unknown"] == ((y == 1) & np.isnan(drain)).sum() > 0  # excluded from both
        assert row["n_neg"] == (y == 0).sum() > ((y == 0) & ~np.isnan(drain)).sum()  # every negative, unknown drain too
    assert (res.shortcut["delta"] > 0).all()  # the synthetic scores rise with the drain


def test_paired_interval_against_a_slow_loop(ml):
    _, runs, res = ml
    run = runs[0]
    test = run.split("test").sort_values("image_id")
    patients, strata = test["patient_id"].astype(str).to_numpy(), test["sex"].to_numpy()
    counts = patient_counts(patients, merge_small_strata(patients, strata, MIN_STRATUM_PATIENTS)[0], R,
                            np.random.default_rng(SEED))
    y, p, drain = test["y_Pneumothorax"].to_numpy(), test["p_Pneumothorax"].to_numpy(), test["drain"].to_numpy()
    reps = []
    for r in range(R):
        idx = np.repeat(np.arange(len(test)), counts[r].astype(int))
        pos, neg = y[idx] == 1, y[idx] == 0
        with_ = roc_auc_score(y[idx][(pos & (drain[idx] == 1)) | neg], p[idx][(pos & (drain[idx] == 1)) | neg])
        without = roc_auc_score(y[idx][(pos & (drain[idx] == 0)) | neg], p[idx][(pos & (drain[idx] == 0)) | neg])
        reps.append((with_, without))
    reps = np.array(reps)
    row = res.shortcut.set_index("run_id").loc[run.run_id]
    for col, x in (("auc_with", reps[:, 0]), ("auc_without", reps[:, 1]), ("", reps[:, 0] - reps[:, 1])):
        lo, hi = np.percentile(x, [2.5, 97.5])
        assert (row[f"{col}_ci_low" if col else "ci_low"], row[f"{col}_ci_high" if col else "ci_high"]) == \
            pytest.approx((lo, hi), abs=1e-12)
    # Paired: the interval of the difference is narrower than the unpaired one (independent resamples).
    unpaired = np.percentile(reps[:, 0] - np.roll(reps[:, 1], 1), [2.5, 97.5])
    assert row["ci_high"] - row["ci_low"] < unpaired[1] - unpaired[0]


def test_shortcut_rows_in_seeds_and_comparisons(ml):
    _, _, res = ml
    key = (res.comparisons["metric"] == "shortcut_delta") & (res.comparisons["attribute"] == "drain")
    c = res.comparisons[key & (res.comparisons["class"] == "Pneumothorax")]
    assert len(c) == 1 and c["method"].item() == "zeroshot" and c["baseline"].item() == "linear"  # the reference
    d = res.shortcut.set_index("method")["delta"]
    assert c["delta"].item() == pytest.approx(d["zeroshot"] - d["linear"])
    assert set(res.seeds.loc[res.seeds["attribute"] == "drain", "metric"]) == {
        "shortcut_auc_with", "shortcut_auc_without", "shortcut_delta"}
    assert any("positives with drain = 1" in n and "negatives" in n for n in res.notes)


def _multiclass_runs(tmp_path, drain=None):
    rows = cohort_rows(40)
    rng = np.random.default_rng(0)
    rows["drain"] = rng.choice([1.0, 0.0, np.nan], size=len(rows)) if drain is None else drain
    write_run(tmp_path / "RUNS", meta_for("m", "linear", 0), make_predictions(rows, probs_for(rows, seed=2), CLASSES))
    return tmp_path / "RUNS"


def test_multiclass_runs_use_the_class_probability_one_vs_rest(tmp_path):
    d = _multiclass_runs(tmp_path)
    res = compute(read_runs(d), AnalyzeConfig(d, d, n_boot=0, shortcut="drain", shortcut_class="Effusion"))
    test = read_runs(d)[0].split("test").sort_values("image_id")
    positive = (test["label"] == "Effusion").to_numpy()
    w, wo = _subsets(test, "Effusion", positive, ~positive)
    p = test["p_Effusion"].to_numpy()
    row = res.shortcut.iloc[0]
    assert row["auc_with"] == pytest.approx(roc_auc_score(positive[w], p[w]))
    assert row["auc_without"] == pytest.approx(roc_auc_score(positive[wo], p[wo]))
    assert row["n_neg"] == (~positive).sum() and np.isnan(row["ci_low"])  # --bootstrap 0: no interval
    # Automatic only for drain + Pneumothorax: these runs have no Pneumothorax class.
    assert compute(read_runs(d), AnalyzeConfig(d, d, n_boot=0)).shortcut.empty


def _invoke(*args):
    return CliRunner().invoke(main, ["analyze", *map(str, args)])


@pytest.mark.parametrize("args, pattern", [
    (["--shortcut", "tube", "--shortcut-class", "Effusion"], r"predictions.csv has no column tube for --shortcut"),
    (["--shortcut", "age", "--shortcut-class", "Effusion"], r"--shortcut column age has value\(s\) \['\d+"),
    (["--shortcut", "drain", "--shortcut-class", "Nodule"], r"--shortcut-class Nodule is not a class of the run"),
    (["--shortcut", "drain"], r"--shortcut COLUMN and --shortcut-class CLASS go together"),
    (["--shortcut-class", "Effusion"], r"--shortcut COLUMN and --shortcut-class CLASS go together"),
])
def test_bad_explicit_shortcut_is_a_one_line_error(tmp_path, args, pattern):
    d = _multiclass_runs(tmp_path)
    r = _invoke(d, "--out", tmp_path / "R", "--bootstrap", "0", *args)
    assert r.exit_code != 0 and len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output, r.output
    assert re.search(pattern, r.output), r.output
    assert not (tmp_path / "R").exists()


def test_a_subset_without_positives_is_an_error_when_asked_and_a_note_when_automatic(tmp_path):
    rows = multilabel_rows(40)
    rows.loc[rows["y_Pneumothorax"] == 1, "drain"] = 1.0  # no positive without a drain
    write_multilabel_runs(tmp_path / "RUNS", [("m", "linear", 0)], rows)
    runs = read_runs(tmp_path / "RUNS")
    with pytest.raises(CxrfairError, match=r"no Pneumothorax positive without the shortcut \(drain == 0\) in the test split"):
        compute(runs, AnalyzeConfig(tmp_path, tmp_path, n_boot=0, shortcut="drain", shortcut_class="Pneumothorax"))
    res = compute(runs, AnalyzeConfig(tmp_path, tmp_path, n_boot=0))
    assert res.shortcut.empty and res.config.shortcut == "none"
    assert any(n.startswith("automatic shortcut test (drain, Pneumothorax) skipped") for n in res.notes)


def test_non_binary_drain_is_skipped_when_automatic(tmp_path):
    rows = multilabel_rows(40)
    rows.loc[rows.index[-1], "drain"] = 2.0
    write_multilabel_runs(tmp_path / "RUNS", [("m", "linear", 0)], rows)
    res = compute(read_runs(tmp_path / "RUNS"), AnalyzeConfig(tmp_path, tmp_path, n_boot=0))
    assert res.shortcut.empty and any("column drain has value(s) ['2.0']" in n for n in res.notes)
    off = compute(read_runs(tmp_path / "RUNS"), AnalyzeConfig(tmp_path, tmp_path, n_boot=0, shortcut="none"))
    assert not any("shortcut" in n for n in off.notes)


def test_cli_writes_shortcut_csv(tmp_path):
    write_multilabel_runs(tmp_path / "RUNS", [("m", "linear", 0)], multilabel_rows(40))
    r = _invoke(tmp_path / "RUNS", "--out", tmp_path / "R", "--bootstrap", "100", "--attributes", "sex")
    assert r.exit_code == 0, r.output
    s = pd.read_csv(tmp_path / "R" / "shortcut.csv")
    assert list(s.columns) == SHORTCUT_COLUMNS and s["column"].item() == "drain" and s["ci_low"].notna().all()
