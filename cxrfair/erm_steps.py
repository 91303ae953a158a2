"""The steps of the ERM protocol: synth, cohort, extract, zero-shot, probes, fine-tuning, analysis.

Each step builds its stage's config while planning (``stage_config``: a bad value stops the run,
``--dry-run`` included, with a message naming the config key) and calls the stage's library
function. A stage's config is built from its section with ``stage_kwargs`` (every key of a
section is a field of its stage config, see ``cxrfair.config``), plus what the pipeline supplies:
paths, the model, the method, the seeds.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from cxrfair.analysis import analyze as analyze_command
from cxrfair.analysis.config import AnalyzeConfig
from cxrfair.config import ExperimentConfig, section_settings, settings_dict, stage_kwargs
from cxrfair.core.runs import read_run, write_run
from cxrfair.errors import CxrfairError
from cxrfair.extract import cohort as cohort_stage
from cxrfair.extract import extractor, synth
from cxrfair.extract.cohort_presets import PRESETS
from cxrfair.extract.datasets import OPTIONS as READER_OPTIONS
from cxrfair.extract.datasets import PATH_OPTIONS, READERS
from cxrfair.extract.registry import resolve_name
from cxrfair.finetune.config import FinetuneConfig
from cxrfair.io import sha256_file
from cxrfair.probe import sweep, zeroshot
from cxrfair.publish import move_stale_runs
from cxrfair.step_base import (cache_path, family, model_weights, publishing_step, stage_config,
                               weights_setting)
from cxrfair.steps import Step


def synth_step(config: ExperimentConfig, p: dict) -> Step:
    sy = config.synth
    cfg = stage_config("synth", lambda: synth.SynthConfig(**stage_kwargs(sy, synth.SynthConfig), out=p["synth"],
                                                          force=True))

    def run(force: bool) -> None:
        synth.make_synth(cfg)

    # `drains` only chooses what the cohort reads (the NIH folder always has the drain file).
    settings = {k: v for k, v in section_settings(sy).items() if k != "drains"}
    return Step("synth", settings, [p["synth"] / "synth_info.json"], run)


# The files of a synthetic folder, per format, as `cxrfair cohort synth` prints them.
_SYNTH_SOURCES = {
    "nih": {"metadata": "Data_Entry_2017.csv", "images": "."},
    "chexpert": {"metadata": "CheXpert-v1.0-small/train.csv", "demographics": "CHEXPERT DEMO.csv", "images": "."},
    "mimic": {"metadata": "mimic-cxr-jpg/2.0.0", "mimic_iv": "mimiciv/2.2", "images": "mimic-cxr-jpg/2.0.0"},
}
# The [cohort] keys naming files: metadata, images and every path option the dataset readers declare.
_SOURCE_KEYS = ("metadata", "images", *PATH_OPTIONS)


def _cohort_sources(config: ExperimentConfig, p: dict) -> dict:
    """The cohort's files: the [cohort] paths, or the synthetic folder's when [synth] is enabled."""
    c, sy = config.cohort, config.synth
    if not sy.enabled:
        return {k: getattr(c, k) for k in _SOURCE_KEYS}
    given = [k for k in _SOURCE_KEYS if getattr(c, k) is not None]
    if given:
        raise CxrfairError(f"[cohort] {given[0]}: not used with [synth] enabled (the cohort is built from the "
                           "synthetic data); remove it or set [synth] enabled = false")
    sources = {k: p["synth"] / v for k, v in _SYNTH_SOURCES[sy.format].items()}
    if sy.format == "nih" and sy.drains:
        sources["drains"] = p["synth"] / synth.NEATX_NAME
    if sy.format == "mimic" and sy.reports:  # the synthetic reports give the cohort its text column
        sources["reports"] = p["synth"] / synth.REPORTS_FILE
    if sy.format == "nih" and c.preset in PRESETS and PRESETS[c.preset].split_rule == "official":
        sources["official_split"] = p["synth"]
    return sources


def cohort_step(config: ExperimentConfig, p: dict) -> tuple[Step, object, list[str]]:
    """The cohort step, its CohortConfig, and what is missing among its files (an error unless dry run)."""
    c = config.cohort
    if config.synth.drains and config.synth.format != "nih":
        raise CxrfairError(f"[synth] drains: only the nih format has drain labels, not {config.synth.format}")
    sources = _cohort_sources(config, p)
    dataset = c.dataset or (config.synth.format if config.synth.enabled else None)
    _check_dataset(dataset)
    cfg = stage_config("cohort", lambda: cohort_stage.CohortConfig.from_preset(
        c.preset, out=p["cohort"], dataset=dataset, **sources, diseases=c.diseases, attributes=c.attributes,
        age_bins=c.age_bins, uncertain=c.uncertain, per_group=c.per_group, max_train=c.max_train, seed=c.seed,
        split=c.split, force=True, **{k: getattr(c, k) for k in READER_OPTIONS if k not in PATH_OPTIONS}))

    def run(force: bool) -> None:
        cohort_stage.build_cohort(cfg)
        for line in stale_runs_moved(p):  # the steps below rebuild them for this cohort
            print(f"    note: {line}")

    settings = settings_dict(c) | {"dataset": cfg.dataset} | {k: str(v) if v else None for k, v in sources.items()}
    missing = []
    if not config.synth.enabled:
        # The files' content, not just their names: an edited metadata file must rebuild the cohort.
        identity, missing = _sources_identity(cfg)
        settings["sources_sha256"] = identity
    deps = ("synth",) if config.synth.enabled else ()
    return Step("cohort", settings, [p["cohort"] / "cohort.json"], run, deps), cfg, missing


def stale_runs_moved(p: dict) -> list[str]:
    """Move the runs made on another cohort than cohort/cohort.json's out of runs/ and sweeps/ (one line each).

    Without this, a changed cohort would leave runs every later stage refuses to write beside
    (``check_runs_folder``) and analyze refuses to mix; see ``cxrfair.publish.move_stale_runs``.
    """
    try:
        cohort_hash = json.loads((p["cohort"] / "cohort.json").read_text(encoding="utf-8"))["hash"]
    except (OSError, ValueError, KeyError, TypeError):  # no cohort yet (or a broken one the cohort step rebuilds)
        return []
    return move_stale_runs(p["out"], (p["runs"], p["sweeps"]), str(cohort_hash))


def cohort_attributes(cohort_cfg) -> tuple[str, ...]:
    """The sensitive attributes the cohort can have: the configured ones, else the preset's (+ optional)."""
    if cohort_cfg.attributes:
        return tuple(cohort_cfg.attributes)
    preset = PRESETS[cohort_cfg.preset]
    return tuple(preset.attributes) + tuple(preset.optional_attributes)


def _check_dataset(dataset: str | None) -> None:
    if dataset is not None and dataset not in READERS:
        raise CxrfairError(f"[cohort] dataset {dataset!r}: unknown; choose one of {', '.join(READERS)}, or \"\" for the preset's")


def _sources_identity(cfg) -> tuple[dict, list[str]]:
    """SHA-256 of every file the cohort reads ({key: hash or {file: hash}}), and the missing ones, named.

    Which files, and inside a folder which of its files, the dataset's reader declares (``cfg.source_files``).
    """
    identity, missing = {}, []
    for key, path, inside in cfg.source_files():
        if path.is_file():
            identity[key] = _sha(path)
        elif path.is_dir():
            identity[key] = {name: _sha(f) for name, f in _folder_files(path, inside)}
        else:
            missing.append(f"[cohort] {key} {path}: no such file or folder")
    return identity, missing


def _folder_files(folder: Path, stems: tuple) -> list[tuple[str, Path]]:
    """The files of ``stems`` present in ``folder`` (``.csv.gz`` preferred over ``.csv``)."""
    found = []
    for stem in stems:
        for name in (f"{stem}.gz", stem) if stem.endswith(".csv") else (stem,):
            if (folder / name).is_file():
                found.append((name, folder / name))
                break
    return found


def _sha(path: Path) -> str:
    return sha256_file(path)


def extract_step(config: ExperimentConfig, p: dict, model: str, source: str | None = None,
                 base: str | None = None, deps: tuple[str, ...] = ("cohort",)) -> Step:
    """``cache/<model>.h5``. ``source``: the ``--model`` value to load when it is not ``model`` itself
    (``contrastive:FOLDER``, written by the step in ``deps``, so resolved only when this step runs; it
    must name ``model``); ``base``: the model whose [extract] weights it loads (an adapted model's base)."""
    e = config.extract
    cache = cache_path(p, model)
    weights = model_weights(config, base or model)
    cfg = stage_config("extract", lambda: extractor.ExtractConfig(
        **stage_kwargs(e, extractor.ExtractConfig), model=model, cohort=p["cohort"], out=cache, weights=weights))

    def run(force: bool) -> None:
        if source is not None and resolve_name(source) != model:
            raise CxrfairError(f"{source}: holds model {resolve_name(source)}, expected {model}; rerun with the "
                               "step that writes it")
        extractor.extract(dataclasses.replace(cfg, force=force))

    settings = ({k: v for k, v in section_settings(e).items() if k != "weights"}
                | {"model": model, "weights": weights_setting(config, base or model)}
                | ({"source": source} if source is not None else {}))  # unset: fingerprints as before
    return Step(f"extract-{model}", settings, [cache], run, deps)


def zeroshot_step(config: ExperimentConfig, p: dict, model: str) -> Step:
    cache = cache_path(p, model)
    term = config.probe.zeroshot_term
    if term is not None and term not in zeroshot.TERMS:
        raise CxrfairError(f"[probe] zeroshot_term {term!r}: choose one of {', '.join(zeroshot.TERMS)}, or \"\" for the default")

    def build(staging: Path) -> None:
        zeroshot.zeroshot_cache(cache, staging, all_sets=config.probe.all_prompt_sets, force=True, term=term)

    settings = {"model": model, "all_prompt_sets": config.probe.all_prompt_sets, "term": term}
    return publishing_step(f"zeroshot-{model}", settings, (f"extract-{model}",), p, family(model, "zeroshot"), build)


def sweep_config(config: ExperimentConfig, method: str, shots: int | None = None) -> sweep.SweepConfig:
    """The probe stage's SweepConfig for ``method`` (``shots``: its few-shot sweep) from [probe],
    checked (messages name [probe] keys)."""
    kwargs = stage_kwargs(config.probe, sweep.SweepConfig)
    if method != "mlp":
        kwargs["l2s_skip"] = None  # the skip weight's grid is the skip MLP's alone
    return stage_config("probe", lambda: sweep.SweepConfig(
        **kwargs, method=method, seeds=tuple(range(config.seeds)), shots=shots).validate(),
        {"memory_budget": "memory_budget_mb"})


# SweepConfig fields that one solver or method ignores: changing them must not rerun those probes.
_UNUSED_BY = {solver: tuple(f for other, options in sweep.SOLVER_OPTIONS.items() if other != solver for f in options)
              for solver in sweep.SOLVER_OPTIONS}
_UNUSED_BY_LINEAR = ("hiddens", "architecture", "l2s_skip")


def sweep_settings(cfg: sweep.SweepConfig) -> dict:
    """What changes a probe sweep's runs (for its fingerprint): the SweepConfig minus what it ignores."""
    unused = {"memory_budget_mb", "track", *_UNUSED_BY.get(cfg.solver, ()), *(_UNUSED_BY_LINEAR if cfg.method == "linear" else ())}
    if cfg.shots is None:  # a whole-split sweep: its fingerprint stays as before shots existed
        unused.add("shots")
    return {k: v for k, v in settings_dict(cfg).items() if k not in unused}


def probe_step(config: ExperimentConfig, p: dict, model: str, method: str, shots: int | None = None) -> Step:
    """The probe sweep of ``model`` x ``method`` on the whole training split, or (``shots``) on K
    images per class: its own step and run family (``<model>__<method>-k<K>``)."""
    cache = cache_path(p, model)
    cfg = sweep_config(config, method, shots)

    def build(staging: Path) -> None:
        sweep.probe_cache(cache, staging, cfg, force=True)

    settings = sweep_settings(cfg) | {"model": model}
    name = f"{method}-{model}" if shots is None else f"{method}-k{shots}-{model}"
    return publishing_step(name, settings, (f"extract-{model}",), p, family(model, method, shots=shots), build)


def fewshot_steps(config: ExperimentConfig, p: dict, model: str, method: str) -> list[Step]:
    """One few-shot probe step per K of [probe] shots (none when it is empty)."""
    shots = config.probe.shots
    twice = sorted({k for k in shots if shots.count(k) > 1})
    if twice:
        raise CxrfairError(f"[probe] shots: {', '.join(map(str, twice))} listed more than once; list each K once")
    return [probe_step(config, p, model, method, shots=k) for k in shots]


def finetune_config(config: ExperimentConfig, p: dict, model: str, method: str, where: str = "finetune",
                    **fields) -> FinetuneConfig:
    """[finetune] as the stage's FinetuneConfig of ``model`` x ``method``, checked at planning.

    ``fields``: what the step sets besides (``out``, ``lr``, ``seed``, ``tag``, the mitigation);
    every run resumes an interrupted attempt and replaces a finished one. ``where`` prefixes the
    stage's messages.
    """
    return stage_config(where, lambda: FinetuneConfig(
        **stage_kwargs(config.finetune, FinetuneConfig), model=model, cohort=p["cohort"], method=method,
        weights=model_weights(config, model), resume=True, force=True, **fields))


def finetune_settings(config: ExperimentConfig, model: str, method: str) -> dict:
    """What changes a fine-tuning run of ``model`` x ``method`` besides its lr and seed (for fingerprints)."""
    settings = {k: v for k, v in section_settings(config.finetune).items() if k != "track"}  # tracking changes no result
    return settings | {"model": model, "method": method, "weights": weights_setting(config, model)}


def run_finetune(cfg: FinetuneConfig) -> None:
    """One fine-tuning run (torch loads here, when a fine-tuning step runs, not when one is planned)."""
    from cxrfair.finetune import train  # torch: planning and --dry-run stay torch-free

    train.finetune(cfg, progress=True)


def _lr_sweep_dir(p: dict, model: str, method: str) -> Path:
    return p["sweeps"] / f"{model}__{method}"


def _lr_tag(lr: float) -> str:
    return f"lr{lr:g}".replace("+", "")


def finetune_steps(config: ExperimentConfig, p: dict, model: str, method: str) -> list[Step]:
    """Learning rates are chosen on validation loss with seed 0; other seeds reuse the choice.

    Seed 0 of each candidate is written to the sweeps folder; the chosen one is copied as ``best``.
    """
    f = config.finetune
    lrs = f.lora_lr if method == "lora" else f.full_lr
    if not lrs:
        raise CxrfairError(f"[finetune] {method}_lr: give at least one learning rate")
    candidates = {lr: finetune_config(config, p, model, method, out=_lr_sweep_dir(p, model, method), lr=lr, seed=0,
                                      tag=_lr_tag(lr))
                  for lr in lrs}
    base = finetune_settings(config, model, method)
    steps = []
    for lr, cfg in candidates.items():
        steps.append(Step(f"{method}-{model}-{_lr_tag(lr)}-s0", base | {"lr": lr, "seed": 0},
                          [cfg.out / cfg.run_id], lambda force, cfg=cfg: run_finetune(cfg), ("cohort",)))

    def build(staging: Path) -> None:
        best = _select_lr(candidates)
        _copy_run(candidates[best], staging, {"lr_candidates": list(lrs), "lr_selected_on": "val loss (seed 0)"})
        for seed in range(1, config.seeds):
            run_finetune(dataclasses.replace(candidates[best], seed=seed, out=staging, tag="best"))

    steps.append(publishing_step(f"{method}-{model}", base | {"lrs": list(lrs), "seeds": config.seeds},
                                 tuple(s.name for s in steps), p, family(model, method), build))
    return steps


def _select_lr(candidates: dict) -> float:
    """The learning rate whose seed-0 run reached the lowest validation loss."""
    scores = {}
    for lr, cfg in candidates.items():
        meta = json.loads((cfg.out / cfg.run_id / "run.json").read_text())
        scores[lr] = min(meta["curves"]["val_loss"])
    return min(scores, key=scores.get)


def _copy_run(cfg: FinetuneConfig, runs: Path, extra: dict) -> Path:
    """The selected candidate's seed-0 run, renamed to the ``best`` tag (predictions + run.json)."""
    run = read_run(cfg.out / cfg.run_id)
    meta = dict(run.meta) | {"run_id": dataclasses.replace(cfg, tag="best").run_id} | extra
    return write_run(runs, meta, run.predictions, force=True)


def analysis_step(config: ExperimentConfig, p: dict, deps: list[str], embeddings: bool,
                  attributes: tuple[str, ...] = ()) -> Step:
    """The report over every run; ``embeddings``: leakage/geometry outputs exist under <out>/embeddings/.

    ``attributes``: the cohort's (``cohort_attributes``); [analysis] attributes and cross must be
    among them, checked while planning rather than at the last step.
    """
    a = config.analysis
    for key in ("attributes", "cross"):
        unknown = [x for x in (getattr(a, key) or ()) if x not in attributes]
        if attributes and unknown:
            raise CxrfairError(f"[analysis] {key}: {unknown[0]!r} is not a sensitive attribute of the cohort "
                               f"(it has {', '.join(attributes)}); remove it or add it to [cohort] attributes")
    extra = {"embeddings": p["embeddings"]} if embeddings else {}
    cfg = stage_config("analysis", lambda: AnalyzeConfig(
        **stage_kwargs(a, AnalyzeConfig), runs_dir=p["runs"], out=p["report"], force=True, **extra))

    def run(force: bool) -> None:
        analyze_command.analyze(cfg)

    settings = section_settings(a) | {k: str(v) for k, v in extra.items()}
    return Step("analyze", settings, [p["report"] / "report.html"], run, tuple(deps))
