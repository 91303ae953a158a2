"""Atomic writes: all or nothing, and readable by others once published."""

import os
import stat

import pytest

from cxrfair.errors import CxrfairError
from cxrfair.io import atomic_dir, atomic_path, write_json_atomic


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.txt"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_refuses_existing_without_force_and_replaces_with(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(CxrfairError, match="--force"):
        with atomic_dir(target):
            pass
    with atomic_dir(target, force=True, writes=("a", "b")) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["b"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_published_outputs_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "x.json", {"a": 1})
        with atomic_dir(tmp_path / "d"):
            pass
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "x.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755


# ---------------------------------------------------------------- --force deletes only what the command wrote


def test_force_refuses_an_out_that_is_or_holds_an_input(tmp_path):
    data = tmp_path / "D"
    data.mkdir()
    (data / "meta.csv").write_text("x\n")
    for out, word in ((data, "is the input"), (tmp_path, "holds the input")):
        with pytest.raises(CxrfairError, match=word) as e:
            with atomic_dir(out, force=True, inputs=(data / "meta.csv", data)):
                pass
        assert "\n" not in str(e.value) and "--out" in str(e.value)
    assert (data / "meta.csv").read_text() == "x\n"  # nothing deleted
    # An output inside an input folder is fine (it replaces only itself).
    with atomic_dir(data / "cohort", force=True, inputs=(data,)) as tmp:
        (tmp / "a").write_text("1")
    assert (data / "meta.csv").exists() and (data / "cohort" / "a").exists()


def test_force_refuses_foreign_entries_declared_up_front(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "cohort.csv").write_text("old")
    (out / "thesis.docx").write_text("mine")
    with pytest.raises(CxrfairError, match=r"1 entry this command did not write \(thesis.docx\)"):
        with atomic_dir(out, force=True, writes=("cohort.csv", "cohort.json")):
            raise AssertionError("the refusal must come before any work")
    assert (out / "thesis.docx").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp left


def test_force_refuses_foreign_entries_at_the_end_without_declared_writes(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "a").write_text("old")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(CxrfairError, match=r"notes.txt"):
        with atomic_dir(out, force=True) as tmp:
            (tmp / "a").write_text("new")
    assert (out / "a").read_text() == "old" and (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_force_replaces_an_older_output_holding_only_the_commands_names(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "shortcut.csv").write_text("from an older run")  # declared, though this run does not write it
    (out / "images_001").mkdir()
    with atomic_dir(out, force=True, writes=("images_*", "shortcut.csv", "a")) as tmp:
        (tmp / "a").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["a"]
    # Without declared names, an old folder holding only names the new output writes is replaced.
    with atomic_dir(out, force=True) as tmp:
        (tmp / "a").write_text("newer")
    assert (out / "a").read_text() == "newer"
