"""The report folder: CSV tables, PNG figures, report.md and a self-contained report.html.

Layout of REPORT/:
    metrics.csv      long format, one row per run × metric × attribute × group × class
    comparisons.csv  paired bootstrap differences, each method minus its model's baseline
    findings.csv     the comparisons the report's findings state, with their verdicts
    seeds.csv        mean, sd and the mean's interval over runs that differ only by seed
    runs.csv         the runs read, their tag and whether the tables show them (primary)
    mitigation.csv, tradeoff.csv  mitigated runs vs ERM (written by analyze.write_tables; section
                     sections.mitigation, tables and figure from mitigation_figures)
    roc.csv          per-group ROC curves of the primary runs (seeds averaged vertically)
    reliability.csv  per-group reliability-diagram bins of the primary runs (seeds pooled)
    analysis.json    the options used
    figures/*.png    the figures
    report.md        the sections in order, figures linked;  report.html: the same, figures embedded

The page is a list of sections (``sections.SECTIONS``): each is a small function of the
report's data (``ReportData``) returning ``Section``s, or nothing when its data is absent. The
renderers below lay out any section the same way: title, prose, figures, then tables; adding a
section never touches them.
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from cxrfair.core.metrics import GROUP_METRICS
from cxrfair.core.runs import METHODS
from cxrfair.io import write_json_atomic

GAP_COLUMNS = [s.name for s in GROUP_METRICS]
SUMMARY_KEYS = ["model", "method", "metric", "attribute", "group", "class"]


# ----------------------------------------------------------------------------- building blocks


@dataclass(frozen=True)
class Figure:
    """One figure: drawn only when the report has figures on."""

    name: str  # file name under figures/, unique in the report
    caption: str  # one or two sentences under the image (markdown-lite)
    draw: Callable[[], object]  # () -> matplotlib Figure


@dataclass(frozen=True)
class Table:
    """One table of strings. Columns beyond ``visible`` value columns fold into a <details> block."""

    df: pd.DataFrame
    caption: str = ""  # shown above the table (markdown-lite)
    index: tuple[str, ...] = ("model", "method")  # key columns, repeated in the folded part
    visible: int = 6  # value columns shown open; the rest fold away
    collapsed: bool = False  # fold the whole table (long reference tables)
    stacked: bool = False  # intervals under their values (narrow cells for many columns)
    titles: dict | None = None  # {column: definition}, shown when hovering a column name


@dataclass(frozen=True)
class Section:
    """One section of the page: anchor id, title, prose, then its figures, its tables, notes, folded details."""

    id: str  # anchor (``#id``), unique in the report
    title: str
    prose: tuple[str, ...] = ()  # paragraphs (markdown-lite: `code`, **bold**, [a](#id), "- " lists, "### " headings)
    figures: tuple[Figure, ...] = ()
    tables: tuple[Table, ...] = ()
    notes: tuple[str, ...] = ()  # paragraphs after the figures and tables
    details: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (summary, paragraphs) folded after the tables


class ReportData:
    """What sections are built from: the analysis results plus things derived from them once.

    Args:
        results: ``analyze.Results``.
        runs: the runs analysed (``Run``); when None they are read again from
            ``results.config.runs_dir`` if it exists (for curves and zero-shot settings).
    """

    def __init__(self, results, runs=None):
        self.results = results
        self._runs = runs

    @property
    def config(self):
        return self.results.config

    @cached_property
    def summary(self) -> pd.DataFrame:
        return summary(self.results)

    @cached_property
    def attributes(self) -> list[str]:
        """The analysed attributes in order, the crossed one last (``Results.attributes``), e.g.
        ``["sex", "age_group", "sex×age"]``; the shortcut column is never one."""
        declared = list(getattr(self.results, "attributes", None) or {})
        if declared:
            return declared
        m = self.results.metrics
        return list(dict.fromkeys(a for a, k in zip(m["attribute"], m["metric"]) if a and not k.startswith("shortcut_")))

    @property
    def task(self) -> str:
        return getattr(self.results, "task", "multiclass")

    @cached_property
    def primary_runs(self) -> list:
        """The runs tables and figures show (``primary`` in runs.csv); [] if they cannot be read."""
        from cxrfair.core.runs import read_run

        prim = set(self.results.runs.loc[self.results.runs["primary"], "run_id"])
        if self._runs is not None:
            return [r for r in self._runs if r.run_id in prim]
        folder = Path(self.config.runs_dir)
        paths = [folder / rid for rid in sorted(prim) if (folder / rid).is_dir()]
        return [read_run(p) for p in paths] if len(paths) == len(prim) else []

    @cached_property
    def roc(self) -> pd.DataFrame:
        from cxrfair.analysis.curves import roc_table

        return roc_table(self.primary_runs, self.config.split, self.config.attributes, cross=self.config.cross)

    @cached_property
    def reliability(self) -> pd.DataFrame:
        from cxrfair.analysis.curves import reliability_table

        return reliability_table(self.primary_runs, self.config.split, self.config.attributes, cross=self.config.cross)

    @cached_property
    def findings(self) -> pd.DataFrame:
        from cxrfair.analysis.findings import findings_table

        return findings_table(self.results.comparisons)

    @cached_property
    def definitions(self) -> dict[str, str]:
        """One-sentence definitions of this task's metrics (``Results.definitions``)."""
        return dict(self.results.definitions)


# ----------------------------------------------------------------------------- summary and tables


def summary(results) -> pd.DataFrame:
    """Primary runs' metrics over seeds: one row per (model, method, metric, attribute, group, class).

    Returns:
        DataFrame with value (mean over seeds), ci_low, ci_high (the interval of that mean, from
        the seed-averaged bootstrap replicates; ``results.seeds``), sd (over seeds; NaN with one
        seed) and n_seeds.
    """
    prim = results.runs.loc[results.runs["primary"], ["model", "method", "tag"]].drop_duplicates()
    t = results.seeds.merge(prim, on=["model", "method", "tag"]).rename(columns={"mean": "value"})
    return t[SUMMARY_KEYS + ["value", "ci_low", "ci_high", "sd", "n_seeds"]].reset_index(drop=True)


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


def wide(t: pd.DataFrame, col: str, names: dict | None = None) -> pd.DataFrame:
    """Summary rows -> one row per model · method, one formatted column per value of ``col``, then ``seeds``."""
    if t.empty:
        return pd.DataFrame()
    t = _order(t.assign(cell=_cells(t)))
    w = t.pivot_table(index=["model", "method"], columns=col, values="cell", aggfunc="first", sort=False)
    cols = [c for c in (names or dict.fromkeys(t[col])) if c in w.columns]
    w = w[cols].rename(columns=names or {})
    seeds = t.groupby(["model", "method"], sort=False)["n_seeds"].max()
    return w.assign(seeds=seeds.reindex(w.index).to_numpy()).reset_index()


def table_utility(s: pd.DataFrame) -> pd.DataFrame:
    """Accuracy, macro F1, macro AUC and ECE per model × method."""
    names = {"accuracy": "Accuracy", "f1_macro": "Macro F1", "auc_macro": "Macro AUC", "ap_macro": "Macro AP",
             "adjusted_auprc_macro": "Macro adjusted AUPRC", "ece": "ECE (binned)", "ece_macro": "Macro ECE"}
    t = s[s["metric"].isin(names) & (s["attribute"] == "") & (s["class"] == "")]
    return wide(t, "metric", names)


def table_class_f1(s: pd.DataFrame) -> pd.DataFrame:
    """Var_F1 and class-wise F1 per model × method."""
    v = s[(s["metric"] == "var_f1") & (s["attribute"] == "")]
    w = wide(s[(s["metric"] == "f1") & (s["attribute"] == "")], "class")
    if w.empty or v.empty:
        return w
    v = wide(v, "metric", {"var_f1": "Var_F1"}).drop(columns="seeds")
    return v.merge(w, on=["model", "method"], how="right")[list(v.columns) + list(w.columns[2:])]


# Shown first in the group-fairness table, in this order; any other gap metric follows.
FAIRNESS_FIRST = ("f1_gap", "f1_gap_abs", "eqodds", "eqodds_worst", "ece_gap", "worst_group_accuracy")


def table_fairness(s: pd.DataFrame, attribute: str) -> pd.DataFrame:
    """Every group-fairness metric of one attribute per model × method (headline metrics first)."""
    t = s[(s["attribute"] == attribute) & (s["group"] == "") & (s["class"] == "")]
    present = list(dict.fromkeys(t["metric"]))
    order = [m for m in FAIRNESS_FIRST if m in present] + [m for m in GAP_COLUMNS if m in present and m not in FAIRNESS_FIRST]
    order += sorted(m for m in present if m not in order)
    return wide(t, "metric", {m: m for m in order})


def table_group_metric(s: pd.DataFrame, attribute: str, metric: str, extra: tuple[str, ...] = ()) -> pd.DataFrame:
    """``metric`` within each group of one attribute per model × method, then ``extra`` gap metrics."""
    t = s[(s["attribute"] == attribute) & (s["group"] != "") & (s["metric"] == metric) & (s["class"] == "")]
    w = wide(t, "group")
    g = s[(s["attribute"] == attribute) & (s["group"] == "") & s["metric"].isin(extra)]
    if w.empty or g.empty:
        return w
    g = wide(g, "metric", {m: m for m in extra}).drop(columns="seeds")
    return w.drop(columns="seeds").merge(g, on=["model", "method"], how="left").assign(seeds=w["seeds"].to_numpy())


def table_group_f1(s: pd.DataFrame, attribute: str) -> pd.DataFrame:
    """Macro F1 within each group of one attribute per model × method."""
    return table_group_metric(s, attribute, "f1_macro")


def table_class_metric(s: pd.DataFrame, metric: str) -> pd.DataFrame:
    """``metric`` per class (condition) on the whole split, one column per class, per model × method."""
    return wide(s[(s["metric"] == metric) & (s["attribute"] == "") & (s["class"] != "")], "class")


def table_condition_groups(s: pd.DataFrame, attribute: str, metric: str = "auc",
                           extra: tuple[str, ...] = ("auc_gap", "worst_group_auc", "es_auc")) -> pd.DataFrame:
    """Multi-label: ``metric`` of each condition within each group of one attribute, then ``extra``
    per-condition gap metrics; one row per model × method × condition."""
    t = s[(s["attribute"] == attribute) & (s["class"] != "")]
    per = t[(t["metric"] == metric) & (t["group"] != "")]
    if per.empty:
        return pd.DataFrame()
    per = _order(per.assign(cell=_cells(per)))
    keys = ["model", "method", "class"]
    w = per.pivot_table(index=keys, columns="group", values="cell", aggfunc="first", sort=False)
    w = w[list(dict.fromkeys(per["group"]))]
    g = t[(t["group"] == "") & t["metric"].isin(extra)]
    if not g.empty:
        g = g.assign(cell=_cells(g)).pivot_table(index=keys, columns="metric", values="cell", aggfunc="first", sort=False)
        w = w.join(g[[m for m in extra if m in g.columns]])
    seeds = per.groupby(keys, sort=False)["n_seeds"].max()
    return w.assign(seeds=seeds.reindex(w.index).to_numpy()).reset_index().rename(columns={"class": "condition"})


def table_thresholds(thresholds: pd.DataFrame, primary: set) -> pd.DataFrame:
    """Multi-label: each primary run's decision threshold per condition (and the validation
    positives / negatives it was chosen on), one row per run."""
    t = thresholds[thresholds["run_id"].isin(primary)]
    if t.empty:
        return pd.DataFrame()
    cell = [("–" if not np.isfinite(r.threshold) else f"{r.threshold:.3f}") + f" ({r.n_val_pos}+/{r.n_val_neg}−)"
            for r in t.itertuples()]
    w = _order(t.assign(cell=cell)).pivot_table(index=["model", "method", "seed"], columns="class", values="cell",
                                                aggfunc="first", sort=False)
    return w[list(dict.fromkeys(t["class"]))].reset_index()


def table_shortcut(shortcut: pd.DataFrame) -> pd.DataFrame:
    """The shortcut test per run: AUC with and without the shortcut, their paired difference, the images counted."""
    if shortcut.empty:
        return pd.DataFrame()
    t = _order(shortcut)
    cells = {name: [fmt(getattr(r, k), getattr(r, lo), getattr(r, hi)) for r in t.itertuples()]
             for name, k, lo, hi in (("AUC with", "auc_with", "auc_with_ci_low", "auc_with_ci_high"),
                                     ("AUC without", "auc_without", "auc_without_ci_low", "auc_without_ci_high"),
                                     ("difference", "delta", "ci_low", "ci_high"))}
    out = t[["model", "method", "seed"]].assign(**cells)
    return out.assign(**{"positives with / without / unknown": [f"{a} / {b} / {c}" for a, b, c in zip(
        t["n_pos_with"], t["n_pos_without"], t["n_pos_unknown"])], "negatives": t["n_neg"].to_numpy()}).reset_index(drop=True)


def table_comparisons(c: pd.DataFrame, metrics=("accuracy", "f1_macro", "f1_gap", "f1_gap_abs", "eqodds", "ece_gap")) -> pd.DataFrame:
    """Paired differences (method − baseline, in points) for headline metrics, one row per run pair."""
    t = c[c["metric"].isin(metrics) & (c["group"] == "") & (c["class"] == "")]
    if t.empty:
        return pd.DataFrame()
    t = t.assign(col=np.where(t["attribute"] == "", t["metric"], t["metric"] + " " + t["attribute"]),
                 cell=[fmt(r.delta, r.ci_low, r.ci_high) for r in t.itertuples()])
    w = t.pivot_table(index=["model", "baseline", "method", "seed"], columns="col", values="cell",
                      aggfunc="first", sort=False)
    return w.reset_index()


# ----------------------------------------------------------------------------- rendering

_CI = re.compile(r"^(–|−?-?\d+\.\d+)( \[[^\]]+\])?( ±\S+)?$")


def slug(s: str) -> str:
    """An anchor/file-name-safe form: ``sex×age`` -> ``sex_x_age``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", s.replace("×", "_x_")).strip("-")


def split_columns(t: Table) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """(open part, folded part or None): key columns plus the first ``visible`` value columns, and the rest."""
    df = t.df
    keys = [c for c in df.columns if c in t.index]
    values = [c for c in df.columns if c not in t.index]
    tail = [c for c in values if c == "seeds"]  # the seed count stays with the open part
    values = [c for c in values if c != "seeds"]
    if len(values) <= t.visible:
        return df, None
    return df[keys + values[: t.visible] + tail], df[keys + values[t.visible:]]


def md_inline(text: str) -> str:
    """Escape, then turn `code`, **bold** and [text](#anchor) into tags (the only inline markdown the report uses)."""
    t = html.escape(text, quote=False)
    t = re.sub(r"`([^`]+)`", r"<code>\1</code>", t)
    t = re.sub(r"\[([^\]]+)\]\((#[A-Za-z0-9_.-]+)\)", r"<a href='\2'>\1</a>", t)  # links within the page only
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", t)


def md_block_html(text: str) -> str:
    """A prose block: ``### `` heading, a list (every line starts with ``- ``), or a paragraph."""
    lines = text.strip().splitlines()
    if text.startswith("### "):
        return f"<h3>{md_inline(text[4:].strip())}</h3>"
    if lines and all(line.startswith("- ") for line in lines):
        return "<ul>" + "".join(f"<li>{md_inline(line[2:])}</li>" for line in lines) + "</ul>"
    return f"<p>{md_inline(text)}</p>"


def _cell_html(v) -> str:
    s = str(v)
    m = _CI.match(s)
    if m and (m.group(2) or m.group(3)):  # the interval and sd in a lighter, smaller span
        return f"{html.escape(m.group(1))}<span class='ci'>{html.escape((m.group(2) or '') + (m.group(3) or ''))}</span>"
    return html.escape(s)


def _html_table(df: pd.DataFrame, stacked: bool = False, titles: dict | None = None) -> str:
    if df.empty:
        return "<p><em>no rows</em></p>"
    tip = lambda c: f" title='{html.escape(titles[c])}'" if titles and c in titles else ""  # noqa: E731
    head = "".join(f"<th{tip(c)}>{html.escape(str(c))}</th>" for c in df.columns)
    body = "".join("<tr>" + "".join(f"<td>{_cell_html(v)}</td>" for v in row) + "</tr>"
                   for row in df.itertuples(index=False))
    cls = " class='stacked'" if stacked else ""
    return f"<div class='scroll'><table{cls}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"


def _md_table(df: pd.DataFrame) -> str:
    if df.empty:
        return "_no rows_\n"
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |")
    return "\n".join(lines) + "\n"


def _folded_summary(rest: pd.DataFrame, t: Table) -> str:
    names = [str(c) for c in rest.columns if c not in t.index]
    return f"{len(names)} more columns: " + ", ".join(names)


def table_html(t: Table) -> str:
    caption = f"<p class='caption'>{md_inline(t.caption)}</p>" if t.caption else ""
    if t.collapsed:
        return f"<details><summary>{md_inline(t.caption) or 'table'}</summary>{_html_table(t.df)}</details>"
    head, rest = split_columns(t)
    folded = ("" if rest is None else f"<details><summary>{html.escape(_folded_summary(rest, t))}</summary>"
              f"{_html_table(rest, t.stacked, t.titles)}</details>")
    return caption + _html_table(head, t.stacked, t.titles) + folded


def table_md(t: Table) -> str:
    if t.collapsed:
        return f"<details><summary>{t.caption or 'table'}</summary>\n\n{_md_table(t.df)}\n</details>\n"
    head, rest = split_columns(t)
    out = (t.caption + "\n\n" if t.caption else "") + _md_table(head)
    if rest is not None:
        out += f"\n<details><summary>{_folded_summary(rest, t)}</summary>\n\n{_md_table(rest)}\n</details>\n"
    return out


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1a1a1a;line-height:1.45}
nav#toc{position:fixed;top:0;left:0;width:210px;height:100vh;overflow-y:auto;padding:1em 0.8em;
  box-sizing:border-box;background:#f6f7f9;border-right:1px solid #ddd;font-size:13px}
nav#toc ol{padding-left:1.2em;margin:0.3em 0}nav#toc li{margin:0.25em 0}nav#toc a{color:#1f4e8c;text-decoration:none}
nav#toc h2{font-size:14px;margin:0 0 0.4em}
main{margin-left:210px;padding:0.5em 2em 3em;max-width:1120px}
h1{font-size:1.6em;margin:0.6em 0 0.2em}h2{border-bottom:1px solid #ddd;padding-bottom:0.2em;margin-top:1.8em}
h3{font-size:1.05em;margin:1em 0 0.3em}
p.lead{color:#555;margin-top:0}
section#findings{background:#f4f8fc;border:1px solid #cfe0f1;border-radius:6px;padding:0.2em 1.2em 0.8em}
section#findings h2{margin-top:0.6em}section#findings li{margin:0.35em 0}
table{border-collapse:collapse;font-size:12.5px;margin:0.4em 0}td,th{border:1px solid #d6d6d6;padding:3px 7px;white-space:nowrap}
th{background:#f1f3f5;position:sticky;top:0}tbody tr:nth-child(even){background:#fafafa}
.scroll{overflow-x:auto;max-width:100%}
span.ci{color:#666;font-size:0.88em;margin-left:0.3em}
table.stacked span.ci{display:block;margin-left:0}table.stacked td{text-align:center}
p.caption{font-size:13px;color:#444;margin:0.8em 0 0.2em}
figure{margin:1em 0}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:13px;color:#444}
details{margin:0.4em 0 1em}summary{cursor:pointer;color:#1f4e8c;font-size:13px}
code{background:#f1f3f5;padding:0 3px;border-radius:3px}
@media (max-width:900px){nav#toc{position:static;width:auto;height:auto;border:0}main{margin-left:0}}
"""


def _figure_html(f: Figure, png: bytes) -> str:
    data = base64.b64encode(png).decode("ascii")
    alt = re.sub(r"[`*]", "", f.caption)  # the caption, as plain text, for readers who cannot see the image
    return (f"<figure id='fig-{slug(f.name.removesuffix('.png'))}'><img alt='{html.escape(alt)}' "
            f"src='data:image/png;base64,{data}'><figcaption>{md_inline(f.caption)}</figcaption></figure>")


def section_html(s: Section, pngs: dict[str, bytes]) -> str:
    parts = [f"<section id='{s.id}'><h2>{html.escape(s.title)}</h2>"]
    parts += [md_block_html(p) for p in s.prose]
    parts += [_figure_html(f, pngs[f.name]) for f in s.figures if f.name in pngs]
    parts += [table_html(t) for t in s.tables]
    parts += [md_block_html(p) for p in s.notes]
    for summary_text, paragraphs in s.details:
        parts.append(f"<details><summary>{md_inline(summary_text)}</summary>"
                     + "".join(md_block_html(p) for p in paragraphs) + "</details>")
    return "\n".join(parts) + "</section>"


def render_html(sections: list[Section], pngs: dict[str, bytes], title: str, lead: str) -> str:
    toc = "".join(f"<li><a href='#{s.id}'>{html.escape(s.title)}</a></li>" for s in sections)
    return "\n".join([
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><meta name='viewport' "
        f"content='width=device-width, initial-scale=1'><title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
        f"<nav id='toc'><h2>Contents</h2><ol>{toc}</ol></nav>",
        f"<main><h1>{html.escape(title)}</h1><p class='lead'>{md_inline(lead)}</p>",
        *(section_html(s, pngs) for s in sections),
        "</main></body></html>",
    ])


def section_md(s: Section, figure_names: set[str]) -> str:
    parts = [f"\n<a id=\"{s.id}\"></a>\n\n## {s.title}\n"]
    parts += [f"\n{p}\n" for p in s.prose]
    parts += [f"\n![{f.name}](figures/{f.name})\n\n{f.caption}\n" for f in s.figures if f.name in figure_names]
    parts += [f"\n{table_md(t)}" for t in s.tables]
    parts += [f"\n{p}\n" for p in s.notes]
    for summary_text, paragraphs in s.details:
        parts.append(f"\n<details><summary>{summary_text}</summary>\n\n" + "\n\n".join(paragraphs) + "\n\n</details>\n")
    return "".join(parts)


def render_markdown(sections: list[Section], figure_names: set[str], title: str, lead: str) -> str:
    toc = "\n".join(f"{i}. [{s.title}](#{s.id})" for i, s in enumerate(sections, 1))
    return f"# {title}\n\n{lead}\n\n**Contents**\n\n{toc}\n" + "".join(section_md(s, figure_names) for s in sections)


# ----------------------------------------------------------------------------- the report


def build_sections(data: ReportData, builders=None) -> list[Section]:
    """Run every section builder in order; keep what they return (None or [] = absent).

    Raises:
        ValueError: two sections share an id, or two figures a file name (a builder bug).
    """
    from cxrfair.analysis.sections import SECTIONS

    out: list[Section] = []
    for build in builders or SECTIONS:
        got = build(data)
        out += [got] if isinstance(got, Section) else list(got or [])
    for what, names in (("section id", [s.id for s in out]), ("figure name", [f.name for s in out for f in s.figures])):
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"duplicate {what}: {sorted(dup)}")
    return out


def draw_figures(sections: list[Section]) -> dict[str, bytes]:
    """{file name: PNG bytes} of every figure of every section."""
    from cxrfair.analysis.figures import png

    return {f.name: png(f.draw()) for s in sections for f in s.figures}


def lead(results) -> str:
    c = results.config
    return (f"{len(results.runs)} runs from `{c.runs_dir}`, metrics on the **{c.split}** split; values in % "
            f"with {100 * c.level:.0f}% bootstrap intervals. Findings first; every figure is followed by its table.")


def write_report(results, folder: Path, runs=None) -> Path:
    """Write every output into ``folder`` (the caller makes the folder appear atomically).

    Args:
        results: ``analyze.Results``.
        folder: the (temporary) report folder.
        runs: the runs analysed, if the caller holds them (else read again for curves).

    Returns:
        The path of report.html.
    """
    folder = Path(folder)
    data = ReportData(results, runs)
    results.metrics.to_csv(folder / "metrics.csv", index=False)
    results.comparisons.to_csv(folder / "comparisons.csv", index=False)
    data.findings.to_csv(folder / "findings.csv", index=False)
    results.seeds.to_csv(folder / "seeds.csv", index=False)
    results.runs.to_csv(folder / "runs.csv", index=False)
    data.roc.to_csv(folder / "roc.csv", index=False)
    data.reliability.to_csv(folder / "reliability.csv", index=False)
    write_json_atomic(folder / "analysis.json", asdict(results.config))
    sections = build_sections(data)
    pngs = draw_figures(sections) if results.config.figures else {}
    (folder / "figures").mkdir(exist_ok=True)
    for name, data_png in pngs.items():
        (folder / "figures" / name).write_bytes(data_png)
    title = "cxrfair fairness report"
    (folder / "report.md").write_text(render_markdown(sections, set(pngs), title, lead(results)), encoding="utf-8")
    (folder / "report.html").write_text(render_html(sections, pngs, title, lead(results)), encoding="utf-8")
    return folder / "report.html"

