"""docs/report.png shows the report as the code draws it now: the picture records a digest of the
report code (docs/screenshot.py ``SOURCES``), and a change to that code without regenerating it fails."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[2]


def _screenshot_module():
    spec = importlib.util.spec_from_file_location("docs_screenshot", ROOT / "docs" / "screenshot.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_docs_report_png_is_regenerated_after_the_report_code_changes():
    shot = _screenshot_module()
    with Image.open(ROOT / "docs" / "report.png") as im:
        recorded = im.info.get(shot.KEY)
    assert recorded == shot.source_digest(), (
        "docs/report.png is stale: the report code changed since it was drawn; run "
        "`.venv/bin/python docs/screenshot.py` (needs chromium) and commit docs/report.png")
    assert all((ROOT / name).is_file() for name in shot.SOURCES)
