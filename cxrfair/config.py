"""Experiment configuration: a TOML file read into frozen dataclasses, validated once.

Every section and key is optional except ``models``; unknown keys are errors (a typo must not
silently fall back to a default). See ``configs/paper.toml`` for the paper's protocol.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cxrfair.errors import CxrfairError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

METHODS = ("zeroshot", "linear", "mlp", "lora", "full")


@dataclass(frozen=True)
class SynthSettings:
    enabled: bool = False  # make synthetic NIH-format data first and build the cohort from it (demo)
    seed: int = 0  # seed of the synthetic images
    size: int = 64  # side of the synthetic PNGs in pixels


@dataclass(frozen=True)
class CohortSettings:
    metadata: str | None = None  # NIH metadata CSV; empty = the vendored Data_Entry_2017_v2020.csv.gz
    images: str | None = None  # folder of the NIH download (images_001/images/...); needed to extract
    preset: str = "nih-6x200"  # the paper's 6 diseases x 4 groups x 50 images
    per_group: int | None = None  # images per disease x group cell; empty = the preset's 50
    seed: int = 0  # sampling and split seed


@dataclass(frozen=True)
class ExtractSettings:
    batch_size: int = 64
    workers: int = 4  # DataLoader decode workers
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "fp32"  # fp32 | bf16 | fp16
    weights: dict = field(default_factory=dict)  # model name -> local weights path (else env var / hub cache)


@dataclass(frozen=True)
class ProbeSettings:
    lr: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3)  # grid, selected on validation loss
    weight_decay: tuple[float, ...] = (0.0, 1e-4, 1e-2)
    hidden: tuple[int, ...] = (256, 512)  # MLP hidden widths
    epochs: int = 150
    batch_size: int = 64
    all_prompt_sets: bool = False  # zero-shot: also write runs of the prompt sets not selected on val


@dataclass(frozen=True)
class FinetuneSettings:
    epochs: int = 150
    batch_size: int = 64
    lora_lr: tuple[float, ...] = (5e-4,)  # candidates; chosen on validation loss of seed 0
    full_lr: tuple[float, ...] = (1e-5,)  # candidates; chosen on validation loss of seed 0
    weight_decay: float = 0.01
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    device: str = "auto"
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    workers: int = 4


@dataclass(frozen=True)
class AnalysisSettings:
    bootstrap: int = 1000  # bootstrap replicates per metric
    attributes: tuple[str, ...] = ("sex", "age_group")
    split: str = "test"
    seed: int = 0


@dataclass(frozen=True)
class ExperimentConfig:
    out: Path  # everything the experiment writes goes under this folder
    models: tuple[str, ...]
    methods: tuple[str, ...] = METHODS
    seeds: int = 3  # seeds 0..seeds-1 for probes and fine-tuning (zero-shot is deterministic)
    synth: SynthSettings = SynthSettings()
    cohort: CohortSettings = CohortSettings()
    extract: ExtractSettings = ExtractSettings()
    probe: ProbeSettings = ProbeSettings()
    finetune: FinetuneSettings = FinetuneSettings()
    analysis: AnalysisSettings = AnalysisSettings()

    def __post_init__(self) -> None:
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise CxrfairError(f"methods: unknown {bad}; choose from {', '.join(METHODS)}")
        if not self.models:
            raise CxrfairError("models: list at least one model (see `cxrfair models list`)")
        if self.seeds < 1:
            raise CxrfairError("seeds: must be at least 1")


_SECTIONS = {"synth": SynthSettings, "cohort": CohortSettings, "extract": ExtractSettings,
             "probe": ProbeSettings, "finetune": FinetuneSettings, "analysis": AnalysisSettings}


def _build(cls: type, values: dict, where: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise CxrfairError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(fields)}")
    kwargs = {}
    for name, value in values.items():
        default = getattr(cls(), name)
        if isinstance(value, list):
            value = tuple(value)
        if isinstance(default, tuple) and not isinstance(value, tuple):
            value = (value,)
        if isinstance(default, bool) and not isinstance(value, bool):
            raise CxrfairError(f"{where}.{name}: expected true or false, got {value!r}")
        if isinstance(default, (int, float)) and not isinstance(default, bool):
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise CxrfairError(f"{where}.{name}: expected a number, got {value!r}")
        if value == "" and default is None:
            value = None
        kwargs[name] = value
    return cls(**kwargs)


def config_from_dict(data: dict, source: str = "config", base: Path | None = None) -> ExperimentConfig:
    """Build an ExperimentConfig from parsed TOML; relative paths are taken from ``base``."""
    data = dict(data)
    sections = {}
    for name, cls in _SECTIONS.items():
        section = data.pop(name, {})
        if not isinstance(section, dict):
            raise CxrfairError(f"{source}: [{name}] must be a table")
        sections[name] = _build(cls, section, f"{source} [{name}]")
    top = {f.name for f in dataclasses.fields(ExperimentConfig)} - set(_SECTIONS)
    unknown = sorted(set(data) - top)
    if unknown:
        raise CxrfairError(f"{source}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(top | set(_SECTIONS)))}")
    if "models" not in data:
        raise CxrfairError(f"{source}: `models = [...]` is required (see `cxrfair models list`)")
    base = base or Path.cwd()
    out = Path(data.pop("out", "experiment"))
    cohort = sections["cohort"]
    cohort = dataclasses.replace(
        cohort,
        metadata=str(_resolve(base, cohort.metadata)) if cohort.metadata else None,
        images=str(_resolve(base, cohort.images)) if cohort.images else None,
    )
    weights = {k: str(_resolve(base, v)) for k, v in sections["extract"].weights.items()}
    sections["cohort"] = cohort
    sections["extract"] = dataclasses.replace(sections["extract"], weights=weights)
    return ExperimentConfig(
        out=_resolve(base, out),
        models=tuple(data.pop("models")),
        methods=tuple(data.pop("methods", METHODS)),
        seeds=int(data.pop("seeds", 3)),
        **sections,
    )


def _resolve(base: Path, path: str | Path) -> Path:
    path = Path(path).expanduser()
    return path if path.is_absolute() else (base / path)


def load_config(path: Path | str) -> ExperimentConfig:
    """Read a TOML experiment config; CxrfairError naming the file and key on any problem.

    Relative paths inside the file are relative to the current folder (where `cxrfair run` runs).
    """
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CxrfairError(f"config {path}: no such file") from None
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
