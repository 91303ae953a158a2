"""`[probe] shots` in `cxrfair run`, and configs/adfair-clip.toml: planned, then run end to end on synthetic data."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd
import pytest

from cxrfair.config import config_from_dict, load_config
from cxrfair.errors import CxrfairError
from cxrfair.pipeline import experiment_steps, run_experiment
from cxrfair.steps import plan

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[2]
ADFAIR = REPO / "configs" / "adfair-clip.toml"


def _synthetic(out: Path, **probe) -> dict:
    """configs/adfair-clip.toml on synthetic CheXpert-format data with the tiny model, sized for tests."""
    data = tomllib.loads(ADFAIR.read_text(encoding="utf-8"))
    data |= {"out": str(out), "models": ["tiny-clip"], "seeds": 2,
             "synth": {"enabled": True, "format": "chexpert", "patients": 160, "size": 32}}
    data["cohort"] = {k: v for k, v in data["cohort"].items() if k not in ("metadata", "images", "demographics")}
    data["extract"] = {"workers": 0, "batch_size": 64}
    data["analysis"] |= {"bootstrap": 100}
    data["probe"] |= probe
    return data


def test_adfair_config_plans_one_probe_step_per_k_and_analysis_reads_them(tmp_path):
    cfg = load_config(ADFAIR)
    assert cfg.probe.shots == (1, 5, 10) and cfg.methods == ("zeroshot", "linear")
    assert set(cfg.analysis.attributes) == {"race", "sex"}
    steps = {s.name: s for s in experiment_steps(cfg)}
    for model in cfg.models:
        for k in (1, 5, 10):
            step = steps[f"linear-k{k}-{model}"]
            assert step.settings["shots"] == k and step.deps == (f"extract-{model}",)
            assert f"linear-k{k}-{model}" in steps["analyze"].deps
        assert "shots" not in steps[f"linear-{model}"].settings  # the whole-split probe's fingerprint is unchanged


def test_shots_change_only_their_own_steps(tmp_path):
    base = _synthetic(tmp_path / "e")
    before = {s.name: s.fingerprint for s, _ in plan(experiment_steps(config_from_dict(base, base=tmp_path)), tmp_path)}
    fewer = base | {"probe": base["probe"] | {"shots": [1, 5]}}
    after = {s.name: s.fingerprint for s, _ in plan(experiment_steps(config_from_dict(fewer, base=tmp_path)), tmp_path)}
    # K = 10's steps go (the base model's and each contrastively adapted model's), nothing else
    assert "linear-k10-tiny-clip" in before
    assert set(before) - set(after) == {n for n in before if n.startswith("linear-k10-")}
    assert all(after[n] == before[n] for n in after if n != "analyze")
    none = base | {"probe": {k: v for k, v in base["probe"].items() if k != "shots"}}
    plain = {s.name: s.fingerprint for s, _ in plan(experiment_steps(config_from_dict(none, base=tmp_path)), tmp_path)}
    assert plain["linear-tiny-clip"] == before["linear-tiny-clip"]


@pytest.mark.parametrize("change, message", [
    ({"probe": {"shots": [5, 5]}}, "[probe] shots: 5 listed more than once"),
    ({"probe": {"shots": [0]}}, "[probe] shots: must be a whole number >= 1"),
    ({"methods": ["zeroshot"], "probe": {"shots": [5]}}, "[probe] shots: few-shot runs are linear / mlp probes"),
    ({"probe": {"shots": 5}}, "[probe] shots = 5: expected a list of integers"),
])
def test_bad_shots_are_refused_while_planning(tmp_path, change, message):
    data = _synthetic(tmp_path / "e")
    data = data | {k: (data.get(k, {}) | v if isinstance(v, dict) else v) for k, v in change.items()}
    with pytest.raises(CxrfairError) as err:
        experiment_steps(config_from_dict(data, base=tmp_path))
    assert message in str(err.value)


@pytest.mark.slow  # synthetic data -> cohort -> tiny-clip -> zero-shot and 4 probe families -> report (~2 min)
def test_adfair_config_runs_end_to_end_on_synthetic_data(tmp_path):
    out = tmp_path / "adfair"
    report = run_experiment(config_from_dict(_synthetic(out), base=tmp_path), echo=lambda line: None)
    runs = {p.parent.name: json.loads(p.read_text()) for p in (out / "runs").glob("*/run.json")}
    for k in (1, 5, 10):
        few = [runs[f"tiny-clip__linear-k{k}__best__s{s}"]["fewshot"] for s in (0, 1)]
        assert [f["shots"] for f in few] == [k, k] and few[0]["image_ids"] != few[1]["image_ids"]
        assert all(f["short"] or min(min(c) for c in f["counts"].values()) >= k for f in few)
    assert {"tiny-clip__linear__best__s0", "tiny-clip__linear__best__s1"} <= set(runs)
    t = pd.read_csv(out / "report" / "fewshot.csv", keep_default_na=False)
    assert set(t["setting"]) == {"zero-shot", "1-shot", "5-shot", "10-shot", "all"}
    assert {"race", "sex"} <= set(t["attribute"]) and {"auc_macro", "es_auc", "auc_gap"} <= set(t["metric"])
    text = (out / "report" / "report.md").read_text(encoding="utf-8")
    assert "Few-shot by race" in text and "Few-shot by sex" in text
    assert (out / "report" / "figures" / "fewshot_race.png").is_file() and report.is_file()
