"""The whole protocol as a list of steps: cohort -> extract -> probes -> fine-tuning -> fairness steps -> analysis.

``experiment_steps(config)`` turns an ExperimentConfig into Steps (see ``cxrfair.steps``);
``run_experiment`` prints the plan, runs what is not already complete and returns the report
path. Every stage is called through its library function, except mitigated training, which
goes through the stage's CLI options (see ``cxrfair.fairness_steps``, which also builds the
embedding-analysis and post-processing steps).

Layout under ``config.out``::

    synth/            synthetic NIH-format data (demo only)
    cohort/           cohort.csv + cohort.json
    cache/<model>.h5  embedding caches
    runs/             every run analysed (zero-shot, probes, selected fine-tuning runs)
    sweeps/           probe sweep tables and fine-tuning learning-rate candidates
    embeddings/<model>/leakage|geometry/   `cxrfair embeddings` outputs ([embeddings])
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
from cxrfair.extract.datasets import OPTIONS as READER_OPTIONS, PATH_OPTIONS
from cxrfair.publish import Family, finish_interrupted, open_staging, publish
from cxrfair.steps import Step, execute, format_plan, plan

T = TypeVar("T")


def _paths(config: ExperimentConfig) -> dict[str, Path]:
    out = Path(config.out)
    return {"out": out, "synth": out / "synth", "cohort": out / "cohort", "cache": out / "cache",
            "runs": out / "runs", "sweeps": out / "sweeps", "report": out / "report", "staging": out / ".staging",
            "embeddings": out / "embeddings"}


def _stage_config(section: str, build: Callable[[], T], renames: dict | None = None) -> T:
    """Build a stage's config while planning, so its own checks fail before any step runs.

    The stage names its options as on its CLI (``--epochs``); here they are config keys, so the
    message says ``[probe] epochs: must be >= 1`` (``renames``: option -> key where they differ).
    """
    def key(m: re.Match) -> str:
        name = m[1].replace("-", "_")
        return (renames or {}).get(name, name)

    try:
        return build()
    except CxrfairError as e:
        message = re.sub(r"^--([a-z][a-z-]*)", key, str(e))
        prefix = section if section.startswith("[") else f"[{section}]"
        raise CxrfairError(f"{prefix} {message}") from None


def _family(model: str, method: str) -> Family:
    """The run folders (and sweep file) of ``model`` x ``method`` in the runs folder."""
    from cxrfair.core.runs import RunKey, safe_name

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

    sy = config.synth
    cfg = _stage_config("synth", lambda: SynthConfig(out=p["synth"], format=sy.format, seed=sy.seed, size=sy.size,
                                                     patients=sy.patients, force=True))

    def run(force: bool) -> None:
        from cxrfair.extract.synth import make_synth

        make_synth(cfg)

    # `drains` only chooses what the cohort reads (the NIH folder always has the drain file).
    settings = {k: v for k, v in settings_dict(sy).items() if k != "drains"}
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
    from cxrfair.extract.cohort_presets import PRESETS

    c, sy = config.cohort, config.synth
    if not sy.enabled:
        return {k: getattr(c, k) for k in _SOURCE_KEYS}
    given = [k for k in _SOURCE_KEYS if getattr(c, k) is not None]
    if given:
        raise CxrfairError(f"[cohort] {given[0]}: not used with [synth] enabled (the cohort is built from the "
                           "synthetic data); remove it or set [synth] enabled = false")
    sources = {k: p["synth"] / v for k, v in _SYNTH_SOURCES[sy.format].items()}
    if sy.format == "nih" and sy.drains:
        from cxrfair.extract.synth import NEATX_NAME

        sources["drains"] = p["synth"] / NEATX_NAME
    if sy.format == "nih" and c.preset in PRESETS and PRESETS[c.preset].split_rule == "official":
        sources["official_split"] = p["synth"]
    return sources


def _cohort_step(config: ExperimentConfig, p: dict) -> tuple[Step, object, list[str]]:
    """The cohort step, its CohortConfig, and what is missing among its files (an error unless dry run)."""
    from cxrfair.extract.cohort import CohortConfig

    c = config.cohort
    if config.synth.drains and config.synth.format != "nih":
        raise CxrfairError(f"[synth] drains: only the nih format has drain labels, not {config.synth.format}")
    sources = _cohort_sources(config, p)
    dataset = c.dataset or (config.synth.format if config.synth.enabled else None)
    _check_dataset(dataset)
    cfg = _stage_config("cohort", lambda: CohortConfig.from_preset(
        c.preset, out=p["cohort"], dataset=dataset, **sources, diseases=c.diseases, attributes=c.attributes,
        age_bins=c.age_bins, uncertain=c.uncertain, per_group=c.per_group, max_train=c.max_train, seed=c.seed,
        split=c.split, force=True, **{k: getattr(c, k) for k in READER_OPTIONS if k not in PATH_OPTIONS}))

    def run(force: bool) -> None:
        from cxrfair.extract.cohort import build_cohort

        build_cohort(cfg)

    settings = settings_dict(c) | {"dataset": cfg.dataset} | {k: str(v) if v else None for k, v in sources.items()}
    missing = []
    if not config.synth.enabled:
        # The files' content, not just their names: an edited metadata file must rebuild the cohort.
        identity, missing = _sources_identity(cfg)
        settings["sources_sha256"] = identity
    deps = ("synth",) if config.synth.enabled else ()
    return Step("cohort", settings, [p["cohort"] / "cohort.json"], run, deps), cfg, missing


def _check_dataset(dataset: str | None) -> None:
    from cxrfair.extract.datasets import READERS

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
    from cxrfair.io import sha256_file

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
    from cxrfair.probe.zeroshot import TERMS

    cache = p["cache"] / f"{model}.h5"
    term = config.probe.zeroshot_term
    if term is not None and term not in TERMS:
        raise CxrfairError(f"[probe] zeroshot_term {term!r}: choose one of {', '.join(TERMS)}, or \"\" for the default")

    def build(staging: Path) -> None:
        from cxrfair.probe.zeroshot import zeroshot_cache

        zeroshot_cache(cache, staging, all_sets=config.probe.all_prompt_sets, force=True, term=term)

    settings = {"model": model, "all_prompt_sets": config.probe.all_prompt_sets, "term": term}
    return _publishing_step(f"zeroshot-{model}", settings, (f"extract-{model}",), p, _family(model, "zeroshot"), build)


def sweep_config(config: ExperimentConfig, method: str):
    """The probe stage's SweepConfig for ``method`` from [probe], checked (messages name [probe] keys)."""
    from cxrfair.probe.sweep import SweepConfig

    pr = config.probe
    return _stage_config("probe", lambda: SweepConfig(
        method=method, solver=pr.solver, standardize=pr.standardize, l2s=pr.l2, lrs=pr.lr, weight_decays=pr.weight_decay,
        hiddens=pr.hidden, seeds=tuple(range(config.seeds)), epochs=pr.epochs, batch_size=pr.batch_size,
        max_iter=pr.max_iter, select=pr.select, architecture=pr.architecture,
        l2s_skip=pr.l2_skip if method == "mlp" else None, ftol=pr.ftol).validate())


# SweepConfig fields that one solver or method ignores: changing them must not rerun those probes.
_UNUSED_BY = {"lbfgs": ("lrs", "weight_decays", "epochs", "batch_size"), "adamw": ("l2s", "max_iter", "l2s_skip", "ftol")}
_UNUSED_BY_LINEAR = ("hiddens", "architecture", "l2s_skip")


def sweep_settings(cfg) -> dict:
    """What changes a probe sweep's runs (for its fingerprint): the SweepConfig minus what it ignores."""
    unused = {"memory_budget_mb", *_UNUSED_BY.get(cfg.solver, ()), *(_UNUSED_BY_LINEAR if cfg.method == "linear" else ())}
    return {k: v for k, v in settings_dict(cfg).items() if k not in unused}


def _probe_step(config: ExperimentConfig, p: dict, model: str, method: str) -> Step:
    cache = p["cache"] / f"{model}.h5"
    cfg = sweep_config(config, method)

    def build(staging: Path) -> None:
        from cxrfair.probe.sweep import probe_cache

        probe_cache(cache, staging, cfg, force=True)

    settings = sweep_settings(cfg) | {"model": model}
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
    from cxrfair.core.runs import read_run, write_run

    run = read_run(cfg.out / cfg.run_id)
    meta = dict(run.meta) | {"run_id": dataclasses.replace(cfg, tag="best").run_id} | extra
    return write_run(runs, meta, run.predictions, force=True)


def _analysis_step(config: ExperimentConfig, p: dict, deps: list[str], embeddings: bool) -> Step:
    """The report over every run; ``embeddings``: leakage/geometry outputs exist under <out>/embeddings/."""
    import dataclasses as dc

    from cxrfair.analysis.analyze import AnalyzeConfig

    a = config.analysis
    extra = {}
    # The report reads the embedding analyses when its stage knows how (`cxrfair analyze --embeddings DIR`).
    if embeddings and "embeddings" in {f.name for f in dc.fields(AnalyzeConfig)}:
        extra["embeddings"] = p["embeddings"]
    cfg = _stage_config("analysis", lambda: AnalyzeConfig(
        runs_dir=p["runs"], out=p["report"], n_boot=a.bootstrap, attributes=tuple(a.attributes), split=a.split,
        seed=a.seed, cross=a.cross, shortcut=a.shortcut, shortcut_class=a.shortcut_class, force=True, **extra))

    def run(force: bool) -> None:
        from cxrfair.analysis.analyze import analyze

        analyze(cfg)

    settings = settings_dict(a) | {k: str(v) for k, v in extra.items()}
    return Step("analyze", settings, [p["report"] / "report.html"], run, tuple(deps))


def experiment_steps(config: ExperimentConfig) -> list[Step]:
    """All steps of an experiment, in dependency order."""
    return _plan_steps(config)[0]


def _plan_steps(config: ExperimentConfig) -> tuple[list[Step], list[str]]:
    """All steps in dependency order, and the cohort files that are missing (named)."""
    from cxrfair import fairness_steps

    p = _paths(config)
    steps = [_synth_step(config, p)] if config.synth.enabled else []
    cohort, cohort_cfg, missing = _cohort_step(config, p)
    steps.append(cohort)
    for model in config.models:
        steps.append(_extract_step(config, p, model))
    producers: dict[tuple[str, str], Step] = {}  # (model, method) -> the step publishing its ERM runs
    for model in config.models:
        for method in config.methods:
            if method == "zeroshot":
                producers[model, method] = _zeroshot_step(config, p, model)
                steps.append(producers[model, method])
            elif method in ("linear", "mlp"):
                producers[model, method] = _probe_step(config, p, model, method)
                steps.append(producers[model, method])
            else:
                ft = _finetune_steps(config, p, model, method)
                steps.extend(ft)
                producers[model, method] = ft[-1]
    extra = fairness_steps.steps(config, p, cohort_cfg, producers)
    steps += extra
    feeds = [s.name for s in producers.values()] + [s.name for s in extra]
    has_embeddings = any(s.name.startswith(("leakage-", "geometry-")) for s in extra)
    steps.append(_analysis_step(config, p, feeds, has_embeddings))
    return steps, missing


def check_models(config: ExperimentConfig) -> None:
    """Fail before any work if a model is unknown or cannot do a requested method."""
    from cxrfair.extract.registry import get_spec

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
    """The steps (every stage's config built and checked) and what data is missing, if any (one line)."""
    check_models(config)
    steps, missing = _plan_steps(config)
    dataset = next(s for s in steps if s.name == "cohort").settings["dataset"]
    images = _missing_images(config, dataset)
    problems = missing + ([images] if images else [])
    return steps, "; ".join(problems) or None


# The demo's mitigation entries: ERM + groupdro + fairot on the linear probe, for sex
# (docs/CONTRACTS.md "Mitigations"); False leaves them out of the demo's plan.
DEMO_MITIGATIONS = True


def demo_config(out: Path) -> ExperimentConfig:
    """The demo: synthetic data, the tiny model, all five methods, sized for 2 CPU cores.

    Besides the runs: NEATX-style drains on the synthetic images (the report's shortcut test on
    Pneumothorax), leakage and geometry of the embeddings, group thresholds on the linear probe
    (post-processing for sex), and, with ``DEMO_MITIGATIONS``, groupdro and fairot linear probes.
    """
    from cxrfair.config import (AnalysisSettings, EmbeddingsSettings, ExtractSettings, FinetuneSettings,
                                MitigationSettings, PostprocessSettings, ProbeSettings, SynthSettings)

    # Probes: the stage's default solver (L-BFGS over its L2 grid); fine-tuning is cut to 30 epochs
    # so the demo stays within a few minutes on 2 CPU cores. Two seeds show the mean +- sd columns.
    # The embedding analyses use fewer reruns than their defaults to keep the demo's time: leakage
    # probes (linear + kNN) with one shuffled rerun as the chance level (each rerun retrains every
    # probe), and 199 geometry shuffles, the fewest with which a Holm-adjusted p over 10
    # components can reach 0.05.
    mitigations = tuple(MitigationSettings(methods=("linear",), mitigation=name, sensitive="sex", strengths=strengths,
                                           select="worst_group", enabled=DEMO_MITIGATIONS)
                        for name, strengths in (("groupdro", (0.01, 0.1)), ("fairot", (0.0, 0.1, 0.3))))
    return ExperimentConfig(
        out=Path(out),
        models=("tiny-clip",),
        seeds=2,
        synth=SynthSettings(enabled=True, seed=0, size=64, drains=True),
        extract=ExtractSettings(workers=2),
        # lr / weight_decay / epochs reach only the AdamW-trained mitigation sweeps (ERM probes use
        # L-BFGS); a small grid keeps fairot's per-step Sinkhorn affordable on 2 cores.
        probe=ProbeSettings(hidden=(128,), lr=(3e-3,), weight_decay=(0.0, 1e-2), epochs=50),
        finetune=FinetuneSettings(epochs=30, lora_lr=(1e-3,), full_lr=(1e-4,), workers=2),
        analysis=AnalysisSettings(bootstrap=1000),
        embeddings=EmbeddingsSettings(leakage=("tiny-clip",), geometry=("tiny-clip",), probes=("linear", "knn"),
                                      permutations=1, geometry_permutations=199),
        postprocess=(PostprocessSettings(methods=("linear",), sensitive="sex"),),
        mitigations=mitigations,
    )
