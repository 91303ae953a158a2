"""Patient-disjoint splits: exact per-class totals (multi-class cohorts) and stratified dealing of patients.

- ``split_cohort``: the multi-class rule (Sun et al.). Each class gets exactly its
  largest-remainder share of the ratio; each (class, group) cell lands as close to the ratio as
  the patients allow. Small cohorts (the 6x200 protocol) get a greedy pass and an exhaustive
  best-move / best-swap repair; large ones start from a stratified deal and repair the class
  totals with moves and sampled swaps, so 65k patients take seconds.
- ``deal_patients``: the rule for cohorts split by patients (multi-label presets). Patients are
  shuffled (seeded), sorted into strata (sex, race, age group, which conditions they have, how
  many images) and dealt in an even interleave, so the split has exactly the largest-remainder
  number of patients and every stratum is within one patient of the ratio. O(P log P).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import pandas as pd

from cxrfair.errors import CxrfairError

SPLITS = ("train", "val", "test")
# v1 group order (young male, young female, old male, old female): cell order of the 6x200 split.
DEFAULT_GROUPS = ("young_M", "young_F", "old_M", "old_F")
EXACT_SEARCH_MAX_PATIENTS = 1500  # above this, start from a deal and sample swap candidates
SWAP_SAMPLE = 512  # swap candidates per split in the large-cohort repair


def split_targets(n: int, ratio: tuple[float, ...]) -> np.ndarray:
    """Largest-remainder rounding of ``n * ratio``: ints summing to n (ties go to the earlier split)."""
    ideal = n * np.asarray(ratio, dtype=float)
    base = np.floor(ideal + 1e-9).astype(int)
    # Rounded so float noise (28 * 0.2 = 5.6000000000000005) does not break ties against train.
    order = np.argsort(-np.round(ideal - base, 9), kind="stable")
    base[order[: n - base.sum()]] += 1
    return base


# --------------------------------------------------------------------------------------------
# Dealing patients


def deal_patients(strata: np.ndarray, ratio: tuple[float, ...], seed: int, salt: str = "deal") -> np.ndarray:
    """Assign P patients to len(ratio) splits, stratified.

    Args:
        strata: (P,) int stratum of each patient (patients with equal keys are alike).
        ratio: shares of the splits (normalised here).
    Returns:
        (P,) split index; exactly ``split_targets(P, ratio)`` patients per split, and within every
        stratum each split's count is within one of its share.
    """
    n = len(strata)
    rng = np.random.default_rng([seed, zlib.crc32(salt.encode())])
    perm = rng.permutation(n)
    order = perm[np.argsort(strata[perm], kind="stable")]  # strata in key order, shuffled within
    targets = split_targets(n, tuple(np.asarray(ratio, dtype=float) / np.sum(ratio)))
    # Slot k of split s sits at (k + 0.5) * n / T_s: merging the slots interleaves the splits evenly.
    pos = np.concatenate([(np.arange(t) + 0.5) * n / max(t, 1) for t in targets])
    owner = np.repeat(np.arange(len(targets)), targets)
    pattern = np.roll(owner[np.argsort(pos, kind="stable")], int(rng.integers(n)) if n else 0)
    assign = np.empty(n, dtype=int)
    assign[order] = pattern
    return assign


def patient_strata(table: pd.DataFrame, columns: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(rows -> patient index (N,), stratum per patient (P,)) from per-patient summaries of ``columns``.

    Each column is summarised by its first value per patient (attributes) or, for float 0/1/NaN
    target columns, by whether the patient has any positive; image counts are capped at 3.
    """
    patients, block = np.unique(table["patient_id"].to_numpy(), return_inverse=True)
    keys = pd.DataFrame({"n": np.minimum(np.bincount(block), 3)})
    for c in columns:
        values = table[c]
        if values.dtype.kind == "f":
            keys[c] = np.bincount(block, weights=(values.to_numpy() == 1), minlength=len(patients)) > 0
        else:
            first = pd.Series(values.to_numpy()).groupby(block).first()
            keys[c] = first.to_numpy()
    strata = keys.groupby(list(keys.columns), sort=True).ngroup().to_numpy()
    return block, strata


# --------------------------------------------------------------------------------------------
# Exact per-class split (multi-class cohorts)


@dataclass
class _SplitProblem:
    """Patient blocks and targets. B: (P, K) images of each patient per cell; M: (K, D) cell -> class;
    T: (3, D) exact class targets; I: (3, K) ideal (fractional) cell counts."""

    B: np.ndarray
    M: np.ndarray
    T: np.ndarray
    I: np.ndarray
    W: float = 1000.0  # a class total off by one costs more than any cell imbalance we accept

    def cost_terms(self, C: np.ndarray) -> float:
        """Cost of cell counts C (3, K): W * sum |class - T| + sum (cell - ideal)^2."""
        return self.W * np.abs(C @ self.M - self.T).sum() + ((C - self.I) ** 2).sum()


def _greedy(p: _SplitProblem, order: np.ndarray) -> np.ndarray:
    """Assign blocks in ``order`` one by one to the split whose cost drops most. Returns (P,) split index."""
    C = np.zeros_like(p.I)
    assign = np.empty(len(p.B), dtype=int)
    for i in order:
        b = p.B[i]
        deltas = [p.cost_terms(C + np.eye(3)[s][:, None] * b) for s in range(3)]
        s = int(np.argmin(deltas))
        assign[i] = s
        C[s] += b
    return assign


def _move_deltas(p: _SplitProblem, C: np.ndarray, assign: np.ndarray) -> np.ndarray:
    """(P, 3) cost change of moving each block to each split (0 for its own split)."""
    E, Dv = C - p.I, C @ p.M - p.T  # (3, K), (3, D)
    Bd = p.B @ p.M  # (P, D)
    src = assign
    # Leaving the source split.
    out_cells = (p.B**2 - 2 * p.B * E[src]).sum(1)
    out_dis = (np.abs(Dv[src] - Bd) - np.abs(Dv[src])).sum(1)
    deltas = np.zeros((len(p.B), 3))
    for t in range(3):
        in_cells = (p.B**2 + 2 * p.B * E[t]).sum(1)
        in_dis = (np.abs(Dv[t] + Bd) - np.abs(Dv[t])).sum(1)
        deltas[:, t] = np.where(src == t, 0.0, out_cells + in_cells + p.W * (out_dis + in_dis))
    return deltas


def _swap_deltas(p: _SplitProblem, C: np.ndarray, i: np.ndarray, j: np.ndarray, s: int, t: int) -> np.ndarray:
    """(len(i), len(j)) cost change of exchanging block i (in split s) with block j (in split t)."""
    E, Dv = C - p.I, C @ p.M - p.T
    d = p.B[j][None, :, :] - p.B[i][:, None, :]  # (I, J, K): what split s gains
    dd = d @ p.M
    cells = (2 * d**2 + 2 * d * (E[s] - E[t])).sum(-1)
    dis = (np.abs(Dv[s] + dd) - np.abs(Dv[s]) + np.abs(Dv[t] - dd) - np.abs(Dv[t])).sum(-1)
    return cells + p.W * dis


def _best_swap(p: _SplitProblem, C: np.ndarray, assign: np.ndarray, chunk: int = 256,
               rng: np.random.Generator | None = None) -> tuple[float, tuple]:
    """The best pairwise exchange between two splits: (delta, (block a, block b, split of a, split of b)).

    With ``rng``, only a random sample of ``SWAP_SAMPLE`` blocks per split is searched (large cohorts).
    """
    best = (np.inf, ())
    for s, t in ((0, 1), (0, 2), (1, 2)):
        i, j = np.flatnonzero(assign == s), np.flatnonzero(assign == t)
        if rng is not None:
            i = rng.choice(i, size=min(len(i), SWAP_SAMPLE), replace=False)
            j = rng.choice(j, size=min(len(j), SWAP_SAMPLE), replace=False)
        for lo in range(0, len(i), chunk):  # chunks bound memory at chunk * len(j) * K
            sw = _swap_deltas(p, C, i[lo:lo + chunk], j, s, t)
            if sw.size and sw.min() < best[0]:
                a, b = np.unravel_index(np.argmin(sw), sw.shape)
                best = (sw[a, b], (i[lo + a], j[b], s, t))
    return best


def _local_search(p: _SplitProblem, assign: np.ndarray, max_rounds: int = 5_000,
                  rng: np.random.Generator | None = None) -> np.ndarray:
    """Repair: apply the best single move, or if none helps the best swap, while the cost drops.

    With ``rng`` (large cohorts, started from a stratified deal whose cells are already within
    one patient of the ratio) the search stops once every class total is exact, and swaps are
    searched among sampled candidates (a few fresh samples before giving up).
    """
    assign = assign.copy()
    misses = 0
    for _ in range(max_rounds):
        C = np.stack([p.B[assign == s].sum(0) for s in range(3)])
        if rng is not None and not np.abs(C @ p.M - p.T).any():
            break
        moves = _move_deltas(p, C, assign)
        if moves.min() < -1e-9:
            blk, to = np.unravel_index(np.argmin(moves), moves.shape)
            assign[blk] = to
            continue
        delta, found = _best_swap(p, C, assign, rng=rng)
        if delta > -1e-9:
            misses += 1
            if rng is None or misses >= 8:
                break
            continue
        a, b, s, t = found
        assign[a], assign[b] = t, s
    return assign


def _fix_totals(p: _SplitProblem, assign: np.ndarray) -> np.ndarray:
    """Large cohorts: make the class totals exact by moving "pure" patients (all images of one
    class) from a split over its target to one under it, preferring images from the source's
    over-full cells. Each move shrinks the total deviation, so this ends in a few hundred cheap
    steps; whatever it cannot fix is left to ``_local_search``."""
    assign = assign.copy()
    Bd = p.B @ p.M  # (P, D) images per class
    size, cls = Bd.sum(1), Bd.argmax(1)
    pure = Bd.max(1) == size
    C = np.stack([p.B[assign == s].sum(0) for s in range(3)])
    Dv = C @ p.M - p.T
    for _ in range(int(np.abs(Dv).sum())):
        move = _pure_move(p, C, Dv, assign, pure, cls, size)
        if move is None:
            break
        i, s, t = move
        assign[i] = t
        C[s] -= p.B[i]
        C[t] += p.B[i]
        Dv = C @ p.M - p.T
    return assign


def _pure_move(p, C, Dv, assign, pure, cls, size) -> tuple[int, int, int] | None:
    """(block, from, to) of the best pure-patient move that reduces a class deviation, or None."""
    E = C - p.I
    for s, d in sorted(map(tuple, np.argwhere(Dv > 0)), key=lambda sd: -Dv[sd]):
        for t in np.flatnonzero(Dv[:, d] < 0):
            room = min(Dv[s, d], -Dv[t, d])
            cand = np.flatnonzero((assign == s) & pure & (cls == d) & (size <= room))
            if cand.size:
                gain = (p.B[cand] * (E[s] - E[t])).sum(1)
                return int(cand[np.argmax(gain)]), int(s), int(t)
    return None


def split_cohort(table: pd.DataFrame, classes: list[str], ratio: tuple[float, float, float], seed: int,
                 restarts: int = 20, groups: tuple[str, ...] | None = None) -> pd.Series:
    """Assign whole patients to train/val/test.

    Each class gets exactly its largest-remainder share of ``ratio`` (140/20/40 of 200 for
    7:1:2); each (class, group) cell lands as close to the ratio as the patients allow. A
    patient may have images in several classes and groups, so patients are the unit: a greedy
    pass (largest patients first, seeded tie order) then best-improvement moves and swaps; if a
    class total is still off, up to ``restarts`` more tries from seeded random orders. Cohorts
    of more than ``EXACT_SEARCH_MAX_PATIENTS`` patients start from a stratified deal instead
    (cells already within a patient or so of the ratio), repair the class totals by moving
    patients whose images are all of one class (then, if needed, general moves and sampled
    swaps), and stop once they are exact (the exhaustive swap search is quadratic in
    patients: 65k patients would take hours; this takes seconds).

    Args:
        table: rows with ``label``, ``group``, ``patient_id``.
        groups: the group names in order (default: ``DEFAULT_GROUPS`` if they cover ``table``,
            else its groups sorted).
    Returns:
        (N,) Series of 'train'/'val'/'test' aligned with ``table``.
    Raises:
        CxrfairError if a class would get no image in some split, or if no patient-disjoint
        assignment with exact class totals was found.
    """
    if groups is None:
        present = set(table["group"])
        groups = DEFAULT_GROUPS if present <= set(DEFAULT_GROUPS) else tuple(sorted(present))
    cells = [(c, g) for c in classes for g in groups]
    cell_idx = pd.MultiIndex.from_tuples(cells).get_indexer(pd.MultiIndex.from_arrays([table["label"], table["group"]]))
    patients, block = np.unique(table["patient_id"].to_numpy(), return_inverse=True)
    B = np.zeros((len(patients), len(cells)))
    np.add.at(B, (block, cell_idx), 1)
    M = np.kron(np.eye(len(classes)), np.ones((len(groups), 1)))  # (K, D)
    n_cell = B.sum(0)
    T = np.stack([split_targets(int(n), ratio) for n in n_cell @ M], axis=1).astype(float)
    _refuse_empty_splits(T, classes)
    p = _SplitProblem(B=B, M=M, T=T, I=np.outer(ratio, n_cell))
    rng = np.random.default_rng([seed, zlib.crc32(b"split")])
    large = len(patients) > EXACT_SEARCH_MAX_PATIENTS
    for attempt in range(restarts + 1):
        # First try: largest patients first (ties in seeded order); then seeded random orders,
        # which get lumpy small cohorts out of local optima the moves and swaps cannot leave.
        if large:
            start = deal_patients(_cell_strata(B), ratio, seed, salt=f"split-{attempt}")
            assign = _local_search(p, _fix_totals(p, start), rng=rng)
        else:
            perm = rng.permutation(len(patients))
            order = perm[np.argsort(-B.sum(1)[perm], kind="stable")] if attempt == 0 else perm
            assign = _local_search(p, _greedy(p, order))
        C = np.stack([B[assign == s].sum(0) for s in range(3)])
        off = np.abs(C @ M - T).sum(0)
        if not off.any():
            break
    if off.any():
        bad = classes[int(np.flatnonzero(off)[0])]
        raise CxrfairError(f"--split: could not split {bad} into exact {'/'.join(map(str, T[:, np.flatnonzero(off)[0]].astype(int)))} "
                           "train/val/test without putting a patient in two splits; try another --seed or --split")
    return pd.Series(np.asarray(SPLITS)[assign[block]], index=table.index, name="split")


def _cell_strata(B: np.ndarray) -> np.ndarray:
    """(P,) stratum per patient block: its largest cell and its image count (capped at 3)."""
    return B.argmax(1) * 4 + np.minimum(B.sum(1), 3).astype(int)


def _refuse_empty_splits(T: np.ndarray, classes: list[str]) -> None:
    """A class with no image in some split cannot be trained, selected or evaluated (issue 11)."""
    empty = np.argwhere(T == 0)
    if len(empty):
        s, d = empty[0]
        raise CxrfairError(f"class {classes[d]}: its {int(T[:, d].sum())} images split {'/'.join(map(str, T[:, d].astype(int)))} "
                           f"train/val/test, so {SPLITS[s]} has none; every class needs images in every split: "
                           "raise --per-group or change --split")
