"""A plain (non-editable) install ships every stage, the vendored data and the console script."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    build = tmp_path_factory.mktemp("build")
    # --no-build-isolation: use the venv's setuptools, so the test needs no network.
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(REPO)],
                   check=True, capture_output=True, cwd=build)
    (found,) = out.glob("cxrfair-*.whl")
    return found


def test_wheel_maps_the_stage_folders_into_one_package(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in ["cxrfair/cli.py", "cxrfair/extract/cohort.py", "cxrfair/extract/models/openclip.py",
                   "cxrfair/probe/train.py", "cxrfair/finetune/train.py", "cxrfair/core/metrics.py",
                   "cxrfair/extract/data/Data_Entry_2017_v2020.csv.gz", "cxrfair/extract/data/prompts.json"]:
        assert module in names
    assert not any(n.startswith(("analysis/", "probe/", "extract/", "tests/")) for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "cxrfair = cxrfair.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_installed_copy_imports_and_finds_its_data(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    code = ("import cxrfair, cxrfair.extract.cohort as c; print(cxrfair.__file__); "
            "print(c.vendored_metadata().is_file())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path,
                         env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}).stdout.split()
    assert out[0].startswith(str(target)) and out[1] == "True"
