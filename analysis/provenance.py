"""Where the analysed runs came from, as far as their own files say: synthetic images, random weights.

A report of the demo (synthetic images, randomly initialised ``tiny-*`` models) must not pass for a
result. This module reads only files the runs already point to, never a stage:

- ``run.json`` ``weights_id`` (fine-tuning runs) or the embedding cache's ``weights_id`` attribute
  (probe and zero-shot runs, whose ``source`` is the cache file): ``random-init(...)`` means the
  model was never trained.
- the cohort folder (a run's ``source`` when it is a folder; the cache's ``cohort_folder``
  attribute otherwise), its ``cohort.json`` ``images_root``, and ``synth_info.json`` there, which
  ``cxrfair cohort synth`` writes beside the images it draws.

Missing files are not an error (a report of copied runs still renders): the banner then says only
what could be read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

SYNTH_INFO = "synth_info.json"  # written by `cxrfair cohort synth` beside the images it draws
RANDOM_WEIGHTS = "random-init"  # prefix of a weights_id whose weights were never trained


@dataclass
class Provenance:
    """What the runs' files say about their data and weights."""

    synthetic: dict[str, str] = field(default_factory=dict)  # {images folder: generator}
    random_weights: dict[str, str] = field(default_factory=dict)  # {model: weights_id}
    weights: dict[str, str] = field(default_factory=dict)  # {model: weights_id}, every model whose id was found
    unknown: list[str] = field(default_factory=list)  # models whose weights could not be identified

    @property
    def is_demo(self) -> bool:
        return bool(self.synthetic or self.random_weights)

    def banner(self) -> str:
        """One paragraph (markdown-lite) saying what the numbers are not; "" for real data and weights."""
        if not self.is_demo:
            return ""
        parts = []
        if self.synthetic:
            gens = ", ".join(sorted(set(self.synthetic.values())))
            parts.append(f"the images are **synthetic** (drawn by `{gens}`; `{SYNTH_INFO}` beside them)")
        if self.random_weights:
            models = ", ".join(f"`{m}` ({w})" for m, w in sorted(self.random_weights.items()))
            parts.append(f"the models' weights are **random** ({models}: never pretrained)")
        said = "; ".join(parts)
        return ("**Demonstration data, not a result.** " + said[0].upper() + said[1:]
                + ". Every number below shows that the pipeline runs; none says anything about a real model or "
                "real patients.")


def _cache_attrs(path: Path) -> dict:
    """The embedding cache's file attributes, or {} when it cannot be read."""
    try:
        import h5py  # only for runs whose source is a cache file (probe, zero-shot); see the module docstring
    except ImportError:  # pragma: no cover - h5py is a dependency
        return {}
    try:
        with h5py.File(path, "r") as f:
            return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
    except (OSError, ValueError):
        return {}


def _synth_generator(cohort: Path) -> str | None:
    """The generator named by ``synth_info.json`` beside the cohort's images (or its metadata), else None."""
    try:
        meta = json.loads((cohort / "cohort.json").read_text())
    except (OSError, ValueError):
        return None
    places = [meta.get("images_root")]
    src = meta.get("metadata_source")
    places.append(Path(src["path"]).parent if isinstance(src, dict) and src.get("path") else None)
    for p in places:
        if p and (Path(p) / SYNTH_INFO).is_file():
            try:
                return str(json.loads((Path(p) / SYNTH_INFO).read_text()).get("generator", "a synthetic generator"))
            except (OSError, ValueError):
                return "a synthetic generator"
    return None


def provenance(runs) -> Provenance:
    """Read the provenance of ``runs`` (``core.runs.Run``); files are read once per source."""
    out = Provenance()
    seen_sources: dict[str, tuple[str | None, str | None]] = {}
    for run in runs:
        source = str(run.meta.get("source") or "")
        if source not in seen_sources:
            path = Path(source) if source else None
            cohort, weights = None, None
            if path is not None and path.is_dir():
                cohort = path
            elif path is not None and path.is_file():
                attrs = _cache_attrs(path)
                weights = attrs.get("weights_id")
                cohort = Path(attrs["cohort_folder"]) if attrs.get("cohort_folder") else None
            seen_sources[source] = (str(cohort) if cohort else None, weights)
        cohort, cache_weights = seen_sources[source]
        if cohort is not None:
            gen = _synth_generator(Path(cohort))
            if gen:
                out.synthetic[cohort] = gen
        weights = run.meta.get("weights_id") or cache_weights
        if weights:
            out.weights[run.model] = str(weights)
            if str(weights).startswith(RANDOM_WEIGHTS):
                out.random_weights[run.model] = str(weights)
        elif run.model not in out.weights and run.model not in out.unknown:
            out.unknown.append(run.model)
    out.unknown = [m for m in out.unknown if m not in out.weights]
    return out
