"""The experiment's contrastive fine-tuning: each [[contrastive]] entry's fine-tuning, extraction and evaluation steps.

Per entry x base model x strength x seed (planned by ``cxrfair.pipeline`` after the ERM steps):

- ``contrastive-<name>``: ``finetune_contrastive`` (``cxrfair finetune contrastive``) on the
  cohort's image-text pairs, written to ``<out>/contrastive/<name>/``; ``<name>`` is
  ``ContrastiveConfig.run_id`` (``<model>.ctr-<adapter>[-<mitigation>-<attr>-st<s>].s<seed>``),
  known while planning. An interrupted run resumes from its checkpoint; a finished one whose
  settings changed is replaced.
- ``extract-<name>``: the same extract step as every model, loading ``contrastive:<folder>``
  (the base model's [extract] weights, the adapted tensors) into ``cache/<name>.h5``, whose
  ``adapted`` attribute names the run.
- ``zeroshot-<name>`` / ``linear-<name>`` / ``mlp-<name>`` (+ few-shot K): the entry's ``methods``,
  the ERM steps of any model, so the analysis reads the adapted model's runs beside its base
  model's (before / after, same cohort, same tables). ``leakage-<name>`` / ``geometry-<name>``
  follow where [embeddings] lists the base model (``cxrfair.fairness_steps``).

Every ContrastiveConfig is built while planning (``--dry-run`` included), so a bad entry stops the
run before any work, with a message naming ``[[contrastive]] #i``.
"""

from __future__ import annotations

from dataclasses import dataclass

from cxrfair.config import ContrastiveSettings, ExperimentConfig, section_settings, stage_kwargs
from cxrfair.core import mitigations
from cxrfair.erm_steps import extract_step, fewshot_steps, probe_step, zeroshot_step
from cxrfair.errors import CxrfairError
from cxrfair.extract.adapted import PREFIX, RECORD, WEIGHTS
from cxrfair.extract.registry import get_spec
from cxrfair.finetune.contrastive_config import ContrastiveConfig
from cxrfair.step_base import model_weights, stage_config, weights_setting
from cxrfair.steps import Step

METHODS = ("zeroshot", "linear", "mlp")  # how an adapted model can be evaluated (fine-tuning it again is not offered)
FOLDER = "contrastive"  # <out>/contrastive/<name>/: the fine-tuned models


@dataclass(frozen=True)
class Planned:
    """What the [[contrastive]] entries add to an experiment."""

    steps: list[Step]  # in dependency order
    producers: dict  # (adapted model, method) -> the step publishing its runs (read by the analysis)
    fewshot: list[Step]  # the adapted models' few-shot probe steps (read by the analysis)
    bases: dict  # adapted model -> its base model


def steps(config: ExperimentConfig, p: dict, attributes: tuple[str, ...]) -> Planned:
    """Every [[contrastive]] entry's steps (``attributes``: the cohort's, which ``sensitive`` must name)."""
    out: list[Step] = []
    producers: dict[tuple[str, str], Step] = {}
    fewshot: list[Step] = []
    made: dict[str, str] = {}  # adapted name -> the entry that makes it
    bases: dict[str, str] = {}
    for i, entry in enumerate(config.contrastive, 1):
        where = f"[[contrastive]] #{i}"
        _check_entry(config, entry, where, attributes)
        for model in entry.models or config.models:
            for strength in entry.strengths or (None,):
                for seed in entry.seeds:
                    cfg = contrastive_config(config, p, entry, where, model, strength, seed)
                    name = cfg.run_id
                    if name in made:
                        raise CxrfairError(f"{where}: fine-tunes {name} as {made[name]} does; change one of them")
                    made[name], bases[name] = where, model
                    out += _model_steps(config, p, entry, cfg, producers, fewshot)
    return Planned(out, producers, fewshot, bases)


def contrastive_config(config: ExperimentConfig, p: dict, entry: ContrastiveSettings, where: str, model: str,
                       strength: float | None, seed: int) -> ContrastiveConfig:
    """The stage's ContrastiveConfig of one fine-tuning, checked at planning (messages name ``where``).

    Every run resumes an interrupted attempt and replaces a finished one (the step decides when to run).
    """
    return stage_config(where, lambda: ContrastiveConfig(
        **stage_kwargs(entry, ContrastiveConfig), model=model, cohort=p["cohort"], out=p["out"] / FOLDER, seed=seed,
        strength=strength, weights=model_weights(config, model), resume=True, force=True),
        {"method": "adapter", "strength": "strengths"})


def _model_steps(config: ExperimentConfig, p: dict, entry: ContrastiveSettings, cfg: ContrastiveConfig,
                 producers: dict, fewshot: list) -> list[Step]:
    """Fine-tune -> extract -> the entry's evaluation steps of one adapted model."""
    name, folder = cfg.run_id, cfg.out / cfg.run_id

    def run(force: bool) -> None:
        from cxrfair.finetune.contrastive import finetune_contrastive  # torch: planning and --dry-run stay torch-free

        finetune_contrastive(cfg, progress=True)

    settings = ({k: v for k, v in section_settings(entry).items() if k not in ("track", "strengths", "seeds", "methods",
                                                                                "models")}  # tracking changes no result
                | {"model": cfg.model, "strength": cfg.strength, "seed": cfg.seed,
                   "weights": weights_setting(config, cfg.model)})
    train = Step(f"contrastive-{name}", settings, [folder / RECORD, folder / WEIGHTS], run, ("cohort",))
    out = [train, extract_step(config, p, name, source=f"{PREFIX}:{folder}", base=cfg.model, deps=(train.name,))]
    for method in entry.methods:
        if method == "zeroshot":
            producers[name, method] = zeroshot_step(config, p, name)
            out.append(producers[name, method])
        else:
            producers[name, method] = probe_step(config, p, name, method)
            more = fewshot_steps(config, p, name, method)
            out += [producers[name, method], *more]
            fewshot += more
    return out


def _check_entry(config: ExperimentConfig, entry: ContrastiveSettings, where: str, attributes: tuple[str, ...]) -> None:
    """What planning can refuse before any ContrastiveConfig exists (one line naming the key)."""
    unknown = [m for m in entry.models if m not in config.models]
    if unknown:
        raise CxrfairError(f"{where} models: {', '.join(unknown)} not among models ({', '.join(config.models)}); "
                           "list it there first")
    for model in entry.models or config.models:
        if not get_spec(model).zero_shot:
            raise CxrfairError(f"{where}: {model} has no text encoder, so it cannot be fine-tuned contrastively; "
                               "list the image-text models in its models")
    bad = [m for m in entry.methods if m not in METHODS]
    if bad or not entry.methods:
        raise CxrfairError(f"{where} methods: {bad or '[]'}: choose one or more of {', '.join(METHODS)}")
    for key in ("methods", "seeds", "strengths", "models"):
        values = getattr(entry, key)
        if len(set(values)) != len(values):
            raise CxrfairError(f"{where} {key}: a value is listed more than once; list each once")
    if not entry.seeds:
        raise CxrfairError(f"{where} seeds: list at least one seed, e.g. [0]")
    row = stage_config(where, lambda: mitigations.get(entry.mitigation, mitigations.CONTRASTIVE))
    if entry.strengths and not row.has_strength:
        raise CxrfairError(f"{where} strengths: {entry.mitigation} has no strength; remove strengths")
    if entry.sensitive is not None and attributes and entry.sensitive not in attributes:
        raise CxrfairError(f"{where} sensitive: {entry.sensitive!r} is not a sensitive attribute of the cohort "
                           f"(it has {', '.join(attributes)})")
