"""The cohort folder format (docs/CONTRACTS.md, "Cohort"): columns, hash, counts, load.

``cohort.csv`` holds one row per image; ``cohort.json`` the classes, task, attributes, rules,
counts and a content hash. Version 1 folders (multi-class NIH cohorts written before datasets
and attributes became data) load unchanged: every new key has a v1 default.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cxrfair.errors import CxrfairError

FORMAT = "cxrfair-cohort"
VERSION = 2  # written; load_cohort reads 1 and 2
READ_VERSIONS = (1, 2)
COLUMNS = ["image_id", "path", "patient_id", "label", "sex", "age", "age_group", "split"]  # multi-class
ML_COLUMNS = ["image_id", "path", "patient_id", "sex", "age", "age_group", "split"]  # multi-label (+ y_ last)
HASH_COLUMNS = ["image_id", "patient_id", "label", "sex", "age", "age_group", "split"]
SPLITS = ("train", "val", "test")
SEXES = ("M", "F")
AGE_GROUPS = ("young", "old")
# Group order used in tables and cohort.json: young male, young female, old male, old female.
GROUPS = tuple(f"{a}_{s}" for a in AGE_GROUPS for s in SEXES)
EXTRA_ORDER = ("view", "study_id", "study_date", "race", "drain", "patient_key", "text")  # extras come in this order
# ``text``: one free-text report or caption per image (str; "" = none), for contrastive image-text
# training. Like every column but ``path`` it enters the v2 hash, so the same images with other
# reports are another cohort; a cohort without it keeps the hash it always had.
INT_COLUMNS = ("patient_id", "age", "study_id")
FLAGS = {"1": 1.0, "0": 0.0, "": np.nan}  # y_ and drain cells as written -> float
NEEDS_QUOTES = re.compile(r'[,"\r\n]')
DEFAULT_ATTRIBUTES = {"sex": {"groups": list(SEXES), "reference": "M"},
                      "age_group": {"groups": list(AGE_GROUPS), "reference": "young"}}


def is_flag_column(name: str) -> bool:
    """Columns holding 1 / 0 / empty (float 1.0 / 0.0 / NaN in memory)."""
    return name.startswith("y_") or name == "drain"


# --------------------------------------------------------------------------------------------
# The cohort object


@dataclass(frozen=True, eq=False)
class Cohort:
    """A built or loaded cohort. ``table``: cohort.csv rows; ``meta``: cohort.json.

    ``table`` dtypes: ``patient_id``, ``age`` (and ``study_id``) int64; ``y_<C>`` and ``drain``
    float64 1.0 / 0.0 / NaN; everything else str.
    """

    table: pd.DataFrame
    meta: dict
    folder: Path | None = None

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    @property
    def hash(self) -> str:
        return self.meta["hash"]

    @property
    def task(self) -> str:
        """``multiclass`` (a ``label`` per image) or ``multilabel`` (a ``y_<C>`` per condition)."""
        return self.meta.get("task", "multiclass")

    @property
    def dataset(self) -> str:
        return self.meta.get("dataset", "nih")

    @property
    def attributes(self) -> dict[str, dict]:
        """Sensitive attributes in order: ``{column: {"groups": [...], "reference": group}}``."""
        return self.meta.get("attributes", DEFAULT_ATTRIBUTES)

    def targets(self) -> np.ndarray:
        """(N,) int64 class index (multiclass) or (N, C) float32 in {0, 1, NaN} (multilabel; NaN = masked)."""
        if self.task == "multilabel":
            return self.table[[f"y_{c}" for c in self.classes]].to_numpy(dtype=np.float32)
        return self.table["label"].map({c: i for i, c in enumerate(self.classes)}).to_numpy(dtype=np.int64)

    def image_paths(self, images_root: Path | str | None = None) -> list[Path]:
        """Absolute image paths; ``images_root`` overrides the root recorded in cohort.json."""
        root = images_root if images_root is not None else self.meta.get("images_root")
        if root is None:
            raise CxrfairError(f"cohort {self.folder}: built without --images, so it has no images root; "
                               "pass the images folder (images_root)")
        root = Path(root).resolve()
        return [root / p for p in self.table["path"]]


# --------------------------------------------------------------------------------------------
# Hash


def uses_v1_hash(task: str, attributes: dict, columns) -> bool:
    """The v1 hash applies to multi-class cohorts comparing exactly sex and age_group with no
    extra column but ``view`` (so the NIH 6x200 cohort keeps its hash)."""
    extras = set(columns) - set(COLUMNS)
    return task == "multiclass" and list(attributes) == ["sex", "age_group"] and extras <= {"view"}


def cohort_hash(table: pd.DataFrame, classes: list[str], task: str = "multiclass",
                attributes: dict | None = None, texts: dict[str, list[str]] | None = None) -> str:
    """SHA-256 of the cohort's content, not of where the images lie.

    v1 rule (``uses_v1_hash``): ``classes:<c1>|<c2>|...\\n`` then one
    ``image_id,patient_id,label,sex,age,age_group,split\\n`` line per row. Otherwise the classes
    line, ``task:<task>\\n``, then for every cohort.csv column but ``path``, in file order,
    ``column:<name>\\n`` and the column's cells as cohort.csv holds them (unquoted) joined by
    ``\\x1f``, then ``\\n`` (column-wise, so hashing 400k rows takes a fraction of a second).
    ``texts``: the columns' ``cell_texts`` if already computed (the writer needs them too).
    """
    attributes = DEFAULT_ATTRIBUTES if attributes is None else attributes
    h = hashlib.sha256(("classes:" + "|".join(classes) + "\n").encode())
    if uses_v1_hash(task, attributes, table.columns):
        cols = [table[c].astype("int64").tolist() if c in ("patient_id", "age") else table[c].astype(str).tolist()
                for c in HASH_COLUMNS]
        h.update("".join(",".join(map(str, row)) + "\n" for row in zip(*cols)).encode())
        return h.hexdigest()
    h.update(f"task:{task}\n".encode())
    for c in (c for c in table.columns if c != "path"):
        h.update(f"column:{c}\n".encode())
        h.update(("\x1f".join(texts[c] if texts else cell_texts(table[c])) + "\n").encode())
    return h.hexdigest()


def cell_texts(col: pd.Series) -> list[str]:
    """A column's cells as cohort.csv writes them (flag columns 1 / 0 / empty, ints in decimal)."""
    if is_flag_column(str(col.name)):
        v = col.to_numpy(dtype=float)
        return np.where(np.isnan(v), "", np.where(v == 1, "1", "0")).tolist()
    if col.dtype.kind in "iu":
        return col.astype(str).tolist()
    values = col.tolist()
    return values if pd.api.types.is_string_dtype(col) and all(type(v) is str for v in values[:1]) else [str(v) for v in values]


def csv_text(table: pd.DataFrame, texts: dict[str, list[str]] | None = None) -> str:
    """cohort.csv as text: header + rows, ``\\n`` line ends, fields quoted only where a comma, quote or
    line break needs it (what ``DataFrame.to_csv`` writes, several times faster on 400k rows)."""
    header = ",".join(_csv_field(str(c)) for c in table.columns)
    cells = [_quote_column(texts[c] if texts else cell_texts(table[c])) for c in table.columns]
    return "\n".join([header] + [",".join(row) for row in zip(*cells)]) + "\n"


def _csv_field(v: str) -> str:
    return '"' + v.replace('"', '""') + '"' if NEEDS_QUOTES.search(v) else v


def _quote_column(values: list[str]) -> list[str]:
    if not NEEDS_QUOTES.search("".join(values)):  # the common case: nothing to quote
        return values
    return [_csv_field(v) for v in values]


# --------------------------------------------------------------------------------------------
# Counts


def count_composition(table: pd.DataFrame, classes: list[str], groups: tuple[str, ...] = GROUPS) -> dict:
    """Counts for a multi-class cohort.json: totals, per split, per label x split and per label x group x split."""
    group = table["age_group"] + "_" + table["sex"]
    return {
        **_totals(table),
        "label_split": {c: _by_split(table[table["label"] == c]) for c in classes},
        "label_group_split": {c: {g: _by_split(table[(table["label"] == c) & (group == g)]) for g in groups}
                              for c in classes},
    }


def count_multilabel(table: pd.DataFrame, classes: list[str], attributes: dict) -> dict:
    """Counts for a multi-label cohort.json: totals, positives / negatives / masked per condition x
    split, images per attribute group x split."""
    masks = _split_masks(table)

    def labels(c: str) -> dict:
        y = table[f"y_{c}"].to_numpy(dtype=float)
        return {s: {"positive": int((y[m] == 1).sum()), "negative": int((y[m] == 0).sum()),
                    "masked": int(np.isnan(y[m]).sum())} for s, m in masks.items()}

    def groups(a: str, spec: dict) -> dict:
        code = pd.Index(spec["groups"]).get_indexer(table[a].to_numpy(dtype=object))
        return {g: {s: int((code[m] == k).sum()) for s, m in masks.items()} for k, g in enumerate(spec["groups"])}

    return {**_totals(table), "condition_split": {c: labels(c) for c in classes},
            "attribute_split": {a: groups(a, spec) for a, spec in attributes.items()}}


def _split_masks(table: pd.DataFrame) -> dict[str, np.ndarray]:
    split = table["split"].to_numpy(dtype=object)
    return {s: split == s for s in SPLITS}


def _by_split(rows: pd.DataFrame) -> dict:
    return {s: int(m.sum()) for s, m in _split_masks(rows).items()}


def _totals(table: pd.DataFrame) -> dict:
    pid = table["patient_id"].to_numpy()
    return {"images": int(len(table)), "patients": int(len(np.unique(pid))), "split": _by_split(table),
            "patients_per_split": {s: int(len(np.unique(pid[m]))) for s, m in _split_masks(table).items()}}


def composition_table(cohort: Cohort) -> str:
    """Plain-text summary: label x group (multi-class) or condition and attribute group (multi-label)
    rows, columns train / val / test / total."""
    if cohort.task == "multilabel":
        return _multilabel_table(cohort)
    counts = cohort.meta["counts"]["label_group_split"]
    groups = cohort.meta.get("parameters", {}).get("groups") or list(GROUPS)
    head = f"{'label':<16}{'group':<10}" + "".join(f"{s:>7}" for s in SPLITS) + f"{'total':>7}"
    lines = [head, "-" * len(head)]
    for c in cohort.classes:
        for g in groups:
            n = [counts[c][g][s] for s in SPLITS]
            lines.append(f"{c:<16}{g:<10}" + "".join(f"{x:>7}" for x in n) + f"{sum(n):>7}")
    tot = [cohort.meta["counts"]["split"][s] for s in SPLITS]
    lines += ["-" * len(head), f"{'all':<26}" + "".join(f"{x:>7}" for x in tot) + f"{sum(tot):>7}"]
    return "\n".join(lines)


def _multilabel_table(cohort: Cohort) -> str:
    counts = cohort.meta["counts"]
    w = 20
    head = f"{'':<30}" + "".join(f"{s:>{w}}" for s in SPLITS)
    lines = [head, f"{'condition (positive/negative/masked)':<30}", "-" * len(head)]
    for c, per in counts["condition_split"].items():
        lines.append(f"{c:<30}" + "".join(f"{'/'.join(str(per[s][k]) for k in ('positive', 'negative', 'masked')):>{w}}"
                                         for s in SPLITS))
    lines += ["-" * len(head)]
    for a, groups in counts["attribute_split"].items():
        for g, per in groups.items():
            lines.append(f"{a + ' ' + g:<30}" + "".join(f"{per[s]:>{w}}" for s in SPLITS))
    lines += ["-" * len(head), f"{'images (patients)':<30}" + "".join(
        f"{str(counts['split'][s]) + ' (' + str(counts['patients_per_split'][s]) + ')':>{w}}" for s in SPLITS)]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Writing and loading


def write_cohort_files(folder: Path, table: pd.DataFrame, meta: dict, texts: dict[str, list[str]] | None = None) -> None:
    """cohort.csv + cohort.json into ``folder`` (the caller's temporary folder)."""
    (folder / "cohort.csv").write_text(csv_text(table, texts), encoding="utf-8")
    (folder / "cohort.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def load_cohort(folder: Path | str) -> Cohort:
    """Read ``folder/cohort.csv`` + ``cohort.json`` (version 1 or 2) and check them against each other.

    Raises:
        CxrfairError naming the file and the problem (missing, foreign format, columns, values,
        hash mismatch).
    """
    folder = Path(folder)
    meta = _load_json(folder / "cohort.json")
    cohort = Cohort(table=pd.DataFrame(), meta=meta, folder=folder)
    table = _load_csv(folder / "cohort.csv", cohort)
    if cohort_hash(table, meta["classes"], cohort.task, cohort.attributes) != meta["hash"]:
        raise CxrfairError(f"cohort {folder / 'cohort.csv'}: content does not match the hash in cohort.json "
                           "(edited or mixed up?); rebuild with `cxrfair cohort build`")
    return Cohort(table=table, meta=meta, folder=folder)


def _load_json(path: Path) -> dict:
    if not path.is_file():
        raise CxrfairError(f"cohort {path}: not found; build the cohort with `cxrfair cohort build --out {path.parent}`")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CxrfairError(f"cohort {path}: not valid JSON ({e}); rebuild the cohort") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CxrfairError(f"cohort {path}: not a cxrfair cohort file (format != {FORMAT!r}); rebuild the cohort")
    if meta.get("version") not in READ_VERSIONS:
        raise CxrfairError(f"cohort {path}: version {meta.get('version')!r}, this cxrfair reads "
                           f"{', '.join(map(str, READ_VERSIONS))}; rebuild the cohort")
    missing = [k for k in ("classes", "hash", "counts") if k not in meta]
    if missing:
        raise CxrfairError(f"cohort {path}: missing field(s) {', '.join(missing)}; rebuild the cohort")
    if meta.get("task", "multiclass") not in ("multiclass", "multilabel"):
        raise CxrfairError(f"cohort {path}: unknown task {meta.get('task')!r}; rebuild the cohort")
    return meta


def _load_csv(path: Path, cohort: Cohort) -> pd.DataFrame:
    if not path.is_file():
        raise CxrfairError(f"cohort {path}: not found; rebuild the cohort")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise CxrfairError(f"cohort {path}: not a readable CSV ({e}); rebuild the cohort") from None
    _check_columns(path, table, cohort)
    for col in (c for c in INT_COLUMNS if c in table.columns):
        num = pd.to_numeric(table[col], errors="coerce")
        if num.isna().any():
            raise CxrfairError(f"cohort {path}: column '{col}' has non-integer values; rebuild the cohort")
        table[col] = num.astype("int64")
    allowed = {"sex": set(SEXES), "split": set(SPLITS),
               **{a: set(spec["groups"]) for a, spec in cohort.attributes.items()}}
    if cohort.task == "multiclass":
        allowed["label"] = set(cohort.classes)
    for col in (c for c in table.columns if is_flag_column(c)):
        allowed[col] = set(FLAGS)
    for col, ok in allowed.items():
        bad = sorted(set(table[col]) - ok)
        if bad:
            raise CxrfairError(f"cohort {path}: column '{col}' has unexpected value(s) {bad[:5]}; allowed {sorted(ok)}")
    for col in (c for c in table.columns if is_flag_column(c)):
        table[col] = table[col].map(FLAGS).astype(float)
    return table


def _check_columns(path: Path, table: pd.DataFrame, cohort: Cohort) -> None:
    first = COLUMNS if cohort.task == "multiclass" else ML_COLUMNS
    if list(table.columns[: len(first)]) != first:
        raise CxrfairError(f"cohort {path}: columns {list(table.columns)}; expected {', '.join(first)} first")
    if cohort.task == "multilabel":
        ys = [f"y_{c}" for c in cohort.classes]
        if list(table.columns[-len(ys):]) != ys or sum(c.startswith("y_") for c in table.columns) != len(ys):
            raise CxrfairError(f"cohort {path}: expected the target columns {', '.join(ys)} last, one per class")
    missing = [a for a in cohort.attributes if a not in table.columns]
    if missing:
        raise CxrfairError(f"cohort {path}: attribute column(s) {', '.join(missing)} listed in cohort.json are missing")
