"""The report's sections, in page order: ``SECTIONS``.

Each entry is a small function ``(data: ReportData) -> Section | list[Section] | None`` that
returns its sections only when its data is present. To add a section (multi-label metrics,
mitigations, leakage, shortcuts, ...), write one such function (here or in its own module) and
add it to ``SECTIONS``; the renderers in ``render`` need no change. Figures are given as
``Figure(name, caption, draw)`` and drawn only when the report has figures on.
"""

from __future__ import annotations

from cxrfair.analysis import findings as F
from cxrfair.analysis.config import describe_intervals
from cxrfair.analysis.embedding_report import geometry, leakage
from cxrfair.analysis.fewshot import UTILITY
from cxrfair.analysis.headline import headline, mitigation_sentences
from cxrfair.analysis.report import (
    Figure,
    ReportData,
    Section,
    Table,
    slug,
    table_class_f1,
    table_class_metric,
    table_comparisons,
    table_condition_groups,
    table_fairness,
    table_fewshot,
    table_group_f1,
    table_group_metric,
    table_shortcut,
    table_thresholds,
    table_utility,
)
from cxrfair.core.multilabel import THRESHOLD_RULE

ECE_NOTE = ("`ece_gap` uses the usual binned top-label ECE (15 equal-width confidence bins); "
            "`ece_gap_paper` is eq. 4 of Sun et al. (ISBI 2025) as written, unbinned: p_i is the top-label confidence and "
            "o_i is 1 if the top label is correct, else 0. Figures show the binned `ece_gap`.")
NAN_NOTE = ("A ratio with a zero denominator (e.g. TPR of a class with no positives in a group) is NaN, "
            "shown as –. Means over classes skip NaN terms; gaps and minima over groups are NaN if any group is.")
CELLS = ("Cells: value [interval] in %; ±: sd over the seeds counted in `seeds` (for zero-shot: over the "
         "prompt draws of the chosen set).")
ZERO_SHOT_TERMS = {
    "global": "global image–text cosine similarity only",
    "both": "GLoRIA's own scoring: the mean of the global and the local (word–region attention) similarity, "
            "the max over a class's prompts, standardised per class",
    "local": "the local (word–region attention) similarity only",
}


def _draw(name: str, *args, **kwargs):
    """A zero-argument drawer for ``figures.<name>(*args, **kwargs)`` returning its Figure.

    matplotlib is imported only when a figure is drawn, not when sections are built: building and
    rendering sections (``figures=False``, tests, ``ReportData`` users) never loads it.
    """
    def make():
        from cxrfair.analysis import figures  # matplotlib: only when drawn (see above)

        return figures.__dict__[name](*args, **kwargs)

    return make


def _single(name: str, *args, width=5.6, height=3.8, **kwargs):
    """A zero-argument drawer for a one-panel figure function ``figures.<name>(*args, ax=...)``."""
    def make():
        import matplotlib.pyplot as plt  # matplotlib: only when drawn (``_draw``)

        from cxrfair.analysis import figures

        fig, ax = plt.subplots(figsize=(width, height), constrained_layout=True)
        figures.__dict__[name](*args, ax=ax, **kwargs)
        return fig

    return make


def _n_rows(data: ReportData) -> int:
    return max(1, data.summary.groupby(["model", "method"]).ngroups)


# ----------------------------------------------------------------------------- findings and setup


def findings(data: ReportData) -> Section | None:
    """Findings: the paired comparisons against the baseline, one sentence per model × method."""
    t = data.findings
    if t.empty:
        return None
    lines = F.summary_lines(t, data.config.level)
    fig = Figure("findings.png", "The findings at a glance: each comparison's difference (points, method − "
                 "baseline) with its interval; filled where the interval excludes zero.",
                 _draw("findings_forest", t))
    notes = ("\n".join("- " + s for s in F.sentences(t)), lines[-1],
             "Every number here is a row of `comparisons.csv` (and `findings.csv`); the section "
             "[Paired comparisons](#comparisons) tabulates them with more metrics.")
    return Section("findings", "Findings", prose=tuple(lines[:-1]), figures=(fig,), notes=notes)


def zero_shot_scoring(data: ReportData) -> list[str]:
    """One line per model with zero-shot runs: the prompt set shown and the similarity its scores use."""
    runs = data.results.runs
    zs = runs[runs["primary"] & (runs["method"] == "zeroshot")]
    meta = {r.run_id: r.meta for r in data.primary_runs}
    out = []
    for model, rows in zs.groupby("model", sort=True):
        terms = sorted({str(meta.get(i, {}).get("zero_shot_term", "")) for i in rows["run_id"]})
        said = "; ".join(ZERO_SHOT_TERMS.get(t, f"`{t}`") if t else "not recorded (run.json has no `zero_shot_term`; "
                         "runs before it scored with the global similarity)" for t in terms)
        if not meta:
            said = "unknown (the runs could not be read again)"
        draws = f"{len(rows)} draw" + ("s" if len(rows) > 1 else "")
        out.append(f"- `{model}`: prompt set `{rows['tag'].iloc[0]}` ({draws}); scoring: {said}.")
    return out


def attribute_lines(data: ReportData) -> list[str]:
    """One line per analysed attribute: its groups, the reference first (``Results.attributes``)."""
    out = []
    for a, spec in (getattr(data.results, "attributes", None) or {}).items():
        of = f" (the cross of {' × '.join(spec['of'])})" if spec.get("of") else ""
        out.append(f"- `{a}`{of}: " + ", ".join(f"**{g}** (reference)" if g == spec.get("reference") else str(g)
                                                for g in spec.get("groups", [])))
    return out


def setup(data: ReportData) -> Section:
    """How the numbers were made: split, intervals, zero-shot scoring per model, notes, metric definitions."""
    prose = [f"**Uncertainty.** {describe_intervals(data.config)} Absolute gaps are biased upward under resampling, so "
             "their interval may not contain the point estimate."]
    groups = attribute_lines(data)
    if groups:
        prose += ["**Attributes** (groups in report order, the reference group first; gaps are the reference "
                  "minus the other group for two groups, max − min for more):", "\n".join(groups)]
    zs = zero_shot_scoring(data)
    if zs:
        prose += ["**Zero-shot** (prompt set chosen on validation; the draws of a sampled set are averaged like seeds):",
                  "\n".join(zs)]
    prose += ([] if data.task == "multilabel" else [ECE_NOTE]) + [NAN_NOTE] + [f"Note: {n}" for n in data.results.notes]
    defs = "\n".join(f"- `{k}`: {v}" for k, v in sorted(data.definitions.items()))
    return Section("setup", "Setup and definitions", prose=tuple(prose), folded=True,
                   details=(("Metric definitions", (defs,)),) if defs else ())


# ----------------------------------------------------------------------------- utility and diseases


def utility(data: ReportData) -> Section | None:
    """Overall utility per model × method (paper Fig. 2a; multi-label: macro AUC, AP, adjusted AUPRC)."""
    t = table_utility(data.summary)
    if t.empty:
        return None
    if data.task == "multilabel":
        fig = Figure("auc_macro.png", "Macro AUC (mean over conditions) by model and method with 95% intervals.",
                     _single("accuracy_by_model", data.summary, metric="auc_macro", label="Macro AUC"))
    else:
        fig = Figure("accuracy.png", "Accuracy by model and method with 95% intervals (paper Fig. 2a).",
                     _single("accuracy_by_model", data.summary))
    return Section("utility", "Utility", figures=(fig,), tables=(Table(t, CELLS, titles=data.definitions),))


def diseases(data: ReportData) -> Section | None:
    """Class-wise F1 and Var_F1 (paper Figs. 2b and 3a); multi-label: AUC per condition."""
    if data.task == "multilabel":
        return _conditions_overall(data)
    t = table_class_f1(data.summary)
    if t.empty:
        return None
    n_classes = max(1, data.summary.loc[data.summary["metric"] == "f1", "class"].nunique())
    figs = (
        Figure("f1_heatmap.png", "Class-wise F1 with intervals (paper Fig. 2b).",
               _single("f1_heatmap", data.summary, width=1.4 * n_classes + 3, height=0.5 * _n_rows(data) + 1.8)),
        Figure("var_f1.png", "Var_F1 per model and method (paper Fig. 3a): lower is fairer across diseases.",
               _single("var_f1_by_model", data.summary)),
    )
    caption = "Var_F1 = population variance of class F1 (× 100, as the paper's %). " + CELLS
    return Section("diseases", "Fairness across diseases", figures=figs,
                   tables=(Table(t, caption, visible=8, stacked=True),))


def _conditions_overall(data: ReportData) -> Section | None:
    t = table_class_metric(data.summary, "auc")
    if t.empty:
        return None
    n = max(1, data.summary.loc[data.summary["metric"] == "auc", "class"].nunique())
    fig = Figure("auc_heatmap.png", "AUC of each condition with intervals, by model and method.",
                 _single("f1_heatmap", data.summary, metric="auc", label="AUC", width=1.4 * n + 3,
                         height=0.5 * _n_rows(data) + 1.8))
    tables = [Table(t, "ROC-AUC per condition (masked labels left out). " + CELLS, visible=8, stacked=True)]
    ap = table_class_metric(data.summary, "adjusted_auprc")
    if not ap.empty:
        tables.append(Table(ap, "Adjusted AUPRC per condition (0: a random ranking, 1: perfect; Sourget et al.). "
                            + CELLS, visible=8, stacked=True))
    return Section("diseases", "Conditions", figures=(fig,), tables=tuple(tables))


def conditions_by_group(data: ReportData) -> list[Section]:
    """Multi-label: per attribute, each condition's AUC within each group with intervals (figure
    and table), with the per-condition AUC gap, worst-group AUC and ES-AUC."""
    if data.task != "multilabel":
        return []
    out = []
    for a in data.attributes:
        t = table_condition_groups(data.summary, a)
        if t.empty:
            continue
        fig = Figure(f"auc_by_condition_{slug(a)}.png",
                     f"AUC of each condition (panels) within each {a} group (bars, told apart by hatch as well as "
                     "colour) for each model and method, with 95% intervals; the dotted line is a random ranking.",
                     _draw("auc_by_condition_group", data.summary, a))
        caption = (f"AUC within each {a} group, per condition, then the condition's AUC gap (reference group − "
                   "other; max − min with more than two groups), worst-group AUC and ES-AUC. " + CELLS)
        out.append(Section(f"conditions-{slug(a)}", f"AUC per condition by {a}", figures=(fig,),
                           tables=(Table(t, caption, index=("model", "method", "condition"), visible=6,
                                         titles=data.definitions),)))
    return out


def thresholds(data: ReportData) -> Section | None:
    """Multi-label: the decision threshold of each condition, chosen per run on validation."""
    th = getattr(data.results, "thresholds", None)
    if th is None or th.empty:
        return None
    primary = set(data.results.runs.loc[data.results.runs["primary"], "run_id"])
    t = table_thresholds(th, primary)
    if t.empty:
        return None
    prose = (f"The threshold metrics (F1, TPR, FPR, FNR, equalized odds, FNR gap) use, {THRESHOLD_RULE}. "
             "A post-processed run uses its own recorded thresholds. All thresholds are in `thresholds.csv`.",)
    return Section("thresholds", "Decision thresholds", prose=prose, folded=True, tables=(Table(
        t, "Threshold per condition (validation positives+ / negatives− it was chosen on), primary runs.",
        index=("model", "method", "seed"), collapsed=True),))


# ----------------------------------------------------------------------------- shortcut and mitigation


def shortcut(data: ReportData) -> Section | None:
    """The shortcut test (``shortcut.csv``): the class's AUC with vs without the shortcut, paired difference."""
    sc = getattr(data.results, "shortcut", None)
    if sc is None or sc.empty:
        return None
    primary = set(data.results.runs.loc[data.results.runs["primary"], "run_id"])
    sc = sc[sc["run_id"].isin(primary)]
    if sc.empty:
        return None
    column, cls = str(sc["column"].iloc[0]), str(sc["class"].iloc[0])
    n_clear = int(((sc["ci_low"] > 0) | (sc["ci_high"] < 0)).sum())
    prose = (f"Does a model read `{column}` instead of {cls}? Each run's {cls} AUC on its positives **with** "
             f"`{column}` = 1 (plus every negative) against its positives **without** (`{column}` = 0, plus the "
             f"same negatives). A positive difference means {cls} is found more easily when `{column}` is present. "
             f"The difference's interval excludes zero in {n_clear} of {len(sc)} runs (paired: both AUCs on the same "
             "resamples; not corrected for multiplicity).",)
    fig = Figure("shortcut.png", f"{cls} AUC with vs without `{column}` per model and method (left, with 95% "
                 "intervals) and the paired difference (right; filled where its interval excludes zero).",
                 _draw("shortcut_panels", sc))
    return Section("shortcut", f"Shortcut test: {cls} with vs without {column}", prose=prose, figures=(fig,),
                   tables=(Table(table_shortcut(sc), "Per run; every row is in `shortcut.csv`. " + CELLS.split(";")[0] + ".",
                                 index=("model", "method", "seed")),))


def mitigation(data: ReportData) -> Section | None:
    """Mitigations against ERM (``Results.mitigation`` / ``tradeoff``, from ``analysis.mitigation``):
    the trade-off figure, then the paired deltas and the trade-off points. None without mitigated runs."""
    m, tradeoff = getattr(data.results, "mitigation", None), getattr(data.results, "tradeoff", None)
    if m is None or len(m) == 0:
        return None
    # mitigation_figures imports matplotlib: loaded only when a report has mitigated runs.
    from cxrfair.analysis import mitigation_figures as MF

    figs = ()
    if tradeoff is not None and len(tradeoff):
        figs = (Figure("mitigation_tradeoff.png", "Utility–fairness trade-off per model, method and sensitive "
                       "attribute: one point per strength (labelled; * selected on validation), bars the 95% "
                       "intervals, ERM the star, the Pareto front the grey step line.",
                       lambda: MF.tradeoff_figure(tradeoff)),)
    deltas = MF.delta_table(m)
    tables = [Table(deltas, MF.DELTA_CAPTION, index=tuple(
        c for c in ("model", "method", "mitigation", "sensitive", "tag", "strength", "erm") if c in deltas.columns),
        visible=7, beside=False)]
    if tradeoff is not None and len(tradeoff):
        rows = MF.tradeoff_rows(tradeoff)
        tables.append(Table(rows, MF.TRADEOFF_CAPTION, index=tuple(
            c for c in ("model", "method", "sensitive") if c in rows.columns), visible=6, collapsed=True))
    return Section("mitigation", "Mitigation", prose=(
        "Each mitigation against plain training (ERM) of the same model, method and seed, trained by the same "
        "solver and grid: paired bootstrap differences on the same test resamples, averaged over seeds; not "
        "corrected for multiplicity. The strength and hyperparameters of a `best` run were chosen on validation "
        "(run.json `selection`); a fine-tuning mitigation's strength is chosen here on its runs' validation "
        "predictions by the same rule; `st<s>` runs show every strength for the trade-off.",
        "\n".join("- " + x for x in mitigation_sentences(data))), figures=figs, tables=tuple(tables))


def fewshot(data: ReportData) -> list[Section]:
    """Per attribute: utility against K per group (few-shot probes) with zero-shot and the whole-split
    probe as references, and the table of ``fewshot.csv``; nothing without few-shot runs."""
    t = getattr(data.results, "fewshot", None)
    if t is None or t.empty:
        return []

    def draw(a):
        def make():
            from cxrfair.analysis import fewshot_figures  # matplotlib: only when drawn (``_draw``)

            return fewshot_figures.fewshot_figure(t, a, UTILITY[data.task][:2])
        return make

    attributes = [a for a in data.attributes if (t["attribute"] == a).any()]
    seeds = int(t.loc[t["setting"].str.endswith("-shot"), "n_seeds"].max())
    out = []
    for a in attributes:
        fig = Figure(f"fewshot_{slug(a)}.png", f"Utility against the training images per class (K) by {a}: one line "
                     "per group (black: all images), bars the interval of the mean over seeds; `all` (open marker) is "
                     "the probe on the whole training split; the dotted horizontal lines are zero-shot (a reference "
                     "line, not K = 0).", draw(a))
        rows = table_fewshot(t, a)
        out.append(Section(f"fewshot-{slug(a)}", f"Few-shot by {a}", prose=(
            f"Probes trained on K images per class of the training split (`probe --shots`; up to {seeds} seeds, each its "
            "own draw of the K images, so the interval of the mean carries the draw-to-draw variance), chosen on the "
            "whole validation split and tested on the whole test split, against zero-shot and the same probe on every "
            "training image. Every cell is a row of `fewshot.csv` (the seed summary of `seeds.csv`).",),
            figures=(fig,), tables=(Table(rows, CELLS, index=("model", "method", "setting"), visible=7,
                                          titles=data.definitions, beside=False),)))
    return out


# ----------------------------------------------------------------------------- groups


def group_fairness(data: ReportData) -> list[Section]:
    """Per attribute: F1 by group (paper Fig. 3b), the gap metrics (Fig. 3c–d), their tables."""
    out = []
    s = data.summary
    for a in data.attributes:
        fair = table_fairness(s, a)
        if fair.empty:
            continue
        panels = [("f1_gap", "F1 gap (A − A')"), ("auc_gap", "AUC gap (A − A')"), ("eqodds", "EqOdds"),
                  ("fnr_gap", "FNR gap (A − A')")]
        panels = [p for p in panels if (s["metric"] == p[0]).any()]
        figs = (  # in table order: the gap panels beside the gap table, per-group F1 beside its table
            Figure(f"fairness_{slug(a)}.png", f"Group-fairness metrics by {a} for each model and method "
                   "(paper Fig. 3c–d); signed gaps are A − A' with A the reference group.",
                   _draw("fairness_panels", s, a, panels)),
            Figure(f"f1_by_group_{slug(a)}.png", f"Macro F1 within each {a} group with 95% intervals (paper Fig. 3b).",
                   _single("f1_by_group", s, a, width=max(5.6, 0.9 * _n_rows(data) + 2))),
        )
        tables = (
            Table(fair, f"Group fairness by {a}: signed gaps are A − A' with A the reference group{_reference(data, a)}; with more than two "
                  "groups a gap is the largest over pairs of groups (max − min). Headline metrics first; "
                  "the rest fold away. Hover a column name for its definition (all in [Setup](#setup)).",
                  visible=4, titles=data.definitions),
            Table(table_group_f1(s, a), f"Macro F1 within each {a} group. " + CELLS),
        )
        out.append(Section(f"fairness-{slug(a)}", f"Fairness by {a}", figures=figs, tables=tables))
    return out


def _reference(data: ReportData, attribute: str) -> str:
    """`` (M)``: the attribute's reference group as the analysis resolved it, or ""."""
    ref = (getattr(data.results, "attributes", None) or {}).get(attribute, {}).get("reference")
    return f" ({ref})" if ref else ""


def _models(df) -> list[str]:
    return sorted(set(df["model"]))


def roc_curves(data: ReportData) -> list[Section]:
    """Per attribute: per-group ROC curves, one figure per model; per-group macro AUC and ES-AUC."""
    roc = data.roc
    if roc.empty:
        return []
    out = []
    for a in data.attributes:
        r = roc[roc["attribute"] == a]
        if r.empty:
            continue
        n_seeds = int(r["n_runs"].max())
        figs = tuple(Figure(f"roc_{slug(model)}_{slug(a)}.png",
                            f"{model}: one-vs-rest ROC curve of each class (columns) for each method (rows), a line "
                            f"per {a} group; the box gives each group's AUC (%) from the tables. Curves of several "
                            f"seeds or prompt draws (up to {n_seeds}) are averaged vertically (TPR at each FPR).",
                            _draw("roc_by_group", r, data.summary, model, a))
                     for model in _models(r))
        t = table_group_metric(data.summary, a, "auc_macro", extra=("es_auc",))
        out.append(Section(f"roc-{slug(a)}", f"ROC curves by {a}", figures=figs, folded=True,
                           tables=(Table(t, f"Macro AUC within each {a} group, and ES-AUC (FairCLIP's equity-scaled "
                                         "AUC; higher is fairer). " + CELLS, titles=data.definitions),)))
    return out


def calibration(data: ReportData) -> list[Section]:
    """Per attribute: reliability diagrams by group with the ECE gap drawn, one figure per model; ECE table."""
    rel = data.reliability
    if rel.empty:
        return []
    multilabel = data.task == "multilabel"
    ece = "ece_macro" if multilabel else "ece"
    what = ("binary calibration of every condition's probability, conditions pooled; ECE: mean over conditions"
            if multilabel else "binned top-label ECE, 15 bins")
    diagram = ("predicted probability against the positive rate of every labelled (image, condition) cell in 15 "
               "equal-width bins, conditions pooled" if multilabel else
               "accuracy against mean confidence in 15 equal-width bins")
    out = []
    for a in data.attributes:
        r = rel[rel["attribute"] == a]
        if r.empty:
            continue
        figs = tuple(Figure(f"reliability_{slug(model)}_{slug(a)}.png",
                            f"{model}: reliability diagram per method (top; {diagram}, a line per {a} group, the "
                            "diagonal is perfect calibration; seeds pooled) and each group's ECE with its interval "
                            "(bottom); the arrow spans the ECE gap, whose value and interval head the panel.",
                            _draw("reliability_by_group", r, data.summary, model, a, ece_metric=ece, what=what))
                     for model in _models(r))
        extra = ("ece_gap",) if multilabel else ("ece_gap", "ece_gap_paper")
        t = table_group_metric(data.summary, a, ece, extra=extra)
        caption = (f"ECE (mean over conditions) within each {a} group and the ECE gap. " if multilabel else
                   f"Binned ECE within each {a} group, its gap, and the paper's unbinned eq. 4 gap. ")
        out.append(Section(f"calibration-{slug(a)}", f"Calibration by {a}", figures=figs, folded=True,
                           tables=(Table(t, caption + CELLS, titles=data.definitions),)))
    return out


# ----------------------------------------------------------------------------- reference tables


def comparisons(data: ReportData) -> Section | None:
    """The paired comparisons of headline metrics as a table, one row per compared run."""
    t = table_comparisons(data.results.comparisons)
    if t.empty:
        return None
    return Section("comparisons", "Paired comparisons against the baseline method", folded=True, tables=(Table(
        t, "Difference in points (method − baseline) on the same bootstrap resamples of the same test images, "
        "one row per method run; every metric is in `comparisons.csv`.", index=("model", "baseline", "method", "seed"),
        visible=4),))


def runs(data: ReportData) -> Section:
    """Every run read, folded: which are primary, their tags and validation accuracy."""
    r = data.results.runs
    t = r.assign(val_accuracy=r["val_accuracy"].round(4)) if "val_accuracy" in r else r
    return Section("runs", "Runs", folded=True, prose=(f"{len(r)} runs read; {int(r['primary'].sum())} primary (shown in the "
                                           "tables): the tag chosen for its model and method on validation.",),
                   tables=(Table(t, "All runs", collapsed=True),))


# The page, in order. Add a section: one function above (or in its own module) and one entry here.
SECTIONS = [
    headline,
    findings,
    setup,
    utility,
    diseases,
    conditions_by_group,
    group_fairness,
    roc_curves,
    calibration,
    thresholds,
    shortcut,
    mitigation,
    fewshot,
    leakage,
    geometry,
    comparisons,
    runs,
]
