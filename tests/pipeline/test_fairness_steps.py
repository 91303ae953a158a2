"""`cxrfair run` v2 keys: cohort files and rules, probe solver options, analysis cross/shortcut,
[embeddings], [[postprocess]] and [[mitigations]] — planned, checked at dry run, fingerprinted.

The stages are not run here (fast tests): steps are planned and their `run` is called with the
stage replaced where noted; test_pipeline.py and the demo run the real stages.
"""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from cxrfair import fairness_steps
from cxrfair.core.runs import RunKey, make_predictions, write_run
from cxrfair.cli import main
from cxrfair.config import config_from_dict, load_config
from cxrfair.errors import CxrfairError
from cxrfair.pipeline import demo_config, experiment_steps
from cxrfair.steps import plan

REPO = Path(__file__).resolve().parents[2]

MITIGATION_ENTRY_KEYS = ("mitigation", "sensitive", "strengths", "select", "adversary", "enabled")


def _base(tmp_path: Path) -> dict:
    """A synthetic experiment using every new section."""
    return {
        "out": str(tmp_path / "exp"), "models": ["tiny-clip"], "methods": ["zeroshot", "linear", "mlp", "lora"],
        "seeds": 2,
        "synth": {"enabled": True, "drains": True},
        "cohort": {"per_group": 10},
        "probe": {"l2": [1e-3, 1e-2], "hidden": [16]},
        "extract": {},
        "finetune": {"epochs": 1, "lora_lr": [1e-3, 3e-3]},
        "analysis": {"bootstrap": 100, "cross": ["sex", "age_group"]},
        "embeddings": {"leakage": ["tiny-clip"], "geometry": ["tiny-clip"], "permutations": 2,
                       "geometry_permutations": 199},
        "postprocess": [{"methods": ["linear", "zeroshot"], "sensitive": "sex"}],
        "mitigations": [
            {"methods": ["linear", "mlp"], "mitigation": "groupdro", "sensitive": "sex", "strengths": [0.01, 0.1],
             "select": "worst_group"},
            {"methods": ["lora"], "mitigation": "adversarial", "sensitive": "age_group", "strengths": [0.3, 1.0],
             "adversary": "grl"},
        ],
    }


def _names(data: dict, tmp_path: Path) -> list[str]:
    return [s.name for s in experiment_steps(config_from_dict(data, base=tmp_path))]


def test_every_new_section_plans_its_steps(tmp_path):
    steps = {s.name: s for s in experiment_steps(config_from_dict(_base(tmp_path), base=tmp_path))}
    assert list(steps) == [
        "synth", "cohort", "extract-tiny-clip", "zeroshot-tiny-clip", "linear-tiny-clip", "mlp-tiny-clip",
        "lora-tiny-clip-lr0.001-s0", "lora-tiny-clip-lr0.003-s0", "lora-tiny-clip",
        "leakage-tiny-clip", "geometry-tiny-clip",
        "linear+thresholds-sex-tiny-clip", "zeroshot+thresholds-sex-tiny-clip",
        "linear+groupdro-sex-tiny-clip", "mlp+groupdro-sex-tiny-clip", "lora+adversarial-age_group-tiny-clip",
        "analyze"]
    assert steps["linear+thresholds-sex-tiny-clip"].deps == ("linear-tiny-clip",)
    assert steps["lora+adversarial-age_group-tiny-clip"].deps == ("lora-tiny-clip",)  # reuses ERM's learning rate
    assert steps["leakage-tiny-clip"].deps == ("extract-tiny-clip",)
    assert set(steps["analyze"].deps) == set(steps) - {"synth", "cohort", "extract-tiny-clip", "lora-tiny-clip-lr0.001-s0",
                                                       "lora-tiny-clip-lr0.003-s0", "analyze"}
    assert steps["cohort"].settings["drains"].endswith("NIH-CX14_TubeAnnotations_NonExperts_aggregated.csv")


def test_the_dropped_enabled_key_is_refused_by_name(tmp_path):
    data = _base(tmp_path)
    data["mitigations"][0]["enabled"] = False
    with pytest.raises(CxrfairError, match=r"\[\[mitigations\]\] #1 enabled: no longer a key .* remove or comment out"):
        config_from_dict(data, base=tmp_path)


def _write_fake_run(runs: Path, key: RunKey, n: int = 48, hyper: dict | None = None) -> Path:
    """A multi-class run with enough validation rows per sex for post-processing."""
    rng = np.random.default_rng(key.seed)
    classes = ["Effusion", "Edema"]
    rows = pd.DataFrame({"image_id": [f"i{i}" for i in range(n)], "patient_id": np.arange(n),
                         "split": ["val", "test"] * (n // 2), "label": [classes[i % 4 < 2] for i in range(n)],
                         "sex": ["M", "M", "F", "F"] * (n // 4), "age": 50, "age_group": ["young", "old"] * (n // 2)})
    p = rng.uniform(0.05, 0.95, n)
    meta = {"run_id": key.run_id, "model": key.model, "method": key.method, "seed": key.seed, "classes": classes,
            "cohort_hash": "c0", "hyperparameters": hyper or {}, "selected_epoch": 1, "trainable_params": 0, "timings": {}}
    return write_run(runs, meta, make_predictions(rows, np.stack([p, 1 - p], 1), classes), force=True)


def test_postprocess_step_writes_the_thresholds_family_from_every_seed(tmp_path):
    cfg = config_from_dict(_base(tmp_path), base=tmp_path)
    steps = experiment_steps(cfg)
    step = next(s for s in steps if s.name == "linear+thresholds-sex-tiny-clip")
    runs = tmp_path / "exp" / "runs"
    for seed in (0, 1):
        _write_fake_run(runs, RunKey("tiny-clip", "linear", "best", seed))
    _write_fake_run(runs, RunKey("tiny-clip", "mlp", "best", 0))  # another family: not post-processed
    plan(steps, tmp_path / "exp")  # gives the step its fingerprint (its staging folder's mark)
    produced = step.run(False)
    assert sorted(p.name for p in produced) == ["tiny-clip__linear+thresholds-sex__best__s0",
                                                "tiny-clip__linear+thresholds-sex__best__s1"]
    meta = json.loads((runs / "tiny-clip__linear+thresholds-sex__best__s1" / "run.json").read_text())
    assert (meta["source_run"], meta["sensitive"], meta["constraint"], meta["strength"]) == (
        "tiny-clip__linear__best__s1", "sex", "equalized_odds", 0.02)


def test_mitigation_steps_call_the_stage_apis_with_the_entry(tmp_path, monkeypatch):
    """A mitigation step builds the stage's config ([probe] / [finetune] + the entry) and calls its
    library function: no argv, no click."""
    data = _base(tmp_path)
    data["probe"] |= {"max_iter": 50, "standardize": False, "weight_decay": [0, 1e-2]}
    data["finetune"] |= {"lora_alpha": 16, "micro_batch": 8}
    cfg = config_from_dict(data, base=tmp_path)
    steps = {s.name: s for s in experiment_steps(cfg)}
    exp = tmp_path / "exp"
    calls = []

    def probe_cache(cache, out, config, force=False):  # writes the run the real stage would, so the step can publish it
        calls.append(("probe", cache, out, config, force))
        return [_write_fake_run(Path(out), RunKey("tiny-clip", config.method, "best", 0, config.mitigation, config.sensitive))]

    def finetune(config, progress=True):
        calls.append(("finetune", config))
        _write_fake_run(config.out, RunKey("tiny-clip", config.method, config.tag, config.seed, config.mitigation,
                                           config.sensitive))

    def no_cli(*args, **kwargs):
        raise AssertionError("a step went through the command line")

    monkeypatch.setattr("cxrfair.probe.sweep.probe_cache", probe_cache)
    monkeypatch.setattr("cxrfair.finetune.train.finetune", finetune)
    monkeypatch.setattr(main, "main", no_cli)
    _write_fake_run(exp / "runs", RunKey("tiny-clip", "lora", "best", 0), hyper={"lr": 0.003})  # the ERM choice
    plan(list(steps.values()), exp)
    steps["mlp+groupdro-sex-tiny-clip"].run(False)
    [(_, cache, out, sweep, force)] = calls
    assert (cache, out, force) == (exp / "cache" / "tiny-clip.h5", exp / ".staging" / "mlp+groupdro-sex-tiny-clip", True)
    # [probe]'s sweep, with the entry's mitigation; groupdro's objective changes every step: AdamW, not L-BFGS.
    assert (sweep.method, sweep.solver, sweep.standardize, sweep.seeds, sweep.hiddens, sweep.epochs) == (
        "mlp", "adamw", False, (0, 1), (16,), 150)
    assert (sweep.mitigation, sweep.sensitive, sweep.strengths, sweep.select, sweep.adversary) == (
        "groupdro", "sex", (0.01, 0.1), "worst_group", "grl")
    assert sweep.weight_decays == (0.0, 0.01) and all(type(v) is float for v in sweep.weight_decays)  # as the CLI parsed them
    calls.clear()
    produced = steps["lora+adversarial-age_group-tiny-clip"].run(False)
    staging = exp / ".staging" / "lora+adversarial-age_group-tiny-clip"
    # One run per strength and seed (the analysis chooses the strength on validation), at the ERM learning rate.
    runs = [c for _, c in calls]
    assert [(c.strength, c.seed, c.lr, c.out, c.tag) for c in runs] == [
        (st, seed, 0.003, staging, f"st{st:g}") for st in (0.3, 1.0) for seed in (0, 1)]
    assert {(c.model, c.method, c.epochs, c.mitigation, c.sensitive, c.micro_batch, c.resume, c.force) for c in runs} == {
        ("tiny-clip", "lora", 1, "adversarial", "age_group", 8, True, True)}
    assert {type(c.lora_alpha) for c in runs} == {float}
    assert sorted(p.name for p in produced) == [f"tiny-clip__lora+adversarial-age_group__st{st}__s{seed}"
                                                for st in ("0.3", "1") for seed in (0, 1)]
    assert (exp / "runs" / "tiny-clip__lora__best__s0").is_dir()  # the ERM family is not touched


def test_a_stage_error_in_a_mitigation_step_is_one_line(tmp_path):
    steps = {s.name: s for s in experiment_steps(config_from_dict(_base(tmp_path), base=tmp_path))}
    plan(list(steps.values()), tmp_path / "exp")
    with pytest.raises(CxrfairError) as info:  # no embedding cache yet
        steps["linear+groupdro-sex-tiny-clip"].run(False)
    assert "tiny-clip.h5" in str(info.value) and "\n" not in str(info.value)


ENTRY_ERRORS = [
    ("mitigations", 0, {"mitigation": "thresholds"}, "[[mitigations]] #1 mitigation 'thresholds': thresholds is post-processing: use [[postprocess]]"),
    ("mitigations", 0, {"mitigation": "erm"}, "erm is the plain method: list it under methods"),
    ("mitigations", 0, {"mitigation": "dance"}, "mitigation 'dance': choose one of reweight, groupdro, adversarial, fairot, erase"),
    ("mitigations", 0, {"strengths": []}, "[[mitigations]] #1 strengths: give at least one strength for groupdro"),
    ("mitigations", 0, {"strengths": [0.0]}, "strengths 0: groupdro strengths must be in (0, inf)"),
    ("mitigations", 0, {"mitigation": "reweight", "strengths": [1.5]}, "strengths 1.5: reweight strengths must be in [0, 1]"),
    ("mitigations", 0, {"mitigation": "erase"}, "strengths: erase takes none"),
    ("mitigations", 1, {"mitigation": "erase", "strengths": []}, "[[mitigations]] #2 mitigation erase: probes only"),
    ("mitigations", 0, {"select": "auc"}, "select 'auc': choose one of worst_group, loss, gap"),
    ("mitigations", 1, {"select": "loss"}, "select 'loss': probes only"),
    ("mitigations", 0, {"adversary": "grl"}, "adversary 'grl': only with mitigation adversarial"),
    ("mitigations", 1, {"adversary": "projection"}, "adversary 'projection': only with mitigation adversarial; grl, or projection for probes"),
    ("mitigations", 0, {"methods": ["full"]}, "[[mitigations]] #1 methods: full not among the experiment's methods"),
    ("mitigations", 0, {"methods": ["zeroshot"]}, "methods: zeroshot not among"),
    ("mitigations", 0, {"methods": []}, "methods: list at least one"),
    ("mitigations", 0, {"sensitive": "race"}, "sensitive 'race': not a sensitive attribute of the cohort (sex, age_group)"),
    ("mitigations", 0, {"models": ["clip-vit-b16"]}, "[[mitigations]] #1 models: clip-vit-b16 not among models (tiny-clip)"),
    ("postprocess", 0, {"constraint": "parity"}, "[[postprocess]] #1 constraint 'parity': choose one of equalized_odds, tpr, fpr"),
    ("postprocess", 0, {"strength": 2}, "[[postprocess]] #1 strength 2: the validation utility given up, in [0, 1]"),
    ("postprocess", 0, {"methods": ["full"]}, "[[postprocess]] #1 methods: full not among"),
    ("postprocess", 0, {"sensitive": "drain"}, "[[postprocess]] #1 sensitive 'drain': not a sensitive attribute"),
]


@pytest.mark.parametrize("section, index, change, message", ENTRY_ERRORS, ids=[m[:40] for *_, m in ENTRY_ERRORS])
def test_a_bad_entry_is_refused_at_planning(tmp_path, section, index, change, message):
    data = _base(tmp_path)
    data[section][index] |= change
    with pytest.raises(CxrfairError) as info:
        experiment_steps(config_from_dict(data, base=tmp_path))
    assert message in str(info.value)


@pytest.mark.parametrize("change, message", [
    ({"embeddings": {"leakage": ["clip-vit-b16"]}}, "[embeddings] leakage: clip-vit-b16 not among models"),
    ({"embeddings": {"geometry": ["tiny-clip"], "geometry_permutations": 10}}, "[embeddings] geometry_permutations: the smallest Holm"),
    ({"embeddings": {"leakage": ["tiny-clip"], "permutations": -1}}, "[embeddings] permutations: must be >= 0"),
    ({"embeddings": {"leakage": ["tiny-clip"], "probes": ["svm"]}}, "[embeddings] probes: choose from linear, mlp, knn"),
    ({"synth": {"enabled": True, "format": "mimic", "drains": True}}, "[synth] drains: only the nih format"),
    ({"cohort": {"metadata": "m.csv"}}, "[cohort] metadata: not used with [synth] enabled"),
    ({"postprocess": [{"methods": ["linear"], "sensitive": "sex"}, {"methods": ["linear"], "sensitive": "sex", "strength": 0.1}]},
     "[[postprocess]] #2: step linear+thresholds-sex-tiny-clip is already planned by another entry"),
])
def test_bad_section_values_are_refused_at_planning(tmp_path, change, message):
    data = {"models": ["tiny-clip"], "methods": ["linear"], "synth": {"enabled": True}, "out": str(tmp_path / "e")} | change
    with pytest.raises(CxrfairError) as info:
        experiment_steps(config_from_dict(data, base=tmp_path))
    assert message in str(info.value)


# ---------------------------------------------------------------- fingerprints

ALL = {"synth", "cohort", "extract-tiny-clip", "zeroshot-tiny-clip", "linear-tiny-clip", "mlp-tiny-clip",
       "lora-tiny-clip-lr0.001-s0", "lora-tiny-clip-lr0.003-s0", "lora-tiny-clip", "leakage-tiny-clip",
       "geometry-tiny-clip", "linear+thresholds-sex-tiny-clip", "zeroshot+thresholds-sex-tiny-clip",
       "linear+groupdro-sex-tiny-clip", "mlp+groupdro-sex-tiny-clip", "lora+adversarial-age_group-tiny-clip", "analyze"}
PROBES_DOWN = {"linear-tiny-clip", "mlp-tiny-clip", "linear+thresholds-sex-tiny-clip", "linear+groupdro-sex-tiny-clip",
               "mlp+groupdro-sex-tiny-clip", "analyze"}
GROUPDRO = {"linear+groupdro-sex-tiny-clip", "mlp+groupdro-sex-tiny-clip"}


def _set(section, key, value, index=None):
    def change(data):
        target = data[section] if index is None else data[section][index]
        target[key] = value
    return change


RERUNS = [
    ("cohort age_bins", _set("cohort", "age_bins", [50]), ALL - {"synth"}),
    ("cohort attributes", _set("cohort", "attributes", ["sex", "age_group"]), ALL - {"synth"}),
    ("synth drains", _set("synth", "drains", False), ALL - {"synth"}),
    ("synth size", _set("synth", "size", 48), ALL),
    # groupdro sweeps always train with AdamW: L-BFGS-only settings leave them alone, AdamW ones rerun them.
    ("probe l2", _set("probe", "l2", [1e-3]), PROBES_DOWN - GROUPDRO),
    ("probe solver", _set("probe", "solver", "adamw"), PROBES_DOWN - GROUPDRO),
    ("probe standardize", _set("probe", "standardize", False), PROBES_DOWN),
    ("probe max_iter", _set("probe", "max_iter", 99), PROBES_DOWN - GROUPDRO),
    ("probe select", _set("probe", "select", "accuracy"),  # mitigation sweeps select by their entry's rule
     {"linear-tiny-clip", "mlp-tiny-clip", "linear+thresholds-sex-tiny-clip", "analyze"}),
    ("probe hidden", _set("probe", "hidden", [32]), {"mlp-tiny-clip", "mlp+groupdro-sex-tiny-clip", "analyze"}),
    ("probe lr (ignored by lbfgs, used by groupdro)", _set("probe", "lr", [0.5]), GROUPDRO | {"analyze"}),
    ("probe zeroshot_term", _set("probe", "zeroshot_term", "global"),
     {"zeroshot-tiny-clip", "zeroshot+thresholds-sex-tiny-clip", "analyze"}),
    ("analysis cross", _set("analysis", "cross", []), {"analyze"}),
    ("analysis shortcut", _set("analysis", "shortcut", "none"), {"analyze"}),
    ("analysis attributes", _set("analysis", "attributes", ["sex"]), {"analyze"}),
    ("embeddings permutations", _set("embeddings", "permutations", 3), {"leakage-tiny-clip", "analyze"}),
    ("embeddings geometry_permutations", _set("embeddings", "geometry_permutations", 299), {"geometry-tiny-clip", "analyze"}),
    ("embeddings attributes", _set("embeddings", "attributes", ["sex"]), {"leakage-tiny-clip", "geometry-tiny-clip", "analyze"}),
    ("postprocess strength", _set("postprocess", "strength", 0.05, 0),
     {"linear+thresholds-sex-tiny-clip", "zeroshot+thresholds-sex-tiny-clip", "analyze"}),
    ("postprocess constraint", _set("postprocess", "constraint", "tpr", 0),
     {"linear+thresholds-sex-tiny-clip", "zeroshot+thresholds-sex-tiny-clip", "analyze"}),
    ("mitigation strengths", _set("mitigations", "strengths", [0.01], 0),
     {"linear+groupdro-sex-tiny-clip", "mlp+groupdro-sex-tiny-clip", "analyze"}),
    ("mitigation select", _set("mitigations", "select", "gap", 0),
     {"linear+groupdro-sex-tiny-clip", "mlp+groupdro-sex-tiny-clip", "analyze"}),
    ("mitigation adversary", _set("mitigations", "adversary", None, 1), {"lora+adversarial-age_group-tiny-clip", "analyze"}),
    ("finetune epochs", _set("finetune", "epochs", 2),
     {"lora-tiny-clip-lr0.001-s0", "lora-tiny-clip-lr0.003-s0", "lora-tiny-clip", "lora+adversarial-age_group-tiny-clip", "analyze"}),
    # Keys the sections take from their stage configs: fingerprinted once set, like any other.
    ("finetune micro_batch", _set("finetune", "micro_batch", 8),
     {"lora-tiny-clip-lr0.001-s0", "lora-tiny-clip-lr0.003-s0", "lora-tiny-clip", "lora+adversarial-age_group-tiny-clip", "analyze"}),
    ("probe memory_budget_mb (where, not what)", _set("probe", "memory_budget_mb", 512.0), set()),
    ("analysis level", _set("analysis", "level", 0.9), {"analyze"}),
    ("embeddings top", _set("embeddings", "top", 5), {"geometry-tiny-clip", "analyze"}),
    ("postprocess max_candidates", _set("postprocess", "max_candidates", 64, 0),
     {"linear+thresholds-sex-tiny-clip", "zeroshot+thresholds-sex-tiny-clip", "analyze"}),
    ("extract features", _set("extract", "features", "unprojected"),  # fine-tuning reads the images, not the cache
     ALL - {"synth", "cohort", "lora-tiny-clip-lr0.001-s0", "lora-tiny-clip-lr0.003-s0", "lora-tiny-clip",
            "lora+adversarial-age_group-tiny-clip"}),
]


@pytest.mark.parametrize("what, change, expected", RERUNS, ids=[r[0] for r in RERUNS])
def test_a_changed_setting_reruns_only_its_steps_and_their_dependants(tmp_path, what, change, expected):
    def prints(data):
        return {s.name: s.fingerprint for s, _ in plan(experiment_steps(config_from_dict(data, base=tmp_path)), tmp_path)}

    data = _base(tmp_path)
    before = prints(data)
    assert set(before) == ALL
    change(data)
    if data["mitigations"][1].get("adversary", "") is None:
        data["mitigations"][1].pop("adversary")
    after = prints(data)
    assert {name for name in ALL if before[name] != after[name]} == expected


def test_changing_a_cohort_file_reruns_the_cohort(tmp_path):
    drains = tmp_path / "neatx.csv"
    split = tmp_path / "lists"
    split.mkdir()
    for name in ("test_list.txt", "train_val_list.txt"):
        (split / name).write_text("a.png\n")
    drains.write_text("Image Index,Drain\n")
    data = {"models": ["tiny-clip"], "methods": ["linear"], "out": str(tmp_path / "e"),
            "cohort": {"preset": "nih-neatx-pneumothorax", "images": str(tmp_path), "drains": str(drains),
                       "official_split": str(split)}}

    def cohort_print():
        return next(s for s, _ in plan(experiment_steps(config_from_dict(data, base=tmp_path)), tmp_path)
                    if s.name == "cohort").fingerprint

    first = cohort_print()
    assert cohort_print() == first
    drains.write_text("Image Index,Drain\na.png,1\n")
    second = cohort_print()
    (split / "test_list.txt").write_text("b.png\n")
    assert len({first, second, cohort_print()}) == 3


def test_a_csv_cohort_takes_its_column_map_from_the_config(tmp_path):
    (tmp_path / "m.csv").write_text("P,ID,S,A,E\na.png,1,M,40,1\n")
    cfg = config_from_dict({"models": ["tiny-clip"], "methods": ["linear"], "out": str(tmp_path / "e"), "cohort": {
        "dataset": "csv", "preset": "all-multilabel", "metadata": "m.csv", "images": ".",
        "columns": {"path": "P", "patient": "ID", "sex": "S", "age": "A"}, "labels": ["Edema=E"], "split": "0.6,0.2,0.2"}},
        base=tmp_path)
    cohort = experiment_steps(cfg)[0]
    assert (cohort.settings["dataset"], cohort.settings["columns"]["patient"], cohort.settings["split"]) == ("csv", "ID", "0.6,0.2,0.2")
    assert set(cohort.settings["sources_sha256"]) == {"metadata"}
    with pytest.raises(CxrfairError, match=r"\[cohort\] split"):
        experiment_steps(config_from_dict({"models": ["tiny-clip"], "cohort": {"split": "1,2"}}, base=tmp_path))


# ---------------------------------------------------------------- the shipped configs

def _fake_mimic(root: Path) -> None:
    for name in ("mimic-cxr-2.0.0-metadata.csv.gz", "mimic-cxr-2.0.0-chexpert.csv.gz", "mimic-cxr-2.0.0-split.csv.gz"):
        (root / "data/mimic-cxr-jpg/2.0.0").mkdir(parents=True, exist_ok=True)
        (root / "data/mimic-cxr-jpg/2.0.0" / name).write_bytes(b"x")
    (root / "data/mimiciv/2.2/hosp").mkdir(parents=True)
    for name in ("patients.csv.gz", "admissions.csv.gz"):
        (root / "data/mimiciv/2.2/hosp" / name).write_bytes(b"x")


def _fake_neatx(root: Path) -> None:
    (root / "data/nih").mkdir(parents=True)
    (root / "data/neatx").mkdir(parents=True)
    for name in ("test_list.txt", "train_val_list.txt"):
        (root / "data/nih" / name).write_text("x\n")
    (root / "data/neatx/NIH-CX14_TubeAnnotations_NonExperts_aggregated.csv").write_text("Image Index,Drain\n")


MODELS = ["biovil", "biovil-t", "chexzero", "cxr-clip-r50", "medclip-vit"]


@pytest.mark.parametrize("name, fake, extra", [
    ("mimic-sourget.toml", _fake_mimic, [f"{a}-{m}" for a in ("leakage", "geometry") for m in MODELS]),
    ("nih-neatx.toml", _fake_neatx, []),
])
def test_real_data_configs_dry_run(tmp_path, monkeypatch, name, fake, extra):
    monkeypatch.chdir(tmp_path)  # the configs' relative data paths resolve here
    result = CliRunner().invoke(main, ["run", str(REPO / "configs" / name), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "note: [cohort]" in result.output and "no such" in result.output  # no data yet: said, not fatal
    result = CliRunner().invoke(main, ["run", str(REPO / "configs" / name)])
    assert result.exit_code == 1 and "no such file or folder" in result.output  # ... but a real run stops first
    assert list(tmp_path.iterdir()) == []
    fake(tmp_path)
    result = CliRunner().invoke(main, ["run", str(REPO / "configs" / name), "--dry-run"])
    assert result.exit_code == 0 and "note:" not in result.output, result.output
    planned = [line.split()[0] for line in result.output.splitlines()[2:]]
    assert planned == ["cohort", *[f"extract-{m}" for m in MODELS],
                       *[f"{meth}-{m}" for m in MODELS for meth in ("zeroshot", "linear")], *extra, "analyze"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # nothing written
    cfg = load_config(REPO / "configs" / name)
    cohort = next(s for s in experiment_steps(cfg) if s.name == "cohort")
    assert cohort.settings["sources_sha256"]  # the data files' content is in the cohort's fingerprint


def test_the_shortcut_config_asks_for_the_drain_test():
    cfg = load_config(REPO / "configs" / "nih-neatx.toml")
    analyze = next(s for s in experiment_steps(cfg) if s.name == "analyze")
    assert (analyze.settings["shortcut"], analyze.settings["shortcut_class"]) == ("drain", "Pneumothorax")
    assert cfg.cohort.preset == "nih-neatx-pneumothorax" and cfg.cohort.drains.name.startswith("NIH-CX14_Tube")


# ---------------------------------------------------------------- the demo

def test_demo_plans_embeddings_shortcut_and_thresholds(tmp_path):
    names = [s.name for s in experiment_steps(demo_config(tmp_path))]
    assert names[-6:] == ["leakage-tiny-clip", "geometry-tiny-clip", "linear+thresholds-sex-tiny-clip",
                          "linear+groupdro-sex-tiny-clip", "linear+fairot-sex-tiny-clip", "analyze"]
    cohort = next(s for s in experiment_steps(demo_config(tmp_path)) if s.name == "cohort")
    assert cohort.settings["drains"]  # the synthetic NEATX labels: the report's shortcut test has its column


def test_demo_plans_groupdro_and_fairot_on_the_linear_probe(tmp_path):
    cfg = demo_config(tmp_path)
    assert [(m.mitigation, m.methods) for m in cfg.mitigations] == [("groupdro", ("linear",)), ("fairot", ("linear",))]
    # fairot's strength 0 is an AdamW ERM probe on the grid groupdro uses too: the like-for-like counterpart
    # of both (analysis.mitigation.find_erm), where the L-BFGS ERM probe would mix in the solver change.
    assert 0.0 in cfg.mitigations[1].strengths
    steps = {s.name: s for s in experiment_steps(cfg)}
    assert {"linear-tiny-clip", "linear+groupdro-sex-tiny-clip", "linear+fairot-sex-tiny-clip"} <= set(steps)
    grid = {k: v for k, v in steps["linear+groupdro-sex-tiny-clip"].settings.items() if k not in MITIGATION_ENTRY_KEYS}
    assert grid == {k: v for k, v in steps["linear+fairot-sex-tiny-clip"].settings.items() if k not in MITIGATION_ENTRY_KEYS}
    assert grid["solver"] == "adamw"


# ---------------------------------------------------------------- multi-label end to end (issue 12)

MULTILABEL = REPO / "tests" / "pipeline" / "multilabel_tiny.toml"


def test_multilabel_config_dry_run(tmp_path):
    result = CliRunner().invoke(main, ["run", str(MULTILABEL), "--dry-run", "--out", str(tmp_path / "ml")])
    assert result.exit_code == 0, result.output
    planned = [line.split()[0] for line in result.output.splitlines()[2:]]
    assert planned == ["synth", "cohort", "extract-tiny-clip", "zeroshot-tiny-clip", "linear-tiny-clip",
                       "lora-tiny-clip-lr0.001-s0", "lora-tiny-clip", "full-tiny-clip-lr0.0001-s0", "full-tiny-clip",
                       "analyze"]
    cohort = next(s for s in experiment_steps(load_config(MULTILABEL)) if s.name == "cohort")
    assert (cohort.settings["dataset"], cohort.settings["preset"]) == ("mimic", "mimic-sourget")
    assert cohort.settings["mimic_iv"].endswith("mimiciv/2.2") and not (tmp_path / "ml").exists()


@pytest.mark.slow
def test_multilabel_config_runs_end_to_end(tmp_path):
    import subprocess
    import sys

    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    result = subprocess.run([sys.executable, "-m", "cxrfair", "run", str(MULTILABEL), "--out", str(tmp_path / "ml")],
                            capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    runs = [json.loads(p.read_text()) for p in (tmp_path / "ml" / "runs").glob("*/run.json")]
    assert {r["method"] for r in runs} == {"zeroshot", "linear", "lora", "full"}
    assert {r["task"] for r in runs} == {"multilabel"}
    assert {"race", "sex", "age_group"} <= set(runs[0]["attributes"])
    metrics = pd.read_csv(tmp_path / "ml" / "report" / "metrics.csv")
    assert {"race", "age_group"} <= set(metrics.get("attribute", pd.Series(dtype=str)).dropna())
    assert (tmp_path / "ml" / "report" / "report.html").is_file()
