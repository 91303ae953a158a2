"""Nothing lost, ever: --force deletes only what the command wrote; OS errors, refused pickles and
mismatched weight files end in one line; Ctrl-C exits 130 and is never swallowed.

One test per case of the reliability issue, each through the console entry point.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from cxrfair.cli import main, os_error_line
from cxrfair.errors import CxrfairError
from cxrfair.io import atomic_dir, library_write_errors

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args):
    return CliRunner().invoke(main, [*map(str, args)])


def _one_line_error(res, *words):
    """A clean failure: exit 1, one ``Error:`` line holding ``words``, no traceback."""
    assert res.exit_code == 1, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    lines = [line for line in res.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and "Traceback" not in res.output, res.output
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def nih(tmp_path_factory):
    """A small synthetic NIH folder D (images + Data_Entry_2017.csv)."""
    d = tmp_path_factory.mktemp("nih") / "D"
    res = _cli("cohort", "synth", "--out", d, "--size", "32", "--per-cell", "50")
    assert res.exit_code == 0, res.output
    return d


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*")}


# ---------------------------------------------------------------- --force deletes only what the command wrote


def test_cohort_build_force_into_its_own_input_folder_deletes_nothing(nih):
    before = _snapshot(nih)
    images = sum(1 for p in nih.rglob("*.png"))
    res = _cli("cohort", "build", "--metadata", nih / "Data_Entry_2017.csv", "--images", nih, "--out", nih, "--force")
    _one_line_error(res, f"--out {nih}", "is the input", "choose another --out")
    assert _snapshot(nih) == before and images > 0
    # --out above the input: the same refusal ("holds").
    res = _cli("cohort", "build", "--metadata", nih / "Data_Entry_2017.csv", "--images", nih, "--out", nih.parent, "--force")
    _one_line_error(res, "holds the input")
    assert _snapshot(nih) == before


@pytest.mark.parametrize("command", ["synth", "build"])
def test_cohort_force_keeps_a_users_file(nih, tmp_path, command):
    out = tmp_path / "F"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    args = ["--out", out, "--force", "--size", "32", "--per-cell", "50"] if command == "synth" else \
        ["--metadata", nih / "Data_Entry_2017.csv", "--images", nih, "--out", out, "--force"]
    res = _cli("cohort", command, *args)
    _one_line_error(res, f"--out {out}", "did not write (notes.txt)", "--force would delete")
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["F"]  # no temp folder left


def test_cohort_force_replaces_its_own_output(nih, tmp_path):
    args = ["cohort", "build", "--metadata", nih / "Data_Entry_2017.csv", "--images", nih, "--out", tmp_path / "C"]
    assert _cli(*args).exit_code == 0
    assert _cli(*args, "--force").exit_code == 0
    assert sorted(p.name for p in (tmp_path / "C").iterdir()) == ["cohort.csv", "cohort.json"]


def test_leakage_force_into_the_folder_of_its_cache_keeps_the_cache(tmp_path):
    from tests.probe.embedding_synth import make_cache

    cache = make_cache(tmp_path / "X" / "cache.h5")[0]
    size = Path(cache).stat().st_size
    res = _cli("embeddings", "leakage", "--cache", cache, "--out", tmp_path / "X", "--force", "--probes", "knn")
    _one_line_error(res, "holds the input", "cache.h5")
    assert Path(cache).stat().st_size == size
    # A foreign file in an old leakage folder is refused before any work, too.
    (tmp_path / "L").mkdir()
    (tmp_path / "L" / "leakage.csv").write_text("old")
    (tmp_path / "L" / "paper.tex").write_text("mine")
    res = _cli("embeddings", "leakage", "--cache", cache, "--out", tmp_path / "L", "--force", "--probes", "knn")
    _one_line_error(res, "paper.tex")
    assert (tmp_path / "L" / "paper.tex").exists()


def test_geometry_and_analyze_refuse_an_out_holding_their_input(tmp_path):
    from tests.probe.embedding_synth import make_cache

    cache = make_cache(tmp_path / "X" / "cache.h5")[0]
    res = _cli("embeddings", "geometry", "--cache", cache, "--out", tmp_path / "X", "--force")
    _one_line_error(res, "holds the input")
    (tmp_path / "runs").mkdir()
    res = _cli("analyze", tmp_path / "runs", "--out", tmp_path, "--force")
    _one_line_error(res, "runs")
    assert Path(cache).exists()


def test_run_folder_force_keeps_foreign_entries(tmp_path):
    from cxrfair.core.runs import write_run
    from tests.pipeline.test_pipeline import CLASSES

    import numpy as np
    from cxrfair.core.runs import make_predictions

    rows = pd.DataFrame({"image_id": ["a", "b", "c", "d"], "patient_id": [1, 2, 3, 4], "split": ["val", "val", "test", "test"],
                         "label": CLASSES * 2, "sex": ["M", "F"] * 2, "age": [30, 70, 30, 70], "age_group": ["young", "old"] * 2})
    meta = {"run_id": "m__linear__best__s0", "model": "m", "method": "linear", "seed": 0, "classes": CLASSES,
            "cohort_hash": "c0", "hyperparameters": {}, "selected_epoch": 1, "trainable_params": 0, "timings": {}}
    preds = make_predictions(rows, np.full((4, 2), 0.5), CLASSES)
    run = write_run(tmp_path, meta, preds)
    write_run(tmp_path, meta, preds, force=True)  # its own files: replaced
    (run / "my_plot.png").write_text("mine")
    with pytest.raises(CxrfairError, match="my_plot.png"):
        write_run(tmp_path, meta, preds, force=True)
    assert (run / "my_plot.png").exists()


# ---------------------------------------------------------------- OS errors: one line naming the file and the fix


@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "disk full; free space or choose another --out"),
                                         (errno.EROFS, "read-only file system"),
                                         (errno.EACCES, "permission denied"),
                                         (errno.EDQUOT, "disk quota exceeded")])
def test_os_errors_in_cohort_build_are_one_line(nih, tmp_path, monkeypatch, code, words):
    def full(self, *a, **k):
        raise OSError(code, os.strerror(code))  # a failed write() names no file

    monkeypatch.setattr(Path, "write_text", full)
    res = _cli("cohort", "build", "--metadata", nih / "Data_Entry_2017.csv", "--images", nih, "--out", tmp_path / "C")
    _one_line_error(res, str(tmp_path / "C"), words)
    assert list(tmp_path.iterdir()) == []  # nothing half-written


@pytest.mark.slow  # four commands, JAX start-up: ~15 s
def test_disk_full_in_probe_leakage_analyze_and_postprocess_is_one_line(tmp_path, monkeypatch):
    from tests.probe.embedding_synth import make_cache as leakage_cache
    from tests.probe.synth import make_cache

    cache = make_cache(tmp_path / "c.h5")[0]
    lcache = leakage_cache(tmp_path / "l.h5")[0]
    probe = ["probe", "linear", "--cache", cache, "--solver", "adamw", "--epochs", "2", "--seeds", "1", "--lr", "1e-2",
             "--weight-decay", "0"]
    assert _cli(*probe, "--out", tmp_path / "runs").exit_code == 0
    run = tmp_path / "runs" / "tiny-clip__linear__best__s0"

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_csv", full)
    for out, args in [("runs2", probe),
                      ("leak", ["embeddings", "leakage", "--cache", lcache, "--probes", "knn", "--permutations", "2",
                                "--bootstrap", "100"]),
                      ("report", ["analyze", tmp_path / "runs", "--bootstrap", "100"]),
                      ("pp", ["postprocess", run, "--sensitive", "sex"])]:
        res = _cli(*args, "--out", tmp_path / out)
        _one_line_error(res, str(tmp_path / out), "disk full; free space or choose another --out")
        assert not (tmp_path / out).exists() or not any((tmp_path / out).iterdir()), out
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp left


def test_torch_save_on_a_full_disk_is_an_os_error_not_basic_ios(tmp_path, monkeypatch):
    """torch.save reports a full disk as RuntimeError('basic_ios::clear ...'); the finetune writers say what it is."""
    import torch

    from cxrfair.finetune import checkpoint

    def full(obj, f, *a, **k):
        raise RuntimeError("basic_ios::clear: iostream error")

    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr(checkpoint.torch, "save", full)
    monkeypatch.setattr("shutil.disk_usage", lambda p: type("U", (), {"free": 0})())

    class State:
        model = torch.nn.Linear(2, 2)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1)
        epoch = best_epoch = 1
        best_val, best_state, curves, epoch_seconds, wait_seconds, images_seen, objective = 0.0, None, {}, [], [], 0, None

    with pytest.raises(CxrfairError, match=r"ckpt.pt: writing failed \(disk full\); free space or choose another --out"):
        checkpoint.save_checkpoint(tmp_path / "ckpt.pt", State(), {}, [{}])
    assert list(tmp_path.iterdir()) == []
    # Anything else a library raises keeps its traceback (a bug, not the disk).
    with pytest.raises(RuntimeError, match="shape"):
        with library_write_errors(tmp_path / "w"):
            raise RuntimeError("shape mismatch")


def test_os_error_line_names_the_file():
    assert os_error_line(OSError(errno.ENOSPC, "No space", "/x/y.csv")) == "/x/y.csv: disk full; free space or choose another --out"
    assert os_error_line(OSError(errno.ENOENT, "No such file", "/x")) is None  # not one of ours: traceback kept


def test_atomic_dir_names_its_output_on_a_nameless_os_error(tmp_path):
    with pytest.raises(OSError) as e:
        with atomic_dir(tmp_path / "out"):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert e.value.filename == str(tmp_path / "out")


# ---------------------------------------------------------------- weights: refused pickles, wrong keys, text


@pytest.fixture(scope="module")
def bad_weights(tmp_path_factory):
    import torch

    d = tmp_path_factory.mktemp("weights")

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo PWNED",))

    torch.save({"a": Evil()}, d / "evil.pt")
    (d / "text.pt").write_text("<html>not weights</html>\n")
    torch.save({"foo.weight": torch.zeros(2)}, d / "wrongkeys.pt")
    return d


@pytest.mark.parametrize("model", ["tiny-clip", "tiny-chexzero"])
@pytest.mark.parametrize("name, words", [("evil.pt", "refusing to load"), ("text.pt", "not a readable"),
                                         ("wrongkeys.pt", "do not match the model")])
def test_bad_weight_files_are_one_line(bad_weights, nih, tmp_path, model, name, words):
    cohort = tmp_path / "C"
    assert _cli("cohort", "build", "--metadata", nih / "Data_Entry_2017.csv", "--images", nih, "--out", cohort).exit_code == 0
    res = _cli("extract", "--model", model, "--cohort", cohort, "--out", tmp_path / "cache", "--weights",
               bad_weights / name, "--device", "cpu")
    line = _one_line_error(res, name, words)
    assert "PWNED" not in res.output and len(line) < 600


# ---------------------------------------------------------------- options


def test_analyze_seed_must_be_non_negative(tmp_path):
    (tmp_path / "runs").mkdir()
    res = _cli("analyze", tmp_path / "runs", "--out", tmp_path / "r", "--seed", "-1")
    assert res.exit_code == 2 and "--seed" in res.output and "Traceback" not in res.output


# ---------------------------------------------------------------- Ctrl-C: exit 130, cleanly, never swallowed

NAP = '''
import gc, sys, time
import click
from cxrfair.io import atomic_dir

@click.command()
@click.argument("out")
@click.option("--gc-heavy", is_flag=True)
def nap(out, gc_heavy):
    if gc_heavy:  # most of the time inside a gc callback, where Python swallows exceptions
        def busy(phase, info):
            x = 0
            for i in range(3000):
                x += i
        gc.callbacks.append(busy)
    with atomic_dir(out) as tmp:
        (tmp / "part").write_text("half")
        print("started", flush=True)
        end = time.time() + 30  # long enough that 'finished' means the Ctrl-C was lost, even on a loaded machine
        while time.time() < end:
            if gc_heavy:
                gc.collect()
                sum(i for i in range(3000))
            else:
                time.sleep(0.01)
    print("finished", flush=True)
'''


def _interrupt(tmp_path, *args, delay=0.5):
    (tmp_path / "napmod.py").write_text(textwrap.dedent(NAP))
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from cxrfair import cli; "
            "cli.COMMANDS['nap'] = ('napmod:nap', 'sleep'); sys.argv = ['cxrfair'] + sys.argv[2:]; cli.main()")
    p = subprocess.Popen([sys.executable, "-c", code, str(tmp_path), "nap", str(tmp_path / "out"), *args],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "started"
    time.sleep(delay)
    t0 = time.time()
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=30)
    return p.returncode, out, err, time.time() - t0


def test_ctrl_c_exits_130_and_leaves_no_temp(tmp_path):
    rc, out, err, seconds = _interrupt(tmp_path)
    assert rc == 130, err
    assert "Interrupted" in err and "Aborted!" not in err and "Traceback" not in err and "finished" not in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["napmod.py"]  # the half-written output is gone
    assert seconds < 25  # stopped at the Ctrl-C, not at the nap's end (no speed claim: a loaded CI is slow)


def test_ctrl_c_inside_a_gc_callback_is_not_swallowed(tmp_path):
    rc, out, err, seconds = _interrupt(tmp_path, "--gc-heavy")
    assert rc == 130, err
    assert "finished" not in out and seconds < 25, (out, err, seconds)  # stopped, not run to the end
    assert sorted(p.name for p in tmp_path.iterdir()) == ["napmod.py"]


@pytest.mark.slow
def test_ctrl_c_during_a_probe_sweep_exits_130(tmp_path):
    from tests.probe.synth import make_cache

    cache = make_cache(tmp_path / "c.h5")[0]
    p = subprocess.Popen([str(Path(sys.executable).parent / "cxrfair"), "probe", "linear", "--cache", str(cache), "--out",
                          str(tmp_path / "runs"), "--solver", "adamw", "--epochs", "30000", "--seeds", "5",
                          "--lr", "1e-3,1e-2,1e-1", "--weight-decay", "0,0.1"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    time.sleep(15)  # imports, JAX start-up and into the sweep (which runs for minutes uninterrupted)
    assert p.poll() is None, p.communicate()
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, err[-2000:]
    assert "Aborted!" not in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists() or not [q for q in (tmp_path / "runs").iterdir() if q.name.endswith(".tmp")]
