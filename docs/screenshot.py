"""Regenerate docs/report.png: a report of synthetic runs (two models x five methods x three seeds)
opened in headless Chromium at 1400 x 900, the first screen, 64 colours (small enough for the README).

The runs point at a cohort drawn by `cxrfair cohort synth` and carry random weights, as the demo's
do, so the picture shows the banner a demo report carries. The PNG records a digest of the report
code it shows (``SOURCES``); tests/analysis/test_report_screenshot.py fails when that code changes
and the picture is not regenerated.

    .venv/bin/python docs/screenshot.py [OUT_PNG]
"""

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image, PngImagePlugin

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cxrfair.analysis.analyze import AnalyzeConfig, analyze  # noqa: E402
from tests.analysis.synth import write_runs  # noqa: E402

# The code that decides what the first screen shows; the digest of these files is in the PNG.
SOURCES = ("analysis/render.py", "analysis/sections.py", "analysis/headline.py", "analysis/findings.py",
           "analysis/report.py", "analysis/provenance.py", "analysis/figures.py", "docs/screenshot.py")
KEY = "cxrfair:report-source"


def source_digest() -> str:
    h = hashlib.sha256()
    for name in SOURCES:
        h.update(name.encode() + b"\0" + (ROOT / name).read_bytes().replace(b"\r\n", b"\n") + b"\0")
    return h.hexdigest()


def _demo_like_runs(tmp: Path) -> Path:
    """Synthetic runs that say so in their files, as the demo's do (synth_info.json, random-init weights)."""
    images = tmp / "synth"
    images.mkdir()
    (images / "synth_info.json").write_text(json.dumps({"generator": "cxrfair.extract.synth"}))
    (tmp / "cohort").mkdir()
    (tmp / "cohort" / "cohort.json").write_text(json.dumps({"images_root": str(images)}))
    grid = [(m, me, s) for m in ("tiny-clip", "tiny-gloria") for me in ("zeroshot", "linear", "mlp", "lora", "full")
            for s in (0, 1, 2)]
    write_runs(tmp / "runs", grid, n_per_split=60)
    for run_json in (tmp / "runs").glob("*/run.json"):
        meta = json.loads(run_json.read_text())
        run_json.write_text(json.dumps(meta | {"source": str(tmp / "cohort"), "weights_id": "random-init(seed=0)"}))
    return tmp / "runs"


def main(out: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("docs/screenshot.py: headless Chromium is needed; install it (Debian: apt-get install chromium)")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        page = analyze(AnalyzeConfig(runs_dir=_demo_like_runs(tmp), out=tmp / "report", n_boot=200, seed=0))
        shot = tmp / "shot.png"
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--user-data-dir={tmp / 'profile'}", f"--screenshot={shot}", "--window-size=1400,900",
                        page.as_uri()], check=True, capture_output=True, timeout=120)
        info = PngImagePlugin.PngInfo()
        info.add_text(KEY, source_digest())
        Image.open(shot).convert("RGB").quantize(colors=64).save(out, optimize=True, pnginfo=info)
    print(out, out.stat().st_size, "bytes")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("report.png"))
