"""What every dataset reader shares: the standard table, the user's file options, and strict parsers.

A reader turns the user's own files into a ``DatasetTable``: one row per image with the standard
columns below, so that filtering, sampling, age binning and splitting (``cxrfair.extract.cohort``)
never look at a dataset's own layout.

Standard columns (``DatasetTable.table``):

===============  ===========================================================================
image_id         str, unique (NIH ``Image Index``, CheXpert path below the release folder,
                 MIMIC ``dicom_id``)
path             str, the image's path relative to the images root (``--images``)
patient_id       int64
sex              ``M`` / ``F``, or ``""`` when the file says unknown
age              float64 whole years, NaN when unknown
frontal          bool (AP/PA); lateral views are dropped unless ``--all-views``
view             str as in the file (``PA``, ``AP``, ``LATERAL``, ...)
study_id         int64 (MIMIC only), study_date ISO ``YYYY-MM-DD`` (MIMIC only)
race             group name (``White``/``Black``/``Asian``), ``other`` (a known code outside
                 those groups) or ``""`` (unknown / not given); only with race data
drain            float64 1/0/NaN (NIH + NEATX only)
official_split   ``train``/``val``/``test`` or ``""`` (NIH lists, MIMIC split file, csv)
label            the single finding of a single-label image, else ``""`` (multi-class source)
text             str, the image's free-text report or caption, ``""`` if none (MIMIC with
                 ``--reports``, csv with ``text=``); only when the reader was given text
<finding>        one float32 column per finding: 1, 0, -1 (uncertain) or NaN (blank), as read
===============  ===========================================================================

Every parser here raises ``CxrfairError`` naming the file, the column, the value and the first
line it occurs on, because a researcher fixes data row by row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np
import pandas as pd

from cxrfair.errors import CxrfairError

MAX_AGE = 120  # older is a data-entry error (the NIH 2017 release had ages such as 413)
SEX_CODES = {"M": "M", "F": "F", "MALE": "M", "FEMALE": "F"}
SEX_UNKNOWN = {"", "UNKNOWN", "U"}  # CheXpert writes "Unknown" for one image
RACE_GROUPS = ("White", "Black", "Asian")  # the groups the race maps produce (Sourget et al.)
FINDING_CODES = {"1": 1.0, "1.0": 1.0, "0": 0.0, "0.0": 0.0, "-1": -1.0, "-1.0": -1.0, "": np.nan}
SPLIT_CODES = {"train": "train", "val": "val", "valid": "val", "validate": "val", "validation": "val", "test": "test"}


KINDS = ("file", "folder", "pairs", "list")


@dataclass(frozen=True)
class Option:
    """One of the user's files or settings a reader reads, declared by that reader (``METADATA``,
    ``OPTIONS``). ``cxrfair cohort build`` makes its CLI option from it, ``CohortConfig`` and the
    pipeline's ``[cohort]`` table their keys, and the pipeline hashes the files it names.
    """

    key: str  # keyword and [cohort] key ("official_split"); the CLI option is --official-split
    kind: str  # file | folder (a path) | pairs (KEY=COLUMN,...; a TOML table) | list (A,B,...; a TOML array)
    help: str  # what to pass, for --help ("DIR with test_list.txt, train_val_list.txt")
    files: tuple[str, ...] = ()  # folder: the files read inside it (a .csv may also be .csv.gz)
    required: bool = False  # the reader cannot do without it
    default: Callable[[], Path] | None = None  # the file used when none is given (NIH: the vendored metadata)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Option {self.key}: kind {self.kind!r} is not one of {KINDS}")

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")

    @property
    def is_path(self) -> bool:
        return self.kind in ("file", "folder")

    def parse(self, value: object) -> object:
        """A given value in this option's form: a Path, ``((key, column), ...)`` or ``(name, ...)``;
        text (the CLI's) is parsed, a mapping (TOML's) becomes pairs. None / empty = not given."""
        if value is None or (not isinstance(value, Path) and not value):
            return None
        if self.is_path:
            return Path(value)
        if self.kind == "pairs":
            return parse_pairs(value, self.flag) if isinstance(value, str) else tuple(
                (str(k), str(v)) for k, v in (value.items() if isinstance(value, Mapping) else value))
        return parse_names(value) if isinstance(value, str) else tuple(value)


def parse_names(text: str) -> tuple[str, ...]:
    """``"Edema, Effusion"`` -> ``("Edema", "Effusion")``."""
    return tuple(x.strip() for x in text.split(",") if x.strip())


def parse_pairs(text: str, flag: str = "--columns") -> tuple[tuple[str, str], ...]:
    """``"path=Path,sex=Sex"`` -> ``(("path", "Path"), ("sex", "Sex"))``; CxrfairError naming ``flag``."""
    pairs = []
    for item in parse_names(text):
        key, eq, column = item.partition("=")
        if not eq or not key.strip() or not column.strip():
            raise CxrfairError(f"{flag}: '{item}' is not key=COLUMN; e.g. {flag} path=Path,patient=PatientID,sex=Sex,age=Age")
        pairs.append((key.strip(), column.strip()))
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise CxrfairError(f"{flag}: '{next(k for k in keys if keys.count(k) > 1)}' given twice")
    return tuple(pairs)


class Sources:
    """The user's files and reader options: ``metadata`` and, by ``Option.key``, the options
    given (``Sources(metadata=p, drains=q)``); ``get(key)`` is None for one not given."""

    def __init__(self, metadata: Path | str | None = None, **options: object) -> None:
        self.metadata = Path(metadata) if metadata is not None else None
        self._given = {k: v for k, v in options.items() if v is not None and (isinstance(v, Path) or v)}

    def get(self, key: str, default: object = None) -> object:
        return self._given.get(key, default)

    def given(self) -> dict[str, object]:
        """The options that were set, by key (``metadata`` not included)."""
        return dict(self._given)

    def __repr__(self) -> str:
        return f"Sources(metadata={self.metadata!r}, {self._given!r})"


@dataclass(frozen=True)
class DatasetTable:
    """A reader's output: the standard table plus where it came from."""

    dataset: str  # reader name
    table: pd.DataFrame  # standard columns (module docstring), one row per image
    findings: tuple[str, ...]  # finding columns of ``table``, in the file's order
    files: tuple[tuple[str, Path], ...]  # (role, path) of every file read; role "metadata" first
    label_file: Path  # the file holding the findings (named in errors about them)
    notes: dict[str, int] = field(default_factory=dict)  # counts worth recording in cohort.json (images set aside, ...)

    @property
    def metadata(self) -> Path:
        return self.files[0][1]

    def has(self, column: str) -> bool:
        """Whether the data carries ``column`` with at least one known value."""
        if column not in self.table.columns:
            return False
        col = self.table[column]
        return bool(col.notna().any()) if col.dtype.kind == "f" else bool((col != "").any())


# --------------------------------------------------------------------------------------------
# Reading files


def check_file(path: Path | None, what: str, option: str, hint: str) -> Path:
    """``path`` as a Path if it is a file; CxrfairError naming the option otherwise."""
    if path is None:
        raise CxrfairError(f"{option}: not given; {hint}")
    path = Path(path)
    if not path.is_file():
        raise CxrfairError(f"{what} {path}: file not found (or not a file); {hint}")
    return path


def read_csv(path: Path, what: str, hint: str, usecols: Iterable[str] | None = None,
             ints: Iterable[str] = ()) -> pd.DataFrame:
    """All columns as str (``""`` for blanks), gzip by extension; one-line errors.

    ``usecols`` reads only those columns (faster on wide files); missing ones are named.
    ``ints`` are read as int64 when every value is an integer (a third faster on MIMIC's 377k
    rows); if one is not, the file is read again as text so the caller's parser names the value.
    Drops the empty trailing column of files whose lines end in a comma (NIH 2017 release).
    """
    try:
        header = pd.read_csv(path, nrows=0, compression="infer").columns
        if usecols is not None:
            require_columns(header, path, what, list(usecols), hint)
        raw = _read(path, usecols, {c: "int64" for c in ints if c in header}, header)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError, EOFError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CxrfairError(f"{what} {path}: not a readable CSV ({reason}); {hint}") from None
    empty = [c for c in raw.columns if str(c).startswith("Unnamed:") and (raw[c] == "").all()]
    return raw.drop(columns=empty)


def _read(path: Path, usecols, ints: dict[str, str], header) -> pd.DataFrame:
    kw = dict(keep_default_na=False, na_filter=False, compression="infer", usecols=list(usecols) if usecols is not None else None)
    if ints:
        try:
            return pd.read_csv(path, dtype={**{c: str for c in header}, **ints}, **kw)
        except (ValueError, OverflowError):
            pass  # a non-integer somewhere: text, so the parser can say where
    return pd.read_csv(path, dtype=str, **kw)


def require_columns(columns: Iterable[str], path: Path, what: str, needed: list[str], hint: str) -> None:
    missing = [c for c in needed if c not in set(columns)]
    if missing:
        raise CxrfairError(f"{what} {path}: missing column(s) {', '.join(repr(c) for c in missing)}; {hint}")


def read_list(path: Path, what: str) -> list[str]:
    """Non-empty stripped lines of a text file (NIH ``test_list.txt``)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CxrfairError(f"{what} {path}: cannot read ({e}); pass the file from the NIH download") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------
# Parsing columns (values are str, as read)


def strip(col: pd.Series) -> pd.Series:
    """``col.str.strip()`` as an object Series (pandas' string methods are several times slower)."""
    return pd.Series([v.strip() for v in col.tolist()], index=col.index, dtype=object, name=col.name)


def map_unique(col: pd.Series, f: Callable[[str], object]) -> np.ndarray:
    """``col.map(f)`` computed once per distinct value (metadata columns repeat a lot). Object array."""
    codes, uniques = pd.factorize(col, use_na_sentinel=False)
    return np.array([f(u) for u in uniques.tolist()] + [None], dtype=object)[codes]


@dataclass(frozen=True)
class Where:
    """A file being parsed, for error messages: its label, path, and an id column to show."""

    what: str  # "metadata", "demographics", ...
    path: Path
    ids: pd.Series | None = None  # per-row id shown in messages (image or patient), aligned with the column
    id_name: str = "image"
    lines: np.ndarray | None = None  # (N,) file line of each row; None = row index + 2 (header on line 1)

    def rows(self, bad: np.ndarray) -> str:
        """'3 rows, first on line 12 (image X)' for an error message."""
        idx = int(np.flatnonzero(bad)[0])
        line = int(self.lines[idx]) if self.lines is not None else idx + 2
        n = int(np.count_nonzero(bad))
        ident = f" ({self.id_name} {self.ids.iloc[idx] or '?'})" if self.ids is not None else ""
        return f"{n} row{'s' if n > 1 else ''}, first on line {line}{ident}"

    def fail(self, column: str, problem: str, bad: np.ndarray, fix: str = "fix or remove those rows") -> CxrfairError:
        return CxrfairError(f"{self.what} {self.path}: column '{column}' {problem} in {self.rows(bad)}; {fix}")


def parse_age(col: pd.Series, column: str, where: Where, suffix: str = "Y") -> np.ndarray:
    """Whole years as float64 (NaN for blank). Accepts ``58``, ``58.0`` and ``058Y``; else CxrfairError."""
    text = map_unique(col, lambda v: v.strip().upper().removesuffix(suffix))
    num = pd.to_numeric(pd.Series(text, index=col.index), errors="coerce").to_numpy(dtype=float)
    blank = (text == "")
    bad = (np.isnan(num) & ~blank) | (~np.isnan(num) & (num != np.floor(num)))
    if bad.any():
        raise where.fail(column, f"has an age that cannot be parsed '{col.iloc[int(np.flatnonzero(bad)[0])]}' "
                                 "(expected whole years such as 58)", bad)
    out_of_range = ~np.isnan(num) & ((num < 0) | (num > MAX_AGE))
    if out_of_range.any():
        raise where.fail(column, f"has an impossible age '{col.iloc[int(np.flatnonzero(out_of_range)[0])]}' "
                                 f"(allowed 0-{MAX_AGE})", out_of_range)
    return num


def parse_int(col: pd.Series, column: str, where: Where, lo: int = 0) -> np.ndarray:
    """A required integer id column as int64; blanks, text and values below ``lo`` are errors."""
    try:  # the fast path for clean files; anything odd goes through the checks below for a message
        fast = col.astype("int64").to_numpy()
        if len(fast) == 0 or fast.min() >= lo:
            return fast
    except (ValueError, TypeError, OverflowError):
        pass
    num = pd.to_numeric(col, errors="coerce").to_numpy(dtype=float)
    bad = np.isnan(num) | (num != np.floor(num)) | (num < lo)
    if bad.any():
        raise where.fail(column, f"has a value '{col.iloc[int(np.flatnonzero(bad)[0])]}' that is not an integer >= {lo}", bad)
    return num.astype(np.int64)


def parse_sex(col: pd.Series, column: str, where: Where) -> np.ndarray:
    """``M``/``F``/``""`` (unknown). Accepts M, F, Male, Female (any case); Unknown/U/blank = unknown."""
    def code(v: str):
        v = v.strip().upper()
        return SEX_CODES.get(v, "" if v in SEX_UNKNOWN else None)

    sex = map_unique(col, code)
    bad = pd.isna(sex)
    if bad.any():
        raise where.fail(column, f"has an unknown sex code '{col.iloc[int(np.flatnonzero(bad)[0])]}'", bad,
                         "allowed codes are M/F, Male/Female, and Unknown or blank for not known")
    return sex.astype(str)


def parse_findings(col: pd.Series, column: str, where: Where) -> np.ndarray:
    """A finding column as float32: 1, 0, -1 (uncertain), NaN (blank); anything else is an error."""
    values = map_unique(col, lambda v: FINDING_CODES.get(v.strip(), "bad"))
    bad = values == "bad"
    if bad.any():
        raise where.fail(column, f"has a value '{col.iloc[int(np.flatnonzero(bad)[0])]}' outside {{1, 0, -1, blank}}", bad)
    return values.astype(np.float32)


def parse_split(col: pd.Series, column: str, where: Where) -> np.ndarray:
    """An official split column: train / val (validate, valid) / test, or blank; anything else is an error."""
    values = map_unique(col, lambda v: SPLIT_CODES.get(v.strip().lower(), "" if not v.strip() else None))
    bad = pd.isna(values)
    if bad.any():
        raise where.fail(column, f"has a split '{col.iloc[int(np.flatnonzero(bad)[0])]}'", bad,
                         "allowed: train, validate (val), test, or blank")
    return values.astype(str)


def parse_drain(col: pd.Series, column: str, where: Where) -> np.ndarray:
    """NEATX ``Drain``: 1 / 0 (also 1.0 / 0.0) as float64; blank = unknown (NaN); anything else an error."""
    values = map_unique(col, lambda v: {"1": 1.0, "1.0": 1.0, "0": 0.0, "0.0": 0.0, "": np.nan}.get(v.strip(), "bad"))
    bad = values == "bad"
    if bad.any():
        raise where.fail(column, f"has a value '{col.iloc[int(np.flatnonzero(bad)[0])]}' outside {{1, 0, blank}}", bad)
    return values.astype(float)


def check_unique(ids: pd.Series, column: str, where: Where) -> None:
    empty = (ids == "").to_numpy()
    if empty.any():
        raise where.fail(column, "is empty", empty)
    dup = ids.duplicated().to_numpy()
    if dup.any():
        raise where.fail(column, f"repeats '{ids[dup].iloc[0]}'", dup, "each image must appear once")


def findings_frame(raw: pd.DataFrame, names: Iterable[str], where: Where) -> pd.DataFrame:
    """Parse each named finding column of ``raw`` (``parse_findings``) into a float32 frame."""
    return pd.DataFrame({n: parse_findings(raw[n], n, where) for n in names}, index=raw.index)
