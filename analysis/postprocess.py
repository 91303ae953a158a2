"""Post-processing for fairness (issue 13, mitigation ``thresholds``): a new run from an existing one.

Works on any run (zero-shot, probes, LoRA, full fine-tuning) because it reads only predictions.
Everything is fitted on the run's **validation** rows and then applied to every row; test rows
never influence a choice. numpy + pandas only (analysis imports no stage).

**Constraint** (what "equal" means), per condition (multi-label) or one-vs-rest class
(multi-class), over the groups of the sensitive attribute:

- ``equalized_odds``: (|ΔTPR| + |ΔFPR|) / 2, the paper's eq. 3 form (the analysis' ``eqodds``);
  with three or more groups the largest pair, as the analysis does;
- ``tpr``: |ΔTPR| (equal opportunity); ``fpr``: |ΔFPR|.

**Objective** (both tasks, ``SELECTION_RULE``): the smallest validation gap among the decision
rules whose validation utility is at most ``strength`` below the source run's (utility: accuracy
for multi-class, each condition's F1 for multi-label); ties go to the higher utility, then to the
rule closest to the source's. ``strength`` is the user's utility budget (default 0.02), not a
value tuned on test; the source's own rule is always a candidate, so the validation gap never
gets worse.

**Multi-class** (rows of ``p_`` sum to 1): one additive offset b[g, c] per (group, class) on the
log-probabilities; the new run's probabilities are softmax(log p + b[g]), so the arg-max the
analysis takes is the post-processed decision. Fitted by coordinate search from zero offsets:
each step moves the one offset whose exact best value, the others fixed, improves the objective
most (the objective is piecewise constant in one offset, so the midpoints between its
breakpoints are every distinct outcome), until no single move improves it. A coordinate-wise
optimum, not a global one. Equalising can lower the better-served group's rate ("levelling
down"): the constraint asks for equal rates, not for raising anyone's.

**Multi-label / binary** (``y_``/``p_`` per condition): one threshold t[g, c] per (group,
condition) among that group's validation scores, predicting p >= t. Deterministic (Hardt et al.
2016 randomise between two thresholds to equalise both rates exactly; a run must hold one
prediction per image, so we do not). Two groups: exhaustive search over every pair of candidate
thresholds (exact); three or more: coordinate search from the source threshold (best
single-group move per step, a coordinate-wise optimum). The analysis picks one threshold per
condition itself, so the group thresholds are encoded in the scores: a per-group monotone
piecewise-linear map sends [0, t_g) onto [0, T) and [t_g, 1] onto [T, 1], T the source's max-F1
validation threshold, recorded in run.json ``decision_thresholds`` for the analysis to read the
new scores at instead of choosing again (CONTRACTS.md, "Post-processing").

What the new scores do and do not mean: within a group, the ranking is unchanged (multi-label:
each group's AUC, and so AUC gaps and worst-group AUC, are identical to the source's); pooled
AUC, AP and calibration (ECE) are of rescaled scores mixed across groups and change; read
those on the source run. Multi-class offsets change rankings too (softmax couples the classes).
The group of every image must be known at prediction time: a real limitation in deployment.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cxrfair.core import groups as G
from cxrfair.core.mitigations import MITIGATIONS
from cxrfair.core import metrics as M
from cxrfair.core import multilabel as ML
from cxrfair.core import runs as R
from cxrfair.errors import CxrfairError

CONSTRAINTS = ("equalized_odds", "tpr", "fpr")
THRESHOLDS = MITIGATIONS["thresholds"]  # this stage's row of the mitigation table
DEFAULT_STRENGTH = THRESHOLDS.postprocess_strength
# Candidate thresholds / offset values per group and coordinate: beyond this the distinct values
# are subsampled evenly by rank (bounds the search to K^2 pairs per condition).
MAX_CANDIDATES = 256
MAX_SWEEPS = 50
# Fewer validation positives than this in a (group, class) cell earn a note: rates of so few
# images are noisy, and a rule fitted to them may not carry over to test (read its test interval).
SMALL_CELL = 25
SELECTION_RULE = (
    "fitted on the validation split only: among decision rules whose validation utility (accuracy "
    "for multi-class, each condition's F1 for multi-label) is at most `strength` below the source "
    "run's, the one with the smallest validation gap of the constraint; ties to the higher utility, "
    "then to the rule closest to the source's"
)
_TOL = 1e-12  # gaps and utilities are ratios of counts; equal values may differ by rounding
# Multi-class constraints as the analysis' group metrics (``groups.combine_groups`` computes them).
_MULTICLASS_GAPS = {
    "equalized_odds": next(s for s in M.GROUP_METRICS if s.name == "eqodds"),
    "tpr": G.GroupMetric("tpr_gap_abs", ("tpr",), "abs_difference", "mean over classes of |ΔTPR|"),
    "fpr": G.GroupMetric("fpr_gap_abs", ("fpr",), "abs_difference", "mean over classes of |ΔFPR|"),
}


@dataclass(frozen=True)
class PostprocessConfig:
    """What ``postprocess`` does.

    Attributes:
        run: the source run folder.
        sensitive: attribute column whose groups are equalised (declared in run.json ``attributes``).
        constraint: one of ``CONSTRAINTS``.
        strength: validation utility the fit may give up, absolute (0.02 = two points), in [0, 1].
        out: runs folder to write into; None: the source run's own runs folder.
        force: replace an existing post-processed run of the same id.
        max_candidates: distinct values tried per group and coordinate (see ``MAX_CANDIDATES``).
    """

    run: Path
    sensitive: str
    constraint: str = "equalized_odds"
    strength: float = DEFAULT_STRENGTH
    out: Path | None = None
    force: bool = False
    max_candidates: int = MAX_CANDIDATES


@dataclass
class Fit:
    """A fitted post-processing rule and what it did on validation.

    Attributes:
        params: multi-class (G, C) log-probability offsets; multi-label (G, C) thresholds (NaN:
            condition left as it was).
        decision: multi-label (C,) threshold T the new scores are read at (NaN: none); None for multi-class.
        before, after: validation ``{"gap": ..., "utility": ...}``: floats (multi-class) or (C,) arrays.
        notes: fallbacks taken (cells without positives or negatives, too few groups).
    """

    params: np.ndarray
    decision: np.ndarray | None
    before: dict
    after: dict
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- shared


def rate_gap(tpr: np.ndarray, fpr: np.ndarray, constraint: str) -> np.ndarray:
    """The constraint's gap over groups from per-group rates (..., G) -> (...).

    ``equalized_odds``: max over pairs of (|ΔTPR| + |ΔFPR|) / 2, computed as
    max(range(TPR + FPR), range(TPR - FPR)) / 2 (|a| + |b| = max(|a + b|, |a - b|)); ``tpr`` /
    ``fpr``: the range of that rate. Fewer than two groups: 0.
    """
    if tpr.shape[-1] < 2:
        return np.zeros(tpr.shape[:-1])
    if constraint == "tpr":
        return np.ptp(tpr, axis=-1)
    if constraint == "fpr":
        return np.ptp(fpr, axis=-1)
    return np.maximum(np.ptp(tpr + fpr, axis=-1), np.ptp(tpr - fpr, axis=-1)) / 2


def best_index(feasible: np.ndarray, gap: np.ndarray, utility: np.ndarray, distance: np.ndarray) -> int:
    """Index of the best candidate (all (K,)): feasible, smallest gap, highest utility, least distance.

    NaN gaps count as infinite. Returns -1 when nothing is feasible.
    """
    gap = np.where(np.isnan(gap), np.inf, gap)
    ok = feasible & np.isfinite(gap)
    if not ok.any():
        return -1
    ok &= gap <= gap[ok].min() + _TOL
    ok &= utility >= utility[ok].max() - _TOL
    ok &= distance <= distance[ok].min() + _TOL
    return int(np.flatnonzero(ok)[0])


def _improves(new: tuple[float, float], old: tuple[float, float]) -> bool:
    """(gap, utility) strictly better: a smaller gap, or the same gap and a higher utility."""
    return new[0] < old[0] - _TOL or (abs(new[0] - old[0]) <= _TOL and new[1] > old[1] + _TOL)


def _small_cells(positives: np.ndarray) -> list[str]:
    """A note when some (group, class) cell of (G, C) validation positive counts is below SMALL_CELL."""
    smallest = int(positives.min()) if positives.size else 0
    if smallest >= SMALL_CELL:
        return []
    return [f"a (group, class) cell has only {smallest} validation positive(s) (< {SMALL_CELL}): the fitted rule "
            "follows noise in so few images and may not carry over to test; read the test gap's interval"]


def _spread(values: np.ndarray, k: int) -> np.ndarray:
    """At most ``k`` of sorted ``values``, evenly by rank, first and last kept."""
    if len(values) <= k:
        return values
    return values[np.unique(np.round(np.linspace(0, len(values) - 1, k)).astype(np.int64))]


# ----------------------------------------------------------------------------- multi-label


@dataclass(frozen=True)
class _GroupCurve:
    """One group's candidate thresholds of one condition and the counts they give (each (K,))."""

    cand: np.ndarray  # thresholds, ascending
    tp: np.ndarray  # positives with p >= cand
    fp: np.ndarray  # negatives with p >= cand
    pos: int
    neg: int


def _curve(p_pos: np.ndarray, p_neg: np.ndarray, cand: np.ndarray) -> _GroupCurve:
    """Counts at each candidate threshold of a group's positive and negative scores."""
    sp, sn = np.sort(p_pos), np.sort(p_neg)
    tp = len(sp) - np.searchsorted(sp, cand, side="left")
    fp = len(sn) - np.searchsorted(sn, cand, side="left")
    return _GroupCurve(cand, tp, fp, len(sp), len(sn))


def _rates(curves: list[_GroupCurve], tp: np.ndarray, fp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(..., G) counts -> (..., G) TPR and FPR of the groups (NaN where undefined)."""
    pos = np.array([c.pos for c in curves], dtype=np.float64)
    neg = np.array([c.neg for c in curves], dtype=np.float64)
    return G.ratio(tp, pos), G.ratio(fp, neg)


def _f1(tp: np.ndarray, fp: np.ndarray, positives: int) -> np.ndarray:
    return G.ratio(2 * tp, positives + tp + fp)


def _search_pairs(curves, fixed_tp, fixed_fp, positives, floor, t_star, constraint) -> np.ndarray:
    """Exhaustive search over every pair of two groups' candidates. Returns (2,) candidate indices."""
    a, b = curves
    tp = np.stack(np.broadcast_arrays(a.tp[:, None], b.tp[None, :]), axis=-1)  # (Ka, Kb, 2)
    fp = np.stack(np.broadcast_arrays(a.fp[:, None], b.fp[None, :]), axis=-1)
    f1 = _f1(tp.sum(-1) + fixed_tp, fp.sum(-1) + fixed_fp, positives)
    gap = rate_gap(*_rates(curves, tp, fp), constraint)
    dist = np.abs(a.cand - t_star)[:, None] + np.abs(b.cand - t_star)[None, :]
    best = best_index((f1 >= floor - _TOL).ravel(), gap.ravel(), f1.ravel(), dist.ravel())
    return np.array(np.unravel_index(best, gap.shape))


def _search_coordinates(curves, fixed_tp, fixed_fp, positives, floor, t_star, constraint) -> np.ndarray:
    """Coordinate search from the source threshold: each step makes the best single-group move
    (``best_index``'s order) until none improves. Returns (G,) candidate indices."""
    idx = np.array([int(np.flatnonzero(c.cand == t_star)[0]) for c in curves])
    for _ in range(MAX_SWEEPS * len(curves)):
        tp = np.array([c.tp[j] for c, j in zip(curves, idx)])
        fp = np.array([c.fp[j] for c, j in zip(curves, idx)])
        now = _summary(curves, idx, fixed_tp, fixed_fp, positives, constraint)
        moves = []
        for g, curve in enumerate(curves):
            tps, fps = np.repeat(tp[None], len(curve.cand), 0), np.repeat(fp[None], len(curve.cand), 0)
            tps[:, g], fps[:, g] = curve.tp, curve.fp
            f1 = _f1(tps.sum(-1) + fixed_tp, fps.sum(-1) + fixed_fp, positives)
            gap = rate_gap(*_rates(curves, tps, fps), constraint)
            j = best_index(f1 >= floor - _TOL, gap, f1, np.abs(curve.cand - t_star))
            if j >= 0 and _improves((gap[j], f1[j]), now):
                moves.append((gap[j], -f1[j], g, j))
        if not moves:
            break
        _, _, g, j = min(moves)
        idx[g] = j
    return idx


def _defined(pos: int, neg: int, constraint: str) -> bool:
    """Whether a group's rate(s) under the constraint exist (TPR needs positives, FPR negatives)."""
    return (pos > 0 or constraint == "fpr") and (neg > 0 or constraint == "tpr")


def fit_condition(y, p, groups, n_groups: int, constraint: str, strength: float,
                  max_candidates: int = MAX_CANDIDATES, group_names=None) -> tuple[np.ndarray, float, dict, list[str]]:
    """Group thresholds for one condition, fitted on validation rows.

    Args:
        y: (N,) labels 1 / 0 / NaN (masked rows are left out). p: (N,) scores in [0, 1].
        groups: (N,) int group index in [0, n_groups). constraint: one of CONSTRAINTS.
        strength: F1 the fit may give up below the source's max-F1 threshold.
        group_names: names for the notes (default: the indices).

    Returns:
        thresholds (n_groups,) (all NaN when the condition has no validation positives),
        t_star the source's max-F1 threshold (``multilabel.choose_thresholds``, NaN likewise),
        {"before"/"after": (gap, f1)}, and notes on fallbacks (a group without positives or
        negatives keeps t_star and is left out of the gap).
    """
    keep = ~np.isnan(y)
    y, p, groups = y[keep], p[keep], groups[keep]
    t_star = float(ML.choose_thresholds(y[:, None], p[:, None])[0])
    if np.isnan(t_star):
        undefined = {"before": (np.nan, np.nan), "after": (np.nan, np.nan)}
        return np.full(n_groups, np.nan), t_star, undefined, ["no validation positives: left unchanged"]
    cells = [(p[(groups == g) & (y == 1)], p[(groups == g) & (y == 0)]) for g in range(n_groups)]
    live = [g for g, (sp, sn) in enumerate(cells) if _defined(len(sp), len(sn), constraint)]
    names = group_names or [str(g) for g in range(n_groups)]
    notes = [f"group {names[g]}: no validation {'positives' if not len(cells[g][0]) else 'negatives'}; keeps the "
             "source threshold and is left out of the gap" for g in range(n_groups) if g not in live]
    fixed = [_curve(*cells[g], np.array([t_star])) for g in range(n_groups) if g not in live]
    fixed_tp, fixed_fp = sum(int(c.tp[0]) for c in fixed), sum(int(c.fp[0]) for c in fixed)
    curves = [_curve(sp, sn, np.union1d(_spread(np.unique(np.r_[sp, sn]), max_candidates), [t_star]))
              for sp, sn in (cells[g] for g in live)]
    positives = int((y == 1).sum())
    start = [int(np.flatnonzero(c.cand == t_star)[0]) for c in curves]
    f1_star = float(_f1(sum(c.tp[j] for c, j in zip(curves, start)) + fixed_tp,
                        sum(c.fp[j] for c, j in zip(curves, start)) + fixed_fp, positives))
    if len(live) < 2:
        idx = np.array(start, dtype=np.int64)
        notes.append(f"{len(live)} group(s) with the rates defined: left unchanged")
    else:
        search = _search_pairs if len(live) == 2 else _search_coordinates
        idx = search(curves, fixed_tp, fixed_fp, positives, f1_star - strength, t_star, constraint)
    thresholds = np.full(n_groups, t_star)
    thresholds[live] = [c.cand[j] for c, j in zip(curves, idx)]
    summary = {k: _summary(curves, i, fixed_tp, fixed_fp, positives, constraint)
               for k, i in (("before", start), ("after", idx))}
    return thresholds, t_star, summary, notes


def _summary(curves, idx, fixed_tp, fixed_fp, positives, constraint) -> tuple[float, float]:
    """(gap, F1) at candidate indices ``idx`` of the live groups."""
    tp = np.array([c.tp[j] for c, j in zip(curves, idx)], dtype=np.float64)
    fp = np.array([c.fp[j] for c, j in zip(curves, idx)], dtype=np.float64)
    gap = rate_gap(*_rates(curves, tp, fp), constraint) if curves else np.nan
    return float(gap), float(_f1(tp.sum() + fixed_tp, fp.sum() + fixed_fp, positives))


def fit_thresholds(Y, P, groups, n_groups: int, constraint: str, strength: float,
                   max_candidates: int = MAX_CANDIDATES, names: tuple[list, list] | None = None) -> Fit:
    """``fit_condition`` for every condition of validation rows Y, P (N, C); groups (N,) int.

    ``names`` = (group names, condition names) for the notes (default: indices).

    Returns a Fit with params (G, C) thresholds, decision (C,) = the T each condition's scores are
    read at after ``apply_thresholds`` (the source threshold; 0.5 if that is 0; NaN if none).
    """
    Y, P = np.asarray(Y, dtype=np.float64), np.asarray(P, dtype=np.float64)
    params, decision = np.full((n_groups, Y.shape[1]), np.nan), np.full(Y.shape[1], np.nan)
    before, after, notes = [], [], []
    group_names, conditions = names or (None, [str(c) for c in range(Y.shape[1])])
    for c in range(Y.shape[1]):
        t, t_star, summary, cell_notes = fit_condition(Y[:, c], P[:, c], groups, n_groups, constraint, strength,
                                                       max_candidates, group_names)
        params[:, c] = t
        decision[c] = 0.5 if t_star == 0 else t_star  # T = 0 cannot separate p < t_g from p >= t_g
        before.append(summary["before"])
        after.append(summary["after"])
        notes += [f"{conditions[c]}: {n}" for n in cell_notes]
    notes += _small_cells(np.array([[np.sum((groups == g) & (Y[:, c] == 1)) for c in range(Y.shape[1])]
                                    for g in range(n_groups)]))
    return Fit(params, decision, _columns(before), _columns(after), notes)


def _columns(pairs: list[tuple[float, float]]) -> dict:
    """[(gap, utility)] per condition -> {"gap": (C,), "utility": (C,)}."""
    return {"gap": np.array([p[0] for p in pairs]), "utility": np.array([p[1] for p in pairs])}


def rescale(p: np.ndarray, t: float, T: float) -> np.ndarray:
    """Monotone piecewise-linear map of scores (N,) with p >= t exactly when the result is >= T.

    [0, t) goes onto [0, T) and [t, 1] onto [T, 1]; t == T (or t NaN) is the identity, bit for bit.
    """
    if np.isnan(t) or t == T:
        return p
    above = p >= t
    hi = T + (p - t) * ((1 - T) / (1 - t)) if t < 1 else np.full_like(p, T)
    lo = np.minimum(p * (T / t), np.nextafter(T, 0)) if t > 0 else np.zeros_like(p)
    return np.clip(np.where(above, hi, lo), 0.0, 1.0)


def apply_thresholds(P, groups, fit: Fit) -> np.ndarray:
    """(N, C) scores -> (N, C) scores whose ``>= fit.decision`` is the group-threshold decision."""
    P = np.array(P, dtype=np.float64)
    for c in range(P.shape[1]):
        for g in range(fit.params.shape[0]):
            rows = groups == g
            P[rows, c] = rescale(P[rows, c], fit.params[g, c], fit.decision[c])
    return P


# ----------------------------------------------------------------------------- multi-class


def _log(P: np.ndarray) -> np.ndarray:
    # A zero probability stays (practically) zero after any finite offset, and no -inf enters the search.
    return np.log(np.maximum(P, 1e-300))


def _counts(y, pred, n_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One-vs-rest (tp, predicted, positives) per class, each (C,), of one group."""
    tp = np.bincount(y[pred == y], minlength=n_classes)
    return tp, np.bincount(pred, minlength=n_classes), np.bincount(y, minlength=n_classes)


def _mc_gap(tp, pp, pos, n, constraint: str) -> np.ndarray:
    """Gap from per-group counts: lists over groups of (..., C) arrays and (G,) sizes -> (...)."""
    per = {"tpr": {g: G.ratio(tp[g], pos[g]) for g in range(len(n))},
           "fpr": {g: G.ratio(pp[g] - tp[g], n[g] - pos[g]) for g in range(len(n))}}
    return G.combine_groups(_MULTICLASS_GAPS[constraint], per, {})


def multiclass_state(logp, y, groups, offsets, constraint: str) -> tuple[float, float]:
    """Validation (gap, accuracy) of arg-max(log p + offsets[group]). logp (N, C), offsets (G, C)."""
    return _state_of(y, (logp + offsets[groups]).argmax(1), groups, offsets.shape, constraint)


def _state_of(y, pred, groups, shape: tuple[int, int], constraint: str) -> tuple[float, float]:
    """(gap, accuracy) of (N,) predicted classes; shape = (groups, classes)."""
    G, C = shape
    counts = [_counts(y[groups == g], pred[groups == g], C) for g in range(G)]
    n = [int((groups == g).sum()) for g in range(G)]
    gap = _mc_gap([k[0] for k in counts], [k[1] for k in counts], [k[2] for k in counts], n, constraint)
    return float(gap), float((pred == y).mean())


def line_candidates(logp, offsets, g: int, c: int, rows: np.ndarray, max_candidates: int):
    """Every distinct outcome of moving offsets[g, c] alone, for the group's rows ``rows`` (bool (N,)).

    A row predicts c when log p_c + v beats its best other class ``alt`` (by ``beta`` = that
    class's score - log p_c); the outcome changes only at the betas, so the midpoints between
    consecutive distinct betas (and one beyond each end) are every distinct outcome.

    Returns:
        values (K,) candidate offsets, switched (K,) rows predicting c at each (taken in order of
        ``order``), order (n,) rows of the group sorted by beta, alt (n,) their best other class.
    """
    s = logp[rows] + offsets[g]
    others = s.copy()
    others[:, c] = -np.inf
    alt = others.argmax(1)
    beta = others.max(1) - logp[rows, c]
    order = np.argsort(beta, kind="stable")
    u = np.unique(beta)
    values = _spread(np.r_[u[0] - 1, (u[:-1] + u[1:]) / 2, u[-1] + 1], max_candidates)
    return values, np.searchsorted(beta[order], values, side="left"), order, alt


def _line_counts(y_g, c: int, switched, order, alt, n_classes: int):
    """(K, C) tp and predicted counts of the group when its first ``switched[k]`` rows (by beta) predict c."""
    eye = np.eye(n_classes, dtype=np.int64)
    ys, alts = y_g[order], alt[order]
    d_pp = eye[c][None] - eye[alts]
    d_tp = (ys == c)[:, None] * eye[c][None] - (ys == alts)[:, None] * eye[alts]
    tp0 = np.bincount(alt[y_g == alt], minlength=n_classes)
    return tp0 + _prefix_sums(d_tp, switched), np.bincount(alt, minlength=n_classes) + _prefix_sums(d_pp, switched)


def _prefix_sums(d: np.ndarray, k: np.ndarray) -> np.ndarray:
    """(n, C) row deltas -> (K, C) sums of the first k[j] rows."""
    return np.vstack([np.zeros((1, d.shape[1]), dtype=d.dtype), np.cumsum(d, axis=0)])[k]


def line_search(logp, y, groups, offsets, g: int, c: int, floor: float, constraint: str,
                max_candidates: int = MAX_CANDIDATES) -> tuple[float, float, float]:
    """The best value of offsets[g, c] with every other offset fixed (``best_index``'s order).

    Returns:
        (value, gap, accuracy) predicted for the best candidate; value is the current offset
        when no candidate is feasible.
    """
    G, C = offsets.shape
    rows = groups == g
    values, switched, order, alt = line_candidates(logp, offsets, g, c, rows, max_candidates)
    tp_g, pp_g = _line_counts(y[rows], c, switched, order, alt, C)
    pred = (logp + offsets[groups]).argmax(1)
    tp, pp, pos, n = [], [], [], []
    for h in range(G):
        k = _counts(y[groups == h], pred[groups == h], C)
        tp.append(tp_g if h == g else np.broadcast_to(k[0], tp_g.shape))
        pp.append(pp_g if h == g else np.broadcast_to(k[1], pp_g.shape))
        pos.append(k[2])
        n.append(int((groups == h).sum()))
    gap = _mc_gap(tp, pp, pos, n, constraint)
    correct = (pred == y)[~rows].sum() + tp_g.sum(1)
    acc = correct / len(y)
    j = best_index(acc >= floor - _TOL, gap, acc, np.abs(values - offsets[g, c]))
    return (float(offsets[g, c]), np.nan, np.nan) if j < 0 else (float(values[j]), float(gap[j]), float(acc[j]))


def fit_offsets(y, P, groups, n_groups: int, constraint: str, strength: float,
                max_candidates: int = MAX_CANDIDATES) -> Fit:
    """Per-(group, class) log-probability offsets by coordinate search on validation rows.

    From zero offsets, each move sets the one offset whose exact best value (``line_search``, the
    others fixed) gives the best (gap, accuracy) among feasible states (accuracy >= the source's
    - strength), until no move improves.

    Args:
        y: (N,) int labels. P: (N, C) probabilities. groups: (N,) int group index in [0, n_groups).
        constraint: one of CONSTRAINTS. strength: accuracy the fit may give up.

    Returns:
        Fit with params (G, C) offsets (zeros = the source), before/after {"gap", "utility"} floats.
    """
    y, groups, logp = np.asarray(y), np.asarray(groups), _log(np.asarray(P, dtype=np.float64))
    offsets = np.zeros((n_groups, logp.shape[1]))
    before = current = multiclass_state(logp, y, groups, offsets, constraint)
    floor = before[1] - strength
    for _ in range(MAX_SWEEPS * offsets.size):
        best = None
        for g, c in np.ndindex(*offsets.shape):
            trial = offsets.copy()
            trial[g, c] = line_search(logp, y, groups, offsets, g, c, floor, constraint, max_candidates)[0]
            # The exact state decides (the line search assumes no ties at the arg-max).
            state = multiclass_state(logp, y, groups, trial, constraint)
            if state[1] >= floor - _TOL and _improves(state, current if best is None else best[0]):
                best = (state, trial)
        if best is None:
            break
        current, offsets = best
    notes = [] if np.isfinite(before[0]) else ["the validation gap is undefined: left unchanged"]
    notes += _small_cells(np.array([[((groups == g) & (y == c)).sum() for c in range(logp.shape[1])]
                                    for g in range(n_groups)]))
    before, after = ({"gap": st[0], "utility": st[1]} for st in (before, current))
    return Fit(offsets, None, before, after, notes)


def apply_offsets(P, groups, offsets: np.ndarray) -> np.ndarray:
    """softmax(log P + offsets[group]): (N, C) probabilities, rows summing to 1."""
    z = _log(np.asarray(P, dtype=np.float64)) + offsets[groups]
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


# ----------------------------------------------------------------------------- runs


def _check_config(config: PostprocessConfig) -> None:
    if config.constraint not in CONSTRAINTS:
        raise CxrfairError(f"--constraint {config.constraint!r} is unknown; choose one of {', '.join(CONSTRAINTS)}")
    if not THRESHOLDS.strength_ok(config.strength):
        raise CxrfairError(f"--strength {config.strength}: the validation utility the fit may give up must be "
                           f"{THRESHOLDS.rule()} (default {DEFAULT_STRENGTH})")
    if config.max_candidates < 2:
        raise CxrfairError(f"max_candidates {config.max_candidates}: needs at least 2")


def _source(config: PostprocessConfig) -> tuple[R.Run, R.RunKey]:
    """Read the source run; its key must have no mitigation yet (a run id holds one)."""
    path = Path(config.run)
    if not R.run_is_complete(path):
        raise CxrfairError(f"RUN {path}: not a run folder (expected {R.META_FILE} and {R.PREDICTIONS_FILE}); "
                           "pass one folder under your runs folder")
    run = R.read_run(path)
    key = R.parse_run_id(run.run_id)
    if key.mitigation != "erm":
        raise CxrfairError(f"run {run.run_id} already has mitigation {key.mitigation}-{key.sensitive}; "
                           "post-process an erm run (a run id holds one mitigation)")
    if key.shots is not None:  # its post-processed run would lose the shots from its id and pose as a whole-split run
        raise CxrfairError(f"run {run.run_id} is a {key.shots}-shot probe; few-shot runs take no mitigation yet, "
                           "post-process a run trained on the whole training split")
    return run, key


def _group_column(run: R.Run, attribute: str) -> tuple[np.ndarray, list[str]]:
    """(N,) group of every prediction row as str, and the declared groups; CxrfairError when the run
    does not declare the attribute, lacks its column, or a row's group is empty or undeclared."""
    declared = R.run_attributes(run)
    if attribute not in declared:
        raise CxrfairError(f"run {run.run_id}: --sensitive {attribute!r} is not one of its attributes "
                           f"({', '.join(declared)}; run.json attributes)")
    if attribute not in run.predictions.columns:
        raise CxrfairError(f"run {run.run_id}: {R.PREDICTIONS_FILE} has no column {attribute} although run.json "
                           "declares it; rewrite the run from a cohort that has it")
    values = run.predictions[attribute]
    if values.isna().any():
        raise CxrfairError(f"run {run.run_id}: column {attribute} is empty in {int(values.isna().sum())} row(s); "
                           "every image needs its group to be post-processed")
    values, levels = values.astype(str).to_numpy(), [str(g) for g in declared[attribute]["groups"]]
    unknown = sorted(set(values) - set(levels))
    if unknown:
        raise CxrfairError(f"run {run.run_id}: column {attribute} has value(s) {unknown[:5]} outside the declared "
                           f"groups {levels}")
    return values, levels


def group_codes(run: R.Run, attribute: str) -> tuple[np.ndarray, list[str]]:
    """(N,) int group index of every prediction row, and the groups it indexes: the declared groups
    present among the rows, in declared order.

    CxrfairError (besides ``_group_column``'s) when fewer than two groups are present, or a present
    group has no validation rows (nothing could be fitted for it).
    """
    values, declared = _group_column(run, attribute)
    levels = [g for g in declared if g in set(values)]
    if len(levels) < 2:
        raise CxrfairError(f"run {run.run_id}: {attribute} has {len(levels)} group(s) among the run's images "
                           f"({', '.join(levels)}); post-processing equalises two or more")
    in_val = set(values[(run.predictions["split"] == "val").to_numpy()])
    lacking = [g for g in levels if g not in in_val]
    if lacking:
        raise CxrfairError(f"run {run.run_id}: group(s) {lacking} of {attribute} have no validation rows, so "
                           "nothing can be fitted for them; merge groups or choose another --sensitive")
    index = {g: i for i, g in enumerate(levels)}
    return np.fromiter((index[v] for v in values), dtype=np.int64, count=len(values)), levels


def fit_run(run: R.Run, codes: np.ndarray, levels: list[str], config: PostprocessConfig) -> tuple[Fit, np.ndarray]:
    """Fit on the run's validation rows; return the fit and the new (N, C) probabilities of every row."""
    task = str(run.meta.get("task", "multiclass"))
    val = (run.predictions["split"] == "val").to_numpy()
    targets, _ = run.arrays("val")
    P = run.predictions[R.prob_columns(run.classes)].to_numpy(dtype=np.float64)
    args = (codes[val], len(levels), config.constraint, config.strength, config.max_candidates)
    if task == "multilabel":
        fit = fit_thresholds(targets, P[val], *args, names=(levels, run.classes))
        return fit, apply_thresholds(P, codes, fit)
    fit = fit_offsets(targets, P[val], *args)
    return fit, apply_offsets(P, codes, fit.params)


def _jsonable(x):
    """NaN -> None (run.json is strict JSON), numpy -> Python."""
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return None if np.isnan(x) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


def _fitted(fit: Fit, classes: list[str], levels: list[str], task: str) -> dict:
    """run.json ``fitted``: {"thresholds"|"offsets": {group: {class: value}}} (+ decision thresholds)."""
    name = "thresholds" if task == "multilabel" else "offsets"
    out = {name: {g: dict(zip(classes, fit.params[i].tolist())) for i, g in enumerate(levels)}}
    if fit.decision is not None:
        out["decision_thresholds"] = dict(zip(classes, fit.decision.tolist()))
    return _jsonable(out)


def _notes(run: R.Run, task: str, sensitive: str) -> str:
    what = "thresholds" if task == "multilabel" else "class offsets"
    source = f"; source notes: {run.meta['notes']}" if run.meta.get("notes") else ""
    return f"group {what} on {sensitive} fitted on the validation split of {run.run_id}{source}"


def new_meta(run: R.Run, key: R.RunKey, fit: Fit, levels: list[str], config: PostprocessConfig, seconds: float) -> dict:
    """run.json of the post-processed run: the source's, with the mitigation's keys set."""
    task = str(run.meta.get("task", "multiclass"))
    new_key = R.RunKey(key.model, key.method, key.tag, key.seed, mitigation="thresholds", sensitive=config.sensitive)
    meta = {k: v for k, v in run.meta.items() if k != "created"}
    fitted = _fitted(fit, run.classes, levels, task)
    unit = "F1 per condition" if task == "multilabel" else "accuracy"
    meta.update({
        "run_id": new_key.run_id, "mitigation": "thresholds", "sensitive": config.sensitive,
        "strength": float(config.strength), "source_run": run.run_id, "fitted": fitted,
        "selection": SELECTION_RULE, "constraint": config.constraint,
        "timings": {**run.meta.get("timings", {}), "postprocess": round(seconds, 3)},
        "postprocess": _jsonable({"utility": unit, "validation_before": fit.before, "validation_after": fit.after,
                                  "max_candidates": config.max_candidates, "notes": fit.notes}),
        "notes": _notes(run, task, config.sensitive),
    })
    if task == "multilabel":
        meta["decision_thresholds"] = fitted["decision_thresholds"]
    return meta


def postprocess(config: PostprocessConfig) -> Path:
    """Fit group-specific decision rules on a run's validation rows and write them as a new run.

    Returns:
        The new run folder ``<out>/<model>__<method>+thresholds-<attr>__<tag>__s<seed>``. Raises
        CxrfairError (nothing written) on an unknown constraint, a strength out of range, a folder
        that is not a run, an attribute the run does not declare, or a group without validation rows.
    """
    start = time.perf_counter()
    _check_config(config)
    run, key = _source(config)
    codes, levels = group_codes(run, config.sensitive)
    fit, probs = fit_run(run, codes, levels, config)
    predictions = run.predictions.copy()
    predictions[R.prob_columns(run.classes)] = probs
    meta = new_meta(run, key, fit, levels, config, time.perf_counter() - start)
    out = Path(config.out) if config.out is not None else Path(config.run).parent
    return R.write_run(out, meta, predictions, force=config.force)
