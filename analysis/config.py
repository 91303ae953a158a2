"""The options of ``cxrfair analyze`` (``AnalyzeConfig``), resolved against the runs, and what
they mean for the intervals: bootstrap strata and the paragraph describing them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from cxrfair.analysis.groups import crossed_name, declared_attributes, default_cross
from cxrfair.core.runs import Run
from cxrfair.errors import CxrfairError

# A 95% percentile interval from a few dozen replicates rests on the one or two most extreme of
# them and moves with the seed by more than the effects it is meant to bound.
MIN_BOOTSTRAP = 100
# Within a stratum of n patients the bootstrap variance is (n - 1)/n of the plain one; strata
# smaller than this are pooled (bootstrap.merge_small_strata) so that tiny cells of a fine cross
# do not shrink the intervals.
MIN_STRATUM_PATIENTS = 5


@dataclass(frozen=True)
class AnalyzeConfig:
    """Options of ``cxrfair analyze``."""

    runs_dir: Path  # folder of run folders (RUNS/<run_id>/)
    out: Path  # report folder to write (replaced only with force)
    n_boot: int = 1000  # bootstrap replicates: 0 = point estimates only, else at least MIN_BOOTSTRAP
    attributes: tuple[str, ...] = ()  # attribute columns; () = every attribute the runs declare
    split: str = "test"  # split the metrics are computed on
    seed: int = 0  # seed of the bootstrap draws
    level: float = 0.95  # interval coverage
    force: bool = False  # replace an existing report folder
    figures: bool = True  # draw PNG figures (off for quick tests)
    cross: tuple[str, ...] | None = None  # attributes crossed into one more (and the bootstrap strata); None = the first two, () = none
    shortcut: str = "auto"  # binary column of the shortcut test; "auto": drain + Pneumothorax when present; "none": off
    shortcut_class: str | None = None  # the class whose AUC the shortcut test compares (with an explicit shortcut)
    # Folder of `cxrfair embeddings leakage|geometry` outputs (<model>/leakage, <model>/geometry) shown in the
    # report: "auto" = the runs folder's sibling embeddings/ when it holds some, "none" = off, or a path.
    embeddings: str = "auto"

    def __post_init__(self):
        if self.n_boot < 0 or 0 < self.n_boot < MIN_BOOTSTRAP:
            raise CxrfairError(f"--bootstrap {self.n_boot}: use 0 (point estimates, no intervals) or at least "
                               f"{MIN_BOOTSTRAP} replicates (default 1000) for intervals")
        if self.split not in ("train", "val", "test"):
            raise CxrfairError(f"--split {self.split}: must be train, val or test")
        if len(set(self.attributes)) != len(self.attributes):
            raise CxrfairError(f"--attributes {','.join(self.attributes)}: give distinct attribute columns")
        if self.cross is not None and (len(self.cross) == 1 or len(set(self.cross)) != len(self.cross)):
            raise CxrfairError(f"--cross {','.join(self.cross)}: give two or more distinct attributes, or none")
        if not 0 < self.level < 1:
            raise CxrfairError(f"level {self.level}: must be between 0 and 1")
        explicit = self.shortcut not in ("auto", "none")
        if explicit != (self.shortcut_class is not None):
            raise CxrfairError("--shortcut COLUMN and --shortcut-class CLASS go together (e.g. --shortcut drain "
                               f"--shortcut-class Pneumothorax); got --shortcut {self.shortcut} and --shortcut-class "
                               f"{self.shortcut_class}")


def resolve(runs: list[Run], config: AnalyzeConfig) -> AnalyzeConfig:
    """``config`` with ``attributes`` and ``cross`` filled in from the runs and checked.

    ``attributes`` () becomes every declared attribute; ``cross`` None becomes the first two
    analysed attributes (none with one). CxrfairError for a ``--cross`` attribute not analysed.
    """
    declared = declared_attributes(runs)  # checked whatever --attributes says: references must agree
    attributes = config.attributes or tuple(declared)
    if not attributes:
        raise CxrfairError("the runs declare no attributes (run.json attributes is empty); name the columns to "
                           "compare groups on with --attributes")
    cross = default_cross(attributes) if config.cross is None else config.cross
    outside = [a for a in cross if a not in attributes]
    if outside:
        raise CxrfairError(f"--cross {','.join(cross)}: {', '.join(outside)} is not among the analysed attributes "
                           f"({', '.join(attributes)}); add it to --attributes or cross others")
    return replace(config, attributes=tuple(attributes), cross=tuple(cross))


def strata_attributes(config: AnalyzeConfig) -> tuple[str, ...]:
    """The attributes whose cross forms the bootstrap strata: ``cross``, else the first attribute."""
    return tuple(config.cross) if config.cross else tuple(config.attributes[:1])


def stratum_name(config: AnalyzeConfig) -> str:
    """The (possibly crossed) attribute whose groups are the bootstrap strata."""
    strata = strata_attributes(config)
    return crossed_name(strata) if len(strata) > 1 else strata[0]


def describe_intervals(config: AnalyzeConfig) -> str:
    """One paragraph saying how intervals are made, for the report and README (``config`` resolved)."""
    if not config.n_boot:
        return "No bootstrap (--bootstrap 0): point estimates only, no intervals."
    strata = strata_attributes(config) if config.attributes else ("the analysed attributes",)
    return (f"{100 * config.level:.0f}% intervals from {config.n_boot} bootstrap replicates (seed "
            f"{config.seed}) of the {config.split} split, resampling patients with replacement within each "
            f"{' × '.join(strata)} stratum: all of a patient's images are drawn together, and a "
            "patient whose images fall in several strata belongs to that of their first image (by image_id). "
            f"Strata with fewer than {MIN_STRATUM_PATIENTS} patients are pooled into one (joined to the smallest "
            "other stratum if the pool is still that small). "
            "Each metric's interval is made by its method (metrics.csv column interval; the notes say why): "
            "percentile for per-sample metrics, and for the gap, worst-group and ES-AUC metrics, which are "
            "biased in small samples, the hull of the percentile and basic intervals (value_bc: the "
            "bias-corrected estimate). Every run on the same test images uses the same resamples. A mean "
            "over seeds (or over the prompt draws of a zero-shot prompt set) has its patients-only interval "
            "widened by the seeds' variance (each side in quadrature with t_{S-1} sd / sqrt(S)), so seeds that "
            "disagree widen it; with one seed the seed variance is unknown. A paired comparison (and a "
            "mitigation delta) takes the percentile interval of the difference on the same resamples, widened "
            "the same way by the seed variance of each mean in it (Welch-Satterthwaite t; seed_var_known false "
            "where a mean has one run), a p-value that inverts that interval, and Holm-adjusted p-values per "
            "comparison and attribute.")
