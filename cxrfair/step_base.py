"""What every step builder of ``cxrfair run`` shares: the experiment's folders, building a stage's
config at planning, and the step that publishes a family of runs.

The bottom of the pipeline's modules, which import one way::

    config, steps, publish  <-  step_base  <-  erm_steps  <-  fairness_steps, contrastive_steps  <-  pipeline  <-  pipeline_cli

Layout under ``config.out``::

    synth/            synthetic NIH-format data (demo only)
    cohort/           cohort.csv + cohort.json
    cache/<model>.h5  embedding caches
    runs/             every run analysed (zero-shot, probes, selected fine-tuning runs)
    sweeps/           probe sweep tables and fine-tuning learning-rate candidates
    embeddings/<model>/leakage|geometry/   `cxrfair embeddings` outputs ([embeddings])
    contrastive/<name>/  contrastively fine-tuned models ([[contrastive]]; extracted as cache/<name>.h5)
    report/           metrics.csv, report.md, report.html, figures/
    .steps/           one stamp per finished step (what makes reruns skip it)
    .staging/<step>/  runs being built; swapped into runs/ when the step succeeds
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, TypeVar

from cxrfair.config import ExperimentConfig
from cxrfair.core.runs import RunKey, safe_name
from cxrfair.errors import CxrfairError
from cxrfair.publish import Family, open_staging, publish
from cxrfair.steps import Step

T = TypeVar("T")


def paths(config: ExperimentConfig) -> dict[str, Path]:
    """The experiment's folders (see the module's layout), by name."""
    out = Path(config.out)
    return {"out": out, "synth": out / "synth", "cohort": out / "cohort", "cache": out / "cache",
            "runs": out / "runs", "sweeps": out / "sweeps", "report": out / "report", "staging": out / ".staging",
            "embeddings": out / "embeddings"}


def cache_path(p: dict, model: str) -> Path:
    """The embedding cache of ``model`` (file-safe: ``hf:org/name`` -> ``hf-org-name.h5``, as ``cxrfair extract``)."""
    return p["cache"] / f"{safe_name(model)}.h5"


def stage_config(section: str, build: Callable[[], T], renames: dict | None = None) -> T:
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


def family(model: str, method: str, mitigation: str = "erm", sensitive: str | None = None,
           shots: int | None = None) -> Family:
    """The run folders (and sweep file) of ``model`` x ``method`` (x mitigation and attribute, or x shots) in the runs folder."""
    return Family.of([RunKey(safe_name(model), method, "best", 0, mitigation=mitigation, sensitive=sensitive, shots=shots)])


def model_weights(config: ExperimentConfig, model: str) -> Path | None:
    """The [extract] weights of ``model``, if given."""
    return config.extract.weights.get(model)


def weights_setting(config: ExperimentConfig, model: str) -> str | None:
    """``model_weights`` as a step setting (fingerprints hold text)."""
    weights = model_weights(config, model)
    return str(weights) if weights else None


def publishing_step(name: str, settings: dict, deps: tuple, p: dict, runs: Family,
                    build: Callable[[Path], object]) -> Step:
    """A step that builds its runs in ``.staging/<name>/`` and only then swaps them into runs/.

    Until the build has succeeded the family's old runs stay as they were; the swap touches no
    other entry of the runs folder (see ``cxrfair.publish``).
    """
    def run(force: bool) -> list[Path]:
        staging = open_staging(p["staging"] / name, step.fingerprint)
        build(staging)
        return publish(staging, p["runs"], runs)

    step = Step(name, settings, [], run, deps)
    return step
