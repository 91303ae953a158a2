"""The report folder: CSV tables, PNG figures, report.md and a self-contained report.html.

Layout of REPORT/:
    metrics.csv      long format, one row per run × metric × attribute × group × class
    comparisons.csv  paired bootstrap differences, each method minus its model's baseline
    seeds.csv        mean, sd and the mean's interval over runs that differ only by seed
    runs.csv         the runs read, their tag and whether the tables show them (primary)
    mitigation.csv, tradeoff.csv  mitigated runs vs ERM (written by analyze.write_tables; section via
                     mitigation_figures.mitigation_section)
    analysis.json    the options used
    figures/*.png    the figures
    report.md        tables + figure links;  report.html: the same with figures embedded (base64)
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd

from cxrfair.analysis.metrics import GROUP_METRICS
from cxrfair.analysis.runs import METHODS
from cxrfair.io import write_json_atomic

GAP_COLUMNS = [s.name for s in GROUP_METRICS]
ECE_NOTE = ("`ece_gap` uses the usual binned top-label ECE (15 equal-width confidence bins); "
            "`ece_gap_paper` is PAPER.md eq. 4 as written, unbinned: p_i is the top-label confidence and "
            "o_i is 1 if the top label is correct, else 0. Figures show the binned `ece_gap`.")
NAN_NOTE = ("A ratio with a zero denominator (e.g. TPR of a class with no positives in a group) is NaN, "
            "shown as –. Means over classes skip NaN terms; gaps and minima over groups are NaN if any group is.")


def summary(results) -> pd.DataFrame:
    """Primary runs' metrics averaged over seeds: one row per (model, method, metric, attribute, group, class).

    Returns:
        DataFrame with value (mean over seeds), ci_low, ci_high (the interval of that mean, from
        the seed-averaged bootstrap replicates; ``results.seeds``), sd (over seeds; NaN with one
        seed) and n_seeds.
    """
    prim = results.runs.loc[results.runs["primary"], ["model", "method", "tag"]].drop_duplicates()
    return results.seeds.merge(prim, on=["model", "method", "tag"]).rename(columns={"mean": "value"}).drop(columns="tag")


def fmt(value, lo=np.nan, hi=np.nan, sd=np.nan, n: int = 1, scale: float = 100.0, digits: int = 1) -> str:
    """``49.4 [43.1, 55.6]`` (in % by default), `` ±1.2`` (sd over seeds) appended for n > 1; – for NaN."""
    if value is None or not np.isfinite(value):
        return "–"
    s = f"{scale * value:.{digits}f}"
    if np.isfinite(lo) and np.isfinite(hi):
        s += f" [{scale * lo:.{digits}f}, {scale * hi:.{digits}f}]"
    if n > 1 and np.isfinite(sd):
        s += f" ±{scale * sd:.{digits}f}"
    return s


def _cells(t: pd.DataFrame) -> pd.Series:
    return pd.Series([fmt(r.value, r.ci_low, r.ci_high, r.sd, int(r.n_seeds)) for r in t.itertuples()], index=t.index)


def _order(df: pd.DataFrame) -> pd.DataFrame:
    key = df["method"].map(lambda m: METHODS.index(m) if m in METHODS else len(METHODS))
    return df.assign(_k=key).sort_values(["model", "_k"]).drop(columns="_k")


def table_utility(s: pd.DataFrame) -> pd.DataFrame:
    """Accuracy, macro F1, macro AUC and ECE per model × method."""
    names = {"accuracy": "Accuracy", "f1_macro": "Macro F1", "auc_macro": "Macro AUC", "ece": "ECE (binned)"}
    t = s[s["metric"].isin(names) & (s["attribute"] == "") & (s["class"] == "")]
    return _wide(t, "metric", names)


def _wide(t: pd.DataFrame, col: str, names: dict | None = None) -> pd.DataFrame:
    if t.empty:
        return pd.DataFrame()
    t = _order(t.assign(cell=_cells(t)))
    w = t.pivot_table(index=["model", "method"], columns=col, values="cell", aggfunc="first", sort=False)
    cols = [c for c in (names or dict.fromkeys(t[col])) if c in w.columns]
    w = w[cols].rename(columns=names or {})
    seeds = t.groupby(["model", "method"], sort=False)["n_seeds"].max()
    return w.assign(seeds=seeds.reindex(w.index).to_numpy()).reset_index()


def table_class_f1(s: pd.DataFrame) -> pd.DataFrame:
    """Class-wise F1 and Var_F1 per model × method."""
    t = s[(s["metric"] == "f1") & (s["attribute"] == "")]
    w = _wide(t, "class")
    v = s[(s["metric"] == "var_f1") & (s["attribute"] == "")]
    if not w.empty and not v.empty:
        v = _wide(v, "metric", {"var_f1": "Var_F1"}).drop(columns="seeds")
        w = w.merge(v, on=["model", "method"], how="left")
    return w


def table_fairness(s: pd.DataFrame, attribute: str) -> pd.DataFrame:
    """Every group-fairness metric of one attribute per model × method."""
    t = s[(s["attribute"] == attribute) & (s["group"] == "") & s["metric"].isin(GAP_COLUMNS)]
    return _wide(t, "metric", {m: m for m in GAP_COLUMNS})


def table_group_f1(s: pd.DataFrame, attribute: str) -> pd.DataFrame:
    """Macro F1 within each group of one attribute per model × method."""
    t = s[(s["attribute"] == attribute) & (s["group"] != "") & (s["metric"] == "f1_macro")]
    return _wide(t, "group")


def table_comparisons(c: pd.DataFrame, metrics=("accuracy", "f1_macro", "f1_gap", "eqodds", "ece_gap")) -> pd.DataFrame:
    """Paired differences (method − baseline, in points) for headline metrics, one row per run pair."""
    t = c[c["metric"].isin(metrics) & (c["group"] == "") & (c["class"] == "")]
    if t.empty:
        return pd.DataFrame()
    t = t.assign(col=np.where(t["attribute"] == "", t["metric"], t["metric"] + " " + t["attribute"]),
                 cell=[fmt(r.delta, r.ci_low, r.ci_high) for r in t.itertuples()])
    w = t.pivot_table(index=["model", "baseline", "method", "seed"], columns="col", values="cell",
                      aggfunc="first", sort=False)
    return w.reset_index()


def tables(results) -> list[tuple[str, str, pd.DataFrame]]:
    """(title, caption, table of strings) for the report, in order."""
    s = summary(results)
    attrs = list(dict.fromkeys(a for a in results.metrics["attribute"] if a))
    out = [
        ("Utility", "Values in % with bootstrap 95% intervals; ±: sd over the seeds counted in `seeds` (for zero-shot: over the prompt draws of the chosen set).",
         table_utility(s)),
        ("Class-wise F1 and Var_F1", "Var_F1 = population variance of class F1 (× 100, as the paper's %).",
         table_class_f1(s)),
    ]
    for a in attrs:
        out.append((f"Group fairness: {a}", "Signed gaps are A − A' with A = M / young; with more than two groups "
                    "a gap is the largest over pairs of groups (max − min). " + ECE_NOTE, table_fairness(s, a)))
        out.append((f"Macro F1 per group: {a}", "", table_group_f1(s, a)))
    out.append(("Paired comparisons against the baseline method",
                "Difference in points (method − baseline) on the same bootstrap resamples of the same test images.",
                table_comparisons(results.comparisons)))
    out += _mitigation(results, figures=False)[0]  # Mitigation section (issue 13); nothing without mitigated runs
    out.append(("Runs", "Primary: the tag shown for its model and method (best validation accuracy).",
                results.runs.assign(val_accuracy=results.runs["val_accuracy"].round(4))))
    return out


def figures(results) -> list[tuple[str, str, bytes]]:
    """(file name, caption, PNG bytes) of every figure."""
    from cxrfair.analysis import figures as F

    s = summary(results)
    attrs = list(dict.fromkeys(a for a in results.metrics["attribute"] if a))
    n_rows = max(1, s.groupby(["model", "method"]).ngroups)
    n_classes = max(1, s.loc[s["metric"] == "f1", "class"].nunique())
    out = [
        ("accuracy.png", "Accuracy by model and method (paper Fig. 2a).", F.to_png(F.accuracy_by_model, s)),
        ("f1_heatmap.png", "Class-wise F1 (paper Fig. 2b).",
         F.to_png(F.f1_heatmap, s, width=1.4 * n_classes + 3, height=0.5 * n_rows + 1.8)),
        ("var_f1.png", "Var_F1 per model (paper Fig. 3a).", F.to_png(F.var_f1_by_model, s)),
    ]
    for a in attrs:
        out.append((f"f1_by_group_{_slug(a)}.png", f"Macro F1 per {a} group (paper Fig. 3b).",
                    F.to_png(F.f1_by_group, s, a, width=max(7.0, 0.9 * n_rows + 2))))
    for metric, label in (("eqodds", "EqOdds"), ("f1_gap", "F1 gap (A − A')"), ("ece_gap", "ECE gap (binned, 15 bins)")):
        for a in attrs:
            out.append((f"{metric}_{_slug(a)}.png", f"{label} by {a} for each method (paper Fig. 3c–d).",
                        F.to_png(F.fairness_by_method, s, metric, a, label=label)))
    return out + _mitigation(results)[1]


def _mitigation(results, figures: bool = True) -> tuple[list, list]:
    """The Mitigation section's (tables, figures) from ``mitigation_figures.mitigation_section``."""
    from cxrfair.analysis.mitigation_figures import mitigation_section

    return mitigation_section(results, figures=figures)


def _slug(s: str) -> str:
    return s.replace("×", "_x_")


def _md_table(df: pd.DataFrame) -> str:
    if df.empty:
        return "_no rows_\n"
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |")
    return "\n".join(lines) + "\n"


def _html_table(df: pd.DataFrame) -> str:
    if df.empty:
        return "<p><em>no rows</em></p>"
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>"
                   for row in df.itertuples(index=False))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _intro(results) -> list[str]:
    from cxrfair.analysis.analyze import describe_intervals

    c = results.config
    return [
        f"Runs: {len(results.runs)} from `{c.runs_dir}`; metrics on the **{c.split}** split.",
        f"Uncertainty: {describe_intervals(c)} Runs that differ only by seed are averaged and their sd "
        "is shown. Absolute gaps are biased upward under resampling, so their interval "
        "may not contain the point estimate.",
        ECE_NOTE,
        NAN_NOTE,
    ] + [f"Note: {n}" for n in results.notes]


def render_markdown(results, tabs, figs) -> str:
    parts = ["# cxrfair fairness report\n", *(p + "\n" for p in _intro(results))]
    for title, caption, df in tabs:
        parts += [f"\n## {title}\n", (caption + "\n\n") if caption else "", _md_table(df)]
    parts.append("\n## Figures\n")
    for name, caption, _ in figs:
        parts.append(f"\n![{caption}](figures/{name})\n\n{caption}\n")
    return "".join(parts)


def render_html(results, tabs, figs) -> str:
    css = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
           "table{border-collapse:collapse;font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 6px}"
           "th{background:#f3f3f3}img{max-width:100%}figure{margin:1.5em 0}code{background:#f3f3f3}")
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>cxrfair report</title><style>{css}</style></head><body>",
             "<h1>cxrfair fairness report</h1>"]
    parts += [f"<p>{_md_inline(p)}</p>" for p in _intro(results)]
    for title, caption, df in tabs:
        parts += [f"<h2>{html.escape(title)}</h2>", f"<p>{_md_inline(caption)}</p>" if caption else "", _html_table(df)]
    parts.append("<h2>Figures</h2>")
    for name, caption, png in figs:
        data = base64.b64encode(png).decode("ascii")
        parts.append(f"<figure><img alt='{html.escape(name)}' src='data:image/png;base64,{data}'>"
                     f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _md_inline(text: str) -> str:
    """Escape, then turn `code` and **bold** into tags (the only markdown the intro uses)."""
    t = html.escape(text)
    t = re.sub(r"`([^`]+)`", r"<code>\1</code>", t)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", t)


def write_report(results, folder: Path) -> Path:
    """Write every output into ``folder`` (the caller makes the folder appear atomically).

    Returns:
        The path of report.html.
    """
    folder = Path(folder)
    results.metrics.to_csv(folder / "metrics.csv", index=False)
    results.comparisons.to_csv(folder / "comparisons.csv", index=False)
    results.seeds.to_csv(folder / "seeds.csv", index=False)
    results.runs.to_csv(folder / "runs.csv", index=False)
    write_json_atomic(folder / "analysis.json", asdict(results.config))
    tabs = tables(results)
    figs = figures(results) if results.config.figures else []
    (folder / "figures").mkdir(exist_ok=True)
    for name, _, png in figs:
        (folder / "figures" / name).write_bytes(png)
    (folder / "report.md").write_text(render_markdown(results, tabs, figs), encoding="utf-8")
    (folder / "report.html").write_text(render_html(results, tabs, figs), encoding="utf-8")
    return folder / "report.html"
