"""A finished experiment that is moved or copied resumes with every step reused (fingerprints and
stamps hold paths relative to the experiment folder)."""

from __future__ import annotations

import json
import shutil

from cxrfair.config import load_config
from cxrfair.pipeline import run_experiment
from tests.pipeline.test_pipeline import FAKE, fake_stages  # noqa: F401  (the fixture)


def _run(folder, monkeypatch) -> list[str]:
    monkeypatch.chdir(folder)  # a relative ``out`` is relative to the working folder
    lines = []
    run_experiment(load_config(folder / "exp.toml"), echo=lines.append)
    return [line[4:] for line in lines if line.startswith("==> ")]


def test_a_copied_experiment_reuses_every_step(tmp_path, fake_stages, monkeypatch):  # noqa: F811
    first = tmp_path / "a"
    first.mkdir()
    (first / "exp.toml").write_text(FAKE.format(out="exp", epochs=5, seeds=2))
    ran = _run(first, monkeypatch)
    assert len(ran) == 7
    stamp = json.loads((first / "exp" / ".steps" / "zeroshot-tiny-clip.json").read_text())
    assert stamp["produced"] and all(p.startswith("<experiment>/") for p in stamp["produced"])
    copy = tmp_path / "elsewhere" / "b"
    shutil.copytree(first, copy)
    assert _run(copy, monkeypatch) == []  # every step reused
    shutil.rmtree(first)  # and it does not lean on the original
    assert _run(copy, monkeypatch) == []
    stamp = json.loads((copy / "exp" / ".steps" / "cohort.json").read_text())
    assert stamp["settings"]["metadata"].startswith(str(tmp_path / "a"))  # the settings held absolute paths
    # A setting that changes still reruns (the relative form is not blind to settings).
    (copy / "exp.toml").write_text(FAKE.format(out="exp", epochs=6, seeds=2))
    assert "linear-tiny-clip" in _run(copy, monkeypatch)


def test_stamps_written_with_absolute_paths_are_still_accepted(tmp_path, fake_stages, monkeypatch):  # noqa: F811
    from cxrfair.pipeline import experiment_steps
    from cxrfair.steps import fingerprint

    (tmp_path / "exp.toml").write_text(FAKE.format(out="exp", epochs=5, seeds=2))
    assert len(_run(tmp_path, monkeypatch)) == 7
    # Rewrite every stamp as the previous release did: fingerprint of the absolute settings, absolute paths.
    monkeypatch.chdir(tmp_path)
    steps = experiment_steps(load_config(tmp_path / "exp.toml"))
    prints = {}
    for step in steps:
        prints[step.name] = fingerprint(step, prints)
        path = tmp_path / "exp" / ".steps" / f"{step.name}.json"
        data = json.loads(path.read_text())
        data["fingerprint"] = prints[step.name]
        data["produced"] = [p.replace("<experiment>", str(tmp_path / "exp")) for p in data["produced"]]
        path.write_text(json.dumps(data))
    assert _run(tmp_path, monkeypatch) == []
