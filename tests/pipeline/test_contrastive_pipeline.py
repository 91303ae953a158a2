"""`cxrfair run` with [[contrastive]] entries: fine-tune -> extract the adapted model -> zero-shot, beside the base model.

The planning tests are fast (no torch work); the end-to-end run on synthetic data is slow (~1 min on 2 cores).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from cxrfair.cli import main
from cxrfair.config import load_config
from cxrfair.errors import CxrfairError
from cxrfair.pipeline import experiment_steps
from cxrfair.steps import plan

# The base model and one FairCLIP-term fine-tune (seed 7: its name is this test's alone, since a
# process registers each adapted model's name once).
SMALL = """
out = "{out}"
models = ["tiny-clip"]
methods = ["zeroshot"]
seeds = 1

[synth]
enabled = true

[cohort]
per_group = 10

[extract]
workers = 0
batch_size = 64

[analysis]
bootstrap = 0
cross = []

[[contrastive]]
mitigation = "fairot"
sensitive = "sex"
strengths = [0.5]
seeds = [7]
epochs = 1
batch_size = 64
workers = 1
device = "cpu"
{extra}
"""
ADAPTED = "tiny-clip.ctr-lora-fairot-sex-st0.5.s7"


def _config(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "exp.toml"
    path.write_text(SMALL.format(out=tmp_path / "exp", extra=extra))
    return path


def test_each_entry_plans_fine_tune_then_extract_then_zero_shot_and_the_analysis_reads_them(tmp_path):
    extra = '\n[[contrastive]]\nadapter = "full"\nseeds = [0, 1]\nmethods = ["zeroshot", "linear"]\nepochs = 2\n'
    steps = {s.name: s for s in experiment_steps(load_config(_config(tmp_path, extra)))}
    erm = [f"tiny-clip.ctr-full.s{seed}" for seed in (0, 1)]
    for name in (ADAPTED, *erm):
        assert steps[f"contrastive-{name}"].deps == ("cohort",)
        assert steps[f"extract-{name}"].deps == (f"contrastive-{name}",)
        assert steps[f"extract-{name}"].settings["source"] == f"contrastive:{tmp_path / 'exp' / 'contrastive' / name}"
        assert steps[f"zeroshot-{name}"].deps == (f"extract-{name}",)
        assert f"zeroshot-{name}" in steps["analyze"].deps
    assert {f"linear-{n}" for n in erm} <= set(steps["analyze"].deps) and f"linear-{ADAPTED}" not in steps
    assert "zeroshot-tiny-clip" in steps["analyze"].deps  # before and after, side by side
    train = steps[f"contrastive-{ADAPTED}"].settings
    assert (train["mitigation"], train["sensitive"], train["strength"], train["seed"], train["epochs"]) == (
        "fairot", "sex", 0.5, 7, 1)
    assert steps[f"contrastive-{erm[0]}"].settings["adapter"] == "full"
    # the base model's extract step is unchanged by the new options (its fingerprint holds no source)
    assert "source" not in steps["extract-tiny-clip"].settings
    # one entry's settings reach its own steps only: another strength adds steps, changes none of these
    more = {s.name: s for s in experiment_steps(load_config(_config(tmp_path, extra.replace("seeds = [0, 1]",
                                                                                            "seeds = [0, 1]\nlr = 0.01"))))}
    for name in steps:
        changed = more[name].settings != steps[name].settings
        assert changed == (name in {f"contrastive-{n}" for n in erm}), name


def test_an_adapted_model_gets_the_embedding_analyses_its_base_model_is_listed_for(tmp_path):
    path = _config(tmp_path)
    path.write_text(path.read_text().replace("[analysis]", '[embeddings]\nleakage = ["tiny-clip"]\n\n[analysis]'))
    steps = {s.name: s for s in experiment_steps(load_config(path))}
    names = list(steps)
    assert steps[f"leakage-{ADAPTED}"].deps == (f"extract-{ADAPTED}",) and "leakage-tiny-clip" in steps
    assert names.index(f"leakage-{ADAPTED}") > names.index(f"extract-{ADAPTED}")  # dependency order
    assert steps[f"leakage-{ADAPTED}"].settings == steps["leakage-tiny-clip"].settings | {"model": ADAPTED}
    assert not any(n.startswith("geometry-") for n in names)  # only what the base model is listed for
    assert steps["analyze"].settings["embeddings"] == str(tmp_path / "exp" / "embeddings")


def test_tracking_changes_no_fingerprint_but_a_training_key_does(tmp_path):
    def prints(extra: str) -> dict:
        return {s.name: s.fingerprint for s, _ in plan(experiment_steps(load_config(_config(tmp_path, extra))),
                                                       tmp_path / "exp")}

    base = prints("")
    assert prints('track = "tensorboard"') == base
    changed = {k for k, v in prints("lora_rank = 4").items() if v != base[k]}
    assert changed == {f"contrastive-{ADAPTED}", f"extract-{ADAPTED}", f"zeroshot-{ADAPTED}", "analyze"}


@pytest.mark.parametrize("extra, message", [
    ('models = ["biomedclip"]', "[[contrastive]] #2 models: biomedclip not among models (tiny-clip)"),
    ('methods = ["lora"]', "[[contrastive]] #2 methods: ['lora']: choose one or more of zeroshot, linear, mlp"),
    ('sensitive = "hair"\nmitigation = "groupdro"', "[[contrastive]] #2 sensitive: 'hair' is not a sensitive attribute"),
    ("strengths = [1.0]", "[[contrastive]] #2 strengths: erm has no strength; remove strengths"),
    ('mitigation = "thresholds"\nsensitive = "sex"', "[[contrastive]] #2 mitigation thresholds: not a contrastive"),
    ('adapter = "head"', "[[contrastive]] #2 adapter"),
    ('text = "half"', "[[contrastive]] #2 text 'half'"),
    ("seeds = []", "[[contrastive]] #2 seeds: list at least one seed"),
    ('mitigation = "fairot"\nsensitive = "sex"\nstrengths = [0.5]\nseeds = [7]',
     f"[[contrastive]] #2: fine-tunes {ADAPTED} as [[contrastive]] #1 does"),
    ("epochs = 0", "[[contrastive]] #2 epochs"),
    ("nonsense = 1", "[[contrastive]] #2 unknown key(s) nonsense"),
])
def test_a_bad_entry_is_one_line_at_planning(tmp_path, extra, message):
    path = _config(tmp_path, f"\n[[contrastive]]\n{extra}\n")
    result = CliRunner().invoke(main, ["run", str(path), "--dry-run"])
    assert result.exit_code == 1 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "exp").exists()


def test_an_image_only_model_is_refused_by_name(tmp_path):
    path = tmp_path / "exp.toml"
    path.write_text(SMALL.format(out=tmp_path / "exp", extra="").replace('models = ["tiny-clip"]', 'models = ["tiny-rad-dino"]')
                    .replace('methods = ["zeroshot"]', 'methods = ["linear"]').replace("[[contrastive]]", "[[contrastive]]\nmethods = [\"linear\"]"))
    with pytest.raises(CxrfairError, match=r"\[\[contrastive\]\] #1: tiny-rad-dino has no text encoder"):
        experiment_steps(load_config(path))


@pytest.mark.slow  # ~1 min on 2 shared cores: one epoch of LoRA fine-tuning, two extractions, the analysis
def test_a_contrastive_experiment_runs_end_to_end_then_reruns_nothing(tmp_path):
    import pandas as pd

    from cxrfair.core.runs import read_runs
    from cxrfair.extract.cache import read_cache

    config = _config(tmp_path)
    runner = CliRunner()
    dry = runner.invoke(main, ["run", str(config), "--dry-run"])
    assert dry.exit_code == 0, dry.output
    for step in (f"contrastive-{ADAPTED}", f"extract-{ADAPTED}", f"zeroshot-{ADAPTED}", "zeroshot-tiny-clip", "analyze"):
        assert f"{step}  " in dry.output or dry.output.rstrip().endswith(step), step
    assert not (tmp_path / "exp").exists()

    first = runner.invoke(main, ["run", str(config)])
    assert first.exit_code == 0, first.output
    exp = tmp_path / "exp"
    folder = exp / "contrastive" / ADAPTED
    record = json.loads((folder / "contrastive.json").read_text())
    assert (record["name"], record["mitigation"], record["strength"], record["seed"]) == (ADAPTED, "fairot", 0.5, 7)
    cache = read_cache(exp / "cache" / f"{ADAPTED}.h5")
    assert cache.model == ADAPTED and cache.attrs["adapted"]["name"] == ADAPTED
    assert cache.attrs["adapted"]["run_dir"] == str(folder.resolve())
    base_id = read_cache(exp / "cache" / "tiny-clip.h5").attrs["weights_id"]
    assert record["base_weights_id"] == base_id and cache.attrs["weights_id"].startswith(base_id + "+contrastive:sha256:")
    runs = read_runs(exp / "runs")
    assert {(r.meta["model"], r.meta["method"]) for r in runs} == {("tiny-clip", "zeroshot"), (ADAPTED, "zeroshot")}
    metrics = pd.read_csv(exp / "report" / "metrics.csv")
    auc = metrics[(metrics["metric"] == "auc_macro") & metrics["attribute"].isna()]
    assert set(auc["model"]) == {"tiny-clip", ADAPTED}
    es = metrics[metrics["metric"] == "es_auc"]
    assert {"tiny-clip", ADAPTED} <= set(es["model"]) and "sex" in set(es["attribute"])

    again = runner.invoke(main, ["run", str(config)])
    assert again.exit_code == 0, again.output
    assert "0 step(s) to run" in again.output and "==>" not in again.output
