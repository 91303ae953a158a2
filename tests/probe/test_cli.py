"""`cxrfair probe ...` end to end on tiny caches, and every bad input as one clean error line."""

from __future__ import annotations

import subprocess
import sys

import h5py
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from cxrfair.core.runs import read_runs
from cxrfair.cli import main
from cxrfair.extract.cache import read_cache
from tests.probe.synth import make_cache

# The paper's recipe, cut short; and the default solver, cut short.
FAST = ["--solver", "adamw", "--no-standardize", "--epochs", "3", "--batch-size", "16", "--seeds", "2", "--lr", "1e-3,1e-2",
        "--weight-decay", "0,0.1"]
LBFGS = ["--seeds", "2", "--l2", "1e-3,1e-1", "--max-iter", "20"]


def _cli(*args):
    return CliRunner().invoke(main, ["probe", *map(str, args)])


@pytest.fixture()
def cache(tmp_path):
    return make_cache(tmp_path / "c.h5")[0]


def test_import_does_not_load_torch():
    code = "import sys, cxrfair.probe, cxrfair.probe.cli; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_linear_writes_a_run_per_seed_and_the_sweep_table(tmp_path, cache):
    res = _cli("linear", "--cache", cache, "--out", tmp_path / "runs", *FAST)
    assert res.exit_code == 0, res.output
    runs = read_runs(tmp_path / "runs")
    assert [r.run_id for r in runs] == ["tiny-clip__linear__best__s0", "tiny-clip__linear__best__s1"]
    meta = runs[0].meta
    assert meta["trainable_params"] == 16 * 6 + 6 and 1 <= meta["selected_epoch"] <= 3
    assert len(meta["curves"]["train_loss"]) == len(meta["curves"]["val_loss"]) == 3
    assert meta["hyperparameters"]["lr"] in (1e-3, 1e-2) and meta["hyperparameters"]["epochs"] == 3
    assert meta["solver"] == "adamw" and meta["standardize"] is False and "standardization" not in meta
    assert set(runs[0].predictions["split"]) == {"val", "test"}
    table = pd.read_csv(tmp_path / "runs" / "tiny-clip__linear__sweep.csv")
    assert len(table) == 4 * 2 and table["selected"].sum() == 2
    # Rerunning refuses to overwrite; --force replaces.
    again = _cli("linear", "--cache", cache, "--out", tmp_path / "runs", *FAST)
    assert again.exit_code == 1 and "--force" in again.output
    assert _cli("linear", "--cache", cache, "--out", tmp_path / "runs", *FAST, "--force").exit_code == 0


def test_mlp_and_zeroshot_commands(tmp_path, cache):
    res = _cli("mlp", "--cache", cache, "--out", tmp_path / "runs", *FAST, "--hidden", "4,8")
    assert res.exit_code == 0, res.output
    assert _cli("zeroshot", "--cache", cache, "--out", tmp_path / "runs").exit_code == 0
    runs = {r.run_id: r for r in read_runs(tmp_path / "runs")}
    hyper = runs["tiny-clip__mlp__best__s0"].meta["hyperparameters"]
    hidden = hyper["hidden"]
    assert hyper["architecture"] == "mlp+skip" and "W0 x" in hyper["forward"]
    # The skip MLP: the hidden layer, the output layer and the skip weight W0 (16 x 6).
    assert runs["tiny-clip__mlp__best__s0"].meta["trainable_params"] == 16 * hidden + hidden + hidden * 6 + 6 + 16 * 6
    assert any(r.method == "zeroshot" for r in runs.values())


def test_mlp_architecture_l2_skip_and_stopping_rule_reach_run_json(tmp_path, cache):
    skip = _cli("mlp", "--cache", cache, "--out", tmp_path / "skip", *LBFGS, "--hidden", "4", "--l2-skip", "1e-4,1e-2",
                "--ftol", "1e-3")
    assert skip.exit_code == 0, skip.output
    meta = read_runs(tmp_path / "skip")[0].meta
    hyper = meta["hyperparameters"]
    assert hyper["architecture"] == "mlp+skip" and hyper["grid"]["l2_skip"] == [1e-4, 1e-2] and hyper["ftol"] == 1e-3
    # The validation loss every val_every iterations and at the last, null between (JSON null, not NaN).
    val, n, every = meta["curves"]["val_loss"], max(hyper["iterations"], 1), hyper["val_every"]
    assert every == 10 and len(val) == len(meta["curves"]["train_loss"]) == n
    assert [v is not None for v in val] == [(i % every == 0) or i == n for i in range(1, n + 1)]
    assert all(np.isfinite(v) for v in val if v is not None)
    assert "1e-3" in hyper["stopping"].replace("0.001", "1e-3") and "l2_skip" in hyper["objective"]
    assert len(pd.read_csv(tmp_path / "skip" / "tiny-clip__mlp__sweep.csv")) == 2 * 2 * 2  # l2 x l2_skip x seeds
    bad = _cli("mlp", "--cache", cache, "--out", tmp_path / "bad", *LBFGS, "--architecture", "plain", "--l2-skip", "1e-3")
    assert bad.exit_code == 1 and "--l2-skip: only for the skip MLP" in bad.output and not (tmp_path / "bad").exists()


def test_default_solver_is_lbfgs_on_standardised_features(tmp_path, cache):
    res = _cli("linear", "--cache", cache, "--out", tmp_path / "runs", *LBFGS)
    assert res.exit_code == 0, res.output
    meta = read_runs(tmp_path / "runs")[0].meta
    assert meta["solver"] == "lbfgs" and meta["standardize"] is True and meta["selected_epoch"] is None
    hyper = meta["hyperparameters"]
    assert hyper["l2"] in (1e-3, 1e-1) and 1 <= hyper["iterations"] <= 20 and hyper["grid"] == {"l2": [1e-3, 1e-1]}
    assert len(meta["curves"]["val_loss"]) == max(hyper["iterations"], 1)
    # The training split's statistics, stored with the run.
    x = read_cache(cache)
    train = x.image_embeddings[x.split_mask("train")]
    np.testing.assert_allclose(meta["standardization"]["mean"], train.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(meta["standardization"]["std"], train.std(0), rtol=1e-5)
    table = pd.read_csv(tmp_path / "runs" / "tiny-clip__linear__sweep.csv")
    assert table["best_epoch"].isna().all() and (table["iterations"] >= 1).all() and table["lr"].isna().all()


def test_l2_grid_defaults_mirror_the_library():
    from cxrfair.probe import cli
    from cxrfair.probe.sweep import FTOL, L2_GRIDS, L2_SKIP_GRID, MAX_ITER

    assert cli.L2_GRIDS == L2_GRIDS and cli.L2_SKIP_GRID == L2_SKIP_GRID and cli.FTOL == FTOL and cli.MAX_ITER == MAX_ITER


def _partial(tmp_path):
    path = make_cache(tmp_path / "partial.h5")[0]
    with h5py.File(path, "a") as f:
        del f.attrs["complete"]
    return path


def _foreign(tmp_path):
    path = tmp_path / "foreign.h5"
    path.write_bytes(b"not an hdf5 file at all")
    return path


@pytest.mark.parametrize("command", ["linear", "zeroshot"])
@pytest.mark.parametrize("case, make, extra, words", [
    ("partial", _partial, [], "incomplete"),
    ("foreign", _foreign, [], "not a readable HDF5"),
    ("missing", lambda p: p / "nope.h5", [], "no such file"),
    ("nan", lambda p: make_cache(p / "nan.h5", nan_rows=3)[0], [], "NaN"),
    ("other cohort", lambda p: make_cache(p / "other.h5", cohort_hash="f" * 64)[0], [], "cohort"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, cache, command, case, make, extra, words):
    _assert_clean_failure(tmp_path, cache, command, make, extra, words)


@pytest.mark.parametrize("command, extra, words", [
    ("linear", ["--lr", ""], "--lr: the grid is empty"),
    ("linear", ["--seeds", "0"], "--seeds '0': expected a count (3 = seeds 0,1,2) or a comma list"),
    ("linear", ["--seeds", "1,1"], "--seeds '1,1': list each seed once"),
    ("mlp", ["--hidden", ""], "--hidden: the grid is empty"),
    ("mlp", ["--hidden", "12.5"], "--hidden '12.5': expected comma-separated whole numbers"),
    ("mlp", ["--hidden", "0"], "--hidden: hidden widths must be whole numbers >= 1"),
    ("linear", ["--lr", "fast"], "--lr 'fast'"),
    ("linear", ["--solver", "lbfgs", "--l2", "-1"], "--l2: L2 penalties must be numbers >= 0"),
    ("linear", ["--solver", "lbfgs", "--max-iter", "0"], "--max-iter: must be >= 1"),
])
def test_bad_grid_is_one_line_and_writes_nothing(tmp_path, cache, command, extra, words):
    _assert_clean_failure(tmp_path, cache, command, lambda p: cache, extra, words)


def _assert_clean_failure(tmp_path, cache, command, make, extra, words):
    runs = tmp_path / "runs"
    assert _cli("zeroshot", "--cache", cache, "--out", runs).exit_code == 0  # existing runs of cohort c0ffee...
    before = sorted(p.name for p in runs.iterdir())
    base = [] if command == "zeroshot" else LBFGS if "lbfgs" in extra else FAST
    res = _cli(command, "--cache", make(tmp_path), "--out", runs, *base, *extra)
    assert res.exit_code == 1, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and words in lines[0], res.output
    assert "Traceback" not in res.output
    assert sorted(p.name for p in runs.iterdir()) == before


@pytest.mark.parametrize("extra, words", [
    # The default solver is L-BFGS: each AdamW option would be ignored.
    (["--lr", "1e-3"], "--lr: only with --solver adamw; this sweep uses lbfgs (its options: --l2, --max-iter, "
                       "--l2-skip, --ftol, --warm-start), which would ignore it"),
    (["--weight-decay", "0"], "--weight-decay: only with --solver adamw"),
    (["--epochs", "5"], "--epochs: only with --solver adamw"),
    (["--batch-size", "32"], "--batch-size: only with --solver adamw"),
    (["--lr", "1e-3", "--weight-decay", "0", "--epochs", "5"],  # the command: all three named
     "--lr, --weight-decay, --epochs: only with --solver adamw; this sweep uses lbfgs"),
    (["--solver", "adamw", "--l2", "1e-3"], "--l2: only with --solver lbfgs; this sweep uses adamw"),
    (["--solver", "adamw", "--max-iter", "10"], "--max-iter: only with --solver lbfgs"),
    (["--solver", "adamw", "--ftol", "0"], "--ftol: only with --solver lbfgs"),
    (["--solver", "adamw", "--cold-start"], "--warm-start: only with --solver lbfgs"),
    (["--memory-budget", "512"], "--memory-budget: only with --solver adamw"),  # L-BFGS: one lane per device
    (["--mitigation", "reweight", "--sensitive", "sex", "--adversary", "projection"],
     "--adversary: only with --mitigation adversarial, not reweight; drop it"),
    (["--adversary", "grl"], "--adversary: only with --mitigation adversarial, not erm"),
])
def test_an_option_the_sweep_would_ignore_is_refused(tmp_path, cache, extra, words):
    res = _cli("linear", "--cache", cache, "--out", tmp_path / "runs", "--seeds", "1", *extra)
    assert res.exit_code == 1 and res.output.startswith("Error: ") and words in res.output, res.output
    assert not (tmp_path / "runs").exists()


def test_options_left_to_their_defaults_are_not_refused():
    """The refusal is of what the user gave: a config with both solvers' values (cxrfair run's [probe]) validates."""
    from cxrfair.probe.sweep import SweepConfig

    cfg = SweepConfig(lrs=(1e-3,), weight_decays=(0.0,), epochs=5, l2s=(1e-3,), adversary="projection")
    assert cfg.validate().solver == "lbfgs"
    with pytest.raises(Exception, match="--epochs: only with --solver adamw"):
        cfg.validate(given=["--epochs"])
