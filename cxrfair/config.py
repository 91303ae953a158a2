"""Experiment configuration: a TOML file read into frozen dataclasses, validated once.

Every section and key is optional except ``models``; unknown keys are errors (a typo must not
silently fall back to a default). See ``configs/paper.toml`` for the paper's protocol.

The dataclasses below are the schema: each key's type is checked on load from its annotation
(``bool``, ``int``, ``float``, ``str``, ``Path``, ``X | None``, ``tuple[X, ...]``, ``tuple``,
``dict[str, X]``, or a settings dataclass for a ``[section]``). Ranges and choices are checked by
the stage configs each step builds (at planning, so ``cxrfair run --dry-run`` catches them too).

A stage's section is its config dataclass (``@stage_section``): every field of the stage's config
is a key of the section, with the stage's name, type and default, except the fields the pipeline
itself supplies (paths, the method, the seeds, the mitigation). The classes below list only the
keys whose name, type, default or comment the pipeline sets, and the pipeline's own keys; so a
new stage option is a config key, passed on by ``stage_kwargs``, with no edit here or in the
pipeline.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from cxrfair.analysis.config import AnalyzeConfig
from cxrfair.analysis.postprocess import PostprocessConfig
from cxrfair.errors import CxrfairError
from cxrfair.extract.datasets import OPTIONS as READER_OPTIONS
from cxrfair.extract.extractor import ExtractConfig
from cxrfair.extract.synth import SynthConfig
from cxrfair.finetune.config import FinetuneConfig
from cxrfair.finetune.contrastive_config import ContrastiveConfig
from cxrfair.probe.embeddings.geometry import GeometryConfig
from cxrfair.probe.embeddings.leakage import LeakageConfig
from cxrfair.probe.sweep import SweepConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

# The methods `cxrfair run` can schedule (each a method of cxrfair.core.runs.RunKey).
METHODS = ("zeroshot", "linear", "mlp", "lora", "full")


@dataclass(frozen=True)
class _Derivation:
    """How a section maps onto stage configs: per stage, section key -> stage field."""

    keys: dict  # stage class -> {key: stage field}
    derived: frozenset  # keys added from a stage config (not written in the section's class)


def stage_section(*stages: type, keys: dict[str, str] | None = None, fixed: tuple[str, ...] = (),
                  own: tuple[str, ...] = (), stage_keys: dict[type, dict[str, str]] | None = None
                  ) -> Callable[[type], type]:
    """Make a section class (before ``@dataclass``) the union of the ``stages``' config fields.

    The class's own annotated fields are keys that the pipeline names, types or defaults itself;
    each must be a field of a stage (``keys``: section key -> stage field where the names differ)
    or listed in ``own`` (the pipeline's keys no stage config has). Every other field of each
    stage config is added as a key with the stage's type and default, except those in ``fixed``
    (the pipeline supplies them) and nested dataclasses (not a flat key). A field two stages
    share must have one default. ``stage_keys``: per stage, renames that apply to it alone.
    """

    def wrap(cls: type) -> type:
        declared = list(cls.__dict__.get("__annotations__", {}))
        mapping: dict[type, dict[str, str]] = {}
        added: dict[str, tuple[Any, dataclasses.Field]] = {}
        for stage in stages:
            hints = typing.get_type_hints(stage)
            fields = {f.name: f for f in dataclasses.fields(stage)}
            renames = (keys or {}) | (stage_keys or {}).get(stage, {})
            mapping[stage] = {k: renames.get(k, k) for k in declared if k not in own and renames.get(k, k) in fields}
            for name, f in fields.items():
                if name in fixed or name in mapping[stage].values() or dataclasses.is_dataclass(hints[name]):
                    continue
                if name in declared:
                    raise TypeError(f"{stage.__name__}.{name} collides with {cls.__name__}'s own key {name}; rename one")
                if _required(f):
                    raise TypeError(f"{stage.__name__}.{name} has no default: add it to {cls.__name__}'s fixed fields "
                                    "(the pipeline supplies it) or give it a default")
                if name in added and _default(added[name][1]) != _default(f):
                    raise TypeError(f"{cls.__name__}.{name}: the stages disagree on its default; declare the key")
                added[name] = (hints[name], f)
                mapping[stage][name] = name
        strays = [k for k in declared if k not in own and not any(k in m for m in mapping.values())]
        if strays:
            raise TypeError(f"{cls.__name__}.{strays[0]}: no field of {', '.join(s.__name__ for s in stages)}; "
                            "rename it in `keys` or list it in `own`")
        for name, (tp, f) in added.items():
            cls.__annotations__[name] = tp
            setattr(cls, name, field(default_factory=f.default_factory) if f.default is dataclasses.MISSING
                    else f.default)
        cls.__derivation__ = _Derivation(mapping, frozenset(added))
        return cls

    return wrap


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def stage_kwargs(section: Any, stage: type) -> dict:
    """The section's values for the fields of ``stage`` (a stage config class), by stage field name."""
    return {field_name: getattr(section, key) for key, field_name in section.__derivation__.keys[stage].items()}


def section_settings(section: Any) -> dict:
    """``settings_dict`` of a section, leaving out keys added from a stage config while at their default.

    A fingerprint thus changes when such a key is set, not when a stage gains an option.
    """
    derived = getattr(section, "__derivation__", None)
    skip = set() if derived is None else {f.name for f in dataclasses.fields(section)
                                         if f.name in derived.derived and getattr(section, f.name) == _default(f)}
    return {k: v for k, v in settings_dict(section).items() if k not in skip}


@dataclass(frozen=True)
@stage_section(SynthConfig, fixed=("out", "force", "images"), own=("enabled", "drains"))
class SynthSettings:
    enabled: bool = False  # make synthetic data first and build the cohort from it (demo, tests)
    format: str = "nih"  # nih | chexpert | mimic: the real dataset whose files are imitated
    seed: int = 0  # seed of the synthetic images
    size: int = 64  # side of the synthetic images in pixels
    patients: int | None = None  # chexpert / mimic: number of patients; empty = 400
    drains: bool = False  # nih: give the cohort the synthetic NEATX drain labels (the shortcut test)



@dataclass(frozen=True)
class _CohortFiles:
    # The files (as on `cxrfair cohort build`; with [synth] enabled they come from the synthetic data).
    dataset: str | None = None  # reader: nih | chexpert | mimic | csv; empty = the preset's
    metadata: Path | None = None  # main metadata file (MIMIC: its folder); NIH: empty = the vendored Data_Entry_2017_v2020.csv.gz
    images: Path | None = None  # images root the metadata's paths start from; needed to extract


# Then each dataset reader's own files and settings, one key per option it declares (its module in
# extract/datasets: drains, official_split, demographics, race_map, mimic_iv, columns, labels, ...;
# see `cxrfair cohort build --help`): a file or folder is a path, csv's columns a table
# { path = "COL", patient = "COL", ... }, its labels an array of "Name" or "Name=COLUMN".
def _reader_field(kind: str) -> tuple[Any, dataclasses.Field]:
    """The [cohort] key's type and default for a reader option of ``kind`` (file | folder | pairs | list)."""
    if kind == "pairs":
        return dict[str, str], field(default_factory=dict)
    if kind == "list":
        return tuple[str, ...], field(default=())
    return Path | None, field(default=None)


_CohortSources = dataclasses.make_dataclass(
    "_CohortSources", [(key, *_reader_field(o.kind)) for key, o in READER_OPTIONS.items()],
    bases=(_CohortFiles,), frozen=True, namespace={"__module__": __name__})


@dataclass(frozen=True)
class CohortSettings(_CohortSources):
    # The rules: the preset's, with any of these overriding it.
    preset: str = "nih-6x200"  # see `cxrfair cohort build --help`; nih-6x200 = the paper's 6 diseases x 4 groups x 50 images
    diseases: tuple[str, ...] | None = None  # classes / conditions in order; empty = the preset's
    attributes: tuple[str, ...] | None = None  # sensitive attributes, e.g. ["sex", "age_group", "race"]; empty = the preset's
    age_bins: tuple[int, ...] | None = None  # age group edges: [60] (young/old) or [18, 25, 50, 65, 80]; empty = the preset's
    uncertain: str | None = None  # multi-label: uncertain labels ignore (masked) | zeros | ones; empty = the preset's
    per_group: int | None = None  # multi-class: images per disease x group cell; empty = the preset's 50
    split: str | None = None  # train,val,test ratio ("0.7,0.1,0.2") or "official"; empty = the preset's
    max_train: int | None = None  # at most this many training images (whole patients); empty = all
    seed: int = 0  # sampling and split seed


@dataclass(frozen=True)
@stage_section(ExtractConfig, fixed=("model", "cohort", "out", "weights", "images", "force", "progress", "rows",
                                     "extra_attrs"), own=("weights",))
class ExtractSettings:
    batch_size: int = 64  # images per forward pass (and per resumable chunk)
    workers: int = 4  # DataLoader decode workers
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "fp32"  # fp32 | bf16 | fp16
    weights: dict[str, Path] = field(default_factory=dict)  # model name -> local weights path (else env var / hub cache)


@dataclass(frozen=True)
@stage_section(SweepConfig, keys={"lr": "lrs", "weight_decay": "weight_decays", "hidden": "hiddens", "l2": "l2s",
                                  "l2_skip": "l2s_skip"},
               fixed=("method", "seeds", "mitigation", "sensitive", "strengths", "adversary", "shots"),
               own=("all_prompt_sets", "zeroshot_term", "shots"))
class ProbeSettings:
    lr: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3)  # adamw: learning-rate grid, selected on validation
    weight_decay: tuple[float, ...] = (0.0, 1e-4, 1e-2)  # adamw: weight decay grid
    hidden: tuple[int, ...] = (256, 512)  # MLP hidden widths
    epochs: int = 150  # adamw: paper 150, cosine-annealed
    batch_size: int = 64  # adamw: paper 64
    solver: str = "lbfgs"  # lbfgs: full-batch L-BFGS over the l2 grid (a tuned logistic regression); adamw: the paper's recipe (lr, weight_decay, epochs, batch_size)
    standardize: bool = True  # z-score features with the training split's mean and sd (paper: false)
    l2: tuple[float, ...] | None = None  # lbfgs: L2 penalty grid; empty = the probe stage's default grid per method
    max_iter: int | None = None  # lbfgs: iterations at most; empty = the probe stage's default per method (linear 1000, mlp 300)
    architecture: str = "skip"  # mlp: skip (a hidden ReLU layer + a linear skip connection) | plain (the paper's MLP)
    l2_skip: tuple[float, ...] | None = None  # lbfgs skip MLP: L2 grid of the skip weight; empty = the probe stage's default
    ftol: float | None = None  # lbfgs: stop once a step lowers the objective by <= ftol*max(|f|,1); empty = per method (mlp 1e-5, linear off)
    select: str = "loss"  # choose the configuration by mean validation loss | accuracy
    all_prompt_sets: bool = False  # zero-shot: also write runs of the prompt sets not selected on val
    zeroshot_term: str | None = None  # zero-shot scoring: global | both (GLoRIA's); empty = both where the cache allows
    shots: tuple[int, ...] = ()  # few-shot: also train each linear / mlp probe on K images per class for each K here, e.g. [1, 5, 10]

    # `recipe = "paper" | "default"`: a preset of several keys above, applied when the section is read
    # (so not a field: a run's settings hold the keys it set, and fingerprints see those).
    # "paper" is Sun et al.'s own probe recipe (docs/methods.md): AdamW with cosine annealing over
    # the lr x weight_decay grid, 150 epochs, batch 64, raw (not standardised) features, the plain
    # MLP. "default" is the stronger default (standardised features, L-BFGS, the skip MLP). A key
    # the recipe sets may be written beside it only with the recipe's value; any other is refused.
    __recipes__ = {
        "default": {"solver": "lbfgs", "standardize": True, "architecture": "skip"},
        "paper": {"solver": "adamw", "standardize": False, "architecture": "plain",
                  "lr": [1e-4, 3e-4, 1e-3, 3e-3], "weight_decay": [0.0, 1e-4, 1e-2], "epochs": 150, "batch_size": 64},
    }


@dataclass(frozen=True)
@stage_section(FinetuneConfig, fixed=("model", "cohort", "out", "method", "lr", "seed", "weights", "images", "resume",
                                      "force", "tag", "mitigation", "sensitive", "strength"),
               own=("lora_lr", "full_lr"))
class FinetuneSettings:
    epochs: int = 150  # the lowest-validation-loss epoch is evaluated
    batch_size: int = 64  # paper: 64
    lora_lr: tuple[float, ...] = (5e-4,)  # candidates; chosen on validation loss of seed 0
    full_lr: tuple[float, ...] = (1e-5,)  # candidates; chosen on validation loss of seed 0
    weight_decay: float = 0.01  # AdamW decoupled weight decay
    lora_rank: int = 8  # r of each low-rank update
    lora_alpha: float = 16  # LoRA scaling numerator (update scaled by alpha / r); kept as written, like every number
    lora_dropout: float = 0.0  # dropout on the LoRA input path
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    workers: int = 4  # threads decoding PNGs into the image cache


@dataclass(frozen=True)
@stage_section(AnalyzeConfig, keys={"bootstrap": "n_boot"}, fixed=("runs_dir", "out", "force", "embeddings"))
class AnalysisSettings:
    bootstrap: int = 1000  # bootstrap replicates per metric
    attributes: tuple[str, ...] = ()  # cohort columns to measure gaps across; empty = every attribute the runs declare
    cross: tuple[str, ...] | None = None  # attributes crossed into one more (and the bootstrap strata); empty "" = the first two, [] = none
    shortcut: str = "auto"  # binary column of the shortcut test; auto: drain + Pneumothorax when present; none: off
    shortcut_class: str | None = None  # the class (condition) the shortcut test compares, with an explicit shortcut
    split: str = "test"  # split the metrics are computed on
    seed: int = 0  # seed of the bootstrap draws


@dataclass(frozen=True)
@stage_section(LeakageConfig, GeometryConfig, keys={"bootstrap": "n_boot", "cohort_split": "cohort_splits"},
               stage_keys={LeakageConfig: {"permutations": "n_perm"}, GeometryConfig: {"geometry_permutations": "n_perm"}},
               own=("leakage", "geometry"))
class EmbeddingsSettings:
    """`cxrfair embeddings leakage|geometry` per model; written to <out>/embeddings/<model>/<analysis>/."""

    leakage: tuple[str, ...] = ()  # models whose embeddings are probed for the attributes (each one of `models`)
    geometry: tuple[str, ...] = ()  # models whose embedding geometry (PCA, centroids, modality gap) is analysed
    attributes: tuple[str, ...] = ()  # cohort columns; empty = the cohort's sensitive attributes
    probes: tuple[str, ...] = ("linear", "mlp", "knn")  # leakage probes
    permutations: int = LeakageConfig.n_perm  # leakage: reruns on shuffled attributes (the chance level)
    conditional: bool = True  # leakage: also within each label condition
    components: int = 10  # geometry: principal components kept and tested
    normalize: str = "l2"  # geometry: l2 | standard | none
    geometry_permutations: int = 1000  # geometry: patient shuffles per component test
    bootstrap: int = 1000  # patient-bootstrap replicates per interval
    min_group: int = 10  # fewest images per group
    cohort_split: tuple[str, ...] = ()  # cohort splits whose rows are used; empty = every row
    seed: int = 0  # splits, shuffles and resamples


@dataclass(frozen=True)
@stage_section(PostprocessConfig, fixed=("run", "out", "force"), own=("methods", "models"))
class PostprocessSettings:
    """One [[postprocess]] entry: `cxrfair postprocess` on every run of each model x method listed."""

    methods: tuple[str, ...]  # the (ERM) run families to post-process, e.g. ["linear"]; each one of `methods`
    sensitive: str  # attribute whose groups are equalised, e.g. "sex"
    constraint: str = "equalized_odds"  # equalized_odds | tpr | fpr
    strength: float = 0.02  # validation utility the fit may give up (absolute, in [0, 1])
    models: tuple[str, ...] = ()  # empty = every model


@dataclass(frozen=True)
class MitigationSettings:
    """One [[mitigations]] entry: one step per model x method, the stage trained with the mitigation.

    The entry's values become the stage config's mitigation fields (probes: the sweep's strength
    axis; fine-tuning: one run per strength); the rest of the config is [probe] / [finetune]'s.
    """

    methods: tuple[str, ...]  # linear | mlp | lora | full; each one of `methods` (fine-tuning reuses its ERM learning rate)
    mitigation: str  # reweight | groupdro | adversarial | fairot | erase (cxrfair.core.mitigations)
    sensitive: str  # attribute the mitigation targets, e.g. "sex"
    strengths: tuple[float, ...] = ()  # probes: the sweep axis; fine-tuning: one run per value (analyze chooses on validation); erase: none
    select: str | None = None  # probes: worst_group | loss | gap; empty = the stage's default (worst_group)
    adversary: str | None = None  # adversarial only: grl | projection (probes)
    models: tuple[str, ...] = ()  # empty = every model

    # Keys that were dropped, with what to do instead (refused by name, not as unknown).
    __removed__ = {"enabled": "no longer a key (every stage has the mitigation options now); delete it, and to "
                              "leave the entry out, remove or comment out the [[mitigations]] entry"}


@dataclass(frozen=True)
@stage_section(ContrastiveConfig, keys={"adapter": "method"},
               fixed=("model", "cohort", "out", "seed", "weights", "images", "resume", "force", "tag", "strength"),
               own=("models", "strengths", "seeds", "methods"))
class ContrastiveSettings:
    """One [[contrastive]] entry: contrastive fine-tuning of each model, then the adapted model evaluated.

    Per model x strength x seed, ``cxrfair finetune contrastive`` writes ``<out>/contrastive/<name>/``
    (``ContrastiveConfig.run_id``), extracted like any model into ``cache/<name>.h5``, whose runs
    (``methods``) sit beside the base model's in the analysis. Every other ContrastiveConfig option
    (epochs, batch_size, lr, weight_decay, lora_rank, device, precision, workers, ...) is a key too.
    """

    adapter: str = "lora"  # the image encoder: lora | full
    mitigation: str = "erm"  # erm | fairot (FairCLIP's Sinkhorn term) | reweight | groupdro | adversarial
    sensitive: str | None = None  # the attribute a mitigation targets, e.g. "race"; empty for erm
    strengths: tuple[float, ...] = ()  # one fine-tuning per value (FairCLIP's lambda); empty = the mitigation's default
    seeds: tuple[int, ...] = (0,)  # one fine-tuning (and one adapted model) per seed
    text: str = "frozen"  # the text encoder: frozen | lora | full
    select: str = "auc"  # the epoch kept: auc (validation zero-shot AUC) | loss (validation contrastive loss)
    methods: tuple[str, ...] = ("zeroshot",)  # how each adapted model is evaluated: zeroshot, linear, mlp
    models: tuple[str, ...] = ()  # the base models fine-tuned (each one of `models`); empty = every model


@dataclass(frozen=True)
class ExperimentConfig:
    models: tuple[str, ...]  # registry names (see `cxrfair models list`); the one required key
    out: Path = Path("experiment")  # everything the experiment writes goes under this folder
    methods: tuple[str, ...] = METHODS  # any of METHODS, run in this order per model
    seeds: int = 3  # seeds 0..seeds-1 for probes and fine-tuning (zero-shot is deterministic)
    synth: SynthSettings = SynthSettings()
    cohort: CohortSettings = CohortSettings()
    extract: ExtractSettings = ExtractSettings()
    probe: ProbeSettings = ProbeSettings()
    finetune: FinetuneSettings = FinetuneSettings()
    analysis: AnalysisSettings = AnalysisSettings()
    embeddings: EmbeddingsSettings = EmbeddingsSettings()
    postprocess: tuple[PostprocessSettings, ...] = ()  # [[postprocess]] entries
    mitigations: tuple[MitigationSettings, ...] = ()  # [[mitigations]] entries
    contrastive: tuple[ContrastiveSettings, ...] = ()  # [[contrastive]] entries (cxrfair.contrastive_steps)

    def __post_init__(self) -> None:
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise CxrfairError(f"methods: unknown {bad}; choose from {', '.join(METHODS)}")
        if not self.models:
            raise CxrfairError("models: list at least one model (see `cxrfair models list`)")
        for name in ("models", "methods"):
            values = getattr(self, name)
            twice = sorted({v for v in values if values.count(v) > 1})
            if twice:
                raise CxrfairError(f"{name}: {', '.join(twice)} listed more than once; list each once")
        if self.seeds < 1:
            raise CxrfairError("seeds: must be at least 1")


def config_from_dict(data: dict, source: str = "config", base: Path | None = None) -> ExperimentConfig:
    """Build an ExperimentConfig from parsed TOML; relative paths are taken from ``base``.

    Every key is checked against its field's type first: CxrfairError with one line naming
    ``source``, the ``[section] key``, the value and what was expected.
    """
    where = _Where(source, Path(base or Path.cwd()), "")
    config = _build(ExperimentConfig, data, where)
    return dataclasses.replace(config, out=_resolve(where.base, config.out))


@dataclass(frozen=True)
class _Where:
    """Where a value comes from, for messages: the file, the folder paths are relative to, the section."""

    source: str
    base: Path
    section: str  # "" at the top level, else e.g. "probe"

    @property
    def prefix(self) -> str:
        if not self.section:
            return ""
        return f"{self.section} " if self.section.startswith("[") else f"[{self.section}] "

    def key(self, name: str) -> str:
        return self.prefix + name

    def error(self, text: str) -> CxrfairError:
        return CxrfairError(f"config {self.source}: {text}")


class _Mismatch(Exception):
    """A value does not have its field's type (turned into a message naming the whole key)."""


def _build(cls: type, values: dict, where: _Where) -> Any:
    """An instance of the settings dataclass ``cls`` from a TOML table, every value type-checked."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    if hasattr(cls, "__recipes__"):
        values = _with_recipe(cls.__recipes__, values, where)
    removed = [k for k in getattr(cls, "__removed__", {}) if k in values]
    if removed:
        raise where.error(f"{where.key(removed[0])}: {cls.__removed__[removed[0]]}")
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise where.error(f"{where.prefix}unknown key(s) {', '.join(unknown)}; "
                          f"known: {', '.join(fields)}")
    missing = [n for n, f in fields.items() if n not in values and _required(f)]
    if missing:
        raise where.error(f"`{where.key(missing[0])} = {_example(hints[missing[0]])}` is required "
                          f"({_describe(hints[missing[0]])})")
    kwargs = {}
    for name, value in values.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise where.error(f"{name} = {_show(value)}: expected a table [{name}]")
            kwargs[name] = _build(tp, value, dataclasses.replace(where, section=name))
            continue
        if _table_list(tp):
            kwargs[name] = _build_tables(_table_list(tp), name, value, where)
            continue
        try:
            kwargs[name] = _coerce(value, tp, where.base)
        except _Mismatch:
            raise where.error(f"{where.key(name)} = {_show(value)}: expected {_describe(tp)}") from None
    try:
        return cls(**kwargs)
    except CxrfairError as e:  # the dataclass's own checks (e.g. unknown methods)
        raise where.error(f"{where.prefix}{e}") from None


def _with_recipe(recipes: dict[str, dict], values: dict, where: _Where) -> dict:
    """``values`` without ``recipe`` and with the keys of the recipe it names (none named: as written).

    A key written beside the recipe must equal the recipe's value (then it is redundant, not an
    override): a different one is refused naming both, so no one runs half a recipe unknowingly.
    """
    values = dict(values)
    name = values.pop("recipe", None)
    if name is None:
        return values
    if name not in recipes:
        raise where.error(f"{where.key('recipe')} = {_show(name)}: expected one of "
                          f"{', '.join(json.dumps(r) for r in recipes)}")
    for key, value in recipes[name].items():
        if key in values and values[key] != value:
            raise where.error(f"{where.key(key)} = {_show(values[key])} conflicts with recipe = {json.dumps(name)}, "
                              f"which sets {key} = {_show(value)}; remove one of the two")
        values[key] = value
    return values


def _table_list(tp: Any) -> type | None:
    """The element dataclass of a ``tuple[Settings, ...]`` field (a TOML array of tables), else None."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) is tuple and args and dataclasses.is_dataclass(args[0]):
        return args[0]
    return None


def _build_tables(cls: type, name: str, values: Any, where: _Where) -> tuple:
    """``[[name]]`` entries, each built as ``cls``; messages say ``[[name]] #2 key``."""
    if not isinstance(values, list) or not all(isinstance(v, dict) for v in values):
        raise where.error(f"{name} = {_show(values)}: expected tables [[{name}]]")
    return tuple(_build(cls, v, dataclasses.replace(where, section=f"[[{name}]] #{i}")) for i, v in enumerate(values, 1))


def _coerce(value: Any, tp: Any, base: Path) -> Any:
    """``value`` as the annotated type ``tp``, or _Mismatch. bool is not an int; lists must be arrays."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if len(inner) != 1:
            raise TypeError(f"config schema: only `X | None` unions are supported, not {tp}")
        return None if value == "" else _coerce(value, inner[0], base)  # TOML has no null: "" is empty
    if origin is tuple or tp is tuple:
        if not isinstance(value, list):
            raise _Mismatch  # a string is not a list of its characters
        if not args:  # a bare `tuple` (a stage's own annotation): any numbers or strings; the stage checks them
            if not all(isinstance(v, (int, float, str)) and not isinstance(v, bool) for v in value):
                raise _Mismatch
            return tuple(value)
        return tuple(_coerce(v, args[0], base) for v in value)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise _Mismatch
        return {k: _coerce(v, args[1], base) for k, v in value.items()} if args else dict(value)
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:  # an int is a fine float; kept as written so fingerprints match what was typed
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif tp is str:
        ok = isinstance(value, str)
    elif tp is Path:
        if not isinstance(value, str) or not value:
            raise _Mismatch
        return _resolve(base, value)
    else:
        raise TypeError(f"config schema: no checker for type {tp}")
    if not ok:
        raise _Mismatch
    return value


_NAMES = {bool: ("true or false", "booleans", "true"), int: ("an integer", "integers", "1"),
          float: ("a number", "numbers", "0.001"), str: ("a string", "strings", '"text"'),
          Path: ("a path (a string)", "paths (strings)", '"folder/file"')}


def _describe(tp: Any) -> str:
    """What a value of type ``tp`` looks like, for messages: ``a list of numbers, e.g. [0.001]``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = next(a for a in args if a is not type(None))
        return f'{_describe(inner)}, or "" for the default'
    if _table_list(tp):
        return "tables, e.g. [[section]] entries"
    if tp is tuple:
        return "a list of numbers or strings, e.g. [1, 2]"
    if origin is tuple:
        return f"a list of {_NAMES[args[0]][1]}, e.g. [{_NAMES[args[0]][2]}]"
    if origin is dict or tp is dict:
        return "a table, e.g. { name = " + (_NAMES[args[1]][2] if args else '"value"') + " }"
    return _NAMES[tp][0]


def _example(tp: Any) -> str:
    return "[...]" if typing.get_origin(tp) is tuple or tp is tuple else "..."


def _show(value: Any, limit: int = 60) -> str:
    """A TOML value as the user wrote it (roughly), shortened to ``limit`` characters."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, list):
        text = "[" + ", ".join(_show(v, limit) for v in value) + "]"
    elif isinstance(value, dict):
        text = "{ " + ", ".join(f"{k} = {_show(v, limit)}" for k, v in value.items()) + " }"
    elif isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)
    else:
        text = str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _resolve(base: Path, path: str | Path) -> Path:
    path = Path(path).expanduser()
    return path if path.is_absolute() else (base / path)


def load_config(path: Path | str) -> ExperimentConfig:
    """Read a TOML experiment config; CxrfairError naming the file and key on any problem.

    Relative paths inside the file are relative to the current folder (where `cxrfair run` runs).
    """
    path = Path(path)
    if path.is_dir():
        raise CxrfairError(f"config {path}: is a folder; pass the experiment's TOML file (e.g. configs/paper.toml)")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CxrfairError(f"config {path}: no such file") from None
    except OSError as e:
        raise CxrfairError(f"config {path}: cannot be read ({e.strerror})") from None
    except UnicodeDecodeError:
        raise CxrfairError(f"config {path}: is not UTF-8 text; pass the experiment's TOML file") from None
    except tomllib.TOMLDecodeError as e:
        raise CxrfairError(f"config {path}: not valid TOML ({e})") from None
    return config_from_dict(data, source=str(path), base=Path.cwd())


def settings_dict(obj: Any) -> dict:
    """A dataclass as plain JSON-able values (for fingerprints and provenance)."""
    return json_safe(dataclasses.asdict(obj))


def json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
