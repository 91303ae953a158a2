"""A tiny step runner: run each step once, skip steps whose outputs are complete and match.

A step is complete when its stamp ``<out>/.steps/<name>.json`` exists with the step's current
fingerprint and its outputs exist. The fingerprint hashes the step's settings and its
dependencies' fingerprints, so changing a setting (or the cohort) reruns that step and
everything downstream, and nothing else. Paths inside the experiment folder enter the
fingerprint relative to it (and stamps record produced outputs relative to it), so an experiment
that is moved or copied elsewhere resumes with every finished step reused. Stamps written before
that (absolute paths) are still accepted. Stamps are written atomically after the step
succeeds, so an interrupted step is never mistaken for a finished one; steps that can resume
(extraction, fine-tuning) pick up their own partial work when rerun.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from cxrfair.io import write_json_atomic


@dataclass
class Step:
    """One unit of work in an experiment.

    Attributes:
        name: unique, path-safe name (e.g. ``extract-tiny-clip``).
        settings: everything that changes the step's outputs (JSON-able).
        outputs: paths that must exist for the step to count as done.
        run: does the work; called with ``force=True`` when stale outputs must be replaced. It may
            return the paths it produced (e.g. run folders), which are checked on reuse.
        deps: names of steps whose outputs this one reads.
    """

    name: str
    settings: dict
    outputs: Sequence[Path]
    run: Callable[[bool], object]
    deps: Sequence[str] = field(default_factory=tuple)
    fingerprint: str = ""


EXPERIMENT = "<experiment>"  # stands for the experiment folder in fingerprints and stamps


def portable(value, root: Path | None):
    """``value`` (JSON-able settings) with every absolute path inside ``root`` written as
    ``<experiment>/relative/path``; everything else unchanged. None ``root``: unchanged."""
    if root is None:
        return value
    if isinstance(value, dict):
        return {k: portable(v, root) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable(v, root) for v in value]
    if isinstance(value, (str, Path)) and Path(value).is_absolute():
        rel = _relative(Path(value), root)
        if rel is not None:
            return EXPERIMENT if rel == "." else f"{EXPERIMENT}/{rel}"
    return value


def _relative(path: Path, root: Path) -> str | None:
    for base in dict.fromkeys((Path(root).absolute(), Path(root).resolve())):
        for p in dict.fromkeys((path, path.resolve())):
            try:
                return p.relative_to(base).as_posix()
            except ValueError:
                continue
    return None


def fingerprint(step: Step, upstream: dict[str, str], root: Path | None = None) -> str:
    """SHA-256 of the step's name, settings (paths inside ``root`` relative to it, see
    ``portable``) and its dependencies' fingerprints."""
    payload = {"name": step.name, "settings": portable(step.settings, root), "deps": {d: upstream[d] for d in step.deps}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _stamp_path(root: Path, step: Step) -> Path:
    return root / ".steps" / f"{step.name}.json"


def plan(steps: Sequence[Step], root: Path) -> list[tuple[Step, str]]:
    """Fingerprint every step and decide ``"reuse"`` or ``"run"`` (steps must be in dependency order)."""
    prints: dict[str, str] = {}
    legacy: dict[str, str] = {}  # the fingerprints stamps held before paths were relative (absolute paths)
    decisions = []
    for step in steps:
        step.fingerprint = fingerprint(step, prints, Path(root))
        prints[step.name] = step.fingerprint
        legacy[step.name] = fingerprint(step, legacy)
        done = is_done(step, root) or is_done(step, root, legacy[step.name])
        decisions.append((step, "reuse" if done else "run"))
    return decisions


def is_done(step: Step, root: Path, expected: str | None = None) -> bool:
    """True when the step's stamp matches its fingerprint (or ``expected``) and all its outputs exist."""
    stamp = _stamp_path(root, step)
    if not stamp.is_file():
        return False
    try:
        data = json.loads(stamp.read_text())
        recorded, produced = data["fingerprint"], data.get("produced", [])
    except (ValueError, KeyError):
        return False
    outputs = [*step.outputs, *(_from_stamp(p, root) for p in produced)]
    return recorded == (expected or step.fingerprint) and all(Path(p).exists() for p in outputs)


def _from_stamp(recorded: str, root: Path) -> Path:
    """A produced path as a stamp records it (``<experiment>/...`` or, in older stamps, absolute)."""
    if recorded == EXPERIMENT or recorded.startswith(EXPERIMENT + "/"):
        return Path(root) / recorded[len(EXPERIMENT) + 1:]
    return Path(recorded)


def execute(decisions: list[tuple[Step, str]], root: Path, echo: Callable[[str], None] = print) -> list[str]:
    """Run the steps marked ``run`` in order, stamping each on success; returns the names run."""
    ran = []
    for step, action in decisions:
        if action != "run":
            continue
        # A stamp with another fingerprint means the settings changed: replace the old outputs.
        # Without a stamp, outputs are an interrupted attempt of this very step: let it resume.
        stale = _stamp_path(root, step).exists()
        echo(f"==> {step.name}")
        t0 = time.perf_counter()
        produced = step.run(stale) or []
        seconds = time.perf_counter() - t0
        write_json_atomic(_stamp_path(root, step), {"name": step.name, "fingerprint": step.fingerprint,
                                                    "settings": step.settings, "seconds": round(seconds, 2),
                                                    "produced": [str(portable(str(p), root)) for p in produced],
                                                    "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        echo(f"    done in {seconds:.1f} s")
        ran.append(step.name)
    return ran


def format_plan(decisions: list[tuple[Step, str]]) -> str:
    """The plan as a two-column table: step, and whether it runs or is reused."""
    width = max((len(s.name) for s, _ in decisions), default=4)
    lines = [f"{'step':<{width}}  action"]
    lines += [f"{s.name:<{width}}  {'reuse (complete, settings match)' if a == 'reuse' else 'run'}" for s, a in decisions]
    return "\n".join(lines)
