"""The one table of fairness interventions: every stage, the pipeline, analysis and the CLI read it.

A mitigation is a row of ``MITIGATIONS``: which stages train or apply it, the probe's solver,
what its strength means and may be, its defaults, and whether strength 0 is plain training.
The *how* lives with each stage (probe: ``cxrfair.probe.objectives``, fine-tuning:
``cxrfair.finetune.objectives``, post-processing: ``cxrfair.analysis.postprocess``), registered
under the same names (each stage's ``TERMS``); no caller asks which mitigation it holds.

Adding a mitigation: one row here, plus its loss term in each stage that trains it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from cxrfair.errors import CxrfairError

PROBE = "probe"  # cxrfair probe linear|mlp --mitigation NAME
FINETUNE = "finetune"  # cxrfair finetune lora|full --mitigation NAME
POSTPROCESS = "postprocess"  # cxrfair postprocess RUN (a new run from a finished one)
CONTRASTIVE = "contrastive"  # cxrfair finetune contrastive --mitigation NAME (image-text fine-tuning)
STAGE_WORDS = {PROBE: "probe", FINETUNE: "fine-tuning", POSTPROCESS: "post-processing",
               CONTRASTIVE: "contrastive fine-tuning"}


@dataclass(frozen=True)
class Mitigation:
    """One fairness intervention, as every stage sees it."""

    name: str
    stages: tuple[str, ...]  # where it runs: PROBE, FINETUNE, CONTRASTIVE and/or POSTPROCESS
    summary: str  # one line for --help and reports
    probe_solver: str = "lbfgs"  # "lbfgs" (full batch) or "adamw": an objective that moves every step needs minibatches
    strength: str = ""  # what the strength means; "" = the mitigation takes none
    low: float = 0.0  # the strength's range: [low, high] or (low, high] when not low_inclusive
    high: float = math.inf
    low_inclusive: bool = True
    # The probe sweep's default strength axis. A zero_is_erm row starts at 0, so a default sweep carries
    # its own ERM counterpart (same solver, grid and selection rule): its deltas are like for like.
    probe_strengths: tuple[float, ...] = ()
    finetune_strength: float | None = None  # fine-tuning's default (one run per strength)
    postprocess_strength: float | None = None  # post-processing's default (one run per strength)
    contrastive_strength: float | None = None  # contrastive fine-tuning's default (one run per strength)
    zero_is_erm: bool = False  # strength 0 trains plain ERM with the mitigation's own solver and grid
    needs_sensitive: bool = True  # targets a sensitive attribute (--sensitive ATTR); erm alone targets none

    @property
    def has_strength(self) -> bool:
        return bool(self.strength)

    def span(self) -> str:
        """The strength's range as text: ``[0, 1]``, ``(0, inf)``."""
        left = "[" if self.low_inclusive else "("
        right = "]" if math.isfinite(self.high) else ")"
        return f"{left}{self.low:g}, {self.high:g}{right}"

    def rule(self) -> str:
        """The strength's range as a condition: ``in [0, 1]``, ``> 0``, ``>= 0``."""
        if math.isfinite(self.high):
            return f"in {self.span()}"
        return f"{'>=' if self.low_inclusive else '>'} {self.low:g}"

    def strength_ok(self, value: float) -> bool:
        above = value >= self.low if self.low_inclusive else value > self.low
        return math.isfinite(value) and above and value <= self.high

    def where(self) -> str:
        """Where the mitigation runs, for messages that refuse it elsewhere."""
        return {
            (PROBE,): "probes only (`cxrfair probe linear|mlp --mitigation NAME`)",
            (POSTPROCESS,): "post-processing of a finished run (`cxrfair postprocess RUN --sensitive ATTR`)",
        }.get(self.stages, "probes and fine-tuning (classifier and contrastive)").replace("NAME", self.name)


_ROWS = (
    Mitigation("erm", (PROBE, FINETUNE, CONTRASTIVE), "plain training: the mean per-example loss", needs_sensitive=False),
    Mitigation("reweight", (PROBE, FINETUNE, CONTRASTIVE), "examples weighted by their (group, class) cell's size",
               strength="exponent s of w ∝ n_cell^-s (1: every cell counts equally)", low=0.0, high=1.0,
               probe_strengths=(0.0, 0.5, 1.0), finetune_strength=1.0, contrastive_strength=1.0, zero_is_erm=True),
    Mitigation("groupdro", (PROBE, FINETUNE, CONTRASTIVE), "online group DRO over (group, class) cells (Sagawa et al.)",
               probe_solver="adamw", strength="step size η of the cell weights q", low_inclusive=False,
               probe_strengths=(0.01, 0.1, 1.0), finetune_strength=0.01, contrastive_strength=0.01),
    Mitigation("adversarial", (PROBE, FINETUNE, CONTRASTIVE), "an adversary predicts the attribute; its gradient is reversed",
               probe_solver="adamw", strength="λ of the reversed adversary gradient",
               probe_strengths=(0.0, 0.1, 0.3, 1.0), finetune_strength=1.0, contrastive_strength=1.0, zero_is_erm=True),
    Mitigation("fairot", (PROBE, FINETUNE, CONTRASTIVE), "Sinkhorn divergence between each group's and all scores (FairCLIP)",
               probe_solver="adamw", strength="λ of the Sinkhorn term",
               probe_strengths=(0.0, 0.1, 1.0, 10.0), finetune_strength=1.0, contrastive_strength=1.0, zero_is_erm=True),
    Mitigation("erase", (PROBE,), "LEACE: the attribute linearly erased from the features before the probe"),
    Mitigation("thresholds", (POSTPROCESS,), "group thresholds / class offsets fitted on validation",
               strength="validation utility the fit may give up, absolute (0.02 = two points)", high=1.0,
               postprocess_strength=0.02, needs_sensitive=True),
)

MITIGATIONS: dict[str, Mitigation] = {m.name: m for m in _ROWS}

# The adversarial mitigation's adversaries -> the stages that train each: "grl" reverses the gradient of an
# adversary reading the features (every trained stage); "projection" (Zhang et al. 2018) reads the probe's
# outputs and label, and only the probe's objective implements it.
ADVERSARIES: dict[str, tuple[str, ...]] = {"grl": (PROBE, FINETUNE, CONTRASTIVE), "projection": (PROBE,)}


def adversaries(stage: str) -> tuple[str, ...]:
    """The adversaries ``stage`` trains (``ADVERSARIES``), in table order."""
    return tuple(a for a, stages in ADVERSARIES.items() if stage in stages)

NAMES = tuple(MITIGATIONS)
ERM = "erm"


@dataclass(frozen=True)
class SinkhornSchedule:
    """How fairot's debiased Sinkhorn divergence S_ε is solved, for scores in [0, 1] (squared cost ≤ 1).

    One schedule, two implementations (probe: ``cxrfair.probe.objectives``, JAX; fine-tuning:
    ``cxrfair.finetune.sinkhorn``, PyTorch). S_ε(α, β) = OT_ε(α, β) − ½OT_ε(α, α) − ½OT_ε(β, β):
    the cross problem OT_ε(α, β) gets one log-domain pass per ``anneal`` blur, then
    ``iterations`` over-relaxed Sinkhorn iterations at ``eps``; each symmetric problem OT_ε(α, α)
    gets ``symmetric_iterations`` averaged updates p ← (p + T(p)) / 2 (Feydy et al. 2019), which
    converge without annealing. Measured: benchmarks/RESULTS.md, "fairot probe" (the counts are
    enough for a batch of 64; problems of a few points converge slower: see ``tolerance``).
    """

    eps: float = 0.01  # the entropic blur: the contract's ε (FairCLIP's, for scores in [0, 1])
    # ε-scaling blurs before eps, one pass each (cross problems). One pass at 0.03 starts the
    # iterations as well as (0.1, 0.03) did (worst gradient error over the hard lanes of
    # benchmarks/RESULTS.md 3.7e-3 against 3.6e-3, the same lane), and each pass costs a kernel.
    anneal: tuple[float, ...] = (0.03,)
    iterations: int = 40  # over-relaxed iterations at eps of a cross problem
    over_relaxation: float = 1.8  # ω of those iterations (Thibault et al. 2017); 1 is plain Sinkhorn, ~10x slower
    symmetric_iterations: int = 20  # averaged updates at eps of a symmetric problem, from p = 0
    # Fine-tuning solves a few problems per step beside an encoder, so it goes on past those counts
    # until no potential moves more than `tolerance` (cost units), at most `max_iterations`; a
    # vmapped probe sweep would run its slowest lane's count on every lane, so it stops at the counts.
    tolerance: float = 1e-10
    max_iterations: int = 5000


SINKHORN = SinkhornSchedule()  # fairot's, in every stage that trains it


def names(stage: str | None = None) -> tuple[str, ...]:
    """Mitigation names, in table order; with ``stage``, those that stage runs (``erm`` included)."""
    return tuple(n for n, m in MITIGATIONS.items() if stage is None or stage in m.stages)


def get(name: str, stage: str | None = None, option: str = "--mitigation") -> Mitigation:
    """The row of ``name``; refuses an unknown name or one ``stage`` does not run, naming the fix."""
    if name not in MITIGATIONS:
        raise CxrfairError(f"{option} {name!r}: unknown; expected one of {', '.join(names(stage))}")
    row = MITIGATIONS[name]
    if stage is not None and stage not in row.stages:
        raise CxrfairError(f"{option} {name}: not a {STAGE_WORDS[stage]} mitigation; it is {row.where()}")
    return row


def check_strength(name: str, value: float, option: str = "--strength") -> float:
    """``value`` if it is a valid strength of ``name`` (one run's), else a CxrfairError naming the range."""
    row = MITIGATIONS[name]
    if not row.has_strength:
        raise CxrfairError(f"{option} {value}: {name} takes no strength; remove it")
    if not row.strength_ok(value):
        raise CxrfairError(f"{option} {value}: out of range for {name}; expected a value in {row.span()}")
    return value


def check_strengths(name: str, values: tuple, option: str = "--strength") -> tuple:
    """``values`` if each is a valid strength of ``name`` (a sweep's grid axis; empty when it takes
    none), else a CxrfairError naming the range."""
    row = MITIGATIONS[name]
    if not row.has_strength:
        if values:
            raise CxrfairError(f"{option}: --mitigation {name} has no strength; leave {option} out")
        return values
    if not all(row.strength_ok(v) for v in values):
        raise CxrfairError(f"{option}: {name} strengths must be {row.rule()}, got {','.join(f'{v:g}' for v in values)}")
    return values
