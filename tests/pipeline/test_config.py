"""`cxrfair run` config checks: every bad value is one line and exit 1, before anything is written.

Type errors come from the config loader (derived from the settings dataclasses' annotations);
range and choice errors from each stage's own config, built while planning. Both must stop
`--dry-run` as well as a real run.
"""

import dataclasses
import typing
from pathlib import Path

import pytest
from click.testing import CliRunner

from cxrfair.cli import main
from cxrfair.config import ExperimentConfig, config_from_dict, load_config
from cxrfair.errors import CxrfairError

# A valid experiment (synthetic data, so no images are needed) that each case breaks in one place.
BASE = {
    "": ['models = ["tiny-clip"]', 'methods = ["zeroshot", "linear", "mlp", "lora", "full"]', "seeds = 1"],
    "synth": ["enabled = true"],
    "cohort": ["per_group = 10"],
    "extract": ["workers = 0"],
    "probe": ["epochs = 5"],
    "finetune": ["epochs = 1"],
    "analysis": ["bootstrap = 100"],
}

# (section, line replacing or adding that key, the part of the one-line message that must appear)
TYPE_ERRORS = [
    ("analysis", "bootstrap = 20.7", "[analysis] bootstrap = 20.7: expected an integer"),
    ("analysis", "bootstrap = true", "[analysis] bootstrap = true: expected an integer"),
    ("cohort", "per_group = true", "[cohort] per_group = true: expected an integer"),
    ("cohort", "per_group = 12.5", "[cohort] per_group = 12.5: expected an integer"),
    ("", 'seeds = "three"', 'seeds = "three": expected an integer'),
    ("", "seeds = true", "seeds = true: expected an integer"),
    ("", "out = 5", "out = 5: expected a path (a string)"),
    ("", 'out = ""', 'out = "": expected a path (a string)'),
    ("", 'models = "tiny-clip"', 'models = "tiny-clip": expected a list of strings'),
    ("", 'methods = "linear"', 'methods = "linear": expected a list of strings'),
    ("", "models = [1]", "models = [1]: expected a list of strings"),
    ("probe", "lr = 0.001", "[probe] lr = 0.001: expected a list of numbers"),
    ("probe", 'lr = [0.001, "x"]', '[probe] lr = [0.001, "x"]: expected a list of numbers'),
    ("probe", "hidden = [12.5]", "[probe] hidden = [12.5]: expected a list of integers"),
    ("probe", 'epochs = "ten"', '[probe] epochs = "ten": expected an integer'),
    ("probe", "all_prompt_sets = 1", "[probe] all_prompt_sets = 1: expected true or false"),
    ("synth", 'enabled = "yes"', '[synth] enabled = "yes": expected true or false'),
    ("extract", "device = 1", "[extract] device = 1: expected a string"),
    ("extract", 'weights = "w.pt"', '[extract] weights = "w.pt": expected a table'),
    ("extract", 'weights = { tiny-clip = 5 }', "[extract] weights = { tiny-clip = 5 }: expected a table"),
    ("cohort", "metadata = 3", "[cohort] metadata = 3: expected a path (a string)"),
    ("cohort", 'images = ["a"]', '[cohort] images = ["a"]: expected a path (a string)'),
    ("analysis", 'attributes = "sex"', '[analysis] attributes = "sex": expected a list of strings'),
    ("finetune", "lora_lr = 5e-4", "[finetune] lora_lr = 0.0005: expected a list of numbers"),
    ("finetune", "weight_decay = [0.01]", "[finetune] weight_decay = [0.01]: expected a number"),
    ("probe", "epoch = 3", "[probe] unknown key(s) epoch; known: lr,"),
    ("", 'method = ["linear"]', "unknown key(s) method"),
    ("", "probe = 5", "probe = 5: expected a table [probe]"),
    ("", 'methods = ["linear", "dance"]', "methods: unknown ['dance']"),
    ("", "models = []", "models: list at least one model"),
    ("", 'methods = ["linear", "linear"]', "methods: linear listed more than once"),
    ("", "seeds = 0", "seeds: must be at least 1"),
    # Keys a section takes from its stage config: typed by the stage's annotation.
    ("finetune", 'micro_batch = "x"', '[finetune] micro_batch = "x": expected an integer'),
    ("probe", "memory_budget_mb = true", "[probe] memory_budget_mb = true: expected a number"),
    ("analysis", 'figures = "no"', '[analysis] figures = "no": expected true or false'),
    ("extract", "features = 1", "[extract] features = 1: expected a string"),
]

# Values of the right type that a stage refuses: caught while planning, named by config key.
STAGE_ERRORS = [
    ("probe", "epochs = -1", "[probe] epochs: must be >= 1"),
    ("probe", "l2 = []", "[probe] l2: the grid is empty"),
    ("probe", 'solver = "sgd"', "[probe] solver 'sgd': expected one of"),
    ("probe", 'select = "auc"', "[probe] select: choose one of"),
    ("probe", "l2 = [-1.0]", "[probe] l2: L2 penalties must be numbers >= 0"),
    ("probe", 'zeroshot_term = "local"', "[probe] zeroshot_term 'local': choose one of global, both"),
    ("probe", 'architecture = "deep"', "[probe] architecture: choose one of"),
    ("probe", "ftol = -1.0", "[probe] ftol: must be a number >= 0"),
    ("cohort", 'uncertain = "maybe"', "[cohort] uncertain"),
    ("cohort", "age_bins = [50, 20]", "[cohort] age_bins"),
    ("cohort", 'dataset = "padchest"', "[cohort] dataset"),
    ("synth", 'format = "dicom"', "[synth] format dicom: expected one of"),
    ("analysis", 'shortcut = "drain"', "[analysis] shortcut COLUMN and --shortcut-class CLASS go together"),
    ("analysis", "cross = [\"sex\"]", "[analysis] cross sex: give two or more distinct attributes"),
    ("probe", "weight_decay = [-1.0]", "[probe] weight_decay: weight decays must be >= 0"),
    ("finetune", "epochs = 0", "[finetune] epochs 0: must be at least 1"),
    ("finetune", 'device = "tpu"', "[finetune] device 'tpu'"),
    ("finetune", "lora_lr = []", "[finetune] lora_lr: give at least one learning rate"),
    ("cohort", "per_group = 0", "[cohort] per_group 0: must be at least 1"),
    ("cohort", 'preset = "nope"', "[cohort] preset nope: unknown preset"),
    ("extract", "batch_size = 0", "[extract] batch_size 0: must be >= 1"),
    ("extract", 'precision = "fp8"', "[extract] precision fp8"),
    ("synth", "size = 8", "[synth] size 8: must be between 32 and 1024"),
    ("analysis", "bootstrap = -1", "[analysis] bootstrap -1: use 0 (point estimates"),
    ("analysis", "bootstrap = 20", "[analysis] bootstrap 20: use 0 (point estimates"),
    ("analysis", 'split = "dev"', "[analysis] split dev: must be train, val or test"),
    ("", 'models = ["no-such-model"]', "unknown model"),
    # ... and checked by the stage, named by config key.
    ("probe", "memory_budget_mb = 0", "[probe] memory_budget_mb: must be > 0 MB"),
    ("finetune", "micro_batch = 0", "[finetune] micro_batch 0: must be at least 1"),
    ("finetune", 'cache = "disk"', "[finetune] cache 'disk': expected one of auto, memory, file"),
    ("analysis", "level = 2", "[analysis] level 2: must be between 0 and 1"),
    ("extract", 'features = "raw"', "[extract] features raw: choose one of"),
]


def _render(section: str, line: str, out: Path) -> str:
    """BASE with ``line`` set in ``section`` (replacing that key if BASE has it)."""
    key = line.split("=")[0].strip()
    parts = [f'out = "{out}"'] if not (section == "" and key == "out") else []
    for name, lines in BASE.items():
        body = [x for x in lines if x.split("=")[0].strip() != key or name != section]
        if name == section:
            body.append(line)
        if name == "":
            parts += body
        elif key != name:  # `probe = 5` replaces the whole section
            parts += [f"[{name}]", *body]
    return "\n".join(parts) + "\n"


def _invoke(tmp_path: Path, text: str, dry_run: bool):
    path = tmp_path / "exp.toml"
    path.write_text(text)
    return CliRunner().invoke(main, ["run", str(path), *(["--dry-run"] if dry_run else [])])


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "run"])
@pytest.mark.parametrize("section, line, message", TYPE_ERRORS + STAGE_ERRORS,
                         ids=[f"{s or 'top'}:{line}" for s, line, _ in TYPE_ERRORS + STAGE_ERRORS])
def test_a_bad_value_is_one_line_and_exit_1_before_anything_is_written(tmp_path, monkeypatch, section, line, message, dry_run):
    monkeypatch.chdir(tmp_path)  # `out = ""` and other relative paths land here, never in the repo
    out = tmp_path / "exp"
    result = _invoke(tmp_path, _render(section, line, out), dry_run)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert result.output.startswith(f"Error: config {tmp_path / 'exp.toml'}: "), result.output  # names the file
    assert message in result.output, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp.toml"]  # nothing written anywhere


def test_the_base_config_is_valid(tmp_path):
    """The table above breaks a config that works: without the bad line the plan prints."""
    result = _invoke(tmp_path, _render("probe", "epochs = 5", tmp_path / "exp"), dry_run=True)
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "exp").exists()


@pytest.mark.parametrize("make, message", [
    (lambda p: p.mkdir(), "is a folder; pass the experiment's TOML file"),
    (lambda p: p.write_bytes(b"models = [\"\xff\"]\n"), "is not UTF-8 text"),
    (lambda p: None, "no such file"),
    (lambda p: p.write_text("models = [\n"), "not valid TOML"),
], ids=["folder", "binary", "missing", "toml-syntax"])
def test_an_unreadable_config_is_one_line(tmp_path, make, message):
    path = tmp_path / "exp.toml"
    make(path)
    result = CliRunner().invoke(main, ["run", str(path), "--dry-run"])
    assert result.exit_code == 1
    assert f"Error: config {path}: {message}" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_values_keep_their_types_and_paths_resolve_from_the_base(tmp_path):
    cfg = config_from_dict({"models": ["tiny-clip"], "out": "exp", "seeds": 2,
                            "cohort": {"images": "data/nih", "metadata": "", "per_group": ""},
                            "extract": {"weights": {"tiny-clip": "w/tiny.pt"}},
                            "probe": {"lr": [1e-3, 3e-3], "weight_decay": [0]}}, base=tmp_path)
    assert cfg.out == tmp_path / "exp" and cfg.seeds == 2
    assert cfg.cohort.images == tmp_path / "data" / "nih"
    assert cfg.cohort.metadata is None and cfg.cohort.per_group is None  # "" means the default
    assert cfg.extract.weights == {"tiny-clip": tmp_path / "w" / "tiny.pt"}
    assert cfg.probe.lr == (1e-3, 3e-3) and cfg.probe.weight_decay == (0,)
    assert config_from_dict({"models": ["tiny-clip"]}, base=tmp_path).out == tmp_path / "experiment"


def _leaf_types(cls) -> list:
    out = []
    for name, tp in typing.get_type_hints(cls).items():
        element = typing.get_args(tp)[0] if typing.get_origin(tp) is tuple else None
        if dataclasses.is_dataclass(element):  # [[section]] tables: the list itself and each key
            out += [(cls.__name__, name, tp)] + _leaf_types(element)
        else:
            out += _leaf_types(tp) if dataclasses.is_dataclass(tp) else [(cls.__name__, name, tp)]
    return out


@pytest.mark.parametrize("owner, name, tp", _leaf_types(ExperimentConfig), ids=lambda v: str(getattr(v, "__name__", v)))
def test_every_key_of_the_schema_has_a_checker(owner, name, tp):
    """Adding a key of a type the loader cannot check fails here, not in a user's run."""
    from cxrfair.config import _coerce, _describe

    assert _describe(tp)
    with pytest.raises(Exception) as info:
        _coerce(object(), tp, Path("."))
    assert type(info.value).__name__ == "_Mismatch"


def test_paper_config_loads(tmp_path):
    repo = Path(__file__).resolve().parents[2]
    cfg = load_config(repo / "configs" / "paper.toml")
    assert cfg.methods == ("zeroshot", "linear", "mlp", "lora", "full") and cfg.seeds == 3
    with pytest.raises(CxrfairError, match="expected a list of strings"):
        config_from_dict({"models": "clip-vit-b16"})


def test_probe_architecture_l2_skip_and_ftol_reach_the_sweep_and_its_fingerprint(tmp_path):
    from cxrfair.erm_steps import sweep_config, sweep_settings

    path = tmp_path / "c.toml"
    path.write_text(_render("probe", 'architecture = "plain"\nftol = 1e-6', tmp_path / "out"))
    plain = load_config(path)
    mlp, linear = sweep_config(plain, "mlp"), sweep_config(plain, "linear")
    assert (mlp.architecture, mlp.ftol_value, mlp.skip) == ("plain", 1e-6, False)
    path.write_text(_render("probe", "l2_skip = [1e-4]", tmp_path / "out"))
    skip = load_config(path)
    assert sweep_config(skip, "mlp").l2_skip_grid == (1e-4,) and sweep_config(skip, "linear").l2s_skip is None
    # The linear probe ignores the MLP's architecture: changing it must not rerun linear probes.
    assert sweep_settings(linear) == sweep_settings(sweep_config(skip, "linear")) | {"ftol": 1e-6}
    assert sweep_settings(mlp) != sweep_settings(sweep_config(skip, "mlp"))


# ---------------------------------------------------------------- sections are the stage configs

NEW_STAGE_OPTIONS = '''
import dataclasses, json, sys
from pathlib import Path

import cxrfair.finetune.config as finetune_config
import cxrfair.probe.sweep as sweep


@dataclasses.dataclass(frozen=True)
class SweepConfig(sweep.SweepConfig):
    new_probe_option: int = 3  # an option the probe stage gained after the pipeline was written


@dataclasses.dataclass(frozen=True)
class FinetuneConfig(finetune_config.FinetuneConfig):
    new_finetune_option: float = 0.5


sweep.SweepConfig, finetune_config.FinetuneConfig = SweepConfig, FinetuneConfig  # as if the stages had them

from cxrfair import erm_steps  # noqa: E402  (imported after the stages changed, as a new install would)
from cxrfair.config import config_from_dict  # noqa: E402
from cxrfair.errors import CxrfairError  # noqa: E402
from cxrfair.pipeline import experiment_steps  # noqa: E402
from cxrfair.steps import plan  # noqa: E402

tmp = Path(sys.argv[1])
data = {"models": ["tiny-clip"], "methods": ["linear", "lora"], "out": str(tmp / "exp"), "synth": {"enabled": True},
        "probe": {"new_probe_option": 7}, "finetune": {"new_finetune_option": 0.25},
        "mitigations": [{"methods": ["linear"], "mitigation": "groupdro", "sensitive": "sex", "strengths": [0.1]}]}
cfg = config_from_dict(data, base=tmp)
steps = {s.name: s for s in experiment_steps(cfg)}
seen = []
sweep.probe_cache = lambda cache, out, config, force=False: seen.append(config.new_probe_option)
plan(list(steps.values()), tmp / "exp")
for name in ("linear-tiny-clip", "linear+groupdro-sex-tiny-clip"):
    try:
        steps[name].run(False)
    except CxrfairError:  # the stand-in wrote no runs to publish
        pass
erm_steps.run_finetune = lambda config: seen.append(config.new_finetune_option)
steps["lora-tiny-clip-lr0.0005-s0"].run(False)
plain = {s.name: s for s in experiment_steps(config_from_dict({k: v for k, v in data.items() if k not in ("probe", "finetune")},
                                                                 base=tmp))}
print(json.dumps({"stage_saw": seen, "linear": steps["linear-tiny-clip"].settings["new_probe_option"],
                  "lora": steps["lora-tiny-clip"].settings["new_finetune_option"],
                  "lora_at_default": "new_finetune_option" in plain["lora-tiny-clip"].settings}))
'''


def test_a_new_stage_option_is_a_config_key_with_no_pipeline_edit(tmp_path):
    """A field added to SweepConfig / FinetuneConfig is a [probe] / [finetune] key, type-checked, passed to the
    stage (ERM and mitigation steps alike) and fingerprinted; at its default it leaves fingerprints as they were."""
    import json
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", NEW_STAGE_OPTIONS, str(tmp_path)], capture_output=True, text=True,
                            timeout=300, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.splitlines()[-1]) == {"stage_saw": [7, 7, 0.25], "linear": 7, "lora": 0.25,
                                                          "lora_at_default": False}
    # Without the stage option the key is unknown (a typo must not pass silently).
    with pytest.raises(CxrfairError, match=r"\[probe\] unknown key\(s\) new_probe_option"):
        config_from_dict({"models": ["tiny-clip"], "probe": {"new_probe_option": 7}})


def test_every_stage_field_is_a_key_or_supplied_by_the_pipeline():
    from cxrfair.analysis.config import AnalyzeConfig
    from cxrfair.config import AnalysisSettings, FinetuneSettings, ProbeSettings, stage_kwargs
    from cxrfair.finetune.config import FinetuneConfig
    from cxrfair.probe.sweep import SweepConfig

    supplied = {SweepConfig: {"method", "seeds", "mitigation", "sensitive", "strengths", "adversary", "shots"},
                FinetuneConfig: {"model", "cohort", "out", "method", "lr", "seed", "weights", "images", "resume", "force",
                                 "tag", "mitigation", "sensitive", "strength"},
                AnalyzeConfig: {"runs_dir", "out", "force", "embeddings"}}
    for section, stage in ((ProbeSettings(), SweepConfig), (FinetuneSettings(), FinetuneConfig),
                           (AnalysisSettings(), AnalyzeConfig)):
        fields = {f.name for f in dataclasses.fields(stage)}
        assert set(stage_kwargs(section, stage)) == fields - supplied[stage], stage.__name__
    # Keys named by the pipeline keep their names; the stage's own options appear under theirs.
    assert stage_kwargs(ProbeSettings(lr=(0.1,)), SweepConfig)["lrs"] == (0.1,)
    assert stage_kwargs(FinetuneSettings(), FinetuneConfig)["micro_batch"] is None


def test_derived_keys_at_their_default_stay_out_of_fingerprints():
    from cxrfair.config import FinetuneSettings, section_settings

    assert "micro_batch" not in section_settings(FinetuneSettings())
    assert section_settings(FinetuneSettings(micro_batch=8))["micro_batch"] == 8
    assert list(section_settings(FinetuneSettings())) == ["epochs", "batch_size", "lora_lr", "full_lr", "weight_decay",
                                                          "lora_rank", "lora_alpha", "lora_dropout", "device",
                                                          "precision", "workers"]


# ---------------------------------------------------------------- the shipped configs and recipes

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.toml"))


def test_configs_holds_one_config_per_study():
    assert {p.stem for p in CONFIGS} >= {"paper", "mimic-sourget", "nih-neatx", "chexpert", "mitigation"}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_config_passes_dry_run(path, tmp_path):
    out = tmp_path / "never-written"
    result = CliRunner().invoke(main, ["run", str(path), "--dry-run", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "analyze" in result.output and "cohort" in result.output
    assert not out.exists()


def test_the_mitigation_config_compares_every_mitigation_with_erm_on_one_model(tmp_path):
    from cxrfair.core import mitigations

    cfg = load_config(next(p for p in CONFIGS if p.stem == "mitigation"))
    assert len(cfg.models) == 1 and "linear" in cfg.methods
    used = {m.mitigation for m in cfg.mitigations} | {"thresholds" for _ in cfg.postprocess}
    assert used == set(mitigations.NAMES) - {mitigations.ERM}


def _probe_config(text: str, tmp_path) -> Path:
    """A valid experiment whose [probe] section is ``text`` (BASE's other sections)."""
    path = tmp_path / "c.toml"
    path.write_text(_render("probe", "", tmp_path / "out").replace("[probe]\nepochs = 5\n", f"[probe]\n{text}\n"))
    return path


def _probe(text: str, tmp_path):
    return load_config(_probe_config(text, tmp_path))


def test_the_paper_recipe_is_sun_et_al_s_adamw_recipe_and_reaches_the_sweep(tmp_path):
    from cxrfair.erm_steps import sweep_config

    cfg = _probe('recipe = "paper"', tmp_path)
    for method in ("linear", "mlp"):
        sweep = sweep_config(cfg, method)
        assert (sweep.solver, sweep.standardize, sweep.epochs, sweep.batch_size) == ("adamw", False, 150, 64)
        assert sweep.lrs == (1e-4, 3e-4, 1e-3, 3e-3) and sweep.weight_decays == (0.0, 1e-4, 1e-2)
    assert sweep_config(cfg, "mlp").family == "mlp"  # the plain MLP, not the skip one
    # Written beside the recipe with the recipe's own value: redundant, accepted; keys it leaves alone are free.
    same = _probe('recipe = "paper"\nsolver = "adamw"\nepochs = 150\nhidden = [64]', tmp_path)
    assert same.probe.solver == "adamw" and same.probe.hidden == (64,)


def test_the_default_recipe_is_today_s_default(tmp_path):
    from cxrfair.config import ProbeSettings
    from cxrfair.erm_steps import sweep_config

    base, named = _probe("", tmp_path), _probe('recipe = "default"', tmp_path)
    assert named.probe == base.probe
    for key, value in ProbeSettings.__recipes__["default"].items():
        assert getattr(ProbeSettings(), key) == value
    assert sweep_config(named, "mlp").family == "mlp+skip" and sweep_config(named, "linear").solver == "lbfgs"


@pytest.mark.parametrize("text, message", [
    ('recipe = "paper"\nsolver = "lbfgs"', '[probe] solver = "lbfgs" conflicts with recipe = "paper", which sets solver = "adamw"'),
    ('recipe = "paper"\nlr = [0.01]', "[probe] lr = [0.01] conflicts with recipe = \"paper\""),
    ('recipe = "default"\nstandardize = false', '[probe] standardize = false conflicts with recipe = "default"'),
    ('recipe = "sun"', '[probe] recipe = "sun": expected one of "default", "paper"'),
])
def test_a_key_that_contradicts_the_recipe_is_refused_in_one_line(text, message, tmp_path):
    path = _probe_config(text, tmp_path)
    result = CliRunner().invoke(main, ["run", str(path), "--dry-run"])
    assert result.exit_code == 1 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1


def test_the_readme_lists_every_shipped_config_and_stays_short():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    for path in CONFIGS:
        assert f"| `configs/{path.name}` |" in readme, path.name
    assert len(readme.splitlines()) <= 200
