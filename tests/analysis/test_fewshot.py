"""The few-shot table, its report section and figure, against a slow reference from the predictions."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from cxrfair.analysis import sections as S
from cxrfair.analysis.analyze import analyze
from cxrfair.analysis.config import AnalyzeConfig
from cxrfair.analysis.engine import compute
from cxrfair.analysis.fewshot import FEWSHOT_COLUMNS
from cxrfair.analysis.render import build_sections
from cxrfair.analysis.report import ReportData
from cxrfair.core.runs import RunKey, make_predictions, parse_run_id, read_runs, write_run

from .synth import CLASSES, cohort_rows, probs_for

# (method, shots, skill): zero-shot, 1- and 5-shot probes and the probe on the whole split.
SETUPS = [("zeroshot", None, 0.4), ("linear", 1, 0.6), ("linear", 5, 1.2), ("linear", None, 2.0)]
SEEDS = (0, 1, 2)


def _write(d, setups=SETUPS):
    rows = cohort_rows(40)
    for j, (method, shots, skill) in enumerate(setups):
        for seed in SEEDS:
            key = RunKey("m", method, "clip" if method == "zeroshot" else "best", seed, shots=shots)
            meta = {"run_id": key.run_id, "model": "m", "method": method, "seed": seed, "classes": CLASSES,
                    "cohort_hash": "abc123", "hyperparameters": {}, "selected_epoch": None, "trainable_params": 0,
                    "timings": {}}
            probs = probs_for(rows, CLASSES, skill=skill, seed=10 * j + seed)
            write_run(d, meta, make_predictions(rows, probs, CLASSES))
    return d


@pytest.fixture(scope="module")
def fewshot(tmp_path_factory):
    d = _write(tmp_path_factory.mktemp("fewshot") / "RUNS")
    runs = read_runs(d)
    return runs, compute(runs, AnalyzeConfig(d, d.parent / "OUT", n_boot=100, figures=False, embeddings="none"))


def _accuracy(run, group=None):
    test = run.split("test")
    if group is not None:
        test = test[test["sex"] == group]
    p = test[[f"p_{c}" for c in CLASSES]].to_numpy()
    return float((np.array(CLASSES)[p.argmax(1)] == test["label"].to_numpy()).mean())


def _auc(test):
    y = test["label"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy()
    return roc_auc_score(y, test[[f"p_{c}" for c in CLASSES]].to_numpy(), multi_class="ovr", average="macro")


def _es_auc(run):
    test = run.split("test")
    overall = _auc(test)
    return overall / (1 + sum(abs(overall - _auc(test[test["sex"] == g])) for g in ("M", "F")))


def test_fewshot_table_equals_a_slow_reference_from_the_predictions(fewshot):
    runs, res = fewshot
    t = res.fewshot
    assert list(t.columns) == FEWSHOT_COLUMNS
    assert list(dict.fromkeys(zip(t["method"], t["setting"]))) == [
        ("zeroshot", "zero-shot"), ("linear", "1-shot"), ("linear", "5-shot"), ("linear", "all")]
    by_setting = {"zero-shot": ("zeroshot", None), "1-shot": ("linear", 1), "5-shot": ("linear", 5), "all": ("linear", None)}
    for setting, (method, shots) in by_setting.items():
        mine = [r for r in runs if r.method == method and parse_run_id(r.run_id).shots == shots]
        assert len(mine) == len(SEEDS)
        rows = t[t["setting"] == setting]
        acc = rows[(rows["metric"] == "accuracy") & (rows["attribute"] == "")]
        assert acc["mean"].item() == pytest.approx(np.mean([_accuracy(r) for r in mine]), abs=1e-12)
        assert acc["n_seeds"].item() == len(SEEDS)
        sd = np.std([_accuracy(r) for r in mine], ddof=1)
        assert acc["sd"].item() == pytest.approx(sd, abs=1e-12)
        for g in ("M", "F"):
            cell = rows[(rows["metric"] == "accuracy") & (rows["attribute"] == "sex") & (rows["group"] == g)]
            assert cell["mean"].item() == pytest.approx(np.mean([_accuracy(r, g) for r in mine]), abs=1e-12)
        es = rows[(rows["metric"] == "es_auc") & (rows["attribute"] == "sex")]
        assert es["mean"].item() == pytest.approx(np.mean([_es_auc(r) for r in mine]), abs=1e-9)
    # The intervals are the seed summary's: the same rows of seeds.csv.
    seeds = res.seeds.merge(t[["model", "method", "tag", "metric", "attribute", "group"]],
                            on=["model", "method", "tag", "metric", "attribute", "group"])
    seeds = seeds[seeds["class"] == ""]
    merged = t.merge(seeds, on=["model", "method", "tag", "metric", "attribute", "group"], suffixes=("", "_s"))
    assert len(merged) == len(t)
    assert np.allclose(merged[["mean", "ci_low", "ci_high"]].to_numpy(), merged[["mean_s", "ci_low_s", "ci_high_s"]].to_numpy(),
                       equal_nan=True)
    assert (t["ci_low"] <= t["ci_high"]).all()


def test_fewshot_runs_are_never_pooled_or_primary(fewshot):
    runs, res = fewshot
    tags = res.runs.set_index("run_id")["tag"]
    assert tags["m__linear-k1__best__s0"] == "k1__best" and tags["m__linear-k5__best__s0"] == "k5__best"
    assert tags["m__linear__best__s0"] == "best"
    primary = set(res.runs.loc[res.runs["primary"], "run_id"])
    assert primary == {f"m__{m}__{t}__s{s}" for m, t in (("linear", "best"), ("zeroshot", "clip")) for s in SEEDS}
    # seeds.csv keeps one row set per K.
    assert set(res.seeds.loc[res.seeds["method"] == "linear", "tag"]) == {"best", "k1__best", "k5__best"}
    # The comparisons (primary runs only) hold no few-shot run.
    assert not res.comparisons["run_id"].str.contains("-k").any()


def test_section_appears_only_with_fewshot_runs(fewshot, tmp_path):
    runs, res = fewshot
    sections = S.fewshot(ReportData(res, runs))
    assert [s.id for s in sections] == ["fewshot-sex", "fewshot-age_group", "fewshot-sex_x_age"]
    table = sections[0].tables[0].df
    assert table["setting"].tolist() == ["zero-shot", "1-shot", "5-shot", "all"]
    assert {"accuracy", "accuracy M", "accuracy F", "es_auc"} <= set(table.columns)
    assert "fewshot-sex" in [s.id for s in build_sections(ReportData(res, runs))]
    # Without few-shot runs: no fewshot table, no section.
    d = _write(tmp_path / "RUNS", [s for s in SETUPS if s[1] is None])
    plain = compute(read_runs(d), AnalyzeConfig(d, tmp_path / "OUT", n_boot=100, figures=False, embeddings="none"))
    assert plain.fewshot is None
    assert S.fewshot(ReportData(plain, read_runs(d))) == []
    assert not any(s.id.startswith("fewshot") for s in build_sections(ReportData(plain, read_runs(d))))


def test_figure_draws_one_line_per_group_and_zero_shot_reference_lines(fewshot):
    from cxrfair.analysis.fewshot_figures import fewshot_figure

    _, res = fewshot
    fig = fewshot_figure(res.fewshot, "sex", ("accuracy", "auc_macro"))
    axes = fig.axes
    assert len(axes) == 2
    ax = axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "5", "all"]
    horizontal = [ln for ln in ax.get_lines() if len(set(ln.get_ydata())) == 1 and len(ln.get_xdata()) == 2
                  and list(ln.get_xdata()) == [0, 1] and ln.get_transform() is not ax.transData]
    assert len(horizontal) == 3  # zero-shot: all images, M, F
    zs = res.fewshot[(res.fewshot["setting"] == "zero-shot") & (res.fewshot["metric"] == "accuracy")
                     & (res.fewshot["attribute"] == "")]["mean"].item()
    assert any(abs(ln.get_ydata()[0] - 100 * zs) < 1e-9 for ln in horizontal)


@pytest.mark.slow  # writes the whole report with figures (~10 s)
def test_analyze_writes_fewshot_csv_and_the_figure(tmp_path):
    d = _write(tmp_path / "RUNS")
    analyze(AnalyzeConfig(d, tmp_path / "OUT", n_boot=100, embeddings="none"))
    t = pd.read_csv(tmp_path / "OUT" / "fewshot.csv")
    assert set(t["setting"]) == {"zero-shot", "1-shot", "5-shot", "all"}
    assert (tmp_path / "OUT" / "figures" / "fewshot_sex.png").is_file()
    assert "Few-shot by sex" in (tmp_path / "OUT" / "report.md").read_text()


def test_postprocess_refuses_a_fewshot_run(fewshot):
    from click.testing import CliRunner

    from cxrfair.cli import main

    runs, _ = fewshot
    run = next(r for r in runs if parse_run_id(r.run_id).shots == 5)
    res = CliRunner().invoke(main, ["postprocess", str(run.path), "--sensitive", "sex"])
    assert res.exit_code == 1 and "5-shot probe" in res.output and "Traceback" not in res.output
    assert not any(p.name.startswith("m__linear+thresholds") for p in run.path.parent.iterdir())
