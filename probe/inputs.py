"""Reading a cache into probe inputs, and the checks made before anything is written.

Everything that can make a probe command fail for a reason the user can fix is checked here,
before training, so a failing command leaves the runs folder as it was.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cxrfair.core.runs import make_predictions
from cxrfair.errors import CxrfairError
from cxrfair.extract.cache import PromptScores, read_cache

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class ProbeInputs:
    """One cache, split for probing.

    Attributes:
        x: split -> (N_split, D) float32 image embeddings (as the encoder output them).
        y: split -> (N_split,) int32 labels indexing ``classes`` (multi-class), or (N_split, C)
            float32 targets in {1, 0, NaN} (multi-label; NaN = masked).
        rows: val and test cohort rows, in the order of ``predicted_probs``' rows.
        classes: class names (cohort order).
        model, cohort_hash, logit_scale, source: from the cache.
        text: prompt set -> (draws, C, D) float32 class text embeddings; multi-label (draws, C, 2, D)
            (negative, positive).
        prompts: prompt set -> [draw][class] prompt lists (what ``text`` was built from).
        prompt_scores: "val" / "test" -> ``PromptScores`` of those rows (GLoRIA caches), else None.
        task: "multiclass" or "multilabel" (the cohort's).
        attributes: the cohort's sensitive attributes ``{column: {"groups", "reference"}}``,
            written into every run so that analysis compares the cohort's own groups.
    """

    x: dict
    y: dict
    rows: pd.DataFrame
    classes: list
    model: str
    cohort_hash: str
    logit_scale: float
    source: str
    text: dict
    prompts: dict
    prompt_scores: dict | None = None
    task: str = "multiclass"
    attributes: dict | None = None  # the cohort's sensitive attributes {column: {"groups", "reference"}}
    train_rows: pd.DataFrame | None = None  # the training split's cohort rows (x["train"]'s order)

    @property
    def multilabel(self) -> bool:
        return self.task == "multilabel"

    def run_meta(self) -> dict:
        """What every run of these inputs says about its cohort (run.json ``task``, ``attributes``)."""
        return {"task": self.task, "attributes": self.attributes}

    def predictions(self, probs: np.ndarray):
        """The predictions table of the val + test ``rows`` for (N, C) ``probs``."""
        return make_predictions(self.rows, probs, self.classes, task=self.task, attributes=self.attributes)


def load_inputs(cache_path: Path | str) -> ProbeInputs:
    """Read and check a cache; CxrfairError naming the file for anything unusable."""
    cache = read_cache(cache_path)
    where = f"cache {cache_path}"
    emb = np.asarray(cache.image_embeddings, dtype=np.float32)
    _check_finite(emb, cache.table, where)
    labels = _targets(cache, where)
    x, y = {}, {}
    for split in SPLITS:
        mask = cache.split_mask(split)
        if not mask.any():
            raise CxrfairError(f"{where}: the cohort has no {split} rows; probes need train, val and test splits")
        x[split], y[split] = emb[mask], labels[mask]
    rows = pd.concat([cache.table[cache.split_mask(s)] for s in ("val", "test")], ignore_index=True)
    text = {name: np.asarray(te.embeddings, dtype=np.float32) for name, te in cache.text.items()}
    prompts = {name: te.prompts for name, te in cache.text.items()}
    return ProbeInputs(x, y, rows, list(cache.classes), str(cache.model), str(cache.cohort_hash),
                       float(cache.logit_scale), str(cache_path), text, prompts, _split_scores(cache, where),
                       cache.task, cache.attributes,
                       cache.table[cache.split_mask("train")].reset_index(drop=True))


def _targets(cache, where: str) -> np.ndarray:
    """(N,) int32 labels (multi-class) or (N, C) float32 targets in {1, 0, NaN} (multi-label)."""
    if cache.task == "multilabel":
        missing = [f"y_{c}" for c in cache.classes if f"y_{c}" not in cache.table.columns]
        if missing:
            raise CxrfairError(f"{where}: a multi-label cache without column {missing[0]!r}; rebuild the cohort and re-extract")
        y = cache.targets()
        if not np.isin(y[np.isfinite(y)], (0.0, 1.0)).all():
            raise CxrfairError(f"{where}: multi-label targets must be 1, 0 or empty; rebuild the cohort and re-extract")
        return y
    labels = cache.labels()
    if (labels < 0).any():
        raise CxrfairError(f"{where}: a cohort row has a label outside the classes {cache.classes}; rebuild the cohort and re-extract")
    return labels.astype(np.int32)


def group_codes(inputs: ProbeInputs, attr: str) -> dict:
    """The sensitive attribute's group code of every train / val / test row, checked for training.

    Returns ``{"train": (N,), "val": (Nv,), "test": (Nt,)}`` int32 indices into ``"names"`` (the
    declared groups, in order). CxrfairError (one line) for an attribute the cohort does not
    declare, an empty or undeclared value, or a group without training rows.
    """
    where = f"cache {inputs.source}"
    if attr not in inputs.attributes:
        raise CxrfairError(f"--sensitive {attr}: not a sensitive attribute of the cohort of {where}; "
                           f"choose one of {', '.join(inputs.attributes)}")
    names = [str(g) for g in inputs.attributes[attr]["groups"]]
    val_test = inputs.rows.groupby("split", sort=False)
    tables = {"train": inputs.train_rows, "val": val_test.get_group("val"), "test": val_test.get_group("test")}
    out = {}
    for split, table in tables.items():
        values = table[attr].astype("string").fillna("").str.strip().to_numpy() if attr in table else None
        if values is None:
            raise CxrfairError(f"--sensitive {attr}: {where} has no column {attr!r}; re-run `cxrfair extract` on the cohort")
        codes = np.array([names.index(v) if v in names else -1 for v in values], np.int32)
        if (codes < 0).any():
            bad = values[codes < 0][0]
            why = "is empty" if bad == "" else f"is {bad!r}, not one of the declared groups {', '.join(names)}"
            raise CxrfairError(f"--sensitive {attr}: {where}: {int((codes < 0).sum())} {split} row(s) where {attr} {why} "
                               f"(first: {table['image_id'].to_numpy()[codes < 0][0]}); fix the cohort and re-extract")
        out[split] = codes
    missing = [g for i, g in enumerate(names) if not (out["train"] == i).any()]
    if missing:
        raise CxrfairError(f"--sensitive {attr}: group {missing[0]!r} has no training rows in {where}; "
                           f"a mitigation needs every group of {attr} in the training split")
    out["names"] = names
    return out


FEWSHOT_RULE = {
    "multiclass": "K training images of each class, drawn without replacement from the training split only, "
                  "each from a different patient while the class has patients not yet drawn; a class with "
                  "fewer than K images contributes all it has. The draw is nested: with one seed, the K-shot "
                  "images of a class are the first K of one random order, so they hold the (K-1)-shot ones.",
    "multilabel": "for each condition in class order, training images are added until the drawn set holds at "
                  "least K positives and K negatives (observed 0) of that condition, drawn without replacement "
                  "from the training split only in a random order that puts every patient's first image of that "
                  "label before any patient's second; the drawn images keep all their labels, so a condition can end with more than K "
                  "positives; one with fewer than K positives or negatives contributes all it has.",
}


@dataclass(frozen=True)
class Shots:
    """One few-shot draw of the training split.

    Attributes:
        index: (n,) int64 row indices into the training split (``x["train"]``), ascending.
        shots: K. seed: the draw's seed.
        counts: class -> images drawn (multi-class) / ``[positives, negatives]`` drawn (multi-label).
        short: the classes (conditions) with fewer than K images (positives or negatives) to draw from.
    """

    index: np.ndarray
    shots: int
    seed: int
    counts: dict
    short: tuple

    def record(self, task: str, train_ids) -> dict:
        """run.json ``fewshot``: what was drawn (``train_ids``: the training split's (N,) image ids) and by which rule."""
        return {"shots": self.shots, "draw_seed": self.seed, "n_train": int(len(self.index)),
                "counts": self.counts, "short": list(self.short), "rule": FEWSHOT_RULE[task],
                "drawn_from": "train split only (val and test untouched; selection on the full validation split)",
                "image_ids": [str(i) for i in np.asarray(train_ids)[self.index]]}


def _patient_first(order: np.ndarray, patients: np.ndarray) -> np.ndarray:
    """``order`` (row indices in a random order) with each patient's first row first, the rest after,
    both parts keeping their order: taking a prefix then spreads the draw over patients."""
    repeat = pd.Series(patients[order]).duplicated().to_numpy()
    return order[np.argsort(repeat, kind="stable")]


def draw_shots(y_train: np.ndarray, patients, shots: int, seed: int, classes: list) -> Shots:
    """K images per class (multi-class) or K positives and K negatives per condition (multi-label)
    from the training split (``FEWSHOT_RULE``), a function of (targets, patients, shots, seed) alone.

    Args:
        y_train: (N,) int class indices, or (N, C) float targets in {1, 0, NaN} (multi-label).
        patients: (N,) patient ids of the same rows. shots: K >= 1. seed: the draw's seed.
        classes: the C class (condition) names, for ``counts`` and ``short``.
    """
    y = np.asarray(y_train)
    patients = np.asarray(patients).astype(str)
    rng = np.random.default_rng([int(seed), 0x5E07])  # a stream of its own: never the training seed's
    if y.ndim == 1:
        chosen, counts, short = [], {}, []
        for c, name in enumerate(classes):
            rows = np.flatnonzero(y == c)
            take = _patient_first(rng.permutation(rows), patients)[:shots]
            chosen.append(take)
            counts[str(name)] = int(len(take))
            short += [str(name)] if len(rows) < shots else []
        index = np.sort(np.concatenate(chosen)).astype(np.int64)
        return Shots(index, int(shots), int(seed), counts, tuple(short))
    selected = np.zeros(len(y), bool)
    short = []
    for c, name in enumerate(classes):
        for value in (1.0, 0.0):
            rows = rng.permutation(np.flatnonzero(y[:, c] == value))
            need = shots - int((y[selected, c] == value).sum())
            short += [str(name)] if len(rows) < shots and str(name) not in short else []
            if need <= 0:
                continue
            free = _patient_first(rows, patients)
            free = free[~selected[free]]
            selected[free[:need]] = True
    index = np.flatnonzero(selected).astype(np.int64)
    counts = {str(name): [int((y[index, c] == 1).sum()), int((y[index, c] == 0).sum())] for c, name in enumerate(classes)}
    return Shots(index, int(shots), int(seed), counts, tuple(short))


def short_note(draws: list) -> str | None:
    """The one line saying which classes had fewer than K images to draw from (None when none did).

    Which classes are short depends on the training split's counts alone, so it is the same for
    every seed's draw: said once per sweep, not once per seed.
    """
    short = list(dict.fromkeys(c for d in draws for c in d.short))
    if not short:
        return None
    k = draws[0].shots
    return (f"--shots {k}: {', '.join(short)} had fewer than {k} training images (multi-label: positives or negatives) "
            "to draw from; their draws use all they have (run.json fewshot.short and counts)")


def _split_scores(cache, where: str) -> dict | None:
    """The cache's prompt scores (if any) for the val and test rows; non-finite ones refused."""
    scores = cache.prompt_scores
    if scores is None:
        return None
    if not (np.isfinite(scores.global_sim).all() and np.isfinite(scores.local_sim).all()):
        raise CxrfairError(f"{where}: prompt scores are NaN or infinite; re-run `cxrfair extract --force` for this model")
    return {s: PromptScores(scores.prompts, scores.global_sim[cache.split_mask(s)], scores.local_sim[cache.split_mask(s)])
            for s in ("val", "test")}


def _check_finite(emb: np.ndarray, table: pd.DataFrame, where: str) -> None:
    bad = ~np.isfinite(emb).all(axis=1)
    if bad.any():
        first = table["image_id"].iloc[int(np.flatnonzero(bad)[0])]
        raise CxrfairError(f"{where}: {int(bad.sum())} image embedding(s) are NaN or infinite (first: {first}); "
                           "re-run `cxrfair extract --force` for this model")
