"""The report's first screen: per model, the methods ranked by utility and by their worst group, what
each mitigation bought and cost, and the chance level every verdict is read against.

Every number is a row of ``seeds.csv`` (the seed-averaged summary) or ``mitigation.csv``; nothing is
recomputed here except the chance level, which is read from the runs' own test labels.

Chance rule (stated on the page): multi-class, the accuracy of always predicting the test split's
most frequent class (1/C for balanced classes); multi-label, a macro AUC of 0.5. A method is *above
chance* when the lower end of its utility interval is above that level; fairness verdicts of a
method at chance, or against a baseline at chance, are withheld (``findings.AT_CHANCE``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from cxrfair.analysis.findings import attribute_label, method_label, number
from cxrfair.analysis.report import ReportData, Section, Table, fmt

_BETTER = {"higher": 1, "lower": -1}


def utility_metric(data: ReportData) -> tuple[str, str]:
    """(metric, its name): accuracy for multi-class, macro AUC for multi-label."""
    return ("auc_macro", "macro AUC") if data.task == "multilabel" else ("accuracy", "accuracy")


def worst_metric(data: ReportData) -> tuple[str, str, str] | None:
    """(metric, attribute, name) of the worst-group view: worst-group accuracy (multi-label: macro
    worst-group AUC) over the finest attribute analysed (the crossed one, listed last); None if absent."""
    s = data.summary
    metric = "worst_group_auc" if data.task == "multilabel" else "worst_group_accuracy"
    have = s[(s["metric"] == metric) & (s["group"] == "") & (s["class"] == "")]
    attrs = [a for a in data.attributes if a in set(have["attribute"])]
    if not attrs:
        return None
    name = "worst-group AUC" if data.task == "multilabel" else "worst-group accuracy"
    return metric, attrs[-1], f"{name} ({attribute_label(attrs[-1])})"


def _pick(s: pd.DataFrame, metric: str, attribute: str = "") -> pd.DataFrame:
    return s[(s["metric"] == metric) & (s["attribute"] == attribute) & (s["group"] == "") & (s["class"] == "")]


def ranking(data: ReportData, model: str) -> pd.DataFrame:
    """One model's primary methods, best utility first: utility and worst-group value (mean over
    seeds [interval of the mean] ±sd), both ranks, and whether the utility is above chance."""
    s = data.summary[data.summary["model"] == model]
    um, uname = utility_metric(data)
    u = _pick(s, um).set_index("method")
    if u.empty:
        return pd.DataFrame()
    w = worst_metric(data)
    wv = _pick(s, w[0], w[1]).set_index("method") if w else pd.DataFrame()
    level = data.chance.get(model, np.nan)
    rows = []
    for method, r in u.iterrows():
        row = {"method": method_label(method), uname: fmt(r.value, r.ci_low, r.ci_high, r.sd, int(r.n_seeds)),
               "_u": r.value}
        if w:
            x = wv.loc[method] if method in wv.index else None
            row[w[2]] = "–" if x is None else fmt(x.value, x.ci_low, x.ci_high, x.sd, int(x.n_seeds))
            row["_w"] = np.nan if x is None else x.value
        row["above chance"] = ("–" if not np.isfinite(level) else
                               "yes" if r.ci_low > level else "no")
        row["seeds"] = int(r.n_seeds)
        rows.append(row)
    t = pd.DataFrame(rows)
    t.insert(0, f"rank by {uname}", t["_u"].rank(ascending=False, method="min").astype(int))
    if w:
        r = t["_w"].rank(ascending=False, method="min")
        t.insert(1, "rank by worst group", [str(int(x)) if np.isfinite(x) else "–" for x in r])
    return t.sort_values(f"rank by {uname}").drop(columns=[c for c in ("_u", "_w") if c in t]).reset_index(drop=True)


def model_sentence(data: ReportData, model: str) -> str:
    """Which method is most accurate, which has the best worst group, and what the latter costs."""
    s = data.summary[data.summary["model"] == model]
    um, uname = utility_metric(data)
    u = _pick(s, um).dropna(subset=["value"])
    if u.empty:
        return ""
    top = u.loc[u["value"].idxmax()]
    tied = [method_label(m) for m, v in zip(u["method"], u["value"])
            if m != top.method and round(100 * v, 1) == round(100 * top.value, 1)]  # equal as printed
    text = (f"**{model}**: most {'accurate' if um == 'accuracy' else 'discriminative'} is "
            f"**{method_label(top.method)}** ({uname} {fmt(top.value, top.ci_low, top.ci_high)}"
            + (f"; tied with {', '.join(tied)}" if tied else "") + ")")
    w = worst_metric(data)
    wv = _pick(s, w[0], w[1]).dropna(subset=["value"]) if w else pd.DataFrame()
    if len(wv):
        best = wv.loc[wv["value"].idxmax()]
        said = fmt(best.value, best.ci_low, best.ci_high)
        if best.method == top.method:
            text += f", and it also has the best {w[2]} ({said})"
        else:
            bu = u[u["method"] == best.method]
            cost = (f"; it gives up {number(top.value - bu['value'].iloc[0])} points of {uname} against "
                    f"{method_label(top.method)} (difference of seed means; the paired interval is under "
                    "[Findings](#findings))") if len(bu) else ""
            text += f"; the best {w[2]} is **{method_label(best.method)}**'s ({said}){cost}"
    return text + "."


def chance_sentence(data: ReportData) -> str:
    um, uname = utility_metric(data)
    levels = {m: c for m, c in data.chance.items() if np.isfinite(c)}
    if not levels:
        return ""
    rule = ("a macro AUC of 50.0" if um == "auc_macro" else
            "the accuracy of always predicting the test split's most frequent class ("
            + ", ".join(f"{m}: {100 * c:.1f}%" for m, c in sorted(levels.items())) + ")")
    low = sorted(data.at_chance)
    said = (" Not shown above chance here: " + ", ".join(f"{m} {method_label(me)}" for m, me in low)
            + "; their fairness verdicts are withheld (a classifier at chance has small gaps for free, and an "
              "interval reaching chance cannot rule that out)."
            if low else " Every method is above chance.")
    return (f"**Chance level**: {rule}; a method is above chance when its {uname} interval lies above it.{said}")


def reference_sentence(data: ReportData) -> str:
    c = data.results.comparisons
    if c.empty:
        return ""
    bases = c.drop_duplicates("model").set_index("model")["baseline"]
    said = "; ".join(f"{method_label(b)} of {', '.join(ms)}"
                     for b, ms in bases.groupby(bases, sort=False).groups.items())
    return (f"**Reference for every verdict** under [Findings](#findings): the {said} (each model's plain linear "
            "probe when it has one; zero-shot only without it, and its fairness verdicts only where it is above "
            "chance).")


def mitigation_sentences(data: ReportData) -> list[str]:
    """One sentence per mitigation / post-process chosen on validation: what it bought and what it cost
    (differences whose interval excludes zero, in both directions), against its ERM counterpart."""
    m = getattr(data.results, "mitigation", None)
    if m is None or len(m) == 0:
        return []
    t = m[m["selected"].astype(bool)]
    out = []
    for (model, method, mit, sens), rows in t.groupby(["model", "method", "mitigation", "sensitive"], sort=False):
        head = f"**{mit}** ({attribute_label(str(sens))}) on {model} {method_label(method)}"
        # The chosen run is its own ERM counterpart (e.g. strength 0 selected): every difference is
        # exactly zero on every resample. Said once instead of a row of "+0.0 [0.0, 0.0]".
        if bool(((rows["delta"] == 0) & (rows["ci_low"] == 0) & (rows["ci_high"] == 0)).all()):
            out.append(f"{head}: validation chose strength {rows['strength'].iloc[0]:g}, i.e. no mitigation; the "
                       "run equals its ERM counterpart, so there is nothing to compare.")
            continue
        bought, cost, flat = [], [], []
        for r in rows.itertuples():
            if r.better not in _BETTER:
                continue
            d = (f"{r.metric} {number(r.erm)} → {number(r.mitigated)} ({number(r.delta, signed=True)} "
                 f"[{number(r.ci_low)}, {number(r.ci_high)}])")
            if r.ci_low > 0 or r.ci_high < 0:
                (bought if np.sign(r.delta) == _BETTER[r.better] else cost).append(d)
            else:
                flat.append(r.metric)
        said = [f"bought {', '.join(bought)}" if bought else "bought nothing clear",
                f"cost {', '.join(cost)}" if cost else "cost nothing clear"]
        n = int(rows["n_seeds"].max())
        out.append(f"{head}: {'; '.join(said)} (%, ERM → mitigated, difference in points, {n} seeds"
                   + (f"; no clear change in {', '.join(dict.fromkeys(flat))}" if flat else "") + ").")
    return out


def headline(data: ReportData) -> Section | None:
    """The first section: which model and method is most accurate, which fairest, at what cost."""
    models = sorted(set(data.summary["model"]))
    if not models:
        return None
    prose = [x for x in (reference_sentence(data), chance_sentence(data)) if x]
    lines = [x for x in (model_sentence(data, m) for m in models) if x]
    if lines:
        prose.insert(0, "\n".join("- " + x for x in lines))
    mit, notes = mitigation_sentences(data), []
    if mit:
        notes.append("**Mitigations and post-processing** (the strength chosen on validation; bought: better "
                     "with an interval excluding zero; cost: worse, likewise):")
        notes.append("\n".join("- " + x for x in mit))
    um, uname = utility_metric(data)
    tables = tuple(Table(t, f"{model}: methods ranked by {uname} and by their worst group; cells: mean over "
                         "seeds [interval of that mean] ±sd over seeds, in %.", index=("method",), visible=8)
                   for model in models if not (t := ranking(data, model)).empty)
    return Section("headline", "Headline", prose=tuple(prose), tables=tables, notes=tuple(notes))
