"""Experiment configuration: a TOML file read into frozen dataclasses, validated once.

Every section and key is optional except ``models``; unknown keys are errors (a typo must not
silently fall back to a default). See ``configs/paper.toml`` for the paper's protocol.

The dataclasses below are the schema: each key's type is checked on load from its annotation
(``bool``, ``int``, ``float``, ``str``, ``Path``, ``X | None``, ``tuple[X, ...]``, ``dict[str, X]``,
or a settings dataclass for a ``[section]``), so adding a key is one field with a default and a
comment. Ranges and choices are checked by the stage configs each step builds (at planning, so
``cxrfair run --dry-run`` catches them too).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cxrfair.errors import CxrfairError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

# The methods `cxrfair run` can schedule (each a method of cxrfair.analysis.runs.RunKey).
METHODS = ("zeroshot", "linear", "mlp", "lora", "full")


@dataclass(frozen=True)
class SynthSettings:
    enabled: bool = False  # make synthetic NIH-format data first and build the cohort from it (demo)
    seed: int = 0  # seed of the synthetic images
    size: int = 64  # side of the synthetic PNGs in pixels


@dataclass(frozen=True)
class CohortSettings:
    metadata: Path | None = None  # NIH metadata CSV; empty = the vendored Data_Entry_2017_v2020.csv.gz
    images: Path | None = None  # folder of the NIH download (images_001/images/...); needed to extract
    preset: str = "nih-6x200"  # the paper's 6 diseases x 4 groups x 50 images
    per_group: int | None = None  # images per disease x group cell; empty = the preset's 50
    seed: int = 0  # sampling and split seed


@dataclass(frozen=True)
class ExtractSettings:
    batch_size: int = 64  # images per forward pass (and per resumable chunk)
    workers: int = 4  # DataLoader decode workers
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "fp32"  # fp32 | bf16 | fp16
    weights: dict[str, Path] = field(default_factory=dict)  # model name -> local weights path (else env var / hub cache)


@dataclass(frozen=True)
class ProbeSettings:
    lr: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3)  # grid, selected on validation loss
    weight_decay: tuple[float, ...] = (0.0, 1e-4, 1e-2)  # AdamW weight decay grid
    hidden: tuple[int, ...] = (256, 512)  # MLP hidden widths
    epochs: int = 150  # paper: 150, cosine-annealed
    batch_size: int = 64  # paper: 64
    all_prompt_sets: bool = False  # zero-shot: also write runs of the prompt sets not selected on val


@dataclass(frozen=True)
class FinetuneSettings:
    epochs: int = 150  # the lowest-validation-loss epoch is evaluated
    batch_size: int = 64  # paper: 64
    lora_lr: tuple[float, ...] = (5e-4,)  # candidates; chosen on validation loss of seed 0
    full_lr: tuple[float, ...] = (1e-5,)  # candidates; chosen on validation loss of seed 0
    weight_decay: float = 0.01  # AdamW decoupled weight decay
    lora_rank: int = 8  # r of each low-rank update
    lora_alpha: int = 16  # LoRA scaling numerator (update scaled by alpha / r)
    lora_dropout: float = 0.0  # dropout on the LoRA input path
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    workers: int = 4  # threads decoding PNGs into the image cache


@dataclass(frozen=True)
class AnalysisSettings:
    bootstrap: int = 1000  # bootstrap replicates per metric
    attributes: tuple[str, ...] = ("sex", "age_group")  # cohort columns to measure gaps across
    split: str = "test"  # split the metrics are computed on
    seed: int = 0  # seed of the bootstrap draws


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
        return f"[{self.section}] " if self.section else ""

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
        try:
            kwargs[name] = _coerce(value, tp, where.base)
        except _Mismatch:
            raise where.error(f"{where.key(name)} = {_show(value)}: expected {_describe(tp)}") from None
    try:
        return cls(**kwargs)
    except CxrfairError as e:  # the dataclass's own checks (e.g. unknown methods)
        raise where.error(f"{where.prefix}{e}") from None


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _coerce(value: Any, tp: Any, base: Path) -> Any:
    """``value`` as the annotated type ``tp``, or _Mismatch. bool is not an int; lists must be arrays."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if len(inner) != 1:
            raise TypeError(f"config schema: only `X | None` unions are supported, not {tp}")
        return None if value == "" else _coerce(value, inner[0], base)  # TOML has no null: "" is empty
    if origin is tuple:
        if not isinstance(value, list):
            raise _Mismatch  # a string is not a list of its characters
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
    if origin is tuple:
        return f"a list of {_NAMES[args[0]][1]}, e.g. [{_NAMES[args[0]][2]}]"
    if origin is dict or tp is dict:
        return "a table, e.g. { name = " + (_NAMES[args[1]][2] if args else '"value"') + " }"
    return _NAMES[tp][0]


def _example(tp: Any) -> str:
    return "[...]" if typing.get_origin(tp) is tuple else "..."


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
