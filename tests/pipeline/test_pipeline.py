"""`cxrfair run`: config validation, the plan, and resuming a killed run without redoing steps."""

import json
import re
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from cxrfair.cli import main
from cxrfair.config import load_config
from cxrfair.errors import CxrfairError
from cxrfair.pipeline import experiment_steps
from cxrfair.steps import Step, execute, plan

REPO = Path(__file__).resolve().parents[2]

# Small but complete: synthetic data, a 240-image cohort, the tiny model, a probe and LoRA.
SMALL = """
out = "{out}"
models = ["tiny-clip"]
methods = ["zeroshot", "linear", "lora"]
seeds = 1

[synth]
enabled = true

[cohort]
per_group = 10

[extract]
workers = 0
batch_size = 32

[probe]
solver = "adamw"
lr = [1e-3]
weight_decay = [0.0]
epochs = 5

[finetune]
epochs = 1
workers = 1

[analysis]
bootstrap = 100
"""


def _write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "exp.toml"
    path.write_text(text.format(out=tmp_path / "exp"))
    return path


def test_paper_config_dry_run_prints_the_whole_protocol():
    result = CliRunner().invoke(main, ["run", str(REPO / "configs" / "paper.toml"), "--dry-run", "--out", "/tmp/cxrfair-never-written"])
    assert result.exit_code == 0, result.output
    for model in ["clip-vit-b16", "biomedclip", "medclip-vit", "medclip-rn50", "gloria-rn50"]:
        assert f"extract-{model} " in result.output
        for method in ["zeroshot", "linear", "mlp", "lora", "full"]:
            assert f"{method}-{model} " in result.output
    assert "analyze" in result.output
    assert not Path("/tmp/cxrfair-never-written").exists()


@pytest.mark.parametrize("text, message", [
    ('models = ["tiny-clip"]\nmethod = ["linear"]\n', "unknown key(s) method"),
    ('models = ["tiny-clip"]\n[probe]\nepochs = "ten"\n', '[probe] epochs = "ten": expected an integer'),
    ('models = ["tiny-clip"]\nmethods = ["linear", "dance"]\n', "methods: unknown ['dance']"),
    ('methods = ["linear"]\n', "`models = [...]` is required"),
    ('models = ["no-such-model"]\n', "unknown model"),
    ('models = [\n', "not valid TOML"),
    # NIH has sex and age_group: caught at planning (--dry-run), not at the last step.
    ('models = ["tiny-clip"]\n[analysis]\nattributes = ["race"]\n',
     "[analysis] attributes: 'race' is not a sensitive attribute of the cohort (it has sex, age_group); remove it"),
    ('models = ["tiny-clip"]\n[analysis]\ncross = ["sex", "race"]\n', "[analysis] cross: 'race' is not a sensitive"),
])
def test_bad_configs_are_one_line_errors(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    result = CliRunner().invoke(main, ["run", str(path), "--dry-run"])
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_missing_config_file(tmp_path):
    with pytest.raises(CxrfairError, match="no such file"):
        load_config(tmp_path / "nope.toml")


def test_changing_a_setting_reruns_that_step_and_what_depends_on_it(tmp_path):
    calls = []

    def step(name, settings, deps=()):
        return Step(name, settings, [], lambda force, n=name: calls.append((n, force)), deps)

    def steps(lr):
        return [step("a", {"x": 1}), step("b", {"lr": lr}, ("a",)), step("c", {}, ("b",)), step("d", {}, ("a",))]

    execute(plan(steps(1), tmp_path), tmp_path, echo=lambda s: None)
    assert calls == [("a", False), ("b", False), ("c", False), ("d", False)]
    calls.clear()
    decisions = plan(steps(2), tmp_path)
    assert [a for _, a in decisions] == ["reuse", "run", "run", "reuse"]
    execute(decisions, tmp_path, echo=lambda s: None)
    assert calls == [("b", True), ("c", True)]  # force: settings changed, old outputs replaced


def test_a_step_whose_recorded_output_vanished_is_rerun(tmp_path):
    out = tmp_path / "thing"

    def run(force):
        out.write_text("x")
        return [out]

    steps = [Step("a", {}, [], run)]
    execute(plan(steps, tmp_path), tmp_path, echo=lambda s: None)
    assert [a for _, a in plan(steps, tmp_path)] == ["reuse"]
    out.unlink()
    assert [a for _, a in plan(steps, tmp_path)] == ["run"]


def _run_cli(config: Path) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "cxrfair", "run", str(config)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)


@pytest.mark.slow  # keeps the default suite under ~10 min; `make test-all` runs it
def test_killed_run_resumes_without_redoing_completed_steps(tmp_path):
    config = _write_config(tmp_path, SMALL)
    out = tmp_path / "exp"
    proc = _run_cli(config)
    stamp = out / ".steps" / "linear-tiny-clip.json"
    deadline = time.time() + 240
    while not stamp.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert stamp.exists(), proc.communicate()[0] if proc.poll() is not None else "timed out"
    os.killpg(proc.pid, signal.SIGKILL)  # as hard as it gets: no cleanup handlers run
    proc.wait()
    done_before = {p.stem: p.stat().st_mtime_ns for p in (out / ".steps").glob("*.json")}
    assert {"synth", "cohort", "extract-tiny-clip", "zeroshot-tiny-clip", "linear-tiny-clip"} <= set(done_before)
    assert "analyze" not in done_before

    result = subprocess.run([sys.executable, "-m", "cxrfair", "run", str(config)], capture_output=True, text=True,
                            env=dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1"), timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    plan_lines = {line.split()[0]: line for line in result.stdout.splitlines() if line and line.split()[0] in done_before}
    for name in done_before:
        assert "reuse" in plan_lines[name], result.stdout
        assert f"==> {name}\n" not in result.stdout
        assert (out / ".steps" / f"{name}.json").stat().st_mtime_ns == done_before[name]  # not redone
    assert "==> analyze" in result.stdout
    assert (out / "report" / "report.html").is_file()
    from tests.analysis.test_report import assert_findings_match_comparisons

    assert_findings_match_comparisons(out / "report")  # the experiment's report opens on its findings
    methods = {json.loads(p.read_text())["method"] for p in (out / "runs").glob("*/run.json")}
    assert methods == {"zeroshot", "linear", "lora"}

    again = subprocess.run([sys.executable, "-m", "cxrfair", "run", str(config), "--dry-run"], capture_output=True,
                           text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=120)
    assert "0 step(s) to run" in again.stdout


def test_steps_follow_the_config(tmp_path):
    cfg = load_config(_write_config(tmp_path, SMALL))
    names = [s.name for s in experiment_steps(cfg)]
    assert names == ["synth", "cohort", "extract-tiny-clip", "zeroshot-tiny-clip", "linear-tiny-clip",
                     "lora-tiny-clip-lr0.0005-s0", "lora-tiny-clip", "analyze"]


def test_real_run_without_images_stops_before_any_work(tmp_path):
    out = tmp_path / "paper"
    result = CliRunner().invoke(main, ["run", str(REPO / "configs" / "paper.toml"), "--out", str(out)])
    assert result.exit_code == 1
    assert "images" in result.output and "download NIH ChestX-ray14" in result.output
    assert not out.exists()


def test_edited_metadata_rebuilds_the_cohort(tmp_path):
    meta = tmp_path / "Data_Entry_2017.csv"
    meta.write_text("a\n")
    text = f'models = ["tiny-clip"]\nout = "{tmp_path / "exp"}"\n[cohort]\nmetadata = "{meta}"\nimages = "{tmp_path}"\n'
    (tmp_path / "exp.toml").write_text(text)
    before = [s for s in experiment_steps(load_config(tmp_path / "exp.toml")) if s.name == "cohort"][0]
    meta.write_text("b\n")
    after = [s for s in experiment_steps(load_config(tmp_path / "exp.toml")) if s.name == "cohort"][0]
    assert before.settings["sources_sha256"]["metadata"] != after.settings["sources_sha256"]["metadata"]


# ---------------------------------------------------------------- rerunning a finished experiment
# The stages are replaced by fakes that write real run folders (through core.runs) in
# milliseconds, so the pipeline's own logic (plan, staging, swap, cleanup) is what is tested;
# test_changing_a_probe_value_on_a_real_experiment does the same with the real stages (slow).

FAKE = """
out = "{out}"
models = ["tiny-clip"]
methods = ["zeroshot", "linear", "mlp"]
seeds = {seeds}

[synth]
enabled = true

[probe]
solver = "adamw"
lr = [1e-3]
epochs = {epochs}
"""
CLASSES = ["Effusion", "Edema"]


def _fake_run(out: Path, key, hyperparameters: dict, cohort_hash: str = "c0") -> Path:
    import numpy as np
    import pandas as pd

    from cxrfair.core.runs import make_predictions, write_run

    rows = pd.DataFrame({"image_id": ["a", "b", "c", "d"], "patient_id": [1, 2, 3, 4], "split": ["val", "val", "test", "test"],
                         "label": CLASSES * 2, "sex": ["M", "F"] * 2, "age": [30, 70, 30, 70], "age_group": ["young", "old"] * 2})
    meta = {"run_id": key.run_id, "model": key.model, "method": key.method, "seed": key.seed, "classes": CLASSES,
            "cohort_hash": cohort_hash, "hyperparameters": hyperparameters, "selected_epoch": 1, "trainable_params": 0, "timings": {}}
    return write_run(out, meta, make_predictions(rows, np.full((4, 2), 0.5), CLASSES), force=True)


@pytest.fixture
def fake_stages(monkeypatch):
    """Every stage the pipeline calls, as a fake; returns what the fake analysis saw each time."""
    import importlib

    from cxrfair.core.runs import RunKey, read_runs

    seen = []

    def touch(path: Path, text: str = "x") -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    def cohort_hash(cache) -> str:  # the fake cohort's: cache/<model>.h5 -> cohort/cohort.json
        return json.loads((Path(cache).parent.parent / "cohort" / "cohort.json").read_text())["hash"]

    def probe_cache(cache, out, cfg, force=False):
        for i, seed in enumerate(cfg.seeds):
            if cfg.epochs == 13 and i == 1:
                raise CxrfairError("probe failed halfway")
            _fake_run(Path(out), RunKey("tiny-clip", cfg.method, "best", seed), {"epochs": cfg.epochs},
                      cohort_hash(cache))
        touch(Path(out) / RunKey("tiny-clip", cfg.method, "best", 0).sweep_file, f"epochs={cfg.epochs}")

    def zeroshot_cache(cache, out, all_sets=False, force=False, term=None):
        return [_fake_run(Path(out), RunKey("tiny-clip", "zeroshot", f"clip-d{d}", d), {}, cohort_hash(cache))
                for d in range(2)]

    def analyze(cfg):
        runs = read_runs(cfg.runs_dir)  # the real reader: a half-replaced or mixed folder fails here
        seen.append({r.run_id: r.meta["hyperparameters"].get("epochs") for r in runs})
        touch(cfg.out / "report.html")

    monkeypatch.setattr("cxrfair.extract.synth.make_synth", lambda cfg: touch(cfg.out / "synth_info.json"))
    monkeypatch.setattr("cxrfair.extract.cohort.build_cohort",
                        lambda cfg: touch(cfg.out / "cohort.json", json.dumps({"hash": f"c{cfg.seed}"})))
    monkeypatch.setattr("cxrfair.extract.extractor.extract", lambda cfg: touch(cfg.out))
    monkeypatch.setattr("cxrfair.probe.zeroshot.zeroshot_cache", zeroshot_cache)
    monkeypatch.setattr("cxrfair.probe.sweep.probe_cache", probe_cache)
    monkeypatch.setattr(importlib.import_module("cxrfair.analysis.analyze"), "analyze", analyze)
    return seen


def _run_fake(tmp_path: Path, epochs: int = 5, seeds: int = 2, cohort_seed: int = 0, lines: list | None = None) -> list[str]:
    """Run the FAKE experiment in-process; returns the names of the steps that ran (``lines``: all it said)."""
    from cxrfair.pipeline import run_experiment

    path = tmp_path / "exp.toml"
    path.write_text(FAKE.format(out=tmp_path / "exp", epochs=epochs, seeds=seeds) + f"\n[cohort]\nseed = {cohort_seed}\n")
    lines = [] if lines is None else lines
    run_experiment(load_config(path), echo=lines.append)
    return [line[4:] for line in lines if line.startswith("==> ")]


def _tree(root: Path) -> dict:
    """Every path under ``root`` with its content hash (files) or None (folders)."""
    import hashlib

    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
            for p in sorted(root.rglob("*"))}


def _runs_and_epochs(runs: Path) -> dict:
    out = {}
    for p in sorted(runs.iterdir()):
        if p.is_file():
            out[p.name] = p.read_text()
        else:
            out[p.name] = json.loads((p / "run.json").read_text())["hyperparameters"].get("epochs") if (p / "run.json").exists() else "folder"
    return out


def test_changing_a_probe_value_reruns_the_probes_and_analysis_and_replaces_their_runs(tmp_path, fake_stages):
    assert _run_fake(tmp_path) == ["synth", "cohort", "extract-tiny-clip", "zeroshot-tiny-clip", "linear-tiny-clip",
                                   "mlp-tiny-clip", "analyze"]
    runs = tmp_path / "exp" / "runs"
    # Entries this experiment does not own: a future mitigation's runs and sweep, a user's notes.
    from cxrfair.core.runs import RunKey

    _fake_run(runs, RunKey("tiny-clip", "linear", "best", 0, mitigation="groupdro", sensitive="sex"), {"epochs": 99})
    (runs / "tiny-clip__linear+groupdro-sex__sweep.csv").write_text("mine")
    (runs / "tiny-clip__linear__notes").mkdir()
    (runs / "notes.txt").write_text("mine")
    zeroshot = {p.name: p.stat().st_mtime_ns for p in runs.glob("tiny-clip__zeroshot__*")}

    assert _run_fake(tmp_path, epochs=6) == ["linear-tiny-clip", "mlp-tiny-clip", "analyze"]
    assert _runs_and_epochs(runs) == {
        "notes.txt": "mine",
        "tiny-clip__linear+groupdro-sex__best__s0": 99, "tiny-clip__linear+groupdro-sex__sweep.csv": "mine",
        "tiny-clip__linear__best__s0": 6, "tiny-clip__linear__best__s1": 6, "tiny-clip__linear__notes": "folder",
        "tiny-clip__linear__sweep.csv": "epochs=6",
        "tiny-clip__mlp__best__s0": 6, "tiny-clip__mlp__best__s1": 6, "tiny-clip__mlp__sweep.csv": "epochs=6",
        "tiny-clip__zeroshot__clip-d0__s0": None, "tiny-clip__zeroshot__clip-d1__s1": None,
    }
    assert {p.name: p.stat().st_mtime_ns for p in runs.glob("tiny-clip__zeroshot__*")} == zeroshot  # not rewritten
    assert fake_stages[-1]["tiny-clip__linear__best__s1"] == 6
    assert not any((tmp_path / "exp" / ".staging").iterdir())

    assert _run_fake(tmp_path, epochs=6) == []  # a second rerun: nothing to do, no crash
    assert _run_fake(tmp_path, epochs=7) == ["linear-tiny-clip", "mlp-tiny-clip", "analyze"]  # and another change
    assert _runs_and_epochs(runs)["tiny-clip__mlp__sweep.csv"] == "epochs=7"


def test_fewer_seeds_leave_no_runs_of_the_dropped_seed(tmp_path, fake_stages):
    _run_fake(tmp_path, seeds=2)
    assert _run_fake(tmp_path, seeds=1) == ["linear-tiny-clip", "mlp-tiny-clip", "analyze"]
    names = sorted(p.name for p in (tmp_path / "exp" / "runs").iterdir())
    assert names == ["tiny-clip__linear__best__s0", "tiny-clip__linear__sweep.csv", "tiny-clip__mlp__best__s0",
                     "tiny-clip__mlp__sweep.csv", "tiny-clip__zeroshot__clip-d0__s0", "tiny-clip__zeroshot__clip-d1__s1"]


@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
def test_an_invalid_probe_value_changes_nothing_on_a_finished_experiment(tmp_path, fake_stages, dry_run):
    _run_fake(tmp_path)
    before = _tree(tmp_path / "exp")
    path = tmp_path / "exp.toml"
    path.write_text(FAKE.format(out=tmp_path / "exp", epochs=-1, seeds=2))
    result = CliRunner().invoke(main, ["run", str(path), *(["--dry-run"] if dry_run else [])])
    assert result.exit_code == 1 and result.output == f"Error: config {path}: [probe] epochs: must be >= 1\n"
    assert _tree(tmp_path / "exp") == before


def test_a_failed_build_keeps_the_old_runs_and_the_next_run_replaces_them(tmp_path, fake_stages):
    _run_fake(tmp_path)
    runs = tmp_path / "exp" / "runs"
    before = _runs_and_epochs(runs)
    with pytest.raises(CxrfairError, match="probe failed halfway"):
        _run_fake(tmp_path, epochs=13)
    assert _runs_and_epochs(runs) == before  # the linear sweep broke after one seed: old runs all there
    assert _run_fake(tmp_path, epochs=6) == ["linear-tiny-clip", "mlp-tiny-clip", "analyze"]
    assert {k: v for k, v in _runs_and_epochs(runs).items() if "__linear__" in k} == {
        "tiny-clip__linear__best__s0": 6, "tiny-clip__linear__best__s1": 6, "tiny-clip__linear__sweep.csv": "epochs=6"}


def test_a_swap_killed_midway_is_finished_by_the_next_run(tmp_path, fake_stages, monkeypatch):
    """A kill between the renames of a swap: the next `cxrfair run` completes it before planning."""
    import cxrfair.publish as publish

    _run_fake(tmp_path)
    real = publish._finish
    monkeypatch.setattr(publish, "_finish", lambda staging: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        _run_fake(tmp_path, epochs=6)  # journal written, nothing moved yet
    monkeypatch.setattr(publish, "_finish", real)
    assert _runs_and_epochs(tmp_path / "exp" / "runs")["tiny-clip__linear__best__s0"] == 5
    assert _run_fake(tmp_path, epochs=6) == ["linear-tiny-clip", "mlp-tiny-clip", "analyze"]
    assert _runs_and_epochs(tmp_path / "exp" / "runs")["tiny-clip__linear__best__s0"] == 6


@pytest.mark.slow
def test_changing_a_probe_value_on_a_real_experiment(tmp_path):
    """The real stages: finish an experiment, change [probe] epochs, rerun twice (the reported crash)."""
    import pandas as pd

    text = SMALL.replace('methods = ["zeroshot", "linear", "lora"]', 'methods = ["zeroshot", "linear"]')
    config = _write_config(tmp_path, text)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1")

    def run() -> subprocess.CompletedProcess:
        result = subprocess.run([sys.executable, "-m", "cxrfair", "run", str(config)], capture_output=True, text=True,
                                env=env, timeout=600)
        assert result.returncode == 0, result.stdout + result.stderr
        return result

    run()
    runs = tmp_path / "exp" / "runs"
    zeroshot = {p.name: p.stat().st_mtime_ns for p in runs.glob("tiny-clip__zeroshot__*")}
    config.write_text(config.read_text().replace("epochs = 5", "epochs = 6", 1))
    result = run()
    assert [line[4:] for line in result.stdout.splitlines() if line.startswith("==> ")] == ["linear-tiny-clip", "analyze"]
    linear = json.loads((runs / "tiny-clip__linear__best__s0" / "run.json").read_text())
    assert linear["hyperparameters"]["epochs"] == 6 and len(linear["curves"]["val_loss"]) == 6
    sweep = pd.read_csv(runs / "tiny-clip__linear__sweep.csv")  # the new sweep's table, not the old one
    assert sweep.loc[sweep["selected"], "best_val_loss"].iloc[0] == pytest.approx(min(linear["curves"]["val_loss"]), rel=1e-5)
    assert {p.name: p.stat().st_mtime_ns for p in runs.glob("tiny-clip__zeroshot__*")} == zeroshot
    assert sorted(p.name for p in runs.iterdir() if "__linear" in p.name) == ["tiny-clip__linear__best__s0",
                                                                               "tiny-clip__linear__sweep.csv"]
    assert "0 step(s) to run" in run().stdout  # the second rerun: no crash, nothing to redo


def test_a_changed_cohort_moves_the_old_cohorts_runs_aside_and_reruns(tmp_path, fake_stages, capsys):
    """Editing [cohort] seed on a finished experiment: old runs (and sweeps) move to stale/, never deleted."""
    from cxrfair.core.runs import RunKey

    _run_fake(tmp_path)
    exp = tmp_path / "exp"
    old = _tree(exp / "runs")
    # A fine-tuning candidate of the old cohort under sweeps/ (what stopped LoRA on every rerun).
    _fake_run(exp / "sweeps" / "tiny-clip__lora", RunKey("tiny-clip", "lora", "lr0.001", 0), {})
    assert _run_fake(tmp_path, cohort_seed=1) == ["cohort", "extract-tiny-clip", "zeroshot-tiny-clip",
                                                  "linear-tiny-clip", "mlp-tiny-clip", "analyze"]
    said = capsys.readouterr().out
    assert re.search(r"note: moved 7 run\(s\) made on cohort c0… \(this cohort is c1…\) from runs, "
                     r"sweeps/tiny-clip__lora to .*stale/c0; the steps rebuild them, nothing was deleted", said), said
    assert _tree(exp / "stale" / "c0" / "runs") == old  # every old entry, sweep files included, byte for byte
    assert (exp / "stale" / "c0" / "sweeps" / "tiny-clip__lora" / "tiny-clip__lora__lr0.001__s0" / "run.json").is_file()
    assert fake_stages[-1] and all(json.loads((r / "run.json").read_text())["cohort_hash"] == "c1"
                                   for r in (exp / "runs").iterdir() if r.is_dir())
    assert not list((exp / "sweeps" / "tiny-clip__lora").iterdir())
    # Back to the first cohort: the c1 runs go aside in their turn; the c0 ones already there are kept.
    lines = []
    _run_fake(tmp_path, cohort_seed=0, lines=lines)
    assert {p.name for p in (exp / "stale").iterdir()} == {"c0", "c1"}
    assert _tree(exp / "stale" / "c0" / "runs") == old


def test_runs_of_a_cohort_rebuilt_by_an_unfinished_run_are_moved_before_any_step(tmp_path, fake_stages):
    from cxrfair.core.runs import RunKey

    _run_fake(tmp_path)
    exp = tmp_path / "exp"
    _fake_run(exp / "runs", RunKey("tiny-clip", "lora", "best", 0), {}, cohort_hash="c9")  # left by another cohort
    lines = []
    assert _run_fake(tmp_path, lines=lines) == []  # nothing else changed: every step reused
    assert any(re.match(r"note: moved 1 run\(s\) made on cohort c9… \(this cohort is c0…\) from runs to ", line)
               for line in lines), lines
    assert (exp / "stale" / "c9" / "runs" / "tiny-clip__lora__best__s0").is_dir()
