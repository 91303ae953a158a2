"""The experiment's fairness steps: embedding analyses, post-processing and mitigations.

Built by ``cxrfair.pipeline`` after the ERM steps (``producers``: (model, method) -> the step that
publishes that family's runs). Every check that can fail runs while planning, so ``--dry-run``
catches a bad entry. Each step builds its stage's config and calls the stage's library function:

- ``leakage-<model>`` / ``geometry-<model>``: ``leakage_cache`` / ``geometry_cache`` on the
  model's cache, written whole to ``<out>/embeddings/<model>/leakage|geometry/`` (the layout
  docs/CONTRACTS.md suggests, where the report looks).
- ``<method>+thresholds-<attr>-<model>`` (one per [[postprocess]] entry x model x method):
  ``postprocess`` on every run of the ERM family, fitted on validation; published as the
  family ``<model>__<method>+thresholds-<attr>``.
- ``<method>+<mitigation>-<attr>-<model>`` (one per [[mitigations]] entry x model x method): the
  probe sweep ([probe]'s SweepConfig) or fine-tuning run ([finetune]'s FinetuneConfig) with the
  entry's mitigation, attribute, strengths, select and adversary. Which mitigation runs where,
  its probe solver and its strength range come from ``cxrfair.core.mitigations``. Fine-tuning
  reuses the learning rate its ERM family chose on validation and trains one run per strength
  (tags ``st<s>``), among which ``cxrfair analyze`` chooses on validation.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path

from cxrfair.analysis import postprocess as postprocess_stage
from cxrfair.config import (ExperimentConfig, MitigationSettings, PostprocessSettings, section_settings,
                            settings_dict, stage_kwargs)
from cxrfair.core import mitigations
from cxrfair.core.runs import RunKey, safe_name
from cxrfair.erm_steps import (cohort_attributes, finetune_config, finetune_settings, run_finetune, sweep_config,
                               sweep_settings)
from cxrfair.errors import CxrfairError
from cxrfair.finetune.config import FinetuneConfig
from cxrfair.probe import sweep
from cxrfair.probe.embeddings import geometry, leakage
from cxrfair.step_base import cache_path, family, publishing_step, stage_config
from cxrfair.steps import Step

PROBES = ("linear", "mlp")
SELECTS = ("worst_group", "loss", "gap")  # how a mitigated probe sweep may select (probe.sweep.SELECTIONS less accuracy)


def steps(config: ExperimentConfig, p: dict, cohort_cfg, producers: dict, adapted: dict | None = None) -> list[Step]:
    """Embedding, post-processing and mitigation steps, in dependency order.

    ``adapted``: adapted model -> its base model ([[contrastive]]; planned before these): an adapted
    model gets the embedding analyses its base model is listed for (before / after)."""
    attributes = cohort_attributes(cohort_cfg)
    out = _embedding_steps(config, p, adapted or {})
    names: set[str] = set()
    for i, entry in enumerate(config.postprocess, 1):
        out += _postprocess_steps(config, p, entry, f"[[postprocess]] #{i}", attributes, producers, names)
    for i, entry in enumerate(config.mitigations, 1):
        out += _mitigation_steps(config, p, entry, f"[[mitigations]] #{i}", attributes, producers, names)
    return out


def _models(config: ExperimentConfig, listed: tuple, where: str) -> tuple[str, ...]:
    unknown = [m for m in listed if m not in config.models]
    if unknown:
        raise CxrfairError(f"{where}: {', '.join(unknown)} not among models ({', '.join(config.models)}); list it there first")
    return listed or config.models


# ---------------------------------------------------------------- embeddings


def _embedding_steps(config: ExperimentConfig, p: dict, adapted: dict) -> list[Step]:
    e = config.embeddings

    def models(listed: tuple, where: str) -> list[str]:
        bases = _models(config, listed, where)
        return [*bases, *(name for name, base in adapted.items() if base in bases)]

    out = []
    if e.leakage:
        cfg = stage_config("embeddings", lambda: leakage.LeakageConfig(**stage_kwargs(e, leakage.LeakageConfig)).validate())
        out += [_embedding_step(p, m, "leakage", cfg, "leakage.json") for m in models(e.leakage, "[embeddings] leakage")]
    if e.geometry:
        cfg = stage_config("embeddings", lambda: geometry.GeometryConfig(**stage_kwargs(e, geometry.GeometryConfig)).validate(),
                           {"permutations": "geometry_permutations"})
        out += [_embedding_step(p, m, "geometry", cfg, "geometry.json") for m in models(e.geometry, "[embeddings] geometry")]
    return out


def _embedding_step(p: dict, model: str, analysis: str, cfg, marker: str) -> Step:
    cache = cache_path(p, model)
    folder = p["embeddings"] / model / analysis

    def run(force: bool) -> None:
        if analysis == "leakage":
            leakage.leakage_cache(cache, folder, cfg, force=True)
        else:
            geometry.geometry_cache(cache, folder, cfg, force=True)

    settings = {"model": model, "analysis": analysis, **settings_dict(cfg)}
    return Step(f"{analysis}-{model}", settings, [folder / marker], run, (f"extract-{model}",))


# ---------------------------------------------------------------- post-processing


def _postprocess_steps(config, p, entry: PostprocessSettings, where: str, attributes, producers, names) -> list[Step]:
    _check_methods(config, entry.methods, config.methods, where)
    _check_sensitive(entry.sensitive, attributes, where)
    if entry.constraint not in postprocess_stage.CONSTRAINTS:
        raise CxrfairError(f"{where} constraint {entry.constraint!r}: choose one of {', '.join(postprocess_stage.CONSTRAINTS)}")
    thresholds = mitigations.get("thresholds")
    if not thresholds.strength_ok(entry.strength):
        raise CxrfairError(f"{where} strength {entry.strength:g}: the validation utility given up, {thresholds.rule()} "
                           f"(e.g. {thresholds.postprocess_strength:g})")
    return [_postprocess_step(config, p, entry, model, method, producers[model, method], names, where)
            for model in _models(config, entry.models, f"{where} models") for method in entry.methods]


def _postprocess_step(config, p, entry, model: str, method: str, source: Step, names: set, where: str) -> Step:
    name = _unique(f"{method}+thresholds-{entry.sensitive}-{model}", names, where)
    sources = family(model, method)
    kwargs = stage_kwargs(entry, postprocess_stage.PostprocessConfig)

    def build(staging: Path) -> None:
        runs = [r for r in sources.entries(p["runs"]) if r.is_dir()]
        if not runs:
            raise CxrfairError(f"{where}: no runs of {model} {method} in {p['runs']} to post-process")
        for run in runs:
            postprocess_stage.postprocess(postprocess_stage.PostprocessConfig(**kwargs, run=run, out=staging, force=True))

    settings = {"model": model, "method": method, **section_settings(dataclasses.replace(entry, models=(), methods=()))}
    return publishing_step(name, settings, (source.name,), p, family(model, method, "thresholds", entry.sensitive), build)


# ---------------------------------------------------------------- mitigations


def _mitigation_steps(config, p, entry: MitigationSettings, where: str, attributes, producers, names) -> list[Step]:
    _check_methods(config, entry.methods, tuple(m for m in config.methods if m != "zeroshot"), where)
    _check_sensitive(entry.sensitive, attributes, where)
    for method in entry.methods:
        _check_mitigation(entry, method, where)
    out = []
    for model in _models(config, entry.models, f"{where} models"):
        for method in entry.methods:
            name = _unique(f"{method}+{entry.mitigation}-{entry.sensitive}-{model}", names, where)
            make = _probe_mitigation if method in PROBES else _finetune_mitigation
            out.append(make(config, p, entry, model, method, name, producers, where))
    return out


def _check_mitigation(entry: MitigationSettings, method: str, where: str) -> None:
    """The entry's values against the mitigation table (``cxrfair.core.mitigations``)."""
    m, s = entry.mitigation, entry.strengths
    probe = method in PROBES
    stage = mitigations.PROBE if probe else mitigations.FINETUNE
    trained = [n for n in mitigations.names() if n != mitigations.ERM
               and {mitigations.PROBE, mitigations.FINETUNE} & set(mitigations.MITIGATIONS[n].stages)]
    if m not in trained:
        row = mitigations.MITIGATIONS.get(m)
        hint = ("erm is the plain method: list it under methods" if m == mitigations.ERM else
                f"{m} is post-processing: use [[postprocess]]" if row is not None else f"choose one of {', '.join(trained)}")
        raise CxrfairError(f"{where} mitigation {m!r}: {hint}")
    row = mitigations.MITIGATIONS[m]
    if stage not in row.stages:
        raise CxrfairError(f"{where} mitigation {m}: {row.where()}, not {method}")
    if not row.has_strength and s:
        raise CxrfairError(f"{where} strengths: {m} takes none; remove strengths")
    if row.has_strength and not s:
        raise CxrfairError(f"{where} strengths: give at least one strength for {m}, e.g. [0.1, 0.3]")
    bad = [x for x in s if not row.strength_ok(x)]
    if bad:
        raise CxrfairError(f"{where} strengths {', '.join(f'{x:g}' for x in bad)}: {m} strengths must be in {row.span()} "
                           f"({row.strength})")
    if entry.select is not None and (not probe or entry.select not in SELECTS):
        raise CxrfairError(f"{where} select {entry.select!r}: " + (f"choose one of {', '.join(SELECTS)}" if probe else
                           f"probes only; fine-tuning ({method}) keeps its lowest-validation-loss checkpoint"))
    if entry.adversary is not None:
        if m != "adversarial" or stage not in mitigations.ADVERSARIES.get(entry.adversary, ()):
            raise CxrfairError(f"{where} adversary {entry.adversary!r}: only with mitigation adversarial; grl, or "
                               "projection for probes")


def _probe_mitigation(config, p, entry, model, method, name, producers, where) -> Step:
    cfg = _mitigation_sweep(config, entry, method, where)
    # [probe] select is the ERM sweep's rule; the entry's own `select` replaces it here.
    settings = {k: v for k, v in sweep_settings(cfg).items() if k != "select"} | _entry_settings(entry) | {"model": model}

    def build(staging: Path) -> None:
        sweep.probe_cache(cache_path(p, model), staging, _grids_as_floats(cfg), force=True)

    return publishing_step(name, settings, (f"extract-{model}",), p,
                           family(model, method, entry.mitigation, entry.sensitive), build)


def _mitigation_sweep(config, entry: MitigationSettings, method: str, where: str) -> sweep.SweepConfig:
    """[probe]'s sweep of ``method`` with the entry's mitigation, checked here (``--dry-run`` sees what the stage refuses).

    A mitigation whose objective changes every step (groupdro, adversarial, fairot: the table's
    ``probe_solver``) trains with [probe]'s AdamW grid (lr, weight_decay, epochs), which
    full-batch L-BFGS cannot follow.
    """
    cfg = sweep_config(config, method)
    solver = "adamw" if mitigations.get(entry.mitigation).probe_solver == "adamw" else cfg.solver
    return stage_config(where, lambda: dataclasses.replace(
        cfg, solver=solver, mitigation=entry.mitigation, sensitive=entry.sensitive,
        strengths=tuple(float(s) for s in entry.strengths) or None, select=entry.select,
        adversary=entry.adversary or "grl").validate(), {"strength": "strengths"})


def _grids_as_floats(cfg: sweep.SweepConfig) -> sweep.SweepConfig:
    """``cfg`` with its number grids as floats (``weight_decay = [0, 1e-4]`` trains as 0.0, 1e-4), as
    ``cxrfair probe`` parses them: mitigated sweeps record the grid as they always have."""
    grids = {k: tuple(float(v) for v in getattr(cfg, k)) for k in ("lrs", "weight_decays", "l2s", "l2s_skip")
             if getattr(cfg, k) is not None}
    return dataclasses.replace(cfg, **grids)


def _finetune_mitigation(config, p, entry, model, method, name, producers, where) -> Step:
    erm = producers[model, method]
    # One run per strength and seed (tags st<s>); `cxrfair analyze` chooses the strength on validation.
    def run_config(strength: float, seed: int, lr: float | None, out: Path) -> FinetuneConfig:
        cfg = finetune_config(config, p, model, method, where, out=out, lr=lr, seed=seed, mitigation=entry.mitigation,
                              sensitive=entry.sensitive, strength=float(strength))
        return _floats_as_parsed(cfg)

    for strength in entry.strengths:  # the stage's own checks, at planning
        run_config(strength, 0, None, p["runs"])
    settings = finetune_settings(config, model, method) | _entry_settings(entry) | {"seeds": config.seeds}

    def build(staging: Path) -> None:
        lr = _erm_lr(p["runs"], model, method)
        for strength in entry.strengths:
            for seed in range(config.seeds):
                run_finetune(run_config(strength, seed, lr, staging))

    return publishing_step(name, settings, (erm.name,), p, family(model, method, entry.mitigation, entry.sensitive), build)


_FLOAT_FIELDS = tuple(n for n, tp in typing.get_type_hints(FinetuneConfig).items() if float in (tp, *typing.get_args(tp)))


def _floats_as_parsed(cfg: FinetuneConfig) -> FinetuneConfig:
    """``cfg`` with its float options as floats (``lora_alpha = 16`` trains as 16.0), as ``cxrfair finetune`` parses them."""
    ints = {n: float(getattr(cfg, n)) for n in _FLOAT_FIELDS if type(getattr(cfg, n)) is int}
    return dataclasses.replace(cfg, **ints) if ints else cfg


def _erm_lr(runs: Path, model: str, method: str) -> float:
    """The learning rate the ERM family chose on validation (its ``best`` seed-0 run)."""
    meta = runs / RunKey(safe_name(model), method, "best", 0).run_id / "run.json"
    try:
        return float(json.loads(meta.read_text())["hyperparameters"]["lr"])
    except (OSError, ValueError, KeyError) as e:
        raise CxrfairError(f"{meta}: cannot read the ERM run's chosen learning rate ({e}); rerun `cxrfair run`") from None


def _entry_settings(entry: MitigationSettings) -> dict:
    # `enabled` was a key of the entry (always true for a planned step): kept so fingerprints stay as they were.
    return settings_dict(dataclasses.replace(entry, models=(), methods=())) | {"enabled": True}


# ---------------------------------------------------------------- shared checks


def _check_methods(config: ExperimentConfig, methods: tuple, allowed: tuple, where: str) -> None:
    if not methods:
        raise CxrfairError(f"{where} methods: list at least one, e.g. [\"linear\"]")
    bad = [m for m in methods if m not in allowed]
    if bad:
        raise CxrfairError(f"{where} methods: {', '.join(bad)} not among the experiment's methods that can take it "
                           f"({', '.join(allowed) or 'none'}); add it to methods or remove it here")


def _check_sensitive(sensitive: str, attributes: tuple, where: str) -> None:
    if sensitive not in attributes:
        raise CxrfairError(f"{where} sensitive {sensitive!r}: not a sensitive attribute of the cohort "
                           f"({', '.join(attributes)}); add it to [cohort] attributes or pick one of those")


def _unique(name: str, names: set, where: str) -> str:
    if name in names:
        raise CxrfairError(f"{where}: step {name} is already planned by another entry (same model, method, "
                           "mitigation and attribute write the same runs); keep one")
    names.add(name)
    return name
