"""`cxrfair run`: config validation, the plan, and resuming a killed run without redoing steps."""

import json
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
    ('models = ["tiny-clip"]\n[probe]\nepochs = "ten"\n', "[probe].epochs: expected a number"),
    ('models = ["tiny-clip"]\nmethods = ["linear", "dance"]\n', "methods: unknown ['dance']"),
    ('methods = ["linear"]\n', "`models = [...]` is required"),
    ('models = ["no-such-model"]\n', "unknown model"),
    ('models = [\n', "not valid TOML"),
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
    assert before.settings["metadata_sha256"] != after.settings["metadata_sha256"]
