"""The whole protocol as a list of steps: cohort -> extract -> probes -> fine-tuning -> contrastive fine-tuning ->
fairness steps -> analysis.

``experiment_steps(config)`` turns an ExperimentConfig into Steps (see ``cxrfair.steps``);
``run_experiment`` prints the plan, runs what is not already complete and returns the report
path. Every stage is called through its library function with its own config dataclass, built
from the config's section for it (``cxrfair.erm_steps``, ``cxrfair.fairness_steps``,
``cxrfair.contrastive_steps``); the
folders are ``cxrfair.step_base``'s.

Every stage's config is built while planning (``--dry-run`` included), so a bad value stops the
run before anything is written or replaced. A step that writes runs replaces only its own
family (``<model>__<method>`` runs and sweep file) and only after its new runs are complete.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from cxrfair import contrastive_steps, fairness_steps
from cxrfair.config import (AnalysisSettings, EmbeddingsSettings, ExperimentConfig, ExtractSettings, FinetuneSettings,
                            MitigationSettings, PostprocessSettings, ProbeSettings, SynthSettings)
from cxrfair.erm_steps import (analysis_step, cohort_attributes, cohort_step, extract_step, fewshot_steps, finetune_steps,
                               probe_step, stale_runs_moved, synth_step, zeroshot_step)
from cxrfair.errors import CxrfairError
from cxrfair.extract.registry import get_spec
from cxrfair.publish import finish_interrupted
from cxrfair.step_base import paths
from cxrfair.steps import Step, execute, format_plan, plan


def experiment_steps(config: ExperimentConfig) -> list[Step]:
    """All steps of an experiment, in dependency order."""
    return _plan_steps(config)[0]


def _plan_steps(config: ExperimentConfig) -> tuple[list[Step], list[str]]:
    """All steps in dependency order, and the cohort files that are missing (named)."""
    p = paths(config)
    steps = [synth_step(config, p)] if config.synth.enabled else []
    cohort, cohort_cfg, missing = cohort_step(config, p)
    steps.append(cohort)
    for model in config.models:
        steps.append(extract_step(config, p, model))
    if config.probe.shots and not {"linear", "mlp"} & set(config.methods):
        raise CxrfairError("[probe] shots: few-shot runs are linear / mlp probes; add linear to methods or remove shots")
    producers: dict[tuple[str, str], Step] = {}  # (model, method) -> the step publishing its ERM runs
    fewshot: list[Step] = []  # [probe] shots: one few-shot probe step per K (runs the analysis reads too)
    for model in config.models:
        for method in config.methods:
            if method == "zeroshot":
                producers[model, method] = zeroshot_step(config, p, model)
                steps.append(producers[model, method])
            elif method in ("linear", "mlp"):
                producers[model, method] = probe_step(config, p, model, method)
                steps.append(producers[model, method])
                more = fewshot_steps(config, p, model, method)
                steps += more
                fewshot += more
            else:
                ft = finetune_steps(config, p, model, method)
                steps.extend(ft)
                producers[model, method] = ft[-1]
    # [[contrastive]]: fine-tune -> extract -> evaluate; the adapted models' runs join the analysis.
    adapted = contrastive_steps.steps(config, p, cohort_attributes(cohort_cfg))
    steps += adapted.steps
    extra = fairness_steps.steps(config, p, cohort_cfg, producers, adapted.bases)
    steps += extra
    feeds = [s.name for s in [*producers.values(), *fewshot, *adapted.producers.values(), *adapted.fewshot, *extra]]
    has_embeddings = any(s.name.startswith(("leakage-", "geometry-")) for s in extra)
    steps.append(analysis_step(config, p, feeds, has_embeddings, cohort_attributes(cohort_cfg)))
    return steps, missing


def check_models(config: ExperimentConfig) -> None:
    """Fail before any work if a model is unknown or cannot do a requested method."""
    for model in config.models:
        spec = get_spec(model)
        if "zeroshot" in config.methods and not spec.zero_shot:
            raise CxrfairError(f"models: {model} has no text encoder, so it cannot run zeroshot; remove one of them")
        if "lora" in config.methods and not spec.lora_targets:
            raise CxrfairError(f"models: {model} has no LoRA target list, so it cannot run lora; remove one of them")


# Where each dataset's images come from, for the message when they are missing.
_DOWNLOADS = {
    "nih": "download NIH ChestX-ray14 (https://nihcc.app.box.com/v/ChestXray-NIHCC) and unpack images_*.tar.gz there",
    "chexpert": "the folder holding CheXpert-v1.0-small/ (Stanford AIMI)",
    "mimic": "the MIMIC-CXR-JPG folder holding files/ (PhysioNet)",
}


def _missing_images(config: ExperimentConfig, dataset: str) -> str | None:
    """Why extraction would fail for lack of images, said before any work starts."""
    images = config.cohort.images
    if config.synth.enabled:
        return None
    hint = _DOWNLOADS.get(dataset, "the folder the metadata's image paths start from")
    if not images:
        if dataset == "nih":
            return "[cohort] images is empty: set it to the folder of the NIH ChestX-ray14 download (images_001/images/...)"
        return f"[cohort] images is empty: set it to {hint}"
    if not Path(images).is_dir():
        return f"[cohort] images {images}: no such folder; " + (hint if dataset == "nih" else f"set it to {hint}")
    return None


def run_experiment(config: ExperimentConfig, dry_run: bool = False, echo: Callable[[str], None] = print,
                   source: str | None = None) -> Path | None:
    """Print the plan, then run every step that is not complete; returns report.html (None on dry run).

    Everything that can be checked is checked before the first step (and on a dry run): models,
    the cohort's files and images, every stage's settings. ``source`` (the config file) prefixes
    those messages. Missing data files stop a run but are only noted by a dry run.
    """
    try:
        steps, problem = _check_experiment(config)
        if problem and not dry_run:
            raise CxrfairError(problem)
    except CxrfairError as e:
        raise CxrfairError(f"config {source}: {e}" if source else str(e)) from None
    if not dry_run:
        for family in finish_interrupted(paths(config)["staging"]):
            echo(f"note: finished replacing the runs of {family}, interrupted last time")
        for line in stale_runs_moved(paths(config)):  # a cohort rebuilt by an earlier, unfinished run
            echo(f"note: {line}")
    decisions = plan(steps, Path(config.out))
    echo(f"Experiment in {config.out}: {sum(a == 'run' for _, a in decisions)} step(s) to run, "
         f"{sum(a == 'reuse' for _, a in decisions)} reused")
    echo(format_plan(decisions))
    if dry_run:
        if problem:
            echo(f"note: {problem}")
        return None
    execute(decisions, Path(config.out), echo)
    return paths(config)["report"] / "report.html"


def _check_experiment(config: ExperimentConfig) -> tuple[list[Step], str | None]:
    """The steps (every stage's config built and checked) and what data is missing, if any (one line)."""
    check_models(config)
    steps, missing = _plan_steps(config)
    dataset = next(s for s in steps if s.name == "cohort").settings["dataset"]
    images = _missing_images(config, dataset)
    problems = missing + ([images] if images else [])
    return steps, "; ".join(problems) or None


def demo_config(out: Path) -> ExperimentConfig:
    """The demo: synthetic data, the tiny model, all five methods, sized for 2 CPU cores.

    Besides the runs: NEATX-style drains on the synthetic images (the report's shortcut test on
    Pneumothorax), leakage and geometry of the embeddings, group thresholds on the linear probe
    (post-processing for sex), and groupdro and fairot linear probes (for sex), whose strength
    0 (fairot) is the AdamW ERM probe both compare with.
    """

    # Probes: the stage's default solver (L-BFGS over its L2 grid); fine-tuning is cut to 15 epochs
    # so the demo stays within 3 minutes on 2 CPU cores. Three seeds, not two: a seed mean's
    # interval is widened by t_{S-1} sd / sqrt(S), and t_1 = 12.7 made every two-seed interval
    # span the whole range ([0, 100]); t_2 = 4.3 gives intervals a reader can use. 3 x 20 epochs
    # took 2 min 57 s (benchmarks/RESULTS.md, "Demo end to end"), 3 x 15 keeps a margin.
    # The embedding analyses: leakage probes (linear + kNN, no MLP sweep) with the default 20
    # shuffled reruns as the chance level (after the first compile a rerun of both costs ~0.5 s
    # on 2,500 images), and 199 geometry shuffles, the fewest with which a Holm-adjusted p over
    # 10 components can reach 0.05.
    mitigations = tuple(MitigationSettings(methods=("linear",), mitigation=name, sensitive="sex", strengths=strengths,
                                           select="worst_group")
                        for name, strengths in (("groupdro", (0.01, 0.1)), ("fairot", (0.0, 0.1, 0.3))))
    return ExperimentConfig(
        out=Path(out),
        models=("tiny-clip",),
        seeds=3,
        synth=SynthSettings(enabled=True, seed=0, size=64, drains=True),
        extract=ExtractSettings(workers=2),
        # lr / weight_decay / epochs reach only the AdamW-trained mitigation sweeps (ERM probes use
        # L-BFGS); a small grid keeps fairot's per-step Sinkhorn affordable on 2 cores.
        probe=ProbeSettings(hidden=(128,), lr=(3e-3,), weight_decay=(0.0, 1e-2), epochs=50),
        finetune=FinetuneSettings(epochs=15, lora_lr=(1e-3,), full_lr=(1e-4,), workers=2),
        analysis=AnalysisSettings(bootstrap=1000),
        embeddings=EmbeddingsSettings(leakage=("tiny-clip",), geometry=("tiny-clip",), probes=("linear", "knn"),
                                      geometry_permutations=199),
        postprocess=(PostprocessSettings(methods=("linear",), sensitive="sex"),),
        mitigations=mitigations,
    )
