"""The embedding cache: one HDF5 file per (model, cohort), readable without torch.

Layout (format ``cxrfair-embeddings`` v2)::

    /                      attrs: format, format_version, complete, model, weights_id, cohort_hash,
                                  embed_dim, logit_scale, classes (JSON), preprocessing (JSON),
                                  versions (JSON), created, and any other provenance (JSON)
    /images/embeddings     float32 (N, D)   encoder outputs in cohort order, not normalised
    /cohort/csv            str              the cohort rows (cohort.csv text) in the same order
    /text/<set>/embeddings float32 (draws, C, D)  per prompt set; attrs: prompts (JSON [draw][class][k]);
                           multi-label cohorts: (draws, C, 2, D), index 0 the negative prompt(s), 1 the
                           positive (prompts [draw][class][2][k])
    /prompt_scores/global  float32 (N, P)   optional: image-prompt similarities of models whose own
    /prompt_scores/local   float32 (N, P)   zero-shot needs more than pooled embeddings (GLoRIA);
                                            attrs of the group: prompts (JSON, the P distinct prompts
                                            of every set, the columns' order)

Version 1 files (no ``/prompt_scores``) still read; v2 only adds that optional group. Caches of
cohort v2 also carry the cohort's ``task`` and ``attributes`` (its sensitive attributes) as attrs;
a file without them is a multi-class cache of the v1 attributes (sex, age_group).

The file only ever exists complete: ``write_cache`` builds it under a temporary name and renames
it, so a reader that finds the file can trust it. Extraction keeps its partial progress
elsewhere (see ``cxrfair.extract.extractor``).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from cxrfair.errors import CxrfairError
from cxrfair.extract.cohort_format import DEFAULT_ATTRIBUTES, INT_COLUMNS, is_flag_column
from cxrfair.io import atomic_path

FORMAT = "cxrfair-embeddings"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # v2 adds the optional /prompt_scores group
_JSON_ATTRS = ("classes", "preprocessing", "versions")


@dataclass(frozen=True)
class TextEmbeddings:
    """Class text embeddings of one prompt set.

    Attributes:
        embeddings: (draws, C, D) float32, one row per class per draw (mean of its prompts'
            normalised embeddings); multi-label: (draws, C, 2, D), per condition the negative
            (index 0) and positive (index 1) prompts' mean.
        prompts: [draw][class] -> list of prompt strings used for that class in that draw;
            multi-label: [draw][class] -> [negative prompts, positive prompts].
    """

    embeddings: np.ndarray
    prompts: list


@dataclass(frozen=True)
class PromptScores:
    """Per-image similarity to every distinct prompt, for zero-shot scoring that pooled
    embeddings cannot reproduce (GLoRIA's word-region attention term).

    Attributes:
        prompts: the P distinct prompt strings (of every prompt set), the columns' order.
        global_sim: (N, P) float32 cosine of the global image and sentence embeddings.
        local_sim: (N, P) float32 the model's local (word-region attention) similarity.
    """

    prompts: list
    global_sim: np.ndarray
    local_sim: np.ndarray

    def columns(self, prompts: list) -> np.ndarray:
        """Column indices of ``prompts`` (KeyError naming a prompt that is not stored)."""
        index = {p: i for i, p in enumerate(self.prompts)}
        return np.array([index[p] for p in prompts], dtype=np.int64)


@dataclass
class EmbeddingCache:
    """A complete cache read back into memory.

    Attributes:
        image_embeddings: (N, D) float32, rows in cohort order.
        table: the cohort rows (N rows, cohort.csv columns) in the same order.
        classes: class names; ``labels()`` indexes into this list.
        text: prompt set name -> TextEmbeddings.
        attrs: provenance (model, weights_id, cohort_hash, embed_dim, logit_scale, ...).
        path: the file it was read from.
        prompt_scores: per-image prompt similarities (GLoRIA caches), else None.
    """

    image_embeddings: np.ndarray
    table: pd.DataFrame
    classes: list[str]
    text: dict[str, TextEmbeddings]
    attrs: dict[str, Any]
    path: Path | None = field(default=None)
    prompt_scores: PromptScores | None = field(default=None)

    @property
    def model(self) -> str:
        return self.attrs["model"]

    @property
    def cohort_hash(self) -> str:
        return self.attrs["cohort_hash"]

    @property
    def logit_scale(self) -> float:
        return float(self.attrs["logit_scale"])

    def split_mask(self, name: str) -> np.ndarray:
        """(N,) bool: rows of split ``name`` (train / val / test)."""
        return (self.table["split"] == name).to_numpy()

    @property
    def task(self) -> str:
        """``multiclass`` or ``multilabel`` (attr ``task``; absent in caches of v1 cohorts = multiclass)."""
        return str(self.attrs.get("task") or "multiclass")

    @property
    def attributes(self) -> dict:
        """The cohort's sensitive attributes ``{column: {"groups", "reference"}}`` (absent: sex, age_group)."""
        value = self.attrs.get("attributes")
        if isinstance(value, str) and value:  # stored as JSON text by writers that pass it through attrs
            value = json.loads(value)
        return json.loads(json.dumps(value if isinstance(value, dict) and value else DEFAULT_ATTRIBUTES))

    def labels(self) -> np.ndarray:
        """(N,) int: each row's label as an index into ``classes``."""
        index = {c: i for i, c in enumerate(self.classes)}
        return self.table["label"].map(index).to_numpy(dtype=np.int64)

    def targets(self) -> np.ndarray:
        """As ``Cohort.targets()``: (N,) int64 class index (multi-class) or (N, C) float32 in
        {0, 1, NaN} (multi-label; NaN = masked)."""
        if self.task == "multilabel":
            return self.table[[f"y_{c}" for c in self.classes]].to_numpy(dtype=np.float32)
        return self.labels()


def _encode_attr(key: str, value: Any) -> Any:
    if isinstance(value, (str, int, float, bool, np.integer, np.floating, np.bool_)):
        return value
    return "json:" + json.dumps(value, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))


def _decode_attr(value: Any) -> Any:
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str) and value.startswith("json:"):
        return json.loads(value[5:])
    if isinstance(value, np.generic):
        return value.item()
    return value


def write_cache(
    path: Path | str,
    *,
    image_embeddings: np.ndarray,
    cohort_table: pd.DataFrame,
    classes: list[str],
    text: Mapping[str, TextEmbeddings],
    attrs: Mapping[str, Any],
    prompt_scores: PromptScores | None = None,
) -> Path:
    """Write a complete cache atomically (temp file + rename).

    Args:
        image_embeddings: (N, D) float array, rows aligned with ``cohort_table``.
        cohort_table: N cohort rows (cohort.csv columns).
        classes: C class names, the order of the text embeddings' class axis.
        text: prompt set -> TextEmbeddings with embeddings (draws, C, D).
        attrs: provenance; must include model, weights_id, cohort_hash, logit_scale.
        prompt_scores: optional (N, P) image-prompt similarities (rows aligned like the embeddings).
    """
    import h5py

    emb = np.asarray(image_embeddings, dtype=np.float32)
    if emb.ndim != 2 or emb.shape[0] != len(cohort_table):
        raise ValueError(f"image_embeddings {emb.shape} do not match {len(cohort_table)} cohort rows")
    for key in ("model", "weights_id", "cohort_hash", "logit_scale"):
        if key not in attrs:
            raise ValueError(f"cache attrs need {key!r}")
    path = Path(path)
    # Built in memory, then written with plain file I/O: on a full disk HDF5 itself fails
    # uncleanly (RuntimeError, then a segfault at exit); a plain write raises OSError(ENOSPC).
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as f:
        meta = dict(attrs)
        meta.update(format=FORMAT, format_version=FORMAT_VERSION, embed_dim=int(emb.shape[1]),
                    classes=list(classes), n_images=int(emb.shape[0]),
                    created=meta.get("created", datetime.now(timezone.utc).isoformat(timespec="seconds")))
        for key, value in meta.items():
            f.attrs[key] = _encode_attr(key, value)
        f.create_dataset("images/embeddings", data=emb, chunks=(min(len(emb), 1024) or 1, emb.shape[1]))
        f.create_dataset("cohort/csv", data=cohort_table.to_csv(index=False), dtype=h5py.string_dtype())
        for name, te in text.items():
            t = np.asarray(te.embeddings, dtype=np.float32)
            _check_text_shape(name, t, len(classes), emb.shape[1], meta.get("task") == "multilabel")
            ds = f.create_dataset(f"text/{name}/embeddings", data=t)
            ds.attrs["prompts"] = json.dumps(te.prompts)
        if prompt_scores is not None:
            _write_scores(f, prompt_scores, len(emb))
        # Written last: a file that has this flag was closed cleanly after everything above.
        f.attrs["complete"] = True
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as out:
            out.write(buffer.getbuffer())
    return path


def _check_text_shape(name: str, t: np.ndarray, n_classes: int, dim: int, multilabel: bool) -> None:
    """Multi-class sets are (draws, C, D); multi-label sets (draws, C, 2, D) (negative, positive)."""
    want = (n_classes, 2, dim) if multilabel else (n_classes, dim)
    if t.shape[1:] != want or t.shape[0] < 1:
        raise ValueError(f"text embeddings {name!r} have shape {t.shape}, want (draws, {', '.join(map(str, want))})")


def _write_scores(f, scores: PromptScores, n: int) -> None:
    group = f.create_group("prompt_scores")
    for name, values in (("global", scores.global_sim), ("local", scores.local_sim)):
        values = np.asarray(values, dtype=np.float32)
        if values.shape != (n, len(scores.prompts)):
            raise ValueError(f"prompt_scores {name} have shape {values.shape}, want ({n}, {len(scores.prompts)})")
        group.create_dataset(name, data=values)
    group.attrs["prompts"] = json.dumps(list(scores.prompts))


def _read_scores(f) -> PromptScores | None:
    if "prompt_scores" not in f:
        return None
    group = f["prompt_scores"]
    return PromptScores(json.loads(group.attrs["prompts"]), group["global"][...], group["local"][...])


def read_table(csv_text: str) -> pd.DataFrame:
    """The stored cohort rows, typed as ``Cohort.table``: ``patient_id``, ``age``, ``study_id``
    int64; ``y_<C>`` and ``drain`` float64 1.0 / 0.0 / NaN; every other column str (empty cells
    "")."""
    table = pd.read_csv(io.StringIO(csv_text), dtype=str, keep_default_na=False, na_filter=False)
    for col in table.columns:
        if is_flag_column(col):
            table[col] = pd.to_numeric(table[col].replace("", np.nan), errors="coerce").astype(np.float64)
        elif col in INT_COLUMNS:
            num = pd.to_numeric(table[col], errors="coerce")
            if not num.isna().any():  # a foreign table with non-integer ids keeps them as text
                table[col] = num.astype(np.int64)
    return table


def read_cache(path: Path | str) -> EmbeddingCache:
    """Read a complete cache; CxrfairError naming the file if it is missing, partial or foreign."""
    import h5py

    path = Path(path)
    if not path.is_file():
        partial = path.with_name(path.name + ".partial")
        hint = f" (an interrupted extraction left {partial}; rerun the same `cxrfair extract` command to finish it)" if partial.exists() else ""
        raise CxrfairError(f"cache {path}: no such file{hint}")
    try:
        f = h5py.File(path, "r")
    except OSError:
        raise CxrfairError(f"cache {path}: not a readable HDF5 file (corrupt or not a cache); re-run `cxrfair extract`") from None
    with f:
        attrs = {k: _decode_attr(v) for k, v in f.attrs.items()}
        if attrs.get("format") != FORMAT:
            raise CxrfairError(f"cache {path}: not a cxrfair embedding cache (format={attrs.get('format')!r}); pass a file written by `cxrfair extract`")
        if attrs.get("format_version") not in READABLE_VERSIONS:
            raise CxrfairError(f"cache {path}: format version {attrs.get('format_version')} is not supported "
                               f"(this cxrfair reads {', '.join(map(str, READABLE_VERSIONS))}); re-run `cxrfair extract`")
        if not attrs.get("complete"):
            raise CxrfairError(f"cache {path}: incomplete (extraction was interrupted); rerun the same `cxrfair extract` command")
        for key in ("images/embeddings", "cohort/csv"):
            if key not in f:
                raise CxrfairError(f"cache {path}: missing dataset {key}; re-run `cxrfair extract --force`")
        emb = f["images/embeddings"][...]
        csv_text = f["cohort/csv"][()]
        csv_text = csv_text.decode() if isinstance(csv_text, bytes) else csv_text
        text = {}
        for name, group in f.get("text", {}).items():
            text[name] = TextEmbeddings(group["embeddings"][...], json.loads(group["embeddings"].attrs["prompts"]))
        scores = _read_scores(f)
    table = read_table(csv_text)
    if len(table) != emb.shape[0]:
        raise CxrfairError(f"cache {path}: {emb.shape[0]} embeddings but {len(table)} cohort rows; re-run `cxrfair extract --force`")
    if scores is not None and scores.global_sim.shape[0] != len(table):
        raise CxrfairError(f"cache {path}: prompt scores for {scores.global_sim.shape[0]} images but {len(table)} cohort rows; "
                           "re-run `cxrfair extract --force`")
    return EmbeddingCache(emb, table, list(attrs["classes"]), text, attrs, path, scores)
