"""Replace one family of runs in a runs folder by freshly built ones, touching nothing else.

A step that writes runs (zero-shot, a probe sweep, fine-tuning seeds) builds them in its own
staging folder first; only when that has succeeded are the family's old entries in ``runs/``
swapped for the new ones. A family is ``RunKey.family`` (``<model>__<method part>``): its run
folders (``parse_run_id(name).family``) and its ``RunKey.sweep_file``. Anything else in the runs
folder (other models, methods, mitigations such as ``linear+groupdro-sex``, stray files) is
never moved or deleted.

The swap is a few renames recorded in a journal (``<staging>/.publish.json``): first every old
entry moves into ``<staging>/.old/``, then every new entry into ``runs/``. A swap interrupted
between two renames is finished by ``finish_interrupted`` (``cxrfair run`` calls it before
anything else), so the runs folder ends up holding the new family whole; while the build itself
runs, the old family stays untouched.

When the cohort changes, ``move_stale_runs`` moves the runs made on the old one (and their sweep
files) out of the runs and sweeps folders into ``<out>/stale/<old hash>/``, so the steps rebuild
them for the new cohort and ``analyze`` never meets two cohorts; nothing is deleted.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from cxrfair.core.runs import parse_run_id
from cxrfair.errors import CxrfairError
from cxrfair.io import write_json_atomic

JOURNAL = ".publish.json"
STALE = "stale"
STALE_HASH_CHARS = 12  # how much of the old cohort hash names its folder under stale/
FINGERPRINT = ".fingerprint"
_OLD = ".old"


@dataclass(frozen=True)
class Family:
    """The run folders and sweep files one step owns in a runs folder.

    Attributes:
        families: ``RunKey.family`` values, e.g. ``tiny-clip__linear``.
        files: file names owned besides run folders (``RunKey.sweep_file`` of each family).
    """

    families: frozenset[str]
    files: frozenset[str]

    @classmethod
    def of(cls, keys: Iterable) -> "Family":
        """From RunKeys (any tag and seed): every run of their families, and their sweep files."""
        keys = list(keys)
        return cls(frozenset(k.family for k in keys), frozenset(k.sweep_file for k in keys))

    def owns(self, entry: Path) -> bool:
        """True if ``entry`` (in a runs or staging folder) is one of this family's runs or sweep files."""
        if entry.name.startswith("."):
            return False
        if entry.is_dir():
            try:
                return parse_run_id(entry.name).family in self.families
            except CxrfairError:  # not a run id at all: not ours
                return False
        return entry.is_file() and entry.name in self.files

    def entries(self, folder: Path) -> list[Path]:
        """This family's entries in ``folder``, sorted by name (none if the folder is missing)."""
        if not folder.is_dir():
            return []
        return sorted((p for p in folder.iterdir() if self.owns(p)), key=lambda p: p.name)


def open_staging(staging: Path, fingerprint: str) -> Path:
    """The staging folder for a build with ``fingerprint``, emptied if it holds another build's work.

    Work left by an interrupted build of the same settings is kept, so a step that resumes
    (fine-tuning checkpoints) picks it up.
    """
    if (staging / JOURNAL).is_file():
        raise CxrfairError(f"{staging}: an unfinished swap of runs is recorded there; rerun `cxrfair run` to finish it")
    mark = staging / FINGERPRINT
    if staging.exists() and (not mark.is_file() or mark.read_text(encoding="utf-8") != fingerprint):
        shutil.rmtree(staging)
    staging.mkdir(parents=True, exist_ok=True)
    mark.write_text(fingerprint, encoding="utf-8")
    return staging


def publish(staging: Path, runs: Path, family: Family) -> list[Path]:
    """Swap ``family``'s entries in ``runs`` for those built in ``staging``; returns the new paths in ``runs``.

    Raises CxrfairError (and moves nothing) if the staging folder holds none of the family's
    entries.
    """
    new = family.entries(staging)
    if not new:
        raise CxrfairError(f"{staging}: the step wrote no runs of {', '.join(sorted(family.families))}; nothing was replaced")
    write_json_atomic(staging / JOURNAL, {"runs": str(runs), "phase": "out", "names": [p.name for p in new],
                                          "families": sorted(family.families), "files": sorted(family.files)})
    return _finish(staging)


def finish_interrupted(staging_root: Path) -> list[str]:
    """Finish every swap recorded under ``staging_root`` and drop leftovers of finished ones.

    Returns the families whose swap was finished (empty when nothing was pending).
    """
    if not staging_root.is_dir():
        return []
    finished = []
    for journal in sorted(staging_root.glob(f"*/{JOURNAL}")):
        finished += json.loads(journal.read_text(encoding="utf-8"))["families"]
        _finish(journal.parent)
    for trash in staging_root.glob(".*.trash"):
        shutil.rmtree(trash, ignore_errors=True)
    return finished


def _finish(staging: Path) -> list[Path]:
    """Run (or rerun) the journal's phases from where they stopped; every phase is idempotent."""
    journal = json.loads((staging / JOURNAL).read_text(encoding="utf-8"))
    runs = Path(journal["runs"])
    family = Family(frozenset(journal["families"]), frozenset(journal["files"]))
    if journal["phase"] == "out":  # nothing new is in runs/ yet: every family entry there is old
        old = staging / _OLD
        old.mkdir(exist_ok=True)
        for entry in family.entries(runs):
            os.replace(entry, old / entry.name)
        write_json_atomic(staging / JOURNAL, journal | {"phase": "in"})
    runs.mkdir(parents=True, exist_ok=True)
    for entry in family.entries(staging):
        os.replace(entry, runs / entry.name)
    _discard(staging)
    return [runs / name for name in journal["names"]]


def move_stale_runs(out: Path, folders: Iterable[Path], cohort_hash: str) -> list[str]:
    """Move every run made on another cohort than ``cohort_hash`` out of ``folders``; one line per old cohort.

    A run is a folder ``<folder>/<run>/run.json`` or ``<folder>/<sub>/<run>/run.json`` (fine-tuning
    candidates under sweeps/) whose ``cohort_hash`` differs; its family's sweep file beside it
    goes too. Each moves to ``<out>/stale/<old hash[:12]>/`` under its path relative to ``out``
    (a name taken there gets ``.2``, ``.3``, ...). Hidden folders (temporaries, staging) and
    unreadable run.json files are left alone.

    Returns:
        ``moved N run(s) made on cohort <old>… ...`` lines, empty when nothing was stale.
    """
    moved: dict[str, list[Path]] = {}
    for folder in folders:
        for meta in sorted([*folder.glob("*/run.json"), *folder.glob("*/*/run.json")]):
            run = meta.parent
            if any(part.startswith(".") for part in run.relative_to(folder).parts):
                continue
            try:
                other = json.loads(meta.read_text(encoding="utf-8")).get("cohort_hash")
            except (OSError, ValueError, AttributeError):
                continue
            if other is None or other == cohort_hash:
                continue
            entries = [run]
            try:
                sweep = run.parent / parse_run_id(run.name).sweep_file
                entries += [sweep] if sweep.is_file() else []
            except CxrfairError:
                pass
            for entry in entries:
                if entry.exists():  # a sweep file moves with the family's first stale run
                    target = _free_name(out / STALE / str(other)[:STALE_HASH_CHARS] / entry.relative_to(out))
                    target.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(entry, target)
            moved.setdefault(str(other), []).append(run)
    return [f"moved {len(runs)} run(s) made on cohort {old[:STALE_HASH_CHARS]}… (this cohort is "
            f"{cohort_hash[:STALE_HASH_CHARS]}…) from {', '.join(sorted({str(r.parent.relative_to(out)) for r in runs}))} "
            f"to {out / STALE / old[:STALE_HASH_CHARS]}; the steps rebuild them, nothing was deleted"
            for old, runs in moved.items()]


def _free_name(path: Path) -> Path:
    """``path``, or ``path.2``, ``path.3``, ... whichever does not exist yet."""
    n = 1
    candidate = path
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}.{n}")
    return candidate


def _discard(staging: Path) -> None:
    # One rename takes the folder (journal, old runs, work files) out of view; deleting may then
    # be interrupted harmlessly (finish_interrupted removes the rest).
    trash = staging.with_name(f".{staging.name}.trash")
    if trash.exists():
        shutil.rmtree(trash)
    os.replace(staging, trash)
    shutil.rmtree(trash, ignore_errors=True)
