"""The run format: one folder per trained/evaluated model, written by probe and finetune, read by analyze.

A run folder ``RUNS/<run_id>/`` holds

- ``predictions.csv``, one row per val and test image:
  multi-class: ``image_id, patient_id, split, label`` + the attribute columns (``sex, age,
  age_group`` for v1 cohorts) + any other cohort columns, then one ``p_<Class>`` per class in
  class order (rows sum to 1);
  multi-label: ``image_id, patient_id, split`` + the attribute and other cohort columns, then
  ``y_<Condition>`` (1 / 0 / empty = masked) per condition, then ``p_<Condition>`` per condition
  (each in [0, 1], no sum-to-one rule).
- ``run.json``: ``run_id, model, method, seed, classes, cohort_hash, hyperparameters,
  selected_epoch, trainable_params, timings`` plus optional ``task`` (absent = multiclass),
  ``attributes`` (absent = ``V1_ATTRIBUTES``), ``curves, prompt_set, draw, notes, source, created``,
  and ``rows`` (``{split: {"n": rows, "ids_sha256": hash of the sorted image ids}}``, filled in by
  ``write_run`` from the predictions it writes; absent in runs written before it existed).

The folder is written in one rename (``cxrfair.io.atomic_dir``), so a folder that exists is
complete. Readers validate everything and raise ``CxrfairError`` naming the run and the column.
numpy + pandas only.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
import numpy as np
import pandas as pd

from cxrfair.core.mitigations import NAMES
from cxrfair.errors import CxrfairError
from cxrfair.io import atomic_dir, write_json_atomic

METHODS = ("zeroshot", "linear", "mlp", "lora", "full")
# Methods that can be trained few-shot (``RunKey.shots``: K training images per class; probe --shots).
FEWSHOT_METHODS = ("linear", "mlp")
# Methods the fine-tuning stage trains (always with AdamW; their run.json records no `solver`).
FINETUNE_METHODS = ("lora", "full")
# Fairness interventions: the names of the one table, cxrfair.core.mitigations; "erm" is plain training and the default.
MITIGATIONS = NAMES
TASKS = ("multiclass", "multilabel")
# Columns every run has; multi-class runs add "label". Attribute columns come from run.json.
ID_COLUMNS = ("image_id", "patient_id", "split")
# The v1 (multi-class NIH) leading columns, kept in this order when present.
BASE_COLUMNS = ("image_id", "patient_id", "split", "label", "sex", "age", "age_group")
REQUIRED_META = (
    "run_id", "model", "method", "seed", "classes", "cohort_hash",
    "hyperparameters", "selected_epoch", "trainable_params", "timings",
)
SPLITS = ("train", "val", "test")
PROB_PREFIX = "p_"
LABEL_PREFIX = "y_"  # multi-label targets: 1, 0 or empty (masked)
# float32 softmax outputs written as text sum to 1 within ~1e-6; 1e-3 catches real mistakes
# (logits, unnormalised scores, a dropped column) without rejecting rounding.
PROB_SUM_TOL = 1e-3
PREDICTIONS_FILE = "predictions.csv"
META_FILE = "run.json"
TRACKING_DIR = "tracking"  # optional training curves (cxrfair.tracking; --track): not part of the run's identity
# Columns of cohort.csv that are not attributes of the image and so do not travel into runs.
_NON_ATTRIBUTE_COLUMNS = ("path",)
_RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=-]*$")
_STRING_COLUMNS = ("image_id", "split", "label", "sex", "age_group")

# What a run.json without ``attributes`` means: the v1 cohort's sensitive attributes (docs/CONTRACTS.md, "Runs").
V1_ATTRIBUTES = {"sex": {"groups": ["M", "F"], "reference": "M"},
                 "age_group": {"groups": ["young", "old"], "reference": "young"}}


@dataclass(frozen=True)
class Run:
    """One run as read from disk.

    Attributes:
        meta: the contents of run.json.
        predictions: predictions.csv as a DataFrame (validated).
        path: the run folder.
    """

    meta: dict
    predictions: pd.DataFrame
    path: Path

    @property
    def run_id(self) -> str:
        return str(self.meta["run_id"])

    @property
    def model(self) -> str:
        return str(self.meta["model"])

    @property
    def method(self) -> str:
        return str(self.meta["method"])

    @property
    def seed(self) -> int:
        return int(self.meta["seed"])

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    @property
    def task(self) -> str:
        """``multiclass`` (also when run.json has no ``task``) or ``multilabel``."""
        return task_of(self.meta)

    def split(self, name: str) -> pd.DataFrame:
        """The prediction rows of one split (``train``/``val``/``test``), in file order."""
        return self.predictions[self.predictions["split"] == name]

    def arrays(self, split: str = "test") -> tuple[np.ndarray, np.ndarray]:
        """Targets and probabilities of one split, in file order.

        Returns:
            multi-class: y (N,) int index into ``classes``, probs (N, C) float64 (rows sum to 1);
            multi-label: Y (N, C) float64 in {1, 0, NaN} (NaN = masked), probs (N, C) float64.
        """
        return targets_and_probs(self.split(split), self.classes, self.task)


def task_of(meta: dict) -> str:
    """The task a run.json declares; absent means ``multiclass`` (v1 runs)."""
    return str(meta.get("task", "multiclass"))


def label_columns(classes: list[str]) -> list[str]:
    """The multi-label target column names ``y_<Condition>``, in class order."""
    return [f"{LABEL_PREFIX}{c}" for c in classes]


def targets_and_probs(rows: pd.DataFrame, classes: list[str], task: str) -> tuple[np.ndarray, np.ndarray]:
    """(targets, (N, C) probabilities) of prediction rows; targets as in ``Run.arrays``."""
    probs = rows[prob_columns(classes)].to_numpy(dtype=np.float64)
    if task == "multilabel":
        return rows[label_columns(classes)].to_numpy(dtype=np.float64), probs
    index = {c: i for i, c in enumerate(classes)}
    return rows["label"].map(index).to_numpy(dtype=np.int64), probs


@dataclass(frozen=True)
class RunKey:
    """What identifies a run; the one place run ids are built and parsed.

    ``run_id`` is ``<model>__<method>[-k<shots>][+<mitigation>-<sensitive>]__<tag>__s<seed>``; the
    ``-k<shots>`` part is present only for a few-shot probe (trained on ``shots`` images per class),
    the ``+`` part only for a mitigation other than ``erm``. ``family`` (the run id without tag
    and seed) names every run of one sweep, and its ``<family>__sweep.csv`` file, so the sweeps of
    different ``shots`` never share a family.

    Attributes:
        model: registry name, made safe for a folder name (see ``safe_name``).
        method: one of ``METHODS``.
        tag: what else sets the run apart (``best``, a prompt set and draw ``clip-d0``, ``lr0.001``).
        seed: training seed, or the prompt draw for zero-shot.
        mitigation: one of ``MITIGATIONS``.
        sensitive: the attribute a mitigation targets (None for ``erm``).
        shots: few-shot probes: training images per class (``FEWSHOT_METHODS``, erm only); None:
            the whole training split.
    """

    model: str
    method: str
    tag: str
    seed: int
    mitigation: str = "erm"
    sensitive: str | None = None
    shots: int | None = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise CxrfairError(f"method {self.method!r} is unknown; expected one of {', '.join(METHODS)}")
        if self.mitigation not in MITIGATIONS:
            raise CxrfairError(f"mitigation {self.mitigation!r} is unknown; expected one of {', '.join(MITIGATIONS)}")
        if (self.mitigation == "erm") != (self.sensitive is None):
            raise CxrfairError(f"mitigation {self.mitigation!r} with sensitive attribute {self.sensitive!r}: "
                               "a mitigation other than erm needs one sensitive attribute, erm none")
        if self.shots is not None:
            if isinstance(self.shots, bool) or not isinstance(self.shots, int) or self.shots < 1:
                raise CxrfairError(f"shots {self.shots!r}: expected a whole number >= 1 (training images per class)")
            if self.method not in FEWSHOT_METHODS or self.mitigation != "erm":
                raise CxrfairError(f"shots {self.shots}: few-shot runs are {' or '.join(FEWSHOT_METHODS)} probes "
                                   f"without a mitigation, not {self.method_part_plain}+{self.mitigation}")
        for name, value in (("model", self.model), ("tag", self.tag), ("sensitive", self.sensitive or "x")):
            if "__" in value or not _RUN_ID_RE.match(value):
                raise CxrfairError(f"run id part {name} {value!r}: use letters, digits, . _ + = - and no '__'")

    @property
    def method_part_plain(self) -> str:
        """The method and shots without the mitigation: ``linear`` or ``linear-k5``."""
        return self.method if self.shots is None else f"{self.method}-k{self.shots}"

    @property
    def method_part(self) -> str:
        """``linear``, ``linear-k5`` (5-shot) or ``linear+groupdro-sex``."""
        plain = self.method_part_plain
        return plain if self.mitigation == "erm" else f"{plain}+{self.mitigation}-{self.sensitive}"

    @property
    def family(self) -> str:
        """``<model>__<method part>``: every run of one sweep, whatever its tag and seed."""
        return f"{self.model}__{self.method_part}"

    @property
    def run_id(self) -> str:
        return f"{self.family}__{self.tag}__s{self.seed}"

    @property
    def sweep_file(self) -> str:
        """The sweep table of this run's family (a file beside the run folders)."""
        return f"{self.family}__sweep.csv"


_RUN_KEY_RE = re.compile(r"^(?P<model>.+?)__(?P<method>[a-z]+)(-k(?P<shots>[0-9]+))?(\+(?P<mit>[a-z]+)-(?P<sens>[A-Za-z0-9._=-]+?))?"
                         r"__(?P<tag>.+)__s(?P<seed>-?\d+)$")


def parse_run_id(run_id: str) -> RunKey:
    """Inverse of ``RunKey.run_id``; CxrfairError naming the run id when it does not follow the convention."""
    m = _RUN_KEY_RE.match(run_id)
    if not m:
        raise CxrfairError(f"run id {run_id!r} does not follow <model>__<method>[-k<shots>][+<mitigation>-<attr>]__<tag>__s<seed>")
    return RunKey(model=m["model"], method=m["method"], tag=m["tag"], seed=int(m["seed"]),
                  mitigation=m["mit"] or "erm", sensitive=m["sens"], shots=None if m["shots"] is None else int(m["shots"]))


def safe_name(name: str) -> str:
    """A model name made usable inside a run id (letters, digits, ``. _ + = -``; no ``__``)."""
    return re.sub(r"_{2,}", "_", re.sub(r"[^A-Za-z0-9._+=-]", "-", name)).strip("-_") or "model"


def prob_columns(classes: list[str]) -> list[str]:
    """The probability column names for ``classes``, in class order."""
    return [f"{PROB_PREFIX}{c}" for c in classes]


def required_columns(task: str, attributes: dict | None = None) -> list[str]:
    """Columns a predictions table must have besides ``p_``/``y_``: ``ID_COLUMNS``, ``label`` for
    multi-class, and the attribute columns (``attributes``, else ``V1_ATTRIBUTES``)."""
    label = ["label"] if task == "multiclass" else []
    return [*ID_COLUMNS, *label, *(V1_ATTRIBUTES if attributes is None else attributes)]


def make_predictions(rows: pd.DataFrame, probs: np.ndarray, classes: list[str], task: str = "multiclass",
                     attributes: dict | None = None) -> pd.DataFrame:
    """Build a predictions table from cohort rows and predicted probabilities.

    Args:
        rows: cohort rows (cohort.csv columns) of the images that were predicted, usually every
            val and test image; their order is kept. Multi-label rows carry ``y_<Condition>``.
        probs: (N, C) probabilities, row i for ``rows.iloc[i]``, columns in ``classes`` order:
            class probabilities summing to 1 (multi-class) or one probability per condition
            (multi-label).
        classes: the class (condition) names, cohort order.
        task: ``multiclass`` or ``multilabel`` (the cohort's ``task``).
        attributes: the cohort's attribute declaration (``Cohort.attributes``); its columns must
            be present. None: the v1 default (``sex``, ``age_group``).

    Returns:
        DataFrame with the ``BASE_COLUMNS`` that ``rows`` has (in that order), then its other
        columns (``path`` dropped; for multi-label the ``y_`` columns moved to the end), then
        ``p_<Class>`` per class. Raises CxrfairError if columns, shapes or values are wrong.
    """
    _check_task(task, "make_predictions")
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape != (len(rows), len(classes)):
        raise CxrfairError(
            f"make_predictions: probabilities have shape {probs.shape}, expected "
            f"({len(rows)} rows, {len(classes)} classes)"
        )
    targets = label_columns(classes) if task == "multilabel" else []
    missing = [c for c in [*required_columns(task, attributes), *targets] if c not in rows.columns]
    if missing:
        hint = "; for a multi-label cohort pass task='multilabel'" if missing == ["label"] else ""
        raise CxrfairError(f"make_predictions: cohort rows lack column(s) {', '.join(missing)}{hint}")
    lead = [c for c in BASE_COLUMNS if c in rows.columns]
    extra = [c for c in rows.columns if c not in lead and c not in targets and c not in _NON_ATTRIBUTE_COLUMNS
             and not str(c).startswith(PROB_PREFIX)]
    out = rows[lead + extra + targets].reset_index(drop=True).copy()
    out = pd.concat([out, pd.DataFrame(probs, columns=prob_columns(classes))], axis=1)
    validate_predictions(out, classes, where="make_predictions", task=task, attributes=attributes)
    return out


def write_run(runs_dir: Path | str, meta: dict, predictions: pd.DataFrame, force: bool = False) -> Path:
    """Write one run folder ``runs_dir/<run_id>/`` atomically.

    Args:
        runs_dir: the RUNS folder (created if needed).
        meta: run.json contents; must hold ``REQUIRED_META``. ``created`` is filled in if absent.
        predictions: from ``make_predictions`` (validated again here).
        force: replace an existing run folder of the same id.

    Returns:
        The run folder path. Raises CxrfairError on invalid meta/predictions or an existing run
        without ``force``.
    """
    meta = dict(meta)
    meta.setdefault("created", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    where = f"run {meta.get('run_id', '?')}"
    validate_meta(meta, where)
    validate_predictions(predictions, meta["classes"], where, task=task_of(meta), attributes=meta.get("attributes"))
    # Always from the rows written here (a copied run.json's record would describe another file).
    meta["rows"] = row_record(predictions)
    run_dir = Path(runs_dir) / meta["run_id"]
    with atomic_dir(run_dir, force=force, option="run folder", writes=(PREDICTIONS_FILE, META_FILE, "adapter", "model.safetensors", TRACKING_DIR)) as tmp:
        # Full precision (repr) so a reread run gives bit-identical probabilities and ties.
        predictions.to_csv(tmp / PREDICTIONS_FILE, index=False)
        write_json_atomic(tmp / META_FILE, meta)
    return run_dir


def ids_sha256(image_ids) -> str:
    """SHA-256 hex of a set of image ids: sorted, one per line (so row order does not matter)."""
    text = "".join(f"{i}\n" for i in sorted(map(str, image_ids)))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def row_record(predictions: pd.DataFrame) -> dict[str, dict]:
    """run.json ``rows``: ``{split: {"n": row count, "ids_sha256": ids_sha256(its image ids)}}`` per split present."""
    return {str(split): {"n": int(len(ids)), "ids_sha256": ids_sha256(ids)}
            for split, ids in predictions.groupby("split", sort=True)["image_id"]}


def row_problems(run: "Run") -> list[tuple[str, int, int]]:
    """The splits whose rows differ from run.json ``rows``: ``[(split, n recorded, n found)]``.

    Empty when they match, and for a run written before ``rows`` existed (nothing to check).
    """
    recorded = run.meta.get("rows")
    if recorded is None:
        return []
    found = row_record(run.predictions)
    return [(split, int(recorded.get(split, {}).get("n", 0)), int(found.get(split, {}).get("n", 0)))
            for split in sorted(set(recorded) | set(found)) if recorded.get(split) != found.get(split)]


def row_mismatch_message(run: "Run", reference: "Run | None" = None) -> str:
    """One line: which split's rows of ``run``'s predictions.csv differ from its run.json record.

    ``reference``: a run whose rows match what ``run`` records, to name the image ids missing or
    extra (the record holds only a count and a hash).
    """
    parts = []
    for split, n_recorded, n_found in row_problems(run):
        part = f"{n_found} {split} row(s) where run.json records {n_recorded}"
        if reference is not None:
            part += "; " + id_difference(run.split(split)["image_id"], reference.split(split)["image_id"])
        elif n_found == n_recorded:
            part += " but other image ids"
        parts.append(part)
    return (f"run {run.run_id}: {run.path / PREDICTIONS_FILE} holds {', '.join(parts)}: the file was cut or edited "
            "after it was written; rerun the step that wrote it (or restore the file)")


def id_difference(have, want, shown: int = 5) -> str:
    """``missing a, b (n in all); extra c`` between two collections of image ids."""
    have, want = set(map(str, have)), set(map(str, want))
    parts = []
    for name, ids in (("missing", sorted(want - have)), ("extra", sorted(have - want))):
        if ids:
            more = f" … ({len(ids)} in all)" if len(ids) > shown else ""
            parts.append(f"{name} {', '.join(ids[:shown])}{more}")
    return "; ".join(parts) or "same image ids"


def run_is_complete(run_dir: Path | str) -> bool:
    """True if ``run_dir`` holds a readable run.json and a predictions.csv (cheap; no validation)."""
    run_dir = Path(run_dir)
    if not (run_dir / PREDICTIONS_FILE).is_file() or not (run_dir / META_FILE).is_file():
        return False
    try:
        meta = json.loads((run_dir / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and "run_id" in meta


def check_runs_folder(out: Path | str, cohort_hash: str, run_ids: list[str], force: bool) -> None:
    """Refuse, before any work, a runs folder holding another cohort's runs or (without force) these runs.

    Only ``*/run.json`` of visible folders is read (hidden ones are temporaries and work files);
    an unreadable run.json is left for ``read_runs`` to report. Used by every stage that writes
    runs, so ``analyze`` never finds two cohorts in one folder.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CxrfairError(f"--out {out}: exists and is not a folder; pass a runs folder")
    if not out.is_dir():
        return
    for meta_path in sorted(out.glob("*/run.json")):
        if meta_path.parent.name.startswith("."):
            continue
        try:
            other = json.loads(meta_path.read_text(encoding="utf-8")).get("cohort_hash")
        except (OSError, ValueError, AttributeError):
            continue
        if other is not None and other != cohort_hash:
            raise CxrfairError(
                f"--out {out}: run {meta_path.parent.name} was made on cohort {str(other)[:12]}…, this one is "
                f"{cohort_hash[:12]}…; write runs of different cohorts to different folders")
    existing = [r for r in run_ids if (out / r).exists()]
    if existing and not force:
        raise CxrfairError(f"--out {out}: run {existing[0]} already exists ({len(existing)} of {len(run_ids)}); "
                           "pass --force to replace it")


def read_run(run_dir: Path | str, check_rows: bool = True) -> Run:
    """Read and validate one run folder; CxrfairError naming the run and the column otherwise.

    ``check_rows``: refuse predictions whose rows differ from run.json ``rows`` (a cut or edited
    file); ``read_runs`` checks them itself, to name the missing ids from another run.
    """
    run_dir = Path(run_dir)
    where = f"run {run_dir.name} ({run_dir})"
    meta = _read_meta(run_dir, where)
    if meta["run_id"] != run_dir.name:
        raise CxrfairError(
            f"{where}: run.json says run_id '{meta['run_id']}' but the folder is '{run_dir.name}'; "
            "rename the folder back or fix run_id"
        )
    attributes = meta.get("attributes")
    predictions = _read_predictions(run_dir / PREDICTIONS_FILE, where, list(V1_ATTRIBUTES if attributes is None else attributes))
    validate_predictions(predictions, meta["classes"], where, task=task_of(meta), attributes=attributes)
    run = Run(meta=meta, predictions=predictions, path=run_dir)
    if check_rows and row_problems(run):
        raise CxrfairError(row_mismatch_message(run))
    return run


def read_runs(runs_dir: Path | str) -> list[Run]:
    """Read every run folder under ``runs_dir`` (sorted by run_id).

    Hidden folders (atomic-write temporaries) and folders holding neither run file are skipped;
    a folder holding only one of the two files is an error. No runs at all is an error. A run
    whose predictions differ from its run.json ``rows`` is an error naming the file, and the ids
    missing or extra when another run of the folder holds the rows it records.
    """
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise CxrfairError(f"RUNS {runs_dir}: not a folder; pass the folder that probe/finetune wrote runs into")
    runs = []
    for sub in sorted(p for p in runs_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        has = [(sub / f).is_file() for f in (META_FILE, PREDICTIONS_FILE)]
        if not any(has):
            continue
        if not all(has):
            lacking = META_FILE if not has[0] else PREDICTIONS_FILE
            raise CxrfairError(f"run {sub.name} ({sub}): {lacking} is missing; rerun that step or delete the folder")
        runs.append(read_run(sub, check_rows=False))
    for run in runs:
        if row_problems(run):
            raise CxrfairError(row_mismatch_message(run, _holding_recorded_rows(run, runs)))
    if not runs:
        raise CxrfairError(
            f"RUNS {runs_dir}: no runs found (expected <run_id>/{META_FILE} + {PREDICTIONS_FILE}); "
            "run `cxrfair probe` or `cxrfair finetune` first"
        )
    return runs


def _holding_recorded_rows(run: Run, runs: list[Run]) -> Run | None:
    """Another run whose rows are those ``run``'s run.json records, in every split that differs."""
    bad = [split for split, _, _ in row_problems(run)]
    for other in runs:
        found = row_record(other.predictions)
        if other is not run and all(found.get(s) == run.meta["rows"].get(s) for s in bad):
            return other
    return None


def validate_meta(meta: dict, where: str) -> None:
    """Check run.json contents: required keys, run_id usable as a folder name, known method."""
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise CxrfairError(f"{where}: run.json lacks key(s) {', '.join(missing)}")
    if not isinstance(meta["run_id"], str) or not _RUN_ID_RE.match(meta["run_id"]):
        raise CxrfairError(f"{where}: run_id {meta['run_id']!r} is not a usable folder name (letters, digits, . _ + = -)")
    if meta["method"] not in METHODS:
        raise CxrfairError(f"{where}: method {meta['method']!r} is unknown; expected one of {', '.join(METHODS)}")
    _check_task(task_of(meta), f"{where}: run.json")
    # A binary task (one condition, e.g. NIH + NEATX Pneumothorax) is multi-label with C = 1.
    fewest = 2 if task_of(meta) == "multiclass" else 1
    classes = meta["classes"]
    if not isinstance(classes, list) or len(classes) < fewest or len(set(classes)) != len(classes):
        raise CxrfairError(f"{where}: classes must be a list of at least {fewest} distinct name(s), got {classes!r}")
    try:
        int(meta["seed"])
    except (TypeError, ValueError):
        raise CxrfairError(f"{where}: seed {meta['seed']!r} is not an integer") from None
    if "attributes" in meta:
        check_attributes(meta["attributes"], f"{where}: run.json attributes")
    rows = meta.get("rows")
    if rows is not None and not (isinstance(rows, dict) and all(
            isinstance(v, dict) and isinstance(v.get("n"), int) and isinstance(v.get("ids_sha256"), str)
            for v in rows.values())):
        raise CxrfairError(f"{where}: run.json rows must map split -> {{n, ids_sha256}}, got {rows!r}")


def _check_task(task: str, where: str) -> None:
    if task not in TASKS:
        raise CxrfairError(f"{where}: task {task!r} is unknown; expected one of {', '.join(TASKS)}")


def check_attributes(attrs, where: str) -> dict[str, dict]:
    """Check an attribute declaration ``{column: {"groups": [...], "reference": group}}``; returns it."""
    if not isinstance(attrs, dict):
        raise CxrfairError(f"{where} must map column -> {{groups, reference}}, got {type(attrs).__name__}")
    for col, spec in attrs.items():
        groups = spec.get("groups") if isinstance(spec, dict) else None
        if (not isinstance(groups, list) or not groups or len(set(map(str, groups))) != len(groups)
                or spec.get("reference") not in groups):
            raise CxrfairError(f"{where}: {col} needs a list of distinct groups and a reference among them, got {spec!r}")
    return attrs


def validate_predictions(df: pd.DataFrame, classes: list[str], where: str, task: str = "multiclass",
                         attributes: dict | None = None) -> None:
    """Check a predictions table against the run format for its task; CxrfairError naming the column.

    Args:
        df: the table. classes: run.json classes. where: the run, for messages.
        task: ``multiclass`` (``label`` column, rows of p summing to 1) or ``multilabel``
            (``y_<C>`` in {1, 0, empty} and ``p_<C>`` in [0, 1] per condition).
        attributes: run.json ``attributes``; their columns must be present and non-empty
            (None: the v1 default, ``sex`` and ``age_group``).
    """
    required = required_columns(task, attributes)
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise CxrfairError(f"{where}: {PREDICTIONS_FILE} lacks column(s) {', '.join(missing)}")
    _check_prob_columns(df, classes, where)
    for col in [c for c in required if c != "patient_id"]:
        if df[col].isna().any():
            first = df.index[df[col].isna()][0]
            raise CxrfairError(f"{where}: column {col} is empty in row {first}")
    if df["image_id"].duplicated().any():
        dup = df["image_id"][df["image_id"].duplicated()].iloc[0]
        raise CxrfairError(f"{where}: column image_id repeats {dup!r}; one row per image")
    _check_values(df, "split", SPLITS, where)
    if task == "multilabel":
        _check_targets(df, classes, where)
    else:
        _check_values(df, "label", classes, where)
    _check_probabilities(df, classes, where, sum_to_one=task == "multiclass")


def _check_targets(df: pd.DataFrame, classes: list[str], where: str) -> None:
    """Multi-label targets: one ``y_<C>`` per condition, each 1, 0 or empty."""
    want = label_columns(classes)
    unknown = [c for c in df.columns if str(c).startswith(LABEL_PREFIX) and c not in want]
    if unknown:
        raise CxrfairError(f"{where}: column(s) {', '.join(unknown)} name condition(s) not in run.json classes {classes}")
    lacking = [c for c in want if c not in df.columns]
    if lacking:
        raise CxrfairError(f"{where}: {PREDICTIONS_FILE} lacks target column(s) {', '.join(lacking)} (multi-label runs "
                           "carry the cohort's y_<Condition> columns)")
    for col in want:
        values = pd.to_numeric(df[col], errors="coerce")
        bad = (values.isna() & df[col].notna()) | ~(values.isna() | values.isin((0, 1)))
        if bad.any():
            shown = sorted(set(df.loc[bad, col].astype(str)))[:5]
            raise CxrfairError(f"{where}: column {col} has value(s) {shown}; multi-label targets are 1, 0 or empty "
                               "(masked)")


def _check_prob_columns(df: pd.DataFrame, classes: list[str], where: str) -> None:
    have = [c for c in df.columns if str(c).startswith(PROB_PREFIX)]
    want = prob_columns(classes)
    unknown = [c for c in have if c not in want]
    if unknown:
        raise CxrfairError(
            f"{where}: column(s) {', '.join(unknown)} name class(es) not in run.json classes {classes}"
        )
    lacking = [c for c in want if c not in have]
    if lacking:
        raise CxrfairError(f"{where}: {PREDICTIONS_FILE} lacks probability column(s) {', '.join(lacking)}")


def _check_values(df: pd.DataFrame, col: str, allowed, where: str) -> None:
    bad = ~df[col].astype(str).isin([str(a) for a in allowed])
    if bad.any():
        values = sorted(set(df.loc[bad, col].astype(str)))[:5]
        raise CxrfairError(f"{where}: column {col} has unknown value(s) {values}; expected one of {list(allowed)}")


def _check_probabilities(df: pd.DataFrame, classes: list[str], where: str, sum_to_one: bool = True) -> None:
    cols = prob_columns(classes)
    for col in cols:
        if not pd.api.types.is_numeric_dtype(df[col]):
            raise CxrfairError(f"{where}: column {col} is not numeric")
    p = df[cols].to_numpy(dtype=np.float64)
    bad_cell = ~np.isfinite(p) | (p < -PROB_SUM_TOL) | (p > 1 + PROB_SUM_TOL)
    if bad_cell.any():
        r, c = np.argwhere(bad_cell)[0]
        raise CxrfairError(
            f"{where}: column {cols[c]} has {float(p[r, c])} for image {df['image_id'].iloc[r]} "
            "(probabilities must be finite and in [0, 1])"
        )
    if not sum_to_one:  # multi-label: each condition its own probability
        return
    sums = p.sum(axis=1)
    off = np.abs(sums - 1) > PROB_SUM_TOL
    if off.any():
        r = int(np.flatnonzero(off)[0])
        raise CxrfairError(
            f"{where}: columns {cols[0]}..{cols[-1]} sum to {sums[r]:.6g} for image "
            f"{df['image_id'].iloc[r]} ({int(off.sum())} row(s) off); probabilities must sum to 1 "
            "(apply softmax)"
        )


def _read_meta(run_dir: Path, where: str) -> dict:
    path = run_dir / META_FILE
    if not path.is_file():
        raise CxrfairError(f"{where}: {META_FILE} is missing")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise CxrfairError(f"{where}: {META_FILE} is not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise CxrfairError(f"{where}: {META_FILE} must hold a JSON object")
    validate_meta(meta, where)
    return meta


def _read_predictions(path: Path, where: str, attribute_columns: list[str]) -> pd.DataFrame:
    if not path.is_file():
        raise CxrfairError(f"{where}: {PREDICTIONS_FILE} is missing")
    try:
        # Identifiers and group labels stay strings (an image id or a group "1" must not become int).
        df = pd.read_csv(path, dtype={c: str for c in (*_STRING_COLUMNS, *attribute_columns)})
    except (ValueError, pd.errors.ParserError) as e:
        raise CxrfairError(f"{where}: {PREDICTIONS_FILE} cannot be parsed ({e})") from None
    return df


def run_attributes(run: Run) -> dict[str, dict]:
    """The run's sensitive attributes ``{column: {"groups": [...], "reference": group}}``.

    From run.json ``attributes`` when present, else ``V1_ATTRIBUTES``; CxrfairError naming the
    run and the attribute when the mapping is malformed.
    """
    return check_attributes(run.meta.get("attributes", V1_ATTRIBUTES), f"run {run.run_id}: run.json attributes")


def runs_table(runs: list[Run]) -> pd.DataFrame:
    """One row per run: ``run_id, model, method, seed``."""
    return pd.DataFrame(
        [{"run_id": r.run_id, "model": r.model, "method": r.method, "seed": r.seed} for r in runs],
        columns=["run_id", "model", "method", "seed"],
    )
