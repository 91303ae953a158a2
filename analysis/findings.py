"""Findings: the paired comparisons (``comparisons.csv``) read out as sentences.

One table, ``findings_table``, holds every stated number (taken from comparisons, never
recomputed) with its verdict; the sentences and the summary counts are formatted from it, so
what the report says and what comparisons.csv holds cannot drift apart.

A comparison "excludes zero" when its interval lies wholly above or below 0. Intervals are the
analysis' intervals of the paired difference (``replicates.delta_interval``: patients, widened by
the seeds), not corrected for multiplicity.
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


AT_CHANCE = "not judged: not shown above chance"  # its utility interval reaches chance (headline.chance)


def _pool(hit: pd.DataFrame) -> tuple[float, float, float, int, float, float]:
    """(delta, ci_low, ci_high, n_seeds, p_value, p_holm) of one question's rows for one model · method.

    A seed-mean row (no seed; its interval over patients widened by the seeds' variance) is
    used as it is. Otherwise the seeds are pooled: the mean
    difference, and the union of the seeds' intervals, so a pooled interval excludes zero only
    when every seed's does, on the same side (conservative: no seed's verdict is hidden by the
    others); p-values (when comparisons.csv has them) likewise take the largest over seeds.
    """
    agg = hit[hit["seed"].isna()]
    rows = agg.iloc[:1] if len(agg) else hit.drop_duplicates("seed")
    p = rows["p_value"].astype(float) if "p_value" in rows else pd.Series([np.nan])
    ph = rows["p_holm"].astype(float) if "p_holm" in rows else pd.Series([np.nan])
    # A seed-mean row says how many seeds it averages (``n_seeds``); pooled rows are one per seed.
    n = (int(agg["n_seeds"].iloc[0]) if "n_seeds" in agg else 0) if len(agg) else len(rows)  # 0: not recorded
    return (float(rows["delta"].astype(float).mean()), float(rows["ci_low"].astype(float).min()),
            float(rows["ci_high"].astype(float).max()), n, float(p.max()), float(ph.max()))


def findings_table(comparisons: pd.DataFrame, at_chance=frozenset(), alpha: float = 0.05) -> pd.DataFrame:
    """Every comparison the findings state, in reading order: one row per model × method × question,
    seeds pooled (``_pool``).

    Args:
        comparisons: the analysis' comparisons table (``comparisons.csv``); columns ``p_value`` and
            ``p_holm`` are optional.
        at_chance: (model, method) pairs whose utility is not above chance (``headline.chance``):
            their fairness and signed-gap rows, and those of every method compared with such a
            baseline, get the verdict ``AT_CHANCE`` (a chance-level classifier's gaps are small for free).
        alpha: the level a Holm-adjusted p-value is read at (1 − the interval level).

    Returns:
        DataFrame with ``model, method, baseline, n_seeds, metric, attribute, label, name, kind,
        better, delta, ci_low, ci_high, verdict, p_value, p_holm, verdict_holm`` (fractions, as
        comparisons.csv). ``n_seeds``: the seeds a row states (a seed-mean row's own count); ``verdict_holm`` is "" without
        ``p_holm``.
    """
    cols = ["model", "method", "baseline", "n_seeds", "metric", "attribute", "label", "name", "kind", "better",
            "delta", "ci_low", "ci_high", "verdict", "p_value", "p_holm", "verdict_holm"]
    if comparisons.empty:
        return pd.DataFrame(columns=cols)
    c = comparisons[(comparisons["group"] == "") & (comparisons["class"] == "")]
    c = c.assign(seed=pd.to_numeric(c["seed"], errors="coerce"))
    qs = questions(comparisons)
    records = []
    for (model, method), rows in _pairs(c):
        for q in qs:
            hit = rows[(rows["metric"] == q.metric) & (rows["attribute"] == q.attribute)]
            if hit.empty:
                continue
            base = hit["baseline"].iloc[0]
            delta, lo, hi, n, p, ph = _pool(hit)
            v = verdict(lo, hi, q.better, q.kind == "fairness")
            vh = "" if not np.isfinite(ph) else (v if ph < alpha else "no clear change")
            if q.kind != "utility" and ((model, method) in at_chance or (model, base) in at_chance):
                v, vh = AT_CHANCE, (AT_CHANCE if vh else "")
            records.append((model, method, base, n, q.metric, q.attribute, q.label, q.name, q.kind, q.better,
                            delta, lo, hi, v, p, ph, vh))
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
    the interval excludes zero; the Holm-adjusted verdict follows when comparisons carry ``p_holm``."""
    v = row.verdict if row.verdict in ("no clear change", "undefined", AT_CHANCE) else f"**{row.verdict}**"
    holm = getattr(row, "verdict_holm", "")
    if holm and row.verdict != AT_CHANCE:
        v += f"; Holm: {holm}"
    return f"{row.name} {number(row.delta, signed=True)}{unit} [{number(row.ci_low)}, {number(row.ci_high)}] ({v})"


def sentence(rows: pd.DataFrame) -> str:
    """One model × method: overall clauses, then one clause group per attribute."""
    r0 = rows.iloc[0]
    parts = []
    for attr, sub in rows.groupby("attribute", sort=False):
        text = ", ".join(clause(r, " points" if r.metric == "accuracy" else "") for r in sub.itertuples())
        parts.append(f"by {attribute_label(attr)}: {text}" if attr else text)
    n = int(r0.n_seeds)
    seeds = f" ({n} seeds pooled)" if n > 1 else ""
    return f"**{r0.model}, {method_label(r0.method)} vs {method_label(r0.baseline)}**{seeds}: " + "; ".join(parts) + "."


def sentences(table: pd.DataFrame) -> list[str]:
    """One sentence per model × method (seeds pooled)."""
    return [sentence(rows) for _, rows in table.groupby(["model", "method"], sort=False)]


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
                           ("higher", "lower", "fairer", "less fair", "no clear change", AT_CHANCE, "undefined")
                           if w in counts)
        if rows["verdict_holm"].astype(str).ne("").any():
            holm = rows["verdict_holm"].value_counts()
            listed += "; after Holm: " + ", ".join(f"{w} in {holm[w]}" for w in (
                "higher", "lower", "fairer", "less fair", "no clear change", AT_CHANCE) if w in holm)
        note = f"; {_KIND_NOTES[kind]}" if kind in _KIND_NOTES else ""
        what = "" if kind == "utility" else f" ({_what(rows)}{note})"
        word = _KIND_WORDS.get(kind) or rows["name"].iloc[0][:1].upper() + rows["name"].iloc[0][1:]  # "Accuracy"
        out.append(f"**{word}**{what}: {listed} (of {len(rows)} comparisons).")
    n, pairs = len(table), table.groupby(["model", "method"]).ngroups
    alpha = 1 - level
    holm = ("; Holm-adjusted verdicts (p_holm in comparisons.csv) are given beside them"
            if table["verdict_holm"].astype(str).ne("").any() else "")
    out.append(
        f"In all, {n} comparisons ({pairs} model × method pairs, seeds pooled: the mean difference over seeds "
        f"with the union of the seeds' {100 * level:.0f}% intervals, so a verdict needs every seed to agree; each "
        f"a paired bootstrap difference, method minus {_baseline_words(table)}, in points, on the same resampled "
        f"test images). The intervals are **not corrected for multiplicity**{holm}: if nothing changed, about "
        f"{alpha * n:.1f} of the {n} would still exclude zero by chance.")
    return out


def _baseline_words(table: pd.DataFrame) -> str:
    bases = list(dict.fromkeys(table["baseline"]))
    return method_label(bases[0]) if len(bases) == 1 else "each model's baseline method"
