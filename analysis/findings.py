"""Findings: the paired comparisons (``comparisons.csv``) read out as sentences.

One table, ``findings_table``, holds every stated number (taken from comparisons, never
recomputed) with its verdict; the sentences and the summary counts are formatted from it, so
what the report says and what comparisons.csv holds cannot drift apart.

A comparison "excludes zero" when its interval lies wholly above or below 0. Intervals are the
analysis' percentile intervals of the paired difference, not corrected for multiplicity.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from cxrfair.core.runs import METHODS

METHOD_LABELS = {"zeroshot": "zero-shot", "linear": "linear probe", "mlp": "MLP probe", "lora": "LoRA",
                 "full": "full fine-tuning"}
ATTRIBUTE_LABELS = {"age_group": "age"}
MINUS = "\N{MINUS SIGN}"


@dataclass(frozen=True)
class Question:
    """One thing asked of every model × method: how did this metric move against the baseline?"""

    metric: str  # name in comparisons.csv
    attribute: str  # "" for a metric on the whole split
    name: str  # how a sentence names it within its attribute, e.g. "|F1 gap|"
    better: str  # "higher", "lower", or "" when a move is neither better nor worse (a signed gap)
    kind: str  # "utility", "fairness" or "signed": which summary line counts it

    @property
    def label(self) -> str:
        """The name with its attribute, e.g. "sex |F1 gap|"."""
        return f"{attribute_label(self.attribute)} {self.name}" if self.attribute else self.name


def method_label(method: str) -> str:
    return METHOD_LABELS.get(method, method)


def attribute_label(attribute: str) -> str:
    return ATTRIBUTE_LABELS.get(attribute, attribute)


def _n_groups(c: pd.DataFrame, attribute: str) -> int:
    return c.loc[(c["attribute"] == attribute) & (c["group"] != ""), "group"].nunique()


def questions(comparisons: pd.DataFrame) -> list[Question]:
    """The questions the findings answer, for the metrics and attributes present.

    Utility: accuracy (multi-class), else macro AUC (multi-label). Var_F1 (fairness across
    diseases). Per attribute: the F1 gap, the AUC gap (multi-label), worst-group AUC and EqOdds.
    A gap is its magnitude (``f1_gap_abs``) when the analysis provides it; otherwise the signed
    gap, whose change has no fairer/less-fair reading for two groups but has one for more (then
    it is max − min).
    """
    c = comparisons
    have = set(zip(c["metric"], c["attribute"]))
    utility = "accuracy" if ("accuracy", "") in have else "auc_macro"
    out = [Question(utility, "", "accuracy" if utility == "accuracy" else "macro AUC", "higher", "utility"),
           Question("var_f1", "", "Var_F1", "lower", "fairness")]
    for a in dict.fromkeys(x for x in c["attribute"] if x):
        two = _n_groups(c, a) == 2
        if ("f1_gap_abs", a) in have:
            out.append(Question("f1_gap_abs", a, "|F1 gap|", "lower", "fairness"))
        else:
            out.append(Question("f1_gap", a, "F1 gap (signed)" if two else "F1 gap", "" if two else "lower",
                                "signed" if two else "fairness"))
        out.append(Question("auc_gap", a, "AUC gap (signed)" if two else "AUC gap", "" if two else "lower",
                            "signed" if two else "fairness"))
        out.append(Question("worst_group_auc", a, "worst group AUC", "higher", "fairness"))
        out.append(Question("eqodds", a, "EqOdds", "lower", "fairness"))
    return [q for q in out if (q.metric, q.attribute) in have]


def verdict(lo: float, hi: float, better: str, fairness: bool = False) -> str:
    """Reading of one interval: higher/lower, or fairer/less fair for a fairness question (a gap,
    where lower is better, or a worst-group score with ``fairness`` set, where higher is);
    no clear change; or undefined."""
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return "undefined"
    if lo <= 0 <= hi:
        return "no clear change"
    up = lo > 0
    if better == "lower":
        return "less fair" if up else "fairer"
    if fairness and better == "higher":
        return "fairer" if up else "less fair"
    return "higher" if up else "lower"


def _seeds(rows: pd.DataFrame) -> list[float]:
    """Seeds of one model · method to state: NaN alone when a seed-aggregate row (no seed) exists, else each seed."""
    seed = pd.to_numeric(rows["seed"], errors="coerce")
    return [np.nan] if seed.isna().any() else sorted(set(seed.tolist()))


def findings_table(comparisons: pd.DataFrame) -> pd.DataFrame:
    """Every comparison the findings state, in reading order.

    Args:
        comparisons: the analysis' comparisons table (``comparisons.csv``).

    Returns:
        DataFrame with ``model, method, baseline, seed, metric, attribute, label, name, kind,
        better, delta, ci_low, ci_high, verdict`` (fractions, as comparisons.csv); ``seed`` is NaN for a
        seed-aggregate row.
    """
    cols = ["model", "method", "baseline", "seed", "metric", "attribute", "label", "name", "kind", "better",
            "delta", "ci_low", "ci_high", "verdict"]
    if comparisons.empty:
        return pd.DataFrame(columns=cols)
    c = comparisons[(comparisons["group"] == "") & (comparisons["class"] == "")]
    c = c.assign(seed=pd.to_numeric(c["seed"], errors="coerce"))
    qs = questions(comparisons)
    records = []
    for (model, method), rows in _pairs(c):
        for seed in _seeds(rows):
            at_seed = rows[rows["seed"].isna()] if np.isnan(seed) else rows[rows["seed"] == seed]
            for q in qs:
                hit = at_seed[(at_seed["metric"] == q.metric) & (at_seed["attribute"] == q.attribute)]
                if hit.empty:
                    continue
                h = hit.iloc[0]
                lo, hi = float(h["ci_low"]), float(h["ci_high"])
                records.append((model, method, h["baseline"], seed, q.metric, q.attribute, q.label, q.name,
                                q.kind, q.better, float(h["delta"]), lo, hi, verdict(lo, hi, q.better, q.kind == "fairness")))
    return pd.DataFrame.from_records(records, columns=cols)


def _pairs(c: pd.DataFrame):
    """((model, method), rows) in reading order: models sorted, methods in METHODS order."""
    rank = c["method"].map(lambda m: METHODS.index(m) if m in METHODS else len(METHODS))
    keys = c.assign(_r=rank).sort_values(["model", "_r", "method"], kind="stable")
    for model, method in dict.fromkeys(zip(keys["model"], keys["method"])):
        yield (model, method), c[(c["model"] == model) & (c["method"] == method)]


# ----------------------------------------------------------------------------- sentences


def number(x: float, scale: float = 100.0, signed: bool = False) -> str:
    """``+10.2`` / ``−0.8`` (Unicode minus) in points; ``0.0`` unsigned when it rounds to zero; – for NaN."""
    if not np.isfinite(x):
        return "–"
    v = round(scale * x, 1)
    if v == 0:
        return "0.0"
    s = f"{v:+.1f}" if signed else f"{v:.1f}"
    return s.replace("-", MINUS)


def clause(row, unit: str = "") -> str:
    """``accuracy +10.2 points [6.1, 14.0] (**higher**)`` for one findings row; a verdict is bold when
    the interval excludes zero."""
    v = row.verdict if row.verdict in ("no clear change", "undefined") else f"**{row.verdict}**"
    return f"{row.name} {number(row.delta, signed=True)}{unit} [{number(row.ci_low)}, {number(row.ci_high)}] ({v})"


def sentence(rows: pd.DataFrame, seed_note: str = "") -> str:
    """One model × method: overall clauses, then one clause group per attribute."""
    r0 = rows.iloc[0]
    parts = []
    for attr, sub in rows.groupby("attribute", sort=False):
        text = ", ".join(clause(r, " points" if r.metric == "accuracy" else "") for r in sub.itertuples())
        parts.append(f"by {attribute_label(attr)}: {text}" if attr else text)
    return f"**{r0.model}, {method_label(r0.method)} vs {method_label(r0.baseline)}**{seed_note}: " + "; ".join(parts) + "."


def sentences(table: pd.DataFrame) -> list[str]:
    """One sentence per model × method (and seed, when comparisons are per seed)."""
    out = []
    for (model, method, seed), rows in table.groupby(["model", "method", "seed"], sort=False, dropna=False):
        seed_note = "" if np.isnan(seed) or _one_seed(table, model, method) else f" (seed {int(seed)})"
        out.append(sentence(rows, seed_note))
    return out


def _one_seed(table: pd.DataFrame, model: str, method: str) -> bool:
    return table.loc[(table["model"] == model) & (table["method"] == method), "seed"].nunique(dropna=False) == 1


_KIND_WORDS = {"fairness": "Fairness", "signed": "Signed gaps"}
_KIND_NOTES = {"signed": "A − A′ with A the reference group; a move is neither fairer nor less fair"}


def _what(rows: pd.DataFrame) -> str:
    """``Var_F1; EqOdds by sex, age; F1 gap by sex×age``: the questions one summary line counts."""
    parts = list(dict.fromkeys(rows.loc[rows["attribute"] == "", "name"]))
    grouped = rows[rows["attribute"] != ""]
    for name, sub in grouped.groupby("name", sort=False):
        parts.append(f"{name} by {', '.join(attribute_label(a) for a in dict.fromkeys(sub['attribute']))}")
    return "; ".join(parts)


def summary_lines(table: pd.DataFrame, level: float) -> list[str]:
    """The headline counts per kind of question, then how many comparisons and what their intervals mean."""
    if table.empty:
        return []
    out = []
    for kind in ("utility", "fairness", "signed"):
        rows = table[table["kind"] == kind]
        if rows.empty:
            continue
        counts = rows["verdict"].value_counts()
        listed = ", ".join(f"{w} in {counts[w]}" for w in
                           ("higher", "lower", "fairer", "less fair", "no clear change", "undefined") if w in counts)
        note = f"; {_KIND_NOTES[kind]}" if kind in _KIND_NOTES else ""
        what = "" if kind == "utility" else f" ({_what(rows)}{note})"
        word = _KIND_WORDS.get(kind) or rows["name"].iloc[0][:1].upper() + rows["name"].iloc[0][1:]  # "Accuracy"
        out.append(f"**{word}**{what}: {listed} (of {len(rows)} comparisons).")
    n, pairs = len(table), table.groupby(["model", "method", "seed"], dropna=False).ngroups
    alpha = 1 - level
    out.append(
        f"In all, {n} comparisons ({pairs} model × method runs; each a paired bootstrap difference, method "
        f"minus {_baseline_words(table)}, in points, with its {100 * level:.0f}% percentile "
        f"interval on the same resampled test images). Intervals are **not corrected for multiplicity**: "
        f"if nothing changed, about {alpha * n:.1f} of the {n} would still exclude zero by chance.")
    return out


def _baseline_words(table: pd.DataFrame) -> str:
    bases = list(dict.fromkeys(table["baseline"]))
    return method_label(bases[0]) if len(bases) == 1 else "each model's baseline method"
