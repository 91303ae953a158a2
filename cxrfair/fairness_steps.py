"""The experiment's fairness steps: embedding analyses, post-processing and mitigations.

Built by ``cxrfair.pipeline`` after the ERM steps (``producers``: (model, method) -> the step that
publishes that family's runs). Every check that can fail runs while planning, so ``--dry-run``
catches a bad entry:

- ``leakage-<model>`` / ``geometry-<model>``: ``cxrfair embeddings leakage|geometry`` on the
  model's cache, written whole to ``<out>/embeddings/<model>/leakage|geometry/`` (the layout
  docs/CONTRACTS.md suggests, where the report looks).
- ``<method>+thresholds-<attr>-<model>`` (one per [[postprocess]] entry x model x method):
  ``cxrfair postprocess`` on every run of the ERM family, fitted on validation; published as the
  family ``<model>__<method>+thresholds-<attr>``.
- ``<method>+<mitigation>-<attr>-<model>`` (one per [[mitigations]] entry x model x method): the
  stage's own CLI (``cxrfair probe linear|mlp`` / ``cxrfair finetune lora|full``) with
  ``--mitigation --sensitive --strength [--select] [--adversary]``. The CLI, not a Python call,
  because these options are the agreed contract (docs/CONTRACTS.md "Mitigations") while the
  stages' Python APIs for them are still being built; an install whose stage lacks the options
  is told so at planning. Fine-tuning reuses the learning rate its ERM family chose on validation and
  trains one run per strength (tags ``st<s>``), among which ``cxrfair analyze`` chooses on validation.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from cxrfair.config import ExperimentConfig, MitigationSettings, PostprocessSettings, settings_dict
from cxrfair.errors import CxrfairError
from cxrfair.pipeline import _publishing_step, _stage_config, sweep_config, sweep_settings
from cxrfair.steps import Step

PROBES = ("linear", "mlp")
FINETUNES = ("lora", "full")
SELECTS = ("worst_group", "loss", "gap")
ADVERSARIES = ("grl", "projection")


def steps(config: ExperimentConfig, p: dict, cohort_cfg, producers: dict) -> list[Step]:
    """Embedding, post-processing and mitigation steps, in dependency order."""
    attributes = _cohort_attributes(cohort_cfg)
    out = _embedding_steps(config, p)
    names: set[str] = set()
    for i, entry in enumerate(config.postprocess, 1):
        out += _postprocess_steps(config, p, entry, f"[[postprocess]] #{i}", attributes, producers, names)
    for i, entry in enumerate(config.mitigations, 1):
        if entry.enabled:
            out += _mitigation_steps(config, p, entry, f"[[mitigations]] #{i}", attributes, producers, names)
    return out


def _cohort_attributes(cohort_cfg) -> tuple[str, ...]:
    """The sensitive attributes the cohort can have: the configured ones, else the preset's (+ optional)."""
    from cxrfair.extract.cohort_presets import PRESETS

    if cohort_cfg.attributes:
        return tuple(cohort_cfg.attributes)
    preset = PRESETS[cohort_cfg.preset]
    return tuple(preset.attributes) + tuple(preset.optional_attributes)


def _models(config: ExperimentConfig, listed: tuple, where: str) -> tuple[str, ...]:
    unknown = [m for m in listed if m not in config.models]
    if unknown:
        raise CxrfairError(f"{where}: {', '.join(unknown)} not among models ({', '.join(config.models)}); list it there first")
    return listed or config.models


# ---------------------------------------------------------------- embeddings


def _embedding_steps(config: ExperimentConfig, p: dict) -> list[Step]:
    e = config.embeddings
    out = []
    if e.leakage:
        cfg = _leakage_config(e)
        out += [_embedding_step(p, m, "leakage", cfg, "leakage.json") for m in _models(config, e.leakage, "[embeddings] leakage")]
    if e.geometry:
        cfg = _geometry_config(e)
        out += [_embedding_step(p, m, "geometry", cfg, "geometry.json") for m in _models(config, e.geometry, "[embeddings] geometry")]
    return out


def _leakage_config(e):
    from cxrfair.probe.embeddings.leakage import LeakageConfig

    return _stage_config("embeddings", lambda: LeakageConfig(
        attributes=e.attributes, probes=e.probes, seed=e.seed, n_boot=e.bootstrap, n_perm=e.permutations,
        min_group=e.min_group, conditional=e.conditional, cohort_splits=e.cohort_split).validate(),
        {"cohort_split": "cohort_split"})


def _geometry_config(e):
    from cxrfair.probe.embeddings.geometry import GeometryConfig

    return _stage_config("embeddings", lambda: GeometryConfig(
        attributes=e.attributes, components=e.components, normalize=e.normalize, n_perm=e.geometry_permutations,
        n_boot=e.bootstrap, min_group=e.min_group, seed=e.seed, cohort_splits=e.cohort_split).validate(),
        {"permutations": "geometry_permutations"})


def _embedding_step(p: dict, model: str, analysis: str, cfg, marker: str) -> Step:
    cache = p["cache"] / f"{model}.h5"
    folder = p["embeddings"] / model / analysis

    def run(force: bool) -> None:
        if analysis == "leakage":
            from cxrfair.probe.embeddings.leakage import leakage_cache

            leakage_cache(cache, folder, cfg, force=True)
        else:
            from cxrfair.probe.embeddings.geometry import geometry_cache

            geometry_cache(cache, folder, cfg, force=True)

    settings = {"model": model, "analysis": analysis, **settings_dict(cfg)}
    return Step(f"{analysis}-{model}", settings, [folder / marker], run, (f"extract-{model}",))


# ---------------------------------------------------------------- post-processing


def _postprocess_steps(config, p, entry: PostprocessSettings, where: str, attributes, producers, names) -> list[Step]:
    from cxrfair.analysis.postprocess import CONSTRAINTS

    _check_methods(config, entry.methods, config.methods, where)
    _check_sensitive(entry.sensitive, attributes, where)
    if entry.constraint not in CONSTRAINTS:
        raise CxrfairError(f"{where} constraint {entry.constraint!r}: choose one of {', '.join(CONSTRAINTS)}")
    if not 0 <= entry.strength <= 1:
        raise CxrfairError(f"{where} strength {entry.strength:g}: the validation utility given up, in [0, 1] (e.g. 0.02)")
    return [_postprocess_step(config, p, entry, model, method, producers[model, method], names, where)
            for model in _models(config, entry.models, f"{where} models") for method in entry.methods]


def _postprocess_step(config, p, entry, model: str, method: str, source: Step, names: set, where: str) -> Step:
    from cxrfair.core.runs import RunKey, safe_name
    from cxrfair.publish import Family

    name = _unique(f"{method}+thresholds-{entry.sensitive}-{model}", names, where)
    sources = _family_of(model, method)
    target = Family.of([RunKey(safe_name(model), method, "best", 0, mitigation="thresholds", sensitive=entry.sensitive)])

    def build(staging: Path) -> None:
        from cxrfair.analysis.postprocess import PostprocessConfig, postprocess

        runs = [r for r in sources.entries(p["runs"]) if r.is_dir()]
        if not runs:
            raise CxrfairError(f"{where}: no runs of {model} {method} in {p['runs']} to post-process")
        for run in runs:
            postprocess(PostprocessConfig(run=run, sensitive=entry.sensitive, constraint=entry.constraint,
                                          strength=entry.strength, out=staging, force=True))

    settings = {"model": model, "method": method, **settings_dict(dataclasses.replace(entry, models=(), methods=()))}
    return _publishing_step(name, settings, (source.name,), p, target, build)


# ---------------------------------------------------------------- mitigations


def _mitigation_steps(config, p, entry: MitigationSettings, where: str, attributes, producers, names) -> list[Step]:
    _check_methods(config, entry.methods, tuple(m for m in config.methods if m != "zeroshot"), where)
    _check_sensitive(entry.sensitive, attributes, where)
    for method in entry.methods:
        _check_mitigation(entry, method, where)
        _check_cli_supports(entry, method, where)
    out = []
    for model in _models(config, entry.models, f"{where} models"):
        for method in entry.methods:
            name = _unique(f"{method}+{entry.mitigation}-{entry.sensitive}-{model}", names, where)
            make = _probe_mitigation if method in PROBES else _finetune_mitigation
            out.append(make(config, p, entry, model, method, name, producers))
    return out


def _check_mitigation(entry: MitigationSettings, method: str, where: str) -> None:
    """The entry's values against docs/CONTRACTS.md "Mitigations" (names from core.runs)."""
    from cxrfair.core.runs import MITIGATIONS

    m, s = entry.mitigation, entry.strengths
    trained = [x for x in MITIGATIONS if x not in ("erm", "thresholds")]
    if m not in trained:
        hint = {"erm": "erm is the plain method: list it under methods", "thresholds": "thresholds is post-processing: use [[postprocess]]"}
        raise CxrfairError(f"{where} mitigation {m!r}: " + hint.get(m, f"choose one of {', '.join(trained)}"))
    probe = method in PROBES
    if m == "erase" and not probe:
        raise CxrfairError(f"{where} mitigation erase: probes only (linear, mlp), not {method}")
    if m == "erase" and s:
        raise CxrfairError(f"{where} strengths: erase takes none; remove strengths")
    if m != "erase" and not s:
        raise CxrfairError(f"{where} strengths: give at least one strength for {m}, e.g. [0.1, 0.3]")
    low, high, text = {"reweight": (0, 1, "in [0, 1]"), "groupdro": (0, None, "> 0")}.get(m, (0, None, ">= 0"))
    bad = [x for x in s if x < low or (high is not None and x > high) or (m == "groupdro" and x <= 0)]
    if bad:
        raise CxrfairError(f"{where} strengths {', '.join(f'{x:g}' for x in bad)}: {m} strengths must be {text}")
    if entry.select is not None and (not probe or entry.select not in SELECTS):
        raise CxrfairError(f"{where} select {entry.select!r}: " + (f"choose one of {', '.join(SELECTS)}" if probe else
                           f"probes only; fine-tuning ({method}) keeps its lowest-validation-loss checkpoint"))
    if entry.adversary is not None:
        if m != "adversarial" or entry.adversary not in ADVERSARIES or (entry.adversary == "projection" and not probe):
            raise CxrfairError(f"{where} adversary {entry.adversary!r}: only with mitigation adversarial; grl, or "
                               "projection for probes")


def _check_cli_supports(entry: MitigationSettings, method: str, where: str) -> None:
    """Stop at planning if this install's stage command lacks the mitigation options."""
    needed = {"mitigation", "sensitive"} | ({"strength"} if entry.strengths else set())
    needed |= ({"select"} if entry.select else set()) | ({"adversary"} if entry.adversary else set())
    stage = "probe" if method in PROBES else "finetune"
    have = {p.name for p in _command(stage, method).params}
    lacking = sorted(needed - have)
    if lacking:
        raise CxrfairError(f"{where}: `cxrfair {stage} {method}` in this install has no "
                           f"{', '.join('--' + n for n in lacking)} option (docs/CONTRACTS.md \"Mitigations\"; not merged "
                           "yet); set enabled = false in this entry until it has")


def _command(stage: str, method: str):
    import click

    from cxrfair.cli import main

    ctx = click.Context(main)
    return main.get_command(ctx, stage).get_command(ctx, method)


def _probe_mitigation(config, p, entry, model, method, name, producers) -> Step:
    from cxrfair.probe.objectives import SOLVER_FOR

    cfg = sweep_config(config, method)
    if SOLVER_FOR.get(entry.mitigation) == "adamw" and cfg.solver != "adamw":
        # groupdro, adversarial and fairot change their objective every step, which full-batch
        # L-BFGS cannot follow: they train with [probe]'s AdamW grid (lr, weight_decay, epochs).
        cfg = dataclasses.replace(cfg, solver="adamw")
    # The whole sweep, mitigation included, is checked here so `--dry-run` catches what the stage would refuse.
    dataclasses.replace(cfg, mitigation=entry.mitigation, sensitive=entry.sensitive,
                        strengths=tuple(entry.strengths) or None, select=entry.select or None,
                        adversary=entry.adversary or "grl").validate()
    args = ["probe", method, "--cache", p["cache"] / f"{model}.h5", "--force", *_sweep_args(cfg), *_mitigation_args(entry)]
    # [probe] select is the ERM sweep's rule; the entry's own `select` replaces it here.
    settings = {k: v for k, v in sweep_settings(cfg).items() if k != "select"} | _entry_settings(entry) | {"model": model}

    def build(staging: Path) -> None:
        call_cli([*args, "--out", staging])

    return _publishing_step(name, settings, (f"extract-{model}",), p, _mitigated_family(model, method, entry), build)


def _finetune_mitigation(config, p, entry, model, method, name, producers) -> Step:
    from cxrfair.pipeline import _weights_str

    f = config.finetune
    erm = producers[model, method]
    # One run per strength and seed (tags st<s>); `cxrfair analyze` chooses the strength on validation.
    one = dataclasses.replace(entry, strengths=())
    args = ["finetune", method, "--model", model, "--cohort", p["cohort"], "--epochs", f.epochs, "--batch-size",
            f.batch_size, "--weight-decay", f.weight_decay, "--device", f.device, "--precision", f.precision,
            "--workers", f.workers, "--resume", "--force", *_mitigation_args(one)]
    if method == "lora":
        args += ["--lora-rank", f.lora_rank, "--lora-alpha", f.lora_alpha, "--lora-dropout", f.lora_dropout]
    if _weights_str(config, model):
        args += ["--weights", _weights_str(config, model)]
    settings = settings_dict(f) | _entry_settings(entry) | {"model": model, "method": method,
                                                            "weights": _weights_str(config, model), "seeds": config.seeds}

    def build(staging: Path) -> None:
        lr = _erm_lr(p["runs"], model, method)
        for strength in entry.strengths:
            for seed in range(config.seeds):
                call_cli([*args, "--strength", _csv([strength]), "--lr", lr, "--seed", seed, "--out", staging])

    return _publishing_step(name, settings, (erm.name,), p, _mitigated_family(model, method, entry), build)


def _erm_lr(runs: Path, model: str, method: str) -> float:
    """The learning rate the ERM family chose on validation (its ``best`` seed-0 run)."""
    from cxrfair.core.runs import RunKey, safe_name

    meta = runs / RunKey(safe_name(model), method, "best", 0).run_id / "run.json"
    try:
        return float(json.loads(meta.read_text())["hyperparameters"]["lr"])
    except (OSError, ValueError, KeyError) as e:
        raise CxrfairError(f"{meta}: cannot read the ERM run's chosen learning rate ({e}); rerun `cxrfair run`") from None


def _sweep_args(cfg) -> list:
    """The probe CLI options that reproduce ``cfg`` (a SweepConfig), seeds 0..K-1 included."""
    args = ["--solver", cfg.solver, "--standardize" if cfg.standardize else "--no-standardize",
            "--seeds", len(cfg.seeds)]
    if cfg.solver == "lbfgs":
        args += ["--max-iter", cfg.max_iter] + (["--l2", _csv(cfg.l2s)] if cfg.l2s is not None else [])
    else:
        args += ["--lr", _csv(cfg.lrs), "--weight-decay", _csv(cfg.weight_decays), "--epochs", cfg.epochs,
                 "--batch-size", cfg.batch_size]
    return args + (["--hidden", _csv(cfg.hiddens)] if cfg.method == "mlp" else [])


def _mitigation_args(entry: MitigationSettings) -> list:
    args = ["--mitigation", entry.mitigation, "--sensitive", entry.sensitive]
    args += ["--strength", _csv(entry.strengths)] if entry.strengths else []
    args += ["--select", entry.select] if entry.select else []
    return args + (["--adversary", entry.adversary] if entry.adversary else [])


def _entry_settings(entry: MitigationSettings) -> dict:
    return settings_dict(dataclasses.replace(entry, models=(), methods=(), enabled=True))


def _csv(values) -> str:
    return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def call_cli(args: list) -> None:
    """Run one ``cxrfair`` command in this process; its one-line error becomes a CxrfairError."""
    import click

    from cxrfair.cli import main

    words = [str(a) for a in args]
    try:
        main.main(args=words, prog_name="cxrfair", standalone_mode=False)
    except click.ClickException as e:
        raise CxrfairError(f"cxrfair {' '.join(words[:2])}: {e.format_message()}") from None


def _mitigated_family(model: str, method: str, entry: MitigationSettings):
    from cxrfair.core.runs import RunKey, safe_name
    from cxrfair.publish import Family

    return Family.of([RunKey(safe_name(model), method, "best", 0, mitigation=entry.mitigation, sensitive=entry.sensitive)])


def _family_of(model: str, method: str):
    from cxrfair.pipeline import _family

    return _family(model, method)


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
