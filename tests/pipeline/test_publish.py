"""Replacing a family of runs: what a family owns, the swap, and a swap killed at every rename."""

import json
import os
from pathlib import Path

import pytest

from cxrfair.core.runs import RunKey
from cxrfair.errors import CxrfairError
from cxrfair.publish import JOURNAL, Family, finish_interrupted, open_staging, publish

LINEAR = Family.of([RunKey("tiny-clip", "linear", "best", 0)])
# Entries of a runs folder that the tiny-clip linear family must never touch.
FOREIGN_DIRS = ["tiny-clip__linear+groupdro-sex__best__s0", "tiny-clip__mlp__best__s0", "tiny-clip-v2__linear__best__s0",
                "tiny-clip__zeroshot__clip-d0__s0", "tiny-clip__linear__notes", ".tiny-clip__linear__best__s1.work"]
FOREIGN_FILES = ["tiny-clip__linear+groupdro-sex__sweep.csv", "tiny-clip__mlp__sweep.csv", "notes.txt",
                 "tiny-clip__linear__best__s0.bak"]


def _entry(folder: Path, name: str, text: str, is_dir: bool = True) -> None:
    if is_dir:
        (folder / name).mkdir(parents=True)
        (folder / name / "run.json").write_text(text)
    else:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)


def _runs_with_old_family(tmp_path: Path) -> Path:
    runs = tmp_path / "runs"
    for name in ["tiny-clip__linear__best__s0", "tiny-clip__linear__best__s1", "tiny-clip__linear__best__s2"]:
        _entry(runs, name, "old")
    _entry(runs, "tiny-clip__linear__sweep.csv", "old", is_dir=False)
    for name in FOREIGN_DIRS:
        _entry(runs, name, "foreign")
    for name in FOREIGN_FILES:
        _entry(runs, name, "foreign", is_dir=False)
    return runs


def _staging_with_new_family(tmp_path: Path) -> Path:
    staging = open_staging(tmp_path / ".staging" / "linear-tiny-clip", "fp-new")
    for name in ["tiny-clip__linear__best__s0", "tiny-clip__linear__best__s1"]:  # one seed fewer than before
        _entry(staging, name, "new")
    _entry(staging, "tiny-clip__linear__sweep.csv", "new", is_dir=False)
    (staging / ".tiny-clip__linear__best__s1.work").mkdir()  # work files stay behind
    return staging


def _snapshot(runs: Path) -> dict:
    return {p.name: (p / "run.json").read_text() if p.is_dir() and (p / "run.json").exists() else
            (p.read_text() if p.is_file() else "dir") for p in runs.iterdir()}


NEW = {"tiny-clip__linear__best__s0": "new", "tiny-clip__linear__best__s1": "new", "tiny-clip__linear__sweep.csv": "new"}
OLD = {"tiny-clip__linear__best__s0": "old", "tiny-clip__linear__best__s1": "old", "tiny-clip__linear__best__s2": "old",
       "tiny-clip__linear__sweep.csv": "old"}
FOREIGN = {name: "foreign" for name in FOREIGN_DIRS + FOREIGN_FILES}


def test_a_family_owns_its_run_folders_and_sweep_file_only(tmp_path):
    runs = _runs_with_old_family(tmp_path)
    assert [p.name for p in LINEAR.entries(runs)] == sorted(OLD)
    assert LINEAR.files == {"tiny-clip__linear__sweep.csv"}
    mitigated = Family.of([RunKey("tiny-clip", "linear", "best", 0, mitigation="groupdro", sensitive="sex")])
    assert [p.name for p in mitigated.entries(runs)] == ["tiny-clip__linear+groupdro-sex__best__s0",
                                                          "tiny-clip__linear+groupdro-sex__sweep.csv"]


def test_publish_swaps_the_family_and_leaves_everything_else(tmp_path):
    runs = _runs_with_old_family(tmp_path)
    staging = _staging_with_new_family(tmp_path)
    produced = publish(staging, runs, LINEAR)
    assert _snapshot(runs) == NEW | FOREIGN
    assert sorted(p.name for p in produced) == sorted(NEW) and all(p.parent == runs for p in produced)
    assert not (tmp_path / ".staging").exists() or not any((tmp_path / ".staging").iterdir())


def test_publish_into_a_missing_runs_folder(tmp_path):
    staging = _staging_with_new_family(tmp_path)
    publish(staging, tmp_path / "runs", LINEAR)
    assert _snapshot(tmp_path / "runs") == NEW


def test_publish_of_nothing_replaces_nothing(tmp_path):
    runs = _runs_with_old_family(tmp_path)
    staging = open_staging(tmp_path / ".staging" / "linear-tiny-clip", "fp")
    _entry(staging, "tiny-clip__mlp__best__s0", "new")  # another family's run: not this step's to publish
    with pytest.raises(CxrfairError, match="wrote no runs of tiny-clip__linear"):
        publish(staging, runs, LINEAR)
    assert _snapshot(runs) == OLD | FOREIGN


def test_staging_keeps_work_of_the_same_settings_only(tmp_path):
    staging = open_staging(tmp_path / "s", "fp1")
    (staging / ".ckpt").write_text("epoch 3")
    assert (open_staging(tmp_path / "s", "fp1") / ".ckpt").is_file()  # same settings: resume
    assert not (open_staging(tmp_path / "s", "fp2") / ".ckpt").exists()  # other settings: start clean


class Killed(BaseException):
    """Stands in for SIGKILL: nothing after it runs (not even `except Exception`)."""


def _count_renames(tmp_path: Path) -> int:
    calls = []
    real = os.replace

    def counting(*args):
        calls.append(args)
        return real(*args)

    runs, staging = _runs_with_old_family(tmp_path / "count"), _staging_with_new_family(tmp_path / "count")
    os.replace = counting
    try:
        publish(staging, runs, LINEAR)
    finally:
        os.replace = real
    return len(calls)


def test_a_swap_killed_at_any_rename_ends_with_the_old_or_the_new_family_never_a_mix(tmp_path, monkeypatch):
    total = _count_renames(tmp_path)
    assert total >= 8  # journal, 4 old out, journal, 3 new in, discard
    real = os.replace
    for k in range(total):
        root = tmp_path / f"kill{k}"
        runs, staging = _runs_with_old_family(root), _staging_with_new_family(root)
        calls = []

        def dying(*args, calls=calls):
            if len(calls) == k:
                raise Killed
            calls.append(args)
            return real(*args)

        monkeypatch.setattr(os, "replace", dying)
        with pytest.raises(Killed):
            publish(staging, runs, LINEAR)
        monkeypatch.setattr(os, "replace", real)
        journaled = (staging / JOURNAL).is_file()
        finish_interrupted(root / ".staging")  # what the next `cxrfair run` does first
        assert _snapshot(runs) == (NEW if journaled else OLD) | FOREIGN, k
        assert not any((root / ".staging").glob(f"*/{JOURNAL}"))
        assert not any(p.name.endswith(".trash") for p in (root / ".staging").iterdir())


def test_finish_interrupted_reports_what_it_finished(tmp_path):
    runs = _runs_with_old_family(tmp_path)
    staging = _staging_with_new_family(tmp_path)
    (staging / JOURNAL).write_text(json.dumps({"runs": str(runs), "phase": "out", "names": sorted(NEW),
                                               "families": ["tiny-clip__linear"], "files": ["tiny-clip__linear__sweep.csv"]}))
    assert finish_interrupted(tmp_path / ".staging") == ["tiny-clip__linear"]
    assert _snapshot(runs) == NEW | FOREIGN
    assert finish_interrupted(tmp_path / ".staging") == []
