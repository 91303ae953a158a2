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
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

from cxrfair.config import ExperimentConfig, settings_dict
from cxrfair.errors import CxrfairError
from cxrfair.steps import Step, execute, format_plan, plan


def _paths(config: ExperimentConfig) -> dict[str, Path]:
    out = Path(config.out)
    return {"out": out, "synth": out / "synth", "cohort": out / "cohort", "cache": out / "cache",
            "runs": out / "runs", "sweeps": out / "sweeps", "report": out / "report"}


def _synth_step(config: ExperimentConfig, p: dict) -> Step:
    def run(force: bool) -> None:
        from cxrfair.extract.synth import SynthConfig, make_synth

        make_synth(SynthConfig(out=p["synth"], seed=config.synth.seed, size=config.synth.size, force=True))

    return Step("synth", settings_dict(config.synth), [p["synth"] / "Data_Entry_2017.csv"], run)


def _cohort_step(config: ExperimentConfig, p: dict) -> Step:
    c = config.cohort
    metadata = p["synth"] / "Data_Entry_2017.csv" if config.synth.enabled else c.metadata
    images = p["synth"] if config.synth.enabled else c.images

    def run(force: bool) -> None:
        from cxrfair.extract.cohort import CohortConfig, build_cohort

        build_cohort(CohortConfig.from_preset(c.preset, out=p["cohort"], metadata=Path(metadata) if metadata else None,
                                              images=Path(images) if images else None, per_group=c.per_group,
                                              seed=c.seed, force=True))

    settings = settings_dict(c) | {"metadata": str(metadata), "images": str(images)}
    if not config.synth.enabled:
        # The file's content, not just its name: an edited metadata file must rebuild the cohort.
        settings["metadata_sha256"] = _metadata_identity(metadata)
    deps = ("synth",) if config.synth.enabled else ()
    return Step("cohort", settings, [p["cohort"] / "cohort.json"], run, deps)


def _metadata_identity(metadata: str | None) -> str:
    from cxrfair.extract.cohort import vendored_metadata
    from cxrfair.io import sha256_file

    path = Path(metadata) if metadata else vendored_metadata()
    if not path.is_file():
        raise CxrfairError(f"[cohort] metadata {path}: no such file; point it at Data_Entry_2017*.csv[.gz] or leave it empty for the vendored file")
    return sha256_file(path)


def _extract_step(config: ExperimentConfig, p: dict, model: str) -> Step:
    e = config.extract
    cache = p["cache"] / f"{model}.h5"

    def run(force: bool) -> None:
        from cxrfair.extract.extractor import ExtractConfig, extract

        weights = e.weights.get(model)
        extract(ExtractConfig(model=model, cohort=p["cohort"], out=cache, batch_size=e.batch_size,
                              workers=e.workers, device=e.device, precision=e.precision,
                              weights=Path(weights) if weights else None, force=force))

    settings = {k: v for k, v in settings_dict(e).items() if k != "weights"} | {"model": model, "weights": e.weights.get(model)}
    return Step(f"extract-{model}", settings, [cache], run, ("cohort",))


def _zeroshot_step(config: ExperimentConfig, p: dict, model: str) -> Step:
    cache = p["cache"] / f"{model}.h5"

    def run(force: bool) -> None:
        from cxrfair.probe.zeroshot import zeroshot_cache

        _clear_runs(p["runs"], model, "zeroshot")
        return zeroshot_cache(cache, p["runs"], all_sets=config.probe.all_prompt_sets, force=True)

    settings = {"model": model, "all_prompt_sets": config.probe.all_prompt_sets}
    return Step(f"zeroshot-{model}", settings, [], run, (f"extract-{model}",))


def _probe_step(config: ExperimentConfig, p: dict, model: str, method: str) -> Step:
    pr = config.probe
    cache = p["cache"] / f"{model}.h5"
    seeds = tuple(range(config.seeds))

    def run(force: bool) -> None:
        from cxrfair.probe.sweep import SweepConfig, probe_cache

        _clear_runs(p["runs"], model, method)
        cfg = SweepConfig(method=method, lrs=pr.lr, weight_decays=pr.weight_decay, hiddens=pr.hidden,
                          seeds=seeds, epochs=pr.epochs, batch_size=pr.batch_size).validate()
        return probe_cache(cache, p["runs"], cfg, force=True)

    settings = settings_dict(pr) | {"model": model, "method": method, "seeds": list(seeds)}
    return Step(f"{method}-{model}", settings, [], run, (f"extract-{model}",))


def _finetune_config(config: ExperimentConfig, p: dict, model: str, method: str, seed: int, lr: float, out: Path, tag: str):
    from cxrfair.finetune.config import FinetuneConfig

    f = config.finetune
    weights = config.extract.weights.get(model)
    return FinetuneConfig(model=model, cohort=p["cohort"], out=out, method=method, epochs=f.epochs,
                          batch_size=f.batch_size, lr=lr, weight_decay=f.weight_decay, lora_rank=f.lora_rank,
                          lora_alpha=f.lora_alpha, lora_dropout=f.lora_dropout, seed=seed, device=f.device,
                          precision=f.precision, workers=f.workers, weights=Path(weights) if weights else None,
                          resume=True, force=True, tag=tag)


def _run_id(model: str, method: str, tag: str, seed: int) -> str:
    from cxrfair.analysis.runs import RunKey, safe_name

    return RunKey(safe_name(model), method, tag, seed).run_id


def _lr_tag(lr: float) -> str:
    return f"lr{lr:g}".replace("+", "")


def _finetune_steps(config: ExperimentConfig, p: dict, model: str, method: str) -> list[Step]:
    """Learning rates are chosen on validation loss with seed 0; other seeds reuse the choice."""
    f = config.finetune
    lrs = f.lora_lr if method == "lora" else f.full_lr
    lrs = lrs if isinstance(lrs, tuple) else (lrs,)
    base = settings_dict(f) | {"model": model, "method": method, "weights": config.extract.weights.get(model)}
    sweep_dir = p["sweeps"] / f"{model}__{method}"
    steps = []
    for lr in lrs:
        def run(force: bool, lr=lr) -> None:
            from cxrfair.finetune.train import finetune

            finetune(_finetune_config(config, p, model, method, 0, lr, sweep_dir, _lr_tag(lr)), progress=True)

        steps.append(Step(f"{method}-{model}-{_lr_tag(lr)}-s0", base | {"lr": lr, "seed": 0},
                          [sweep_dir / _run_id(model, method, _lr_tag(lr), 0)], run, ("cohort",)))

    def select_and_seed(force: bool) -> None:
        from cxrfair.finetune.train import finetune

        best = _select_lr(sweep_dir, model, method, lrs)
        _clear_runs(p["runs"], model, method)
        src = sweep_dir / _run_id(model, method, _lr_tag(best), 0)
        produced = [_copy_run(src, p["runs"], model, method, 0, {"lr_candidates": list(lrs), "lr_selected_on": "val loss (seed 0)"})]
        for seed in range(1, config.seeds):
            produced.append(finetune(_finetune_config(config, p, model, method, seed, best, p["runs"], "best"), progress=True).run_dir)
        return produced

    steps.append(Step(f"{method}-{model}", base | {"lrs": list(lrs), "seeds": config.seeds}, [],
                      select_and_seed, tuple(s.name for s in steps)))
    return steps


def _select_lr(sweep_dir: Path, model: str, method: str, lrs) -> float:
    """The learning rate whose seed-0 run reached the lowest validation loss."""
    scores = {}
    for lr in lrs:
        meta = json.loads((sweep_dir / _run_id(model, method, _lr_tag(lr), 0) / "run.json").read_text())
        scores[lr] = min(meta["curves"]["val_loss"])
    return min(scores, key=scores.get)


def _copy_run(src: Path, runs: Path, model: str, method: str, seed: int, extra: dict) -> Path:
    from cxrfair.analysis.runs import read_run, write_run

    run = read_run(src)
    run_id = _run_id(model, method, "best", seed)
    meta = dict(run.meta) | {"run_id": run_id} | extra
    return write_run(runs, meta, run.predictions, force=True)


def _clear_runs(runs: Path, model: str, method: str) -> None:
    # A rerun with new settings must not leave runs of the old settings behind for analysis.
    if runs.is_dir():
        for d in runs.glob(f"{model}__{method}__*"):
            shutil.rmtree(d)


def _analysis_step(config: ExperimentConfig, p: dict, deps: list[str]) -> Step:
    a = config.analysis

    def run(force: bool) -> None:
        from cxrfair.analysis.analyze import AnalyzeConfig, analyze

        analyze(AnalyzeConfig(runs_dir=p["runs"], out=p["report"], n_boot=a.bootstrap,
                              attributes=tuple(a.attributes), split=a.split, seed=a.seed, force=True))

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


def run_experiment(config: ExperimentConfig, dry_run: bool = False, echo: Callable[[str], None] = print) -> Path | None:
    """Print the plan, then run every step that is not complete; returns report.html (None on dry run)."""
    check_models(config)
    problem = _missing_images(config)
    if problem and not dry_run:
        raise CxrfairError(problem)
    steps = experiment_steps(config)
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
