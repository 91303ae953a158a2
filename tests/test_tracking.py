"""Experiment tracking (``cxrfair.tracking``, ``--track``): what the trackers record is what the runs
recorded, tracking changes no result, off writes nothing, and a missing backend is one line.

TensorBoard's event files are read back with TensorBoard's own reader; wandb and MLflow are not
installed here, so their code paths run against fake modules that record every call.
"""

from __future__ import annotations

import importlib.machinery
import json
import math
import sys
import types
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cxrfair.cli import main
from cxrfair.core.runs import TRACKING_DIR, read_run
from cxrfair.errors import CxrfairError
from cxrfair.finetune import train as T
from cxrfair.finetune.config import FinetuneConfig
from cxrfair.tracking import BACKENDS, Tracker, check_backend, flat_config, open_tracker
from tests.finetune.helpers import make_cohort
from tests.probe.synth import make_cache

torch.set_num_threads(1)

# 36 training images in batches of 12: 3 steps per epoch.
FT = ["--epochs", "2", "--batch-size", "12", "--lr", "1e-2", "--workers", "2", "--device", "cpu"]
STEPS_PER_EPOCH = 3
LBFGS = ["--seeds", "2", "--l2", "1e-3,1e-2,1e-1", "--max-iter", "20"]
ADAMW = ["--solver", "adamw", "--no-standardize", "--epochs", "4", "--batch-size", "16", "--seeds", "2",
         "--lr", "1e-3,1e-2", "--weight-decay", "0"]
RUN_ID = "tiny-clip__lora__best__s0"


def cli(*args):
    return CliRunner().invoke(main, [*map(str, args)])


def scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] of every scalar in the event files directly in ``folder``."""
    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def values(series) -> list[float]:
    return [v for _, v in series]


def close(a, b, rel=1e-6):  # event files hold float32
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=rel, abs_tol=1e-7) for x, y in zip(a, b))


def visible(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def same_run(a: Path, b: Path) -> None:
    """Two runs hold the same predictions (bytes) and run.json (but for when and how fast)."""
    assert (a / "predictions.csv").read_bytes() == (b / "predictions.csv").read_bytes()
    ma, mb = (json.loads((d / "run.json").read_text()) for d in (a, b))
    for m in (ma, mb):
        m.pop("created"), m.pop("timings")
    assert ma == mb


def one_line_error(result, *needles):
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


# ---------------------------------------------------------------- fine-tuning


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("track-cohort")
    return make_cohort(root / "cohort", root / "images")


@pytest.fixture(scope="module")
def tracked_finetune(tmp_path_factory, cohort):
    """One tiny LoRA run with --track tensorboard (every step's loss captured from the trainer) and the
    same run untracked."""
    root = tmp_path_factory.mktemp("track-ft")
    step_losses = []
    real = T.train_step

    def spy(state, x, y, w, step, rt, *rest):
        loss = real(state, x, y, w, step, rt, *rest)
        step_losses.append(float(loss) / step.images)
        return loss

    T.train_step = spy
    try:
        tracked = cli("finetune", "lora", "--model", "tiny-clip", "--cohort", cohort, "--out", root / "on", *FT,
                      "--track", "tensorboard")
    finally:
        T.train_step = real
    assert tracked.exit_code == 0, tracked.output
    plain = cli("finetune", "lora", "--model", "tiny-clip", "--cohort", cohort, "--out", root / "off", *FT)
    assert plain.exit_code == 0, plain.output
    return {"root": root, "cohort": cohort, "on": root / "on" / RUN_ID, "off": root / "off" / RUN_ID,
            "step_losses": step_losses}


@pytest.mark.slow
def test_finetune_event_files_hold_the_run_s_losses_step_for_step(tracked_finetune):
    run = tracked_finetune["on"]
    meta = json.loads((run / "run.json").read_text())
    curves = meta["curves"]
    got = scalars(run / TRACKING_DIR)
    ends = [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
    # Per epoch, at the epoch's last optimizer step: exactly run.json's curves.
    for name in ("train_loss", "val_loss", "lr"):
        assert [s for s, _ in got[f"epoch/{name}"]] == ends
        assert close(values(got[f"epoch/{name}"]), curves[name]), name
    # Per step: the loss the trainer computed at that step (captured from train_step) ...
    assert [s for s, _ in got["train/loss"]] == list(range(1, 2 * STEPS_PER_EPOCH + 1))
    assert close(values(got["train/loss"]), tracked_finetune["step_losses"])
    # ... whose mean over each epoch's (equal, 12-image) batches is the epoch's recorded train loss.
    per_epoch = np.reshape(values(got["train/loss"]), (2, STEPS_PER_EPOCH)).mean(1)
    assert close(per_epoch, curves["train_loss"], rel=1e-5)
    # The learning rate of each step: cosine annealing from --lr 1e-2 to 0 over the 6 steps.
    expected_lr = [1e-2 * (1 + math.cos(math.pi * t / 6)) / 2 for t in range(6)]
    assert close(values(got["train/lr"]), expected_lr)
    # The selection rule: lowest validation loss so far, and its epoch (the run's selected_epoch at the end).
    assert close(values(got["val/best_loss"]), np.minimum.accumulate(curves["val_loss"]))
    assert values(got["val/selected_epoch"])[-1] == meta["selected_epoch"]
    assert values(got["epoch/epoch"]) == [1.0, 2.0]
    assert all(0 <= v <= 1 for v in values(got["val/accuracy"]) + values(got["val/auc_macro"]))


@pytest.mark.slow
def test_finetune_tracking_changes_no_result_and_off_writes_nothing(tracked_finetune):
    on, off = tracked_finetune["on"], tracked_finetune["off"]
    same_run(on, off)
    assert visible(on) == sorted(visible(off) + [TRACKING_DIR])
    assert TRACKING_DIR not in visible(off)
    # The work folder (checkpoint and the tracker's folder while training) is gone in both.
    for runs in (on.parent, off.parent):
        assert visible(runs) == [RUN_ID] and not any(p.name.endswith(".work") for p in runs.iterdir())
    assert [p.name.split(".")[0] for p in (on / TRACKING_DIR).iterdir()] == ["events"]


def test_force_replaces_a_tracked_run_with_or_without_tracking(cohort, tmp_path):
    out = tmp_path / "runs"
    args = ["finetune", "lora", "--model", "tiny-clip", "--cohort", cohort, "--out", out, *FT,
            "--epochs", "1"]
    assert cli(*args, "--track", "tensorboard").exit_code == 0
    first = sorted((out / RUN_ID / TRACKING_DIR).iterdir())
    again = cli(*args, "--track", "tensorboard", "--force")
    assert again.exit_code == 0, again.output
    files = sorted((out / RUN_ID / TRACKING_DIR).iterdir())
    assert len(files) == 1 and files != first  # the old events went with the old run
    untracked = cli(*args, "--force")
    assert untracked.exit_code == 0, untracked.output  # tracking/ is the command's own: --force may replace it
    assert TRACKING_DIR not in visible(out / RUN_ID)


def test_a_resumed_run_continues_its_curves(cohort, tmp_path):
    """Interrupted after epoch 1 and resumed: the event files (one per attempt) hold each step once and
    end equal to the run's curves; a fresh --force start drops an interrupted attempt's events."""
    cfg = FinetuneConfig(model="tiny-clip", cohort=cohort, out=tmp_path, epochs=2, batch_size=12,
                         lr=1e-2, workers=2, device="cpu", track="tensorboard")

    def stop(log):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        T.finetune(cfg, on_epoch_end=stop, progress=False)
    work = tmp_path / f".{cfg.run_id}.work" / TRACKING_DIR
    assert values(scalars(work)["epoch/train_loss"]) and len(list(work.iterdir())) == 1
    T.finetune(replace(cfg, resume=True), progress=False)
    run = tmp_path / cfg.run_id
    got = scalars(run / TRACKING_DIR)
    assert len(list((run / TRACKING_DIR).iterdir())) == 2
    assert [s for s, _ in got["train/loss"]] == list(range(1, 7))
    for name in ("train_loss", "val_loss", "lr"):
        assert close(values(got[f"epoch/{name}"]), read_run(run).meta["curves"][name])

    with pytest.raises(KeyboardInterrupt):
        T.finetune(replace(cfg, force=True), on_epoch_end=stop, progress=False)
    T.finetune(replace(cfg, force=True), progress=False)  # starts over: one attempt's events
    assert len(list((run / TRACKING_DIR).iterdir())) == 1
    assert [s for s, _ in scalars(run / TRACKING_DIR)["train/loss"]] == list(range(1, 7))


# ---------------------------------------------------------------- probe sweeps


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return make_cache(tmp_path_factory.mktemp("track-probe") / "c.h5")[0]


@pytest.mark.slow
@pytest.mark.parametrize("solver", [LBFGS, ADAMW], ids=["lbfgs", "adamw"])
def test_probe_sweep_logs_one_scalar_per_lane_and_the_runs_curves(cache, tmp_path, solver):
    on = cli("probe", "linear", "--cache", cache, "--out", tmp_path / "on", *solver, "--track", "tensorboard")
    assert on.exit_code == 0, on.output
    off = cli("probe", "linear", "--cache", cache, "--out", tmp_path / "off", *solver)
    assert off.exit_code == 0, off.output
    table = pd.read_csv(tmp_path / "on" / "tiny-clip__linear__sweep.csv")
    assert table.equals(pd.read_csv(tmp_path / "off" / "tiny-clip__linear__sweep.csv"))
    runs = [r for r in visible(tmp_path / "on") if not r.endswith(".csv")]
    assert visible(tmp_path / "off") == visible(tmp_path / "on")
    n_configs, lanes = table["config"].nunique(), 0
    for run_id in runs:
        run = tmp_path / "on" / run_id
        same_run(run, tmp_path / "off" / run_id)
        assert TRACKING_DIR not in visible(tmp_path / "off" / run_id)
        meta = read_run(run).meta
        got = scalars(run / TRACKING_DIR)
        for name in ("train_loss", "val_loss"):  # the run's own curves, steps 1, 2, ...
            assert close(values(got[name]), meta["curves"][name])
            assert [s for s, _ in got[name]] == list(range(1, len(meta["curves"][name]) + 1))
        sweep = scalars(run / TRACKING_DIR / "sweep")
        rows = table[table["seed"] == meta["seed"]].sort_values("config")
        assert [s for s, _ in sweep["best_val_loss"]] == rows["config"].tolist()
        assert close(values(sweep["best_val_loss"]), rows["best_val_loss"].tolist())
        assert close(values(sweep["val_accuracy"]), rows["val_accuracy"].tolist())
        chosen = rows[rows["selected"]]
        assert sweep["selected_best_val_loss"] == [(int(chosen["config"].iloc[0]), pytest.approx(
            float(chosen["best_val_loss"].iloc[0]), rel=1e-6))]
        lanes += len(sweep["best_val_loss"])
    assert lanes == len(table) == n_configs * 2  # every lane once, over the seeds' runs


@pytest.mark.slow
def test_probe_strength_runs_get_curves_and_the_best_runs_the_lanes(cache, tmp_path):
    args = ["probe", "linear", "--cache", cache, "--out", tmp_path, *ADAMW, "--mitigation", "reweight",
            "--sensitive", "sex", "--strength", "0,1", "--track", "tensorboard"]
    result = cli(*args)
    assert result.exit_code == 0, result.output
    for run_id in visible(tmp_path):
        if run_id.endswith(".csv"):
            continue
        tracked = tmp_path / run_id / TRACKING_DIR
        assert close(values(scalars(tracked)["val_loss"]), read_run(tmp_path / run_id).meta["curves"]["val_loss"])
        assert (tracked / "sweep").is_dir() == ("__best__" in run_id), run_id


# ---------------------------------------------------------------- unavailable backends and options


def test_a_missing_backend_is_one_line_through_the_cli(cache, cohort, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # `import tensorboard` now fails
    ft = cli("finetune", "lora", "--model", "tiny-clip", "--cohort", cohort, "--out", tmp_path / "ft",
             *FT, "--track", "tensorboard")
    one_line_error(ft, "--track tensorboard", "pip install cxrfair[track]")
    probe = cli("probe", "linear", "--cache", cache, "--out", tmp_path / "pr", *LBFGS, "--track", "tensorboard")
    one_line_error(probe, "--track tensorboard", "pip install cxrfair[track]")
    for kind, fix in (("wandb", "pip install wandb"), ("mlflow", "pip install mlflow")):
        monkeypatch.setitem(sys.modules, kind, None)
        one_line_error(cli("probe", "mlp", "--cache", cache, "--out", tmp_path / "pr", *LBFGS, "--track", kind),
                       f"--track {kind}", fix)
    assert not (tmp_path / "ft").exists() and not (tmp_path / "pr").exists()  # refused before any work
    unknown = cli("probe", "linear", "--cache", cache, "--out", tmp_path / "pr", "--track", "comet")
    assert unknown.exit_code == 2 and "comet" in unknown.output


def test_off_is_a_no_op_and_other_ranks_do_not_log(tmp_path, monkeypatch):
    with open_tracker(None, tmp_path / "off", "r", {"a": 1}) as t:
        assert not t.active
        t.log(0, {"x": 1.0})
    monkeypatch.setenv("RANK", "1")
    with open_tracker("tensorboard", tmp_path / "rank1", "r", {"a": 1}) as t:
        assert not t.active
        t.log(0, {"x": 1.0})
    assert not (tmp_path / "off").exists() and not (tmp_path / "rank1").exists()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(CxrfairError):  # every rank refuses a missing backend alike
        open_tracker("tensorboard", tmp_path / "x", "r")


def test_steps_must_not_decrease_and_values_are_converted(tmp_path):
    with open_tracker("tensorboard", tmp_path, "r") as t:
        t.log(1, {"a": np.float32(0.5), "b": torch.tensor(2.0), "c": 3})
        t.log(1, {"a": 0.25})
        with pytest.raises(ValueError, match="must not decrease"):
            t.log(0, {"a": 1.0})
    got = scalars(tmp_path)
    assert got == {"a": [(1, 0.5), (1, 0.25)], "b": [(1, 2.0)], "c": [(1, 3.0)]}


def test_config_checks_name_the_option():
    with pytest.raises(CxrfairError, match=r"--track comet: unknown tracking backend; choose one of tensorboard, "):
        check_backend("comet")
    with pytest.raises(CxrfairError, match="--track comet"):
        FinetuneConfig(model="tiny-clip", cohort=Path("c"), out=Path("o"), track="comet")
    assert flat_config({"a": None, "b": (1, 2), "c": float("nan"), "d": Path("/x"), "e": True}) == {
        "a": "none", "b": "[1, 2]", "c": "nan", "d": '"/x"', "e": True}
    assert set(BACKENDS) == {"tensorboard", "wandb", "mlflow"}


def test_tracking_is_no_run_setting(tmp_path):
    """Neither run.json's hyperparameters, a resume checkpoint's fingerprint nor the pipeline's step
    fingerprints see --track / the track keys."""
    from cxrfair.config import config_from_dict
    from cxrfair.erm_steps import finetune_settings, sweep_config, sweep_settings

    cfg = FinetuneConfig(model="tiny-clip", cohort=Path("c"), out=Path("o"), track="tensorboard")
    assert "track" not in cfg.hyperparameters() and "track" not in cfg.training_fields()
    on = config_from_dict({"models": ["tiny-clip"], "probe": {"track": "tensorboard"},
                           "finetune": {"track": "tensorboard"}})
    off = config_from_dict({"models": ["tiny-clip"]})
    assert sweep_config(on, "linear").track == "tensorboard"
    assert sweep_settings(sweep_config(on, "linear")) == sweep_settings(sweep_config(off, "linear"))
    assert finetune_settings(on, "tiny-clip", "lora") == finetune_settings(off, "tiny-clip", "lora")
    with pytest.raises(CxrfairError, match=r"\[probe\] track comet"):
        sweep_config(config_from_dict({"models": ["tiny-clip"], "probe": {"track": "comet"}}), "linear")


# ---------------------------------------------------------------- wandb and MLflow against fake modules


def fake_module(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)  # found by importlib.util.find_spec
    for k, v in attrs.items():
        setattr(module, k, v)
    return module


class FakeWandbRun:
    def __init__(self, calls):
        self.calls = calls

    def log(self, metrics, step=None):
        self.calls.append(("log", dict(metrics), step))

    def finish(self):
        self.calls.append(("finish",))


@pytest.fixture()
def fake_wandb(monkeypatch):
    calls = []

    def init(**kwargs):
        calls.append(("init", kwargs))
        return FakeWandbRun(calls)

    monkeypatch.setitem(sys.modules, "wandb", fake_module("wandb", init=init))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    return calls


def test_wandb_runs_offline_under_the_run_folder(fake_wandb, tmp_path, monkeypatch):
    with open_tracker("wandb", tmp_path / "t", "run-1", {"lr": 0.1, "hidden": None}) as t:
        t.log(1, {"loss": np.float64(0.5)})
        t.log(3, {"loss": 0.25, "acc": 1})
    assert fake_wandb == [
        ("init", {"project": "cxrfair", "name": "run-1", "dir": str(tmp_path / "t"),
                  "config": {"lr": 0.1, "hidden": "none"}, "mode": "offline"}),
        ("log", {"loss": 0.5}, 1), ("log", {"loss": 0.25, "acc": 1.0}, 3), ("finish",)]
    assert (tmp_path / "t").is_dir()
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_PROJECT", "mine")
    open_tracker("wandb", tmp_path / "u", "run-2").close()
    assert fake_wandb[-2][1]["mode"] == "online" and fake_wandb[-2][1]["project"] == "mine"


@pytest.mark.slow
def test_wandb_through_a_probe_sweep_gets_the_run_s_curves(fake_wandb, cache, tmp_path):
    result = cli("probe", "linear", "--cache", cache, "--out", tmp_path, *ADAMW, "--track", "wandb")
    assert result.exit_code == 0, result.output
    inits = [c[1] for c in fake_wandb if c[0] == "init"]
    run_ids = [r for r in visible(tmp_path) if not r.endswith(".csv")]
    # Per run: its own wandb run (in <run>/tracking) and one for its seed's sweep lanes (in tracking/sweep).
    assert [i["name"] for i in inits] == [n for r in run_ids for n in (r, f"{r}/sweep")]
    assert [i["dir"] for i in inits] == [str(tmp_path / r / TRACKING_DIR / s) for r in run_ids for s in (".", "sweep")]
    first = fake_wandb[1:fake_wandb.index(("finish",))]
    meta = read_run(tmp_path / run_ids[0]).meta
    assert [c[2] for c in first] == list(range(1, 5))
    assert close([c[1]["val_loss"] for c in first], meta["curves"]["val_loss"], rel=1e-12)  # wandb gets float64


class FakeMlflowClient:
    calls: list = []
    experiments: dict = {}

    def __init__(self, tracking_uri=None):
        self.calls.append(("client", tracking_uri))

    def get_experiment_by_name(self, name):
        self.calls.append(("get_experiment_by_name", name))
        return self.experiments.get(name)

    def create_experiment(self, name):
        self.calls.append(("create_experiment", name))
        self.experiments[name] = types.SimpleNamespace(experiment_id="7")
        return "7"

    def create_run(self, experiment_id, run_name=None):
        self.calls.append(("create_run", experiment_id, run_name))
        return types.SimpleNamespace(info=types.SimpleNamespace(run_id="r1"))

    def log_param(self, run_id, key, value):
        self.calls.append(("log_param", run_id, key, value))

    def log_metric(self, run_id, key, value, step=None):
        self.calls.append(("log_metric", run_id, key, value, step))

    def set_terminated(self, run_id):
        self.calls.append(("set_terminated", run_id))


def test_mlflow_writes_to_a_file_store_in_the_run_folder(tmp_path, monkeypatch):
    FakeMlflowClient.calls, FakeMlflowClient.experiments = [], {}
    monkeypatch.setitem(sys.modules, "mlflow", fake_module("mlflow", MlflowClient=FakeMlflowClient))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    with open_tracker("mlflow", tmp_path / "t", "run-1", {"lr": 0.1}) as t:
        t.log(2, {"loss": 0.5, "acc": 0.75})
    assert FakeMlflowClient.calls == [
        ("client", (tmp_path / "t" / "mlruns").resolve().as_uri()), ("get_experiment_by_name", "cxrfair"),
        ("create_experiment", "cxrfair"), ("create_run", "7", "run-1"), ("log_param", "r1", "lr", 0.1),
        ("log_metric", "r1", "loss", 0.5, 2), ("log_metric", "r1", "acc", 0.75, 2), ("set_terminated", "r1")]
    assert FakeMlflowClient.calls[0][1].startswith("file:")
    FakeMlflowClient.calls = []
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://example.invalid:5000")
    open_tracker("mlflow", tmp_path / "u", "run-2").close()
    assert FakeMlflowClient.calls[:3] == [("client", "http://example.invalid:5000"),  # the experiment exists: reused
                                          ("get_experiment_by_name", "cxrfair"), ("create_run", "7", "run-2")]


def test_tracker_default_is_inactive():
    assert not Tracker().active


@pytest.mark.slow
def test_the_pipeline_s_probe_step_tracks_and_publishes_the_curves_with_the_runs(tmp_path):
    """`[probe] track` reaches the sweep of `cxrfair run`'s probe step; the runs it publishes carry
    tracking/; the step's settings (its fingerprint) are those of the untracked config."""
    from cxrfair.config import config_from_dict
    from cxrfair.erm_steps import probe_step
    from cxrfair.step_base import cache_path, paths

    probe = {"solver": "adamw", "standardize": False, "epochs": 3, "batch_size": 16, "lr": [1e-3, 1e-2],
             "weight_decay": [0.0]}
    on = config_from_dict({"models": ["tiny-clip"], "out": str(tmp_path), "seeds": 2,
                           "probe": probe | {"track": "tensorboard"}})
    off = config_from_dict({"models": ["tiny-clip"], "out": str(tmp_path), "seeds": 2, "probe": probe})
    p = paths(on)
    cache_path(p, "tiny-clip").parent.mkdir(parents=True)
    make_cache(cache_path(p, "tiny-clip"))
    step = probe_step(on, p, "tiny-clip", "linear")
    assert step.settings == probe_step(off, p, "tiny-clip", "linear").settings
    step.run(False)
    for seed in (0, 1):
        run = p["runs"] / f"tiny-clip__linear__best__s{seed}"
        got = scalars(run / TRACKING_DIR)
        assert close(values(got["val_loss"]), read_run(run).meta["curves"]["val_loss"])
        assert len(scalars(run / TRACKING_DIR / "sweep")["best_val_loss"]) == 2  # its seed's two lanes
