"""Regenerate docs/report.png: a report of synthetic runs (two models x five methods x two seeds)
opened in headless Chromium, the first screen, 64 colours (small enough for the README).

    .venv/bin/python docs/screenshot.py [OUT_PNG]
"""

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cxrfair.analysis.analyze import AnalyzeConfig, analyze  # noqa: E402
from tests.analysis.synth import write_runs  # noqa: E402


def main(out: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        grid = [(m, me, s) for m in ("tiny-clip", "tiny-gloria") for me in ("zeroshot", "linear", "mlp", "lora", "full")
                for s in (0, 1)]
        write_runs(tmp / "runs", grid, n_per_split=60)
        page = analyze(AnalyzeConfig(runs_dir=tmp / "runs", out=tmp / "report", n_boot=200, seed=0))
        shot = tmp / "shot.png"
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--user-data-dir={tmp / 'profile'}", f"--screenshot={shot}", "--window-size=1280,860",
                        page.as_uri()], check=True, capture_output=True, timeout=120)
        Image.open(shot).convert("RGB").quantize(colors=64).save(out, optimize=True)
    print(out, out.stat().st_size, "bytes")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("report.png"))
