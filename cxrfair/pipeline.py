"""The whole protocol as a list of steps: cohort -> extract -> probes -> fine-tuning -> analysis.

``experiment_steps(config)`` turns an ExperimentConfig into Steps (see ``cxrfair.steps``);
``run_experiment`` prints the plan, runs what is not already complete and returns the report
path. Every stage is called through its library function, never through the CLI.

Layout under ``config.out``::

    synth/            synthetic NIH-format data (demo only)
    cohort/           cohort.csv + cohort.json
    cache/<model>.h5  embedding caches
    runs/             every run analysed (zero-shot, probes, selected fine-tuning runs)
    sweeps/           probe sweep tables and fine-tuning learning-rate candidates
    report/           metrics.csv, report.md, report.html, figures/
    .steps/           one stamp per finished step (what makes reruns skip it)
    .staging/<step>/  runs being built; swapped into runs/ when the step succeeds

Every stage's config is built while planning (``--dry-run`` included), so a bad value stops the
run before anything is written or replaced. A step that writes runs replaces only its own
family (``<model>__<method>`` runs and sweep file) and only after its new runs are complete.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Callable, TypeVar

from cxrfair.config import ExperimentConfig, settings_dict
from cxrfair.errors import CxrfairError
from cxrfair.publish import Family, finish_interrupted, open_staging, publish
from cxrfair.steps import Step, execute, format_plan, plan

T = TypeVar("T")


def _paths(config: ExperimentConfig) -> dict[str, Path]:
    out = Path(config.out)
    return {"out": out, "synth": out / "synth", "cohort": out / "cohort", "cache": out / "cache",
            "runs": out / "runs", "sweeps": out / "sweeps", "report": out / "report", "staging": out / ".staging"}


def _stage_config(section: str, build: Callable[[], T]) -> T:
    """Build a stage's config while planning, so its own checks fail before any step runs.

    The stage names its options as on its CLI (``--epochs``); here they are config keys, so the
    message says ``[probe] epochs: must be >= 1``.
    """
    try:
        return build()
    except CxrfairError as e:
        message = re.sub(r"^--([a-z][a-z-]*)", lambda m: m[1].replace("-", "_"), str(e))
        raise CxrfairError(f"[{section}] {message}") from None


def _family(model: str, method: str) -> Family:
    """The run folders (and sweep file) of ``model`` x ``method`` in the runs folder."""
    from cxrfair.analysis.runs import RunKey, safe_name

    return Family.of([RunKey(safe_name(model), method, "best", 0)])


def _publishing_step(name: str, settings: dict, deps: tuple, p: dict, family: Family,
                     build: Callable[[Path], object]) -> Step:
    """A step that builds its runs in ``.staging/<name>/`` and only then swaps them into runs/.

    Until the build has succeeded the family's old runs stay as they were; the swap touches no
    other entry of the runs folder (see ``cxrfair.publish``).
    """
    def run(force: bool) -> list[Path]:
        staging = open_staging(p["staging"] / name, step.fingerprint)
        build(staging)
        return publish(staging, p["runs"], family)

    step = Step(name, settings, [], run, deps)
    return step


def _synth_step(config: ExperimentConfig, p: dict) -> Step:
    from cxrfair.extract.synth import SynthConfig

    cfg = _stage_config("synth", lambda: SynthConfig(out=p["synth"], seed=config.synth.seed, size=config.synth.size,
                                                     force=True))

    def run(force: bool) -> None:
        from cxrfair.extract.synth import make_synth

        make_synth(cfg)

    return Step("synth", settings_dict(config.synth), [p["synth"] / "Data_Entry_2017.csv"], run)


def _cohort_step(config: ExperimentConfig, p: dict) -> Step:
    from cxrfair.extract.cohort import CohortConfig

    c = config.cohort
    metadata = p["synth"] / "Data_Entry_2017.csv" if config.synth.enabled else c.metadata
    images = p["synth"] if config.synth.enabled else c.images
    cfg = _stage_config("cohort", lambda: CohortConfig.from_preset(
        c.preset, out=p["cohort"], metadata=metadata, images=images, per_group=c.per_group, seed=c.seed, force=True))

    def run(force: bool) -> None:
        from cxrfair.extract.cohort import build_cohort

        build_cohort(cfg)

    settings = settings_dict(c) | {"metadata": str(metadata), "images": str(images)}
    if not config.synth.enabled:
        # The file's content, not just its name: an edited metadata file must rebuild the cohort.
        settings["metadata_sha256"] = _metadata_identity(metadata)
    deps = ("synth",) if config.synth.enabled else ()
    return Step("cohort", settings, [p["cohort"] / "cohort.json"], run, deps)


def _metadata_identity(metadata: Path | None) -> str:
    from cxrfair.extract.cohort import vendored_metadata
    from cxrfair.io import sha256_file

    path = Path(metadata) if metadata else vendored_metadata()
    if not path.is_file():
        raise CxrfairError(f"[cohort] metadata {path}: no such file; point it at Data_Entry_2017*.csv[.gz] or leave it empty for the vendored file")
    return sha256_file(path)


def _extract_step(config: ExperimentConfig, p: dict, model: str) -> Step:
    from cxrfair.extract.extractor import ExtractConfig

    e = config.extract
    cache = p["cache"] / f"{model}.h5"
    weights = e.weights.get(model)
    cfg = _stage_config("extract", lambda: ExtractConfig(
        model=model, cohort=p["cohort"], out=cache, batch_size=e.batch_size, workers=e.workers, device=e.device,
        precision=e.precision, weights=weights))

    def run(force: bool) -> None:
        from cxrfair.extract.extractor import extract

        extract(dataclasses.replace(cfg, force=force))

    settings = ({k: v for k, v in settings_dict(e).items() if k != "weights"}
                | {"model": model, "weights": str(weights) if weights else None})
    return Step(f"extract-{model}", settings, [cache], run, ("cohort",))


def _zeroshot_step(config: ExperimentConfig, p: dict, model: str) -> Step:
    cache = p["cache"] / f"{model}.h5"

    def build(staging: Path) -> None:
        from cxrfair.probe.zeroshot import zeroshot_cache

        zeroshot_cache(cache, staging, all_sets=config.probe.all_prompt_sets, force=True)

    settings = {"model": model, "all_prompt_sets": config.probe.all_prompt_sets}
    return _publishing_step(f"zeroshot-{model}", settings, (f"extract-{model}",), p, _family(model, "zeroshot"), build)


def _probe_step(config: ExperimentConfig, p: dict, model: str, method: str) -> Step:
    from cxrfair.probe.sweep import SweepConfig

    pr = config.probe
    cache = p["cache"] / f"{model}.h5"
    seeds = tuple(range(config.seeds))
    cfg = _stage_config("probe", lambda: SweepConfig(
        method=method, lrs=pr.lr, weight_decays=pr.weight_decay, hiddens=pr.hidden, seeds=seeds, epochs=pr.epochs,
        batch_size=pr.batch_size).validate())

    def build(staging: Path) -> None:
        from cxrfair.probe.sweep import probe_cache

        probe_cache(cache, staging, cfg, force=True)

    settings = settings_dict(pr) | {"model": model, "method": method, "seeds": list(seeds)}
    return _publishing_step(f"{method}-{model}", settings, (f"extract-{model}",), p, _family(model, method), build)


def _finetune_config(config: ExperimentConfig, p: dict, model: str, method: str, lr: float):
    """Seed 0 of one learning-rate candidate, written to the sweeps folder (other runs use replace)."""
    from cxrfair.finetune.config import FinetuneConfig

    f = config.finetune
    weights = config.extract.weights.get(model)
    return _stage_config("finetune", lambda: FinetuneConfig(
        model=model, cohort=p["cohort"], out=_lr_sweep_dir(p, model, method), method=method, epochs=f.epochs,
        batch_size=f.batch_size, lr=lr, weight_decay=f.weight_decay, lora_rank=f.lora_rank, lora_alpha=f.lora_alpha,
        lora_dropout=f.lora_dropout, seed=0, device=f.device, precision=f.precision, workers=f.workers,
        weights=weights, resume=True, force=True, tag=_lr_tag(lr)))


def _lr_sweep_dir(p: dict, model: str, method: str) -> Path:
    return p["sweeps"] / f"{model}__{method}"


def _lr_tag(lr: float) -> str:
    return f"lr{lr:g}".replace("+", "")


def _finetune_steps(config: ExperimentConfig, p: dict, model: str, method: str) -> list[Step]:
    """Learning rates are chosen on validation loss with seed 0; other seeds reuse the choice."""
    f = config.finetune
    lrs = f.lora_lr if method == "lora" else f.full_lr
    if not lrs:
        raise CxrfairError(f"[finetune] {method}_lr: give at least one learning rate")
    candidates = {lr: _finetune_config(config, p, model, method, lr) for lr in lrs}
    base = settings_dict(f) | {"model": model, "method": method, "weights": _weights_str(config, model)}
    steps = []
    for lr, cfg in candidates.items():
        def run(force: bool, cfg=cfg) -> None:
            from cxrfair.finetune.train import finetune

            finetune(cfg, progress=True)

        steps.append(Step(f"{method}-{model}-{_lr_tag(lr)}-s0", base | {"lr": lr, "seed": 0},
                          [cfg.out / cfg.run_id], run, ("cohort",)))

    def build(staging: Path) -> None:
        from cxrfair.finetune.train import finetune

        best = _select_lr(candidates)
        _copy_run(candidates[best], staging, {"lr_candidates": list(lrs), "lr_selected_on": "val loss (seed 0)"})
        for seed in range(1, config.seeds):
            finetune(dataclasses.replace(candidates[best], seed=seed, out=staging, tag="best"), progress=True)

    steps.append(_publishing_step(f"{method}-{model}", base | {"lrs": list(lrs), "seeds": config.seeds},
                                  tuple(s.name for s in steps), p, _family(model, method), build))
    return steps


def _weights_str(config: ExperimentConfig, model: str) -> str | None:
    weights = config.extract.weights.get(model)
    return str(weights) if weights else None


def _select_lr(candidates: dict) -> float:
    """The learning rate whose seed-0 run reached the lowest validation loss."""
    scores = {}
    for lr, cfg in candidates.items():
        meta = json.loads((cfg.out / cfg.run_id / "run.json").read_text())
        scores[lr] = min(meta["curves"]["val_loss"])
    return min(scores, key=scores.get)


def _copy_run(cfg, runs: Path, extra: dict) -> Path:
    """The selected candidate's seed-0 run, renamed to the ``best`` tag (predictions + run.json)."""
    from cxrfair.analysis.runs import read_run, write_run

    run = read_run(cfg.out / cfg.run_id)
    meta = dict(run.meta) | {"run_id": dataclasses.replace(cfg, tag="best").run_id} | extra
    return write_run(runs, meta, run.predictions, force=True)


def _analysis_step(config: ExperimentConfig, p: dict, deps: list[str]) -> Step:
    from cxrfair.analysis.analyze import AnalyzeConfig

    a = config.analysis
    cfg = _stage_config("analysis", lambda: AnalyzeConfig(
        runs_dir=p["runs"], out=p["report"], n_boot=a.bootstrap, attributes=tuple(a.attributes), split=a.split,
        seed=a.seed, force=True))

    def run(force: bool) -> None:
        from cxrfair.analysis.analyze import analyze

        analyze(cfg)

    return Step("analyze", settings_dict(a), [p["report"] / "report.html"], run, tuple(deps))


def experiment_steps(config: ExperimentConfig) -> list[Step]:
    """All steps of an experiment, in dependency order."""
    p = _paths(config)
    steps = [_synth_step(config, p)] if config.synth.enabled else []
    steps.append(_cohort_step(config, p))
    for model in config.models:
        steps.append(_extract_step(config, p, model))
    producers: list[Step] = []  # the steps whose runs the analysis reads
    for model in config.models:
        for method in config.methods:
            if method == "zeroshot":
                producers.append(_zeroshot_step(config, p, model))
                steps.append(producers[-1])
            elif method in ("linear", "mlp"):
                producers.append(_probe_step(config, p, model, method))
                steps.append(producers[-1])
            else:
                ft = _finetune_steps(config, p, model, method)
                steps.extend(ft)
                producers.append(ft[-1])
    steps.append(_analysis_step(config, p, [s.name for s in producers]))
    return steps


def check_models(config: ExperimentConfig) -> None:
    """Fail before any work if a model is unknown or cannot do a requested method."""
    from cxrfair.extract.registry import get_spec

    for model in config.models:
        spec = get_spec(model)
        if "zeroshot" in config.methods and not spec.zero_shot:
            raise CxrfairError(f"models: {model} has no text encoder, so it cannot run zeroshot; remove one of them")
        if "lora" in config.methods and not spec.lora_targets:
            raise CxrfairError(f"models: {model} has no LoRA target list, so it cannot run lora; remove one of them")


def _missing_images(config: ExperimentConfig) -> str | None:
    """Why extraction would fail for lack of images, said before any work starts."""
    images = config.cohort.images
    if config.synth.enabled:
        return None
    if not images:
        return "[cohort] images is empty: set it to the folder of the NIH ChestX-ray14 download (images_001/images/...)"
    if not Path(images).is_dir():
        return (f"[cohort] images {images}: no such folder; download NIH ChestX-ray14 "
                "(https://nihcc.app.box.com/v/ChestXray-NIHCC) and unpack images_*.tar.gz there")
    return None


def run_experiment(config: ExperimentConfig, dry_run: bool = False, echo: Callable[[str], None] = print,
                   source: str | None = None) -> Path | None:
    """Print the plan, then run every step that is not complete; returns report.html (None on dry run).

    Everything that can be checked is checked before the first step (and on a dry run): models,
    images, every stage's settings. ``source`` (the config file) prefixes those messages.
    """
    try:
        steps, problem = _check_experiment(config)
        if problem and not dry_run:
            raise CxrfairError(problem)
    except CxrfairError as e:
        raise CxrfairError(f"config {source}: {e}" if source else str(e)) from None
    if not dry_run:
        for family in finish_interrupted(_paths(config)["staging"]):
            echo(f"note: finished replacing the runs of {family}, interrupted last time")
    decisions = plan(steps, Path(config.out))
    echo(f"Experiment in {config.out}: {sum(a == 'run' for _, a in decisions)} step(s) to run, "
         f"{sum(a == 'reuse' for _, a in decisions)} reused")
    echo(format_plan(decisions))
    if dry_run:
        if problem:
            echo(f"note: {problem}")
        return None
    execute(decisions, Path(config.out), echo)
    return _paths(config)["report"] / "report.html"


def _check_experiment(config: ExperimentConfig) -> tuple[list[Step], str | None]:
    """The steps (every stage's config built and checked) and why extraction would lack images, if so."""
    check_models(config)
    return experiment_steps(config), _missing_images(config)


def demo_config(out: Path) -> ExperimentConfig:
    """The demo: synthetic data, the tiny model, all five methods, sized for 2 CPU cores."""
    from cxrfair.config import AnalysisSettings, ExtractSettings, FinetuneSettings, ProbeSettings, SynthSettings

    # Probes keep the paper's recipe (150 epochs); fine-tuning is cut to 30 epochs so the demo
    # stays within a few minutes on 2 CPU cores. Two seeds show the mean +- sd columns.
    return ExperimentConfig(
        out=Path(out),
        models=("tiny-clip",),
        seeds=2,
        synth=SynthSettings(enabled=True, seed=0, size=64),
        extract=ExtractSettings(workers=2),
        probe=ProbeSettings(lr=(1e-3, 3e-3, 1e-2), weight_decay=(0.0, 1e-2), hidden=(128,), epochs=150),
        finetune=FinetuneSettings(epochs=30, lora_lr=(1e-3,), full_lr=(1e-4,), workers=2),
        analysis=AnalysisSettings(bootstrap=1000),
    )
