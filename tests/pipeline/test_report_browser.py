"""Open a report in a real browser (headless Chromium) and check what a reader would see.

Skipped when Chromium is not installed (`.ci/run` installs Debian's `chromium`).
"""

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

# Appended to a copy of the report: after load, put each image's decoded size into the title.
PROBE = """<script>
window.addEventListener('load', () => {
  const imgs = [...document.images].map(i => [i.alt || i.src.slice(0, 30), i.naturalWidth, i.naturalHeight]);
  const tables = [...document.querySelectorAll('table')].map(t => t.rows.length);
  document.title = 'PROBE' + JSON.stringify({imgs, tables}) + 'PROBE';
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


def test_figures_decode_and_tables_render_in_chromium(report, tmp_path):
    html = report.read_text()
    assert re.search(r"<img [^>]*src=['\"]data:image/png;base64,", html)  # self-contained
    probe_page = tmp_path / "probe.html"
    probe_page.write_text(html.replace("</body>", PROBE + "</body>"))
    dom = _chromium(tmp_path, "--dump-dom", "--virtual-time-budget=5000", probe_page.as_uri())
    found = re.search(r"PROBE(.*?)PROBE", dom)
    assert found, dom[:500]
    seen = json.loads(found.group(1).replace("&quot;", '"'))
    figures = list((report.parent / "figures").glob("*.png"))
    assert len(seen["imgs"]) == len(figures) >= 5
    for name, width, height in seen["imgs"]:
        assert width > 200 and height > 100, f"figure {name} did not decode in the browser"
    assert len(seen["tables"]) >= 5 and all(rows >= 2 for rows in seen["tables"])


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
