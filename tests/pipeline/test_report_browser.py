"""Open a report in a real browser (headless Chromium) and check what a reader would see.

Skipped when Chromium is not installed (`.ci/run` installs Debian's `chromium`).
"""

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxrfair.analysis.analyze import AnalyzeConfig, analyze
from tests.analysis.synth import write_runs

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (apt-get install chromium)")

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars"]

# Appended to a copy of the report: after load, put what a reader would see into the title.
PROBE = """<script>
window.addEventListener('load', () => {
  const imgs = [...document.images].map(i => [(i.closest('figure') || i).id, i.naturalWidth, i.naturalHeight, i.alt]);
  const tables = [...document.querySelectorAll('table')].map(t => t.rows.length);
  const sections = [...document.querySelectorAll('main > section')].map(s => s.id);
  const toc = [...document.querySelectorAll('nav#toc a')].map(a => a.getAttribute('href').slice(1));
  const resolved = toc.filter(id => document.getElementById(id) !== null).length;
  const findings = document.getElementById('findings');
  const items = findings ? [...findings.querySelectorAll('li')].map(li => li.textContent) : [];
  const top = findings ? findings.getBoundingClientRect().top : -1;
  const folded = [...document.querySelectorAll('details')].filter(d => !d.open && d.querySelector('table')).length;
  const overflow = document.documentElement.scrollWidth - window.innerWidth;
  document.querySelectorAll('details').forEach(d => { d.open = true; });  // folded sections too: measure them open
  // Each figure as displayed: its scale (CSS px shown per image px) and the smallest text it holds,
  // drawn size (the PNG's own record) times that scale; and whether its table sits beside it.
  const shown = [...document.images].map(i => {
    const r = i.getBoundingClientRect();
    const duo = i.closest('div.duo');
    const beside = duo ? duo.querySelector('div.beside') : null;
    const b = beside ? beside.getBoundingClientRect() : null;
    return [(i.closest('figure') || i).id, r.width / i.naturalWidth, parseFloat(i.dataset.minTextPx) * r.width / i.naturalWidth,
            b ? (b.left >= r.right - 1 && b.top < r.bottom) : null, r.width];
  });
  const banner = document.querySelector('div.banner');
  const bannerBox = banner ? banner.getBoundingClientRect() : null;
  const headline = document.getElementById('headline');
  const headTop = headline ? headline.getBoundingClientRect().top : -1;
  document.title = 'PROBE' + JSON.stringify({imgs, tables, sections, toc, resolved, items, top, shown,
                                             banner: banner ? banner.textContent : '', bannerTop: bannerBox ? bannerBox.top : -1,
                                             headTop, height: window.innerHeight, folded, overflow}) + 'PROBE';
});
</script>"""


def _chromium(tmp_path: Path, *args: str) -> str:
    profile = tmp_path / "profile"
    result = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True, timeout=120)
    return result.stdout


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("browser")
    grid = [("tiny-clip", m, s) for m in ("zeroshot", "linear", "mlp", "lora", "full") for s in (0, 1)]
    write_runs(tmp / "runs", grid, n_per_split=40)
    return analyze(AnalyzeConfig(runs_dir=tmp / "runs", out=tmp / "report", n_boot=100, seed=0))


def _probe(report: Path, tmp_path: Path, size: str = "1280,800") -> dict:
    probe_page = tmp_path / "probe.html"
    probe_page.write_text(report.read_text().replace("</body>", PROBE + "</body>"))
    dom = _chromium(tmp_path, "--dump-dom", "--virtual-time-budget=5000", f"--window-size={size}", probe_page.as_uri())
    found = re.search(r"PROBE(.*?)PROBE", dom)
    assert found, dom[:500]
    return json.loads(html.unescape(found.group(1)))


def test_figures_decode_and_tables_render_in_chromium(report, tmp_path):
    page = report.read_text()
    assert re.search(r"<img [^>]*src=['\"]data:image/png;base64,", page)  # self-contained
    assert not re.search(r"<(img|script|link)[^>]+(src|href)=['\"](?!data:|#)", page)  # nothing fetched
    seen = _probe(report, tmp_path)
    figures = list((report.parent / "figures").glob("*.png"))
    assert len(seen["imgs"]) == len(figures) >= 10
    for name, width, height, alt in seen["imgs"]:
        assert width > 200 and height > 100, f"figure {name} did not decode in the browser"
        assert len(alt) > 20, f"figure {name} has no text alternative"
    names = [name.removeprefix("fig-") for name, _, _, _ in seen["imgs"]]
    for prefix in ("roc_", "reliability_", "f1_by_group_", "fairness_"):
        assert sum(n.startswith(prefix) for n in names) == 3, prefix  # one per attribute (sex, age, sex×age)
    assert len(seen["tables"]) >= 8 and all(rows >= 2 for rows in seen["tables"])
    assert seen["folded"] >= 3  # wide tables' extra columns and the runs list start folded


def test_the_page_opens_on_the_headline_with_a_working_contents_list(report, tmp_path):
    seen = _probe(report, tmp_path, "1400,900")
    assert seen["sections"][:2] == ["headline", "findings"]
    assert 0 <= seen["headTop"] < seen["height"] / 2  # the headline is on the first screen
    assert seen["toc"] == seen["sections"] and seen["resolved"] == len(seen["toc"])
    assert {"roc-sex", "calibration-age_group", "fairness-sex_x_age"} <= set(seen["sections"])
    # One item per compared model × method, seeds pooled (4 methods vs the linear probe, 2 seeds each),
    # each with an interval and a verdict; zero-shot compared with the linear probe, not the reverse.
    findings = [i for i in seen["items"] if " vs " in i]
    assert len(findings) == 4
    for item in findings:
        assert re.match(r"tiny-clip, (zero-shot|MLP probe|LoRA|full fine-tuning) vs linear probe \(2 seeds pooled\): "
                        r"accuracy [+−]?\d+\.\d points \[[−\d.]+, [−\d.]+\] \((higher|lower|no clear change)(; Holm: [a-z ]+)?\)", item), item
    assert seen["overflow"] <= 0  # no sideways scrolling on a laptop-sized window: wide tables scroll in place


def test_every_figure_shows_text_of_at_least_10_px_and_sits_beside_its_table_where_it_fits(report, tmp_path):
    """Measured in Chromium at 1400 px: each image's displayed scale times the smallest text it was
    drawn with (its PNG records that; ``test_figures`` checks the record against the figure)."""
    seen = _probe(report, tmp_path, "1400,900")
    assert len(seen["shown"]) >= 10
    small = [f"{name}: smallest text {text_px:.1f} px (shown at {scale:.2f} of its size)"
             for name, scale, text_px, _, _ in seen["shown"] if not text_px >= 10.0]
    assert not small, small
    narrow = [(n, b) for n, _, _, b, w in seen["shown"] if b is not None and w <= 600]
    assert narrow and all(b for _, b in narrow), narrow  # a narrow figure has its table beside it


def test_a_demo_report_says_so_before_anything_else(tmp_path_factory, tmp_path):
    """Runs whose cohort was drawn by ``cohort synth`` and whose weights are random: a banner on top."""
    tmp = tmp_path_factory.mktemp("demo")
    images = tmp / "synth"
    images.mkdir()
    (images / "synth_info.json").write_text(json.dumps({"generator": "cxrfair.extract.synth"}))
    (tmp / "cohort").mkdir()
    (tmp / "cohort" / "cohort.json").write_text(json.dumps({"images_root": str(images)}))
    write_runs(tmp / "runs", [("tiny-clip", m, 0) for m in ("linear", "full")], n_per_split=30)
    for run_json in (tmp / "runs").glob("*/run.json"):
        meta = json.loads(run_json.read_text())
        run_json.write_text(json.dumps(meta | {"source": str(tmp / "cohort"), "weights_id": "random-init(seed=0)"}))
    page = analyze(AnalyzeConfig(runs_dir=tmp / "runs", out=tmp / "report", n_boot=100, seed=0, figures=False))
    seen = _probe(page, tmp_path, "1400,900")
    assert "synthetic" in seen["banner"] and "random" in seen["banner"] and "not a result" in seen["banner"]
    assert 0 <= seen["bannerTop"] < 100
    md = (page.parent / "report.md").read_text()
    assert md.startswith("> **Demonstration data, not a result.**")


def test_screenshot_shows_content_not_a_blank_page(report, tmp_path):
    shot = tmp_path / "report.png"
    _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1400,3000", report.as_uri())
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.shape == (3000, 1400)
    ink = pixels < 200  # text, table rules, bars
    assert ink.mean() > 0.02
    # Content spreads down the page (tables, then figures), not one strip at the top.
    rows_with_ink = ink.any(axis=1).reshape(30, 100).any(axis=1)
    assert rows_with_ink.sum() >= 25


@pytest.fixture(scope="module")
def v2_report(tmp_path_factory) -> Path:
    """A multi-label report with the shortcut test and embedding analyses (one attribute: few figures)."""
    from tests.analysis.synth import ML_ATTRIBUTES, multilabel_rows, write_embedding_outputs, write_multilabel_runs

    tmp = tmp_path_factory.mktemp("browser_v2")
    rows = multilabel_rows(n_per_split=60)
    write_multilabel_runs(tmp / "runs", [("m", "zeroshot", 0), ("m", "linear", 0)], rows)
    write_embedding_outputs(tmp / "embeddings", "m", rows, {"race": ML_ATTRIBUTES["race"]})
    return analyze(AnalyzeConfig(runs_dir=tmp / "runs", out=tmp / "report", n_boot=100, seed=0,
                                 attributes=("race",), cross=()))


def test_v2_sections_and_their_figures_render_in_chromium(v2_report, tmp_path):
    seen = _probe(v2_report, tmp_path)
    assert seen["sections"][:2] == ["headline", "findings"] and seen["toc"] == seen["sections"]
    assert {"conditions-race", "thresholds", "shortcut", "leakage", "geometry"} <= set(seen["sections"])
    assert not [s for s in seen["sections"] if "drain" in s]
    names = {name.removeprefix("fig-") for name, width, height, _ in seen["imgs"] if width > 200 and height > 100}
    assert {"auc_by_condition_race", "roc_m_race", "reliability_m_race", "shortcut", "leakage", "pca_m"} <= names
    assert len(seen["imgs"]) == len(list((v2_report.parent / "figures").glob("*.png")))
    assert any("macro AUC" in item and "race" in item for item in seen["items"])
    assert seen["overflow"] <= 0
