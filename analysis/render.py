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
report's data (``report.ReportData``) returning ``Section``s, or nothing when its data is absent.
The renderers below lay out any section the same way: title, prose, figures, then tables; adding
a section never touches them. Imports go one way: ``render`` -> ``sections`` -> ``report``
(blocks, data, tables) and the figure modules.
"""

from __future__ import annotations

import base64
import html
import io
import re
from dataclasses import asdict
from pathlib import Path

import pandas as pd
from PIL import Image

from cxrfair.analysis.report import Figure, ReportData, Section, Table, slug
from cxrfair.analysis.sections import SECTIONS
from cxrfair.io import write_json_atomic

_CI = re.compile(r"^(–|−?-?\d+\.\d+)( \[[^\]]+\])?( ±\S+)?$")


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
main{margin-left:210px;padding:0.5em 1.5em 3em;max-width:1180px}
h1{font-size:1.6em;margin:0.6em 0 0.2em}h2{border-bottom:1px solid #ddd;padding-bottom:0.2em;margin-top:1.8em}
h3{font-size:1.05em;margin:1em 0 0.3em}
p.lead{color:#555;margin-top:0}
div.banner{background:#fff4d6;border:2px solid #c98a00;border-radius:6px;padding:0.6em 1em;margin:0.8em 0 0;font-size:15px}
section#findings{background:#f4f8fc;border:1px solid #cfe0f1;border-radius:6px;padding:0.2em 1.2em 0.8em}
section#findings h2{margin-top:0.6em}section#findings li{margin:0.35em 0}
table{border-collapse:collapse;font-size:12.5px;margin:0.4em 0}td,th{border:1px solid #d6d6d6;padding:3px 7px;white-space:nowrap}
th{background:#f1f3f5;position:sticky;top:0}tbody tr:nth-child(even){background:#fafafa}
.scroll{overflow-x:auto;max-width:100%}
span.ci{color:#666;font-size:0.88em;margin-left:0.3em}
table.stacked span.ci{display:block;margin-left:0}table.stacked td{text-align:center}
p.caption{font-size:13px;color:#444;margin:0.8em 0 0.2em}
figure{margin:1em 0;max-width:100%}figure img{max-width:100%;height:auto;border:1px solid #eee;display:block}
div.duo{display:flex;flex-wrap:wrap;gap:0 1.5em;align-items:flex-start}div.duo>figure{flex:0 1 auto}
div.duo>div.beside{flex:1 1 380px;min-width:0;margin-top:1em}
figcaption{font-size:13px;color:#444}
details{margin:0.4em 0 1em}summary{cursor:pointer;color:#1f4e8c;font-size:13px}
details.section>summary{font-size:14px}
code{background:#f1f3f5;padding:0 3px;border-radius:3px}
@media (max-width:900px){nav#toc{position:static;width:auto;height:auto;border:0}main{margin-left:0}}
"""


def png_facts(png: bytes) -> tuple[int, int, str]:
    """(width, height, smallest text in px as drawn) of a report PNG (``figures.png`` writes the last)."""
    with Image.open(io.BytesIO(png)) as im:
        return im.width, im.height, str(im.info.get("cxrfair:min_text_px", ""))


def _figure_html(f: Figure, png: bytes) -> str:
    data = base64.b64encode(png).decode("ascii")
    alt = re.sub(r"[`*]", "", f.caption)  # the caption, as plain text, for readers who cannot see the image
    width, _, text_px = png_facts(png)
    # Shown at its natural size (one image pixel per CSS pixel) unless the page is narrower: its
    # text then displays at the size it was drawn, which figures.png keeps at >= MIN_TEXT_PX.
    return (f"<figure id='fig-{slug(f.name.removesuffix('.png'))}' style='width:{width}px'><img alt='{html.escape(alt)}' "
            f"data-min-text-px='{html.escape(text_px)}' width='{width}' src='data:image/png;base64,{data}'>"
            f"<figcaption>{md_inline(f.caption)}</figcaption></figure>")


def section_html(s: Section, pngs: dict[str, bytes]) -> str:
    parts = [f"<section id='{s.id}'><h2>{html.escape(s.title)}</h2>"]
    parts += [md_block_html(p) for p in s.prose]
    figs = [_figure_html(f, pngs[f.name]) for f in s.figures if f.name in pngs]
    tables = [table_html(t) for t in s.tables]
    # Each figure beside its table where the width allows (flex-wrap puts the table below otherwise):
    # figure i with table i when a section has as many of each, else the first table after the last figure.
    if figs and len(figs) == len(tables):
        parts += [_duo(f, t, keep) for f, t, keep in zip(figs, tables, (t.beside for t in s.tables))]
    elif figs and tables:
        parts.append(_duo("".join(figs), tables[0], s.tables[0].beside))
        parts += tables[1:]
    else:
        parts += figs + tables
    parts += [md_block_html(p) for p in s.notes]
    for summary_text, paragraphs in s.details:
        parts.append(f"<details><summary>{md_inline(summary_text)}</summary>"
                     + "".join(md_block_html(p) for p in paragraphs) + "</details>")
    if s.folded:  # the heading stays (the contents list links to it); the body opens on a click
        what = _contents(len(s.figures), len(s.tables))
        return (parts[0] + f"<details class='section'><summary>Show {what}</summary>" + "\n".join(parts[1:])
                + "</details></section>")
    return "\n".join(parts) + "</section>"


def _duo(figure: str, table: str, beside: bool = True) -> str:
    if not beside:
        return figure + table
    return f"<div class='duo'>{figure}<div class='beside'>{table}</div></div>"


def _contents(n_figures: int, n_tables: int) -> str:
    said = [f"{n} {w}{'s' if n != 1 else ''}" for n, w in ((n_figures, "figure"), (n_tables, "table")) if n]
    return " and ".join(said) or "the notes"


def render_html(sections: list[Section], pngs: dict[str, bytes], title: str, lead: str, banner: str = "") -> str:
    top = f"<div class='banner' role='note'>{md_inline(banner)}</div>" if banner else ""
    toc = "".join(f"<li><a href='#{s.id}'>{html.escape(s.title)}</a></li>" for s in sections)
    return "\n".join([
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><meta name='viewport' "
        f"content='width=device-width, initial-scale=1'><title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
        f"<nav id='toc'><h2>Contents</h2><ol>{toc}</ol></nav>",
        f"<main>{top}<h1>{html.escape(title)}</h1><p class='lead'>{md_inline(lead)}</p>",
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
    if s.folded:
        return (parts[0] + f"\n<details><summary>Show {_contents(len(s.figures), len(s.tables))}</summary>\n"
                + "".join(parts[1:]) + "\n</details>\n")
    return "".join(parts)


def render_markdown(sections: list[Section], figure_names: set[str], title: str, lead: str, banner: str = "") -> str:
    toc = "\n".join(f"{i}. [{s.title}](#{s.id})" for i, s in enumerate(sections, 1))
    top = f"> {banner}\n\n" if banner else ""
    return f"{top}# {title}\n\n{lead}\n\n**Contents**\n\n{toc}\n" + "".join(section_md(s, figure_names) for s in sections)


# ----------------------------------------------------------------------------- the report


def build_sections(data: ReportData, builders=None) -> list[Section]:
    """Run every section builder in order; keep what they return (None or [] = absent).

    Raises:
        ValueError: two sections share an id, or two figures a file name (a builder bug).
    """
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
    # matplotlib is imported here, not at the top: a report without figures (``figures=False``)
    # and every caller that only builds or renders sections never load it.
    from cxrfair.analysis.figures import png

    return {f.name: png(f.draw()) for s in sections for f in s.figures}


def lead(results) -> str:
    c = results.config
    return (f"{len(results.runs)} runs from `{c.runs_dir}`, metrics on the **{c.split}** split; values in % "
            f"with {100 * c.level:.0f}% bootstrap intervals. The headline and findings first; each figure sits beside its "
            "table where the page is wide enough, with the rest of the tables' columns folded.")


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
    banner = data.provenance.banner()  # synthetic images / random weights: said before anything else
    (folder / "report.md").write_text(render_markdown(sections, set(pngs), title, lead(results), banner),
                                      encoding="utf-8")
    (folder / "report.html").write_text(render_html(sections, pngs, title, lead(results), banner), encoding="utf-8")
    return folder / "report.html"

