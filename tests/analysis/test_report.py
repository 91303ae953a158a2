"""analyze end to end on tiny synthetic runs: files, tables, figures, CLI and its errors."""

from __future__ import annotations

import base64
import re

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from cxrfair.analysis.analyze import analyze
from cxrfair.analysis.config import AnalyzeConfig
from cxrfair.analysis.engine import METRIC_COLUMNS, compute
from cxrfair.analysis.report import fmt
from cxrfair.core.runs import read_runs
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
    # The reference is the linear probe where a model has one (both its seeds, averaged), else zero-shot.
    lin = "tiny-clip__linear__best__s0;tiny-clip__linear__best__s1"
    assert len(row) == 1 and row["baseline"].item() == "linear" and row["baseline_runs"].item() == lin
    v = m[(m["metric"] == "eqodds") & (m["attribute"] == "sex")].set_index("run_id")["value"].astype(float)
    base = (v["tiny-clip__linear__best__s0"] + v["tiny-clip__linear__best__s1"]) / 2
    assert float(row["delta"].item()) == pytest.approx(v["tiny-clip__full__best__s0"] - base)
    assert set(c.loc[c["run_id"] == "tiny-clip__zeroshot__best__s0", "baseline_runs"]) == {lin}
    assert set(c.loc[c["model"] == "other", "baseline"]) == {"zeroshot"}  # no linear probe: zero-shot
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
    assert {"accuracy.png", "f1_heatmap.png", "var_f1.png", "fairness_sex.png", "f1_by_group_sex_x_age.png",
            "roc_tiny-clip_sex.png", "roc_other_sex_x_age.png", "reliability_tiny-clip_age_group.png"} <= set(pngs)
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
    assert html_path.exists() and (tmp_path / "OUT" / "figures" / "fairness_sex.png").exists()
    html = html_path.read_text()
    assert "id='findings'" not in html and re.search(r"<main>.*?<section id='setup'>", html, re.S)  # nothing to compare


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
    r = _invoke(runs_dir, "--out", tmp_path / "R", "--bootstrap", "100", "--seed", "1", "--attributes", "sex")
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
    from cxrfair.core.runs import Run

    return Run({"run_id": run_id, "model": "m", "method": method, "seed": seed, **meta}, None, None)


def test_tags_group_seeds_and_zero_shot_draws():
    from cxrfair.analysis.runsets import tag_of

    assert tag_of(_run("m__linear__best__s2", "linear", 2)) == "best"
    assert tag_of(_run("m__zeroshot__gloria-d3__s3", seed=3, draw=3)) == "gloria"
    assert tag_of(_run("odd-name__zeroshot__clip-d0__s0", draw=0)) == "clip"  # sanitised model in the id


def test_primary_tag_prefers_the_probes_choice_then_val_accuracy(tmp_path):
    from .synth import cohort_rows, meta_for, probs_for
    from cxrfair.core.runs import make_predictions, write_run

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
    from cxrfair.core.runs import make_predictions, write_run

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



# ----------------------------------------------------------------------------- findings and layout

# The test's own reading of a findings sentence (independent of findings.py's formatting code).
NUM = r"[+−]?\d+\.\d"
CLAUSE = re.compile(rf"(?:^|, )(?P<name>[A-Za-z_|0-9 ()]+?) (?P<d>{NUM})(?: points)? \[(?P<lo>{NUM}), (?P<hi>{NUM})\] "
                    r"\((?:\*\*)?(?P<verdict>[a-z :]+?)(?:\*\*)?(?:; Holm: (?:\*\*)?(?P<holm>[a-z :]+?)(?:\*\*)?)?\)")
HEAD = re.compile(r"^- \*\*(?P<model>[^,]+), (?P<method>[^*]+) vs (?P<base>[^*]+)\*\*(?: \((?P<n>\d+) seeds pooled\))?: "
                  r"(?P<body>.*)\.$")
METHOD_NAMES = {"zero-shot": "zeroshot", "linear probe": "linear", "MLP probe": "mlp", "LoRA": "lora", "full fine-tuning": "full"}
METRIC_NAMES = {"accuracy": "accuracy", "Var_F1": "var_f1", "F1 gap (signed)": "f1_gap", "F1 gap": "f1_gap",
                "|F1 gap|": "f1_gap_abs", "EqOdds": "eqodds", "macro AUC": "auc_macro", "AUC gap (signed)": "auc_gap",
                "AUC gap": "auc_gap", "worst group AUC": "worst_group_auc"}
ATTRIBUTES = {"sex": "sex", "age": "age_group", "sex×age": "sex×age", "race": "race"}


def _num(s: str) -> float:
    return float(s.replace("−", "-"))


def parse_findings(md: str) -> list[dict]:
    """Every clause of every findings sentence in report.md, as numbers."""
    section = md.split('<a id="findings"></a>')[1].split("<a id=")[0]
    out = []
    for line in section.splitlines():
        m = HEAD.match(line)
        if not m:
            continue
        for part in re.split(r"; (?=by )", m["body"]):  # "; Holm: ..." stays inside its clause
            attr = ""
            if part.startswith("by "):
                label, part = part[3:].split(": ", 1)
                attr = ATTRIBUTES[label]
            for c in CLAUSE.finditer(part):
                out.append({"model": m["model"], "method": METHOD_NAMES[m["method"]], "baseline": METHOD_NAMES[m["base"]],
                            "n_seeds": int(m["n"] or 1), "metric": METRIC_NAMES[c["name"]], "attribute": attr,
                            "delta": _num(c["d"]), "lo": _num(c["lo"]), "hi": _num(c["hi"]), "verdict": c["verdict"]})
    return out


def assert_findings_match_comparisons(out) -> list[dict]:
    """The report in ``out`` opens on findings, and every claim in them is its row of comparisons.csv
    (value and interval to the printed digit, verdict = whether the interval excludes zero).
    Returns the claims."""
    html = (out / "report.html").read_text()
    assert re.search(r"<main>(<div class='banner'.*?</div>)?<h1>[^<]+</h1><p class='lead'>.*?</p>\s*"
                     r"<section id='headline'>.*?</section>\s*<section id='findings'>", html, re.S)
    md = (out / "report.md").read_text()
    claims = parse_findings(md)
    c = pd.read_csv(out / "comparisons.csv", keep_default_na=False)
    c = c[(c["group"] == "") & (c["class"] == "")]
    c = c.assign(**{k: pd.to_numeric(c[k], errors="coerce") for k in ("seed", "delta", "ci_low", "ci_high")})
    assert claims and len(claims) == len(pd.read_csv(out / "findings.csv"))
    n_stated = int(re.search(r"In all, (\d+) comparisons", md)[1])
    assert n_stated == len(claims)
    assert "not corrected for multiplicity" in md.split('<a id="findings"></a>')[1].split("<a id=")[0]
    for k in claims:
        rows = c[(c["model"] == k["model"]) & (c["method"] == k["method"]) & (c["metric"] == k["metric"])
                 & (c["attribute"] == k["attribute"])]
        mean_row = rows[rows["seed"].isna()]
        if len(mean_row):  # the method's seed-mean row (two-level interval) is stated as it is
            assert len(mean_row) == 1 and k["n_seeds"] == int(mean_row["n_seeds"].iloc[0]), k
            rows = mean_row
        else:  # seeds pooled, by the test's own rule: the mean difference and the union of the seeds' intervals
            assert len(rows) == k["n_seeds"] == rows["seed"].nunique(), k
        assert set(rows["baseline"]) == {k["baseline"]}
        for field, value in (("delta", rows["delta"].mean()), ("lo", rows["ci_low"].min()), ("hi", rows["ci_high"].max())):
            assert k[field] == pytest.approx(round(100 * value, 1), abs=0.051), (k, field)
        if k["verdict"] == "not judged: not shown above chance":
            assert k["metric"] not in ("accuracy", "auc_macro"), k  # utility is always judged
            continue
        every_seed = (rows["ci_low"] > 0).all() or (rows["ci_high"] < 0).all()
        assert (k["verdict"] != "no clear change") == every_seed, k
    # Every model × method compared is stated once, and both pages say the same.
    assert {(k["model"], k["method"]) for k in claims} == set(zip(c["model"], c["method"]))
    text = re.sub(r"<[^>]+>", "", html.split("<section id='findings'>")[1].split("</section>")[0])
    for line in md.split('<a id="findings"></a>')[1].split("<a id=")[0].splitlines():
        if line.startswith("- **"):
            assert line[2:].replace("**", "") in text
    return claims


def test_report_opens_on_findings_that_match_comparisons_csv(report):
    out, _ = report
    assert len(assert_findings_match_comparisons(out)) > 10


def test_sections_have_anchors_a_contents_list_and_the_same_order_in_markdown(report):
    out, html_path = report
    html = html_path.read_text()
    ids = re.findall(r"<section id='([^']+)'>", html)
    assert ids[:4] == ["headline", "findings", "setup", "utility"] and len(ids) == len(set(ids))
    assert {"fairness-sex", "roc-sex", "calibration-sex_x_age", "comparisons", "runs"} <= set(ids)
    toc = re.search(r"<nav id='toc'>(.*?)</nav>", html, re.S)[1]
    assert re.findall(r"href='#([^']+)'", toc) == ids
    md = (out / "report.md").read_text()
    assert re.findall(r'<a id="([^"]+)"></a>', md) == ids
    assert re.findall(r"\]\(#([^)]+)\)", md.split("<a id=")[0]) == ids  # markdown contents list
    # Within a section: figures first, then tables.
    roc = html.split("<section id='roc-sex'>")[1].split("</section>")[0]
    assert roc.index("<figure") < roc.index("<table")
    assert md.index('<a id="utility"></a>') < md.index("figures/accuracy.png") < md.index("| Accuracy |")


def test_wide_tables_fold_their_extra_columns(report):
    _, html_path = report
    html = html_path.read_text()
    sec = html.split("<section id='fairness-sex'>")[1].split("</section>")[0]
    first = re.search(r"<table><thead><tr>(.*?)</tr>", sec)[1]
    assert re.findall(r"<th[^>]*>([^<]+)</th>", first) == ["model", "method", "f1_gap", "f1_gap_abs", "eqodds",
                                                           "eqodds_worst", "seeds"]
    assert "<th title='EqOdds = (1/2C)" in first  # hovering a column name gives its definition
    folded = re.search(r"<details><summary>(\d+) more columns: ([^<]+)</summary>(.*?)</details>", sec, re.S)
    assert folded and "es_auc" in folded[2] and "ece_gap" in folded[2] and "<th>model</th>" in folded[3]
    assert "<span class='ci'>" in sec  # intervals set apart from the value


def test_setup_names_each_models_zero_shot_scoring(tmp_path):
    from .synth import cohort_rows, meta_for, probs_for
    from cxrfair.core.runs import make_predictions, write_run

    rows = cohort_rows(16)
    for model, term in (("gloria-ish", "both"), ("clip-ish", "global"), ("old", None)):
        meta = meta_for(model, "zeroshot", 0, tag="gloria-d0") | {"draw": 0}
        if term:
            meta["zero_shot_term"] = term
        write_run(tmp_path / "RUNS", meta, make_predictions(rows, probs_for(rows, seed=1), CLASSES))
    analyze(AnalyzeConfig(tmp_path / "RUNS", tmp_path / "OUT", n_boot=0, figures=False))
    md = (tmp_path / "OUT" / "report.md").read_text()
    setup = md.split('<a id="setup"></a>')[1].split("<a id=")[0]
    assert re.search(r"`gloria-ish`: prompt set `gloria` .*scoring: GLoRIA's own scoring: the mean of the global and "
                     r"the local .* max over a class's prompts, standardised per class", setup)
    assert re.search(r"`clip-ish`: .*scoring: global image–text cosine similarity only", setup)
    assert re.search(r"`old`: .*scoring: not recorded", setup)


def test_metric_definitions_of_the_task_are_shown(report):
    from cxrfair.analysis.render import build_sections, render_markdown
    from cxrfair.analysis.report import ReportData

    out, _ = report
    res = compute(read_runs(out.parent / "RUNS")[:2], AnalyzeConfig(out.parent / "RUNS", out, n_boot=0, figures=False))
    md = render_markdown(build_sections(ReportData(res)), set(), "t", "l")
    for name in ("accuracy", "eqodds", "f1_gap_abs"):  # Results.definitions, one line each
        assert f"`{name}`: {res.definitions[name]}" in md


def test_a_section_is_one_function_and_one_list_entry(report):
    """The renderers lay out any builder's sections; a builder without data adds nothing."""
    from cxrfair.analysis import sections as S
    from cxrfair.analysis.render import build_sections, draw_figures, render_html
    from cxrfair.analysis.report import Figure, ReportData, Section, Table

    import matplotlib.pyplot as plt

    out, _ = report
    res = compute(read_runs(out.parent / "RUNS")[:2], AnalyzeConfig(out.parent / "RUNS", out, n_boot=0, figures=False))

    def leakage(data):  # e.g. a future leakage section, present only when its data is
        df = pd.DataFrame({"model": ["m"], "method": ["linear"], **{f"c{i}": [str(i)] for i in range(9)}})
        fig = Figure("leakage.png", "AUC of a sex probe.", lambda: plt.subplots(figsize=(2, 2))[0])
        return Section("leakage", "Attribute leakage", prose=("Probes of the attribute.",), figures=(fig,),
                       tables=(Table(df, "Leakage.", visible=3),))

    def absent(data):
        return None

    sections = build_sections(ReportData(res), [S.findings, absent, S.setup, leakage])
    assert [s.id for s in sections] == ["setup", "leakage"]  # no comparisons without bootstrap: no findings
    html = render_html(sections, draw_figures(sections), "T", "L")
    assert "<section id='leakage'><h2>Attribute leakage</h2>" in html and re.search(r"<figure id='fig-leakage'[^>]*><img alt='AUC of a sex probe.'", html)
    assert "6 more columns: c3, c4, c5, c6, c7, c8" in html
    with pytest.raises(ValueError, match="duplicate section id"):
        build_sections(ReportData(res), [leakage, leakage])


def test_report_without_the_runs_folder_omits_curves(report, tmp_path):
    from cxrfair.analysis.render import build_sections
    from cxrfair.analysis.report import ReportData

    out, _ = report
    res = compute(read_runs(out.parent / "RUNS")[:3], AnalyzeConfig(tmp_path / "gone", out, n_boot=0, figures=False))
    data = ReportData(res)
    assert data.primary_runs == [] and data.roc.empty
    ids = [s.id for s in build_sections(data)]
    assert "utility" in ids and not any(i.startswith(("roc-", "calibration-")) for i in ids)


def test_summary_takes_the_seed_means_interval_from_seeds_csv(runs_dir):
    from cxrfair.analysis.report import summary

    runs = [r for r in read_runs(runs_dir) if r.method == "linear"]  # two seeds
    res = compute(runs, AnalyzeConfig(runs_dir, runs_dir, n_boot=100))
    s = summary(res)
    seeds = res.seeds[(res.seeds["metric"] == "accuracy") & (res.seeds["attribute"] == "")].iloc[0]
    row = s[(s["metric"] == "accuracy") & (s["attribute"] == "")].iloc[0]
    assert (row["value"], row["ci_low"], row["ci_high"], row["n_seeds"]) == (
        seeds["mean"], seeds["ci_low"], seeds["ci_high"], 2)
    acc = res.metrics[(res.metrics["metric"] == "accuracy") & (res.metrics["attribute"] == "")]
    assert row["value"] == pytest.approx(acc["value"].mean())  # the seed mean, not one run


def test_readme_shows_a_small_screenshot_of_the_report():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    shot = root / "docs" / "report.png"
    assert "](docs/report.png)" in (root / "README.md").read_text()
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size < 300_000
