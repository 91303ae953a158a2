"""Attribute leakage: how well sex, age, race, ... can be read from frozen image embeddings.

For each attribute, linear, MLP and kNN probes predict its groups from the embeddings on a
patient-grouped train/val/test split made for this analysis; each probe's configuration is
chosen on validation and its test ROC-AUC reported with a patient-bootstrap interval. Chance is
measured, not assumed: the whole pipeline (split, standardisation, sweep or k search, selection
on validation) is rerun on the attribute shuffled across patients, and ``chance_auc`` is the
mean test AUC of those runs, ``chance_low``/``chance_high`` the 95% range of their pooled
bootstrap replicates (test sampling and training variation together).

Label-conditional leakage evaluates the same probes within each label condition (each class of
a multi-class cohort; positives and negatives of each condition of a multi-label one): inside
one class, disease features carry no information about the attribute, so an attribute that is
merely correlated with disease prevalence scores near chance there. The probes are not retrained
per condition: training on a sixth of the data would understate leakage, and keeping the probe
fixed makes the conditional and overall AUCs differ only in the images evaluated.

Why a new split rather than the cohort's: the cohort's split serves the disease task (sizes,
stratification by label x group, often a small validation split), and caches of the evaluation
images only (Sourget et al. use MIMIC's test split) have no training rows at all. The encoders
are frozen and never saw these images, so every cached row can serve; the leakage split is
patient-grouped, stratified by the joint cell of the cohort's sensitive attributes (so the
split does not depend on which attributes are requested) and seeded.

References:
    Sourget et al., "Fairness and Robustness of CLIP-Based Models for Chest X-rays", FAIMI 2025.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

import cxrfair
from cxrfair.core.bootstrap import interval
from cxrfair.errors import CxrfairError
from cxrfair.io import atomic_dir, check_replace, write_json_atomic
from cxrfair.probe.embeddings.attribute_probes import (
    KNN_METRICS,
    LINEAR_GRID,
    MLP_GRID,
    KnnIndex,
    ProbeFit,
    SweepGrid,
    knn_fit,
    knn_index,
    leakage_auc,
    standardize,
    sweep_fit,
)
from cxrfair.probe.embeddings.data import (
    SPLIT_NAMES,
    Attribute,
    EmbeddingData,
    conditions,
    group_problem,
    load_embedding_data,
    patient_counts,
    patient_split,
    permute_by_patient,
    resolve_attributes,
    seeded_rng,
)

# The figures (``cxrfair.embedding_figures``) are imported by the writer only: matplotlib costs
# about 1 s, and the analysis, its config and the CLI's option checks need none of it.

PROBES = ("linear", "mlp", "knn")
COLUMNS = ["model", "attribute", "condition", "probe", "auc", "ci_low", "ci_high", "chance_auc", "chance_low",
           "chance_high", "n_train", "n_val", "n_test", "selected", "groups", "n_perm", "note"]
PERMUTATION_COLUMNS = ["model", "attribute", "condition", "probe", "permutation", "auc", "selected"]
# Fewest permutations for a chance level: one run's test AUC on a shuffled attribute has an sd of
# ~0.03-0.1 on a few hundred test images (more within a label condition), so the mean of n is
# uncertain by that / sqrt(n): about +-0.02 at 20, while a single permutation once gave a
# conditional "chance" AUC of 0.79. Fewer (but not 0) is allowed for quick runs, with a note.
MIN_PERMUTATIONS = 20


@dataclass(frozen=True)
class LeakageConfig:
    """What the leakage analysis probes and how."""

    attributes: tuple = ()  # columns to probe; empty = every sensitive attribute of the cohort
    probes: tuple = PROBES  # any of linear, mlp, knn
    fractions: tuple = (0.6, 0.2, 0.2)  # train / val / test shares of patients
    seed: int = 0  # fixes the split, permutations, bootstrap and probe initialisation
    n_boot: int = 1000  # patient-bootstrap replicates per interval
    n_perm: int = MIN_PERMUTATIONS  # reruns of the whole pipeline on shuffled attributes (0: no chance level)
    min_group: int = 10  # fewest images per group in each split (and in the test rows of a condition)
    conditional: bool = True  # also evaluate within each label condition
    cohort_splits: tuple = ()  # use only these cohort splits' rows; empty = every row
    ks: tuple = tuple(range(1, 22, 2))  # kNN neighbour counts searched on validation
    knn_metrics: tuple = KNN_METRICS  # kNN distances searched on validation
    linear: SweepGrid = LINEAR_GRID  # the linear probe's sweep
    mlp: SweepGrid = MLP_GRID  # the MLP probe's sweep

    def validate(self) -> "LeakageConfig":
        """Raise CxrfairError naming the option that is unusable; return self."""
        _check(len(self.probes) > 0 and set(self.probes) <= set(PROBES), "--probes", f"choose from {', '.join(PROBES)}")
        _check(len(self.fractions) == 3 and all(f > 0 for f in self.fractions) and abs(sum(self.fractions) - 1) < 1e-6,
               "--fractions", "three positive shares (train, val, test) summing to 1, e.g. 0.6,0.2,0.2")
        _check(self.n_boot >= 100, "--bootstrap", "at least 100 replicates for a 95% interval")
        _check(self.n_perm >= 0, "--permutations", "must be >= 0")
        _check(self.min_group >= 2, "--min-group", "must be >= 2")
        _check(len(self.ks) > 0 and all(int(k) >= 1 for k in self.ks), "--ks", "neighbour counts must be >= 1")
        _check(len(self.knn_metrics) > 0 and set(self.knn_metrics) <= set(KNN_METRICS), "--knn-metrics",
               f"choose from {', '.join(KNN_METRICS)}")
        return self


def _check(ok: bool, option: str, why: str) -> None:
    if not ok:
        raise CxrfairError(f"{option}: {why}")


@dataclass
class LeakageResult:
    """Everything the analysis measured.

    Attributes:
        table: ``leakage.csv`` rows (``COLUMNS``).
        permutations: each permutation run's test AUC (``PERMUTATION_COLUMNS``).
        split: image_id, patient_id, cohort_split, split (the leakage split of every row used).
        notes: what was skipped and why.
        meta: model, cache, cohort hash, config, attribute groups, timings.
    """

    table: pd.DataFrame
    permutations: pd.DataFrame
    split: pd.DataFrame
    notes: list
    meta: dict


# ---------------------------------------------------------------- the analysis


def leakage(data: EmbeddingData, cfg: LeakageConfig, progress: bool = False) -> LeakageResult:
    """Probe every attribute (and label condition) of ``data``; see the module docstring.

    Every requested attribute is checked before any training (an unusable one is an error);
    a defaulted one that cannot be analysed becomes skipped rows with a note.
    """
    cfg.validate()
    t0 = time.perf_counter()
    attrs = resolve_attributes(data, cfg.attributes)
    split = leakage_split(data, cfg)
    plan, rows, notes = _plan(data, attrs, split, cfg)
    conds = conditions(data) if cfg.conditional else []
    perm_rows, timings = [], {}
    with _bar(len(plan) * (1 + cfg.n_perm), progress, data.model) as bar:
        for attr in plan:
            t = time.perf_counter()
            found, perms, attr_notes = attribute_leakage(data, attr, split, conds, cfg, bar)
            rows, perm_rows, notes = rows + found, perm_rows + perms, notes + attr_notes
            timings[attr.name] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    table = pd.DataFrame(rows, columns=COLUMNS)
    perms = pd.DataFrame(perm_rows, columns=PERMUTATION_COLUMNS)
    if 0 < cfg.n_perm < MIN_PERMUTATIONS:
        notes = notes + [few_permutations_note(perms, cfg.n_perm)]
    meta = _meta(data, cfg, attrs, timings, notes)
    return LeakageResult(table, perms, _split_table(data, split), notes, meta)


def few_permutations_note(perms: pd.DataFrame, n_perm: int) -> str:
    """The note of a chance level from fewer than MIN_PERMUTATIONS runs, with its own sd where measurable.

    perms: the ``PERMUTATION_COLUMNS`` rows; the sd is the largest over (attribute, condition, probe).
    """
    head = f"chance level from {n_perm} permutation(s), fewer than {MIN_PERMUTATIONS}: "
    if n_perm < 2:
        spread = "one run cannot measure its own spread (a single shuffled run's AUC varies by up to ~0.1)"
    else:
        sd = float(perms.groupby(["attribute", "condition", "probe"])["auc"].std(ddof=1).max())
        spread = (f"the runs' AUC sd is up to {sd:.3f}, so chance_auc is uncertain by about "
                  f"+-{sd / np.sqrt(n_perm):.3f} (sd of the mean)")
    return head + spread + f"; use --permutations {MIN_PERMUTATIONS} or more for a table to report"


def _plan(data: EmbeddingData, attrs: list, split: np.ndarray, cfg: LeakageConfig) -> tuple[list, list, list]:
    """(attributes to probe, skipped rows, notes); a named attribute that cannot be probed raises."""
    plan, rows, notes = [], [], []
    for attr in attrs:
        problem = group_problem(attr, split, cfg.min_group)
        if problem and attr.requested:
            raise CxrfairError(problem)
        if problem:
            notes.append(f"skipped {problem}")
            rows += [_skipped(data.model, attr, "", p, notes[-1]) for p in cfg.probes]
        else:
            plan.append(attr)
    if not plan:
        raise CxrfairError(f"cache {data.source}: no attribute can be analysed ({'; '.join(notes) or 'none found'})")
    return plan, rows, notes


def leakage_split(data: EmbeddingData, cfg: LeakageConfig) -> np.ndarray:
    """(N,) 0/1/2 patient-grouped split, stratified by the joint cell of the cohort's sensitive
    attributes (missing values a cell of their own)."""
    cols = [c for c in data.sensitive if c in data.table.columns]
    strata = data.table[cols].astype(str).agg("|".join, axis=1) if cols else pd.Series("", index=data.table.index)
    return patient_split(data.patients, strata.to_numpy(), tuple(cfg.fractions), cfg.seed)


def attribute_leakage(data: EmbeddingData, attr: Attribute, split: np.ndarray, conds: list, cfg: LeakageConfig,
                      bar=None) -> tuple[list, list, list]:
    """Rows of one attribute: every probe, overall and per condition, with its chance level.

    Returns:
        (leakage rows, permutation rows, notes).
    """
    ctx = _fit_labellings(data, attr, split, cfg, bar)
    idx = ctx.idx
    rows, perm_rows, notes = [], [], []
    for name, mask in [("", np.ones(len(split), bool))] + conds:
        test_rows = mask[idx["test"]]
        problem = None if name == "" else _condition_problem(attr, attr.codes[idx["test"]][test_rows], name, cfg.min_group)
        if problem:
            notes.append(f"skipped {problem}")
            rows += [_skipped(data.model, attr, name, p, notes[-1]) for p in cfg.probes]
            continue
        found, perms = _evaluate(ctx, name, test_rows)
        rows, perm_rows = rows + found, perm_rows + perms
    return rows, perm_rows, notes


def _fit_labellings(data: EmbeddingData, attr: Attribute, split: np.ndarray, cfg: LeakageConfig, bar) -> "_Context":
    """Fit every probe on the attribute, then on each of ``cfg.n_perm`` shuffles of it.

    Features are standardised and kNN neighbours searched once: shuffling changes labels only.
    """
    idx = {name: np.flatnonzero((attr.codes >= 0) & (split == i)) for i, name in enumerate(SPLIT_NAMES)}
    x = standardize({s: data.x[i] for s, i in idx.items()})
    index = knn_index(x, cfg.ks, cfg.knn_metrics) if "knn" in cfg.probes else None
    real = fit_probes(x, {s: attr.codes[i] for s, i in idx.items()}, len(attr.groups), cfg, index)
    _tick(bar)
    shuffled = []
    for p in range(cfg.n_perm):
        codes = shuffled_codes(attr, data.patients, split, seeded_rng(cfg.seed, "permute", attr.name, p))
        fits = fit_probes(x, {s: codes[i] for s, i in idx.items()}, len(attr.groups), cfg, index)
        shuffled.append((codes[idx["test"]], fits))
        _tick(bar)
    return _Context(data, attr, cfg, idx, real, shuffled)


def fit_probes(x: dict, y: dict, n_groups: int, cfg: LeakageConfig, index: KnnIndex | None) -> dict[str, ProbeFit]:
    """Fit every probe of ``cfg`` on one labelling; probe name -> ProbeFit."""
    fits = {}
    for probe in cfg.probes:
        if probe == "knn":
            fits[probe] = knn_fit(index, y, n_groups)
        else:
            fits[probe] = sweep_fit(x, y, n_groups, probe, getattr(cfg, probe), cfg.seed)
    return fits


def shuffled_codes(attr: Attribute, patients, split: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(N,) the attribute shuffled across patients within each split (missing values stay missing)."""
    keep = np.flatnonzero(attr.codes >= 0)
    codes = attr.codes.copy()
    codes[keep] = permute_by_patient(attr.codes[keep], np.asarray(patients)[keep], split[keep], rng)
    return codes


@dataclass(frozen=True)
class _Context:
    data: EmbeddingData
    attr: Attribute
    cfg: LeakageConfig
    idx: dict  # split -> row indices used
    real: dict  # probe -> ProbeFit on the true attribute
    shuffled: list  # [(test codes (Nt,), probe -> ProbeFit)] per permutation


def _evaluate(ctx: _Context, condition: str, test_rows: np.ndarray) -> tuple[list, list]:
    """AUC, interval and chance level of every probe on the test rows of one condition.

    All probes share one set of bootstrap resamples (so their differences are paired), and each
    permutation run one set of its own.
    """
    cfg, attr = ctx.cfg, ctx.attr
    test = ctx.idx["test"][test_rows]
    patients, y = ctx.data.patients[test], attr.codes[test]
    counts = patient_counts(patients, y, cfg.n_boot, seeded_rng(cfg.seed, "bootstrap", attr.name, condition))
    perm = [(codes[test_rows], fits, patient_counts(patients, codes[test_rows], cfg.n_boot,
                                                    seeded_rng(cfg.seed, "bootstrap-perm", attr.name, condition, p)))
            for p, (codes, fits) in enumerate(ctx.shuffled)]
    rows, perm_rows = [], []
    for probe, fit in ctx.real.items():
        probs = fit.test_probs[test_rows]
        auc, reps = float(leakage_auc(y, probs)), leakage_auc(y, probs, weights=counts)
        chance = [(float(leakage_auc(c, f[probe].test_probs[test_rows])),
                   leakage_auc(c, f[probe].test_probs[test_rows], weights=w)) for c, f, w in perm]
        rows.append(_row(ctx, condition, probe, auc, reps, chance, len(test), fit.selected))
        perm_rows += [{"model": ctx.data.model, "attribute": attr.name, "condition": condition, "probe": probe,
                       "permutation": p, "auc": a, "selected": perm[p][1][probe].selected} for p, (a, _) in enumerate(chance)]
    return rows, perm_rows


def _row(ctx: _Context, condition: str, probe: str, auc: float, reps: np.ndarray, chance: list, n_test: int,
         selected: str) -> dict:
    lo, hi = interval(reps)
    if chance:
        c_lo, c_hi = interval(np.concatenate([r for _, r in chance]))
        c_auc = float(np.mean([a for a, _ in chance]))
    else:
        c_auc = c_lo = c_hi = np.nan
    return {"model": ctx.data.model, "attribute": ctx.attr.name, "condition": condition, "probe": probe,
            "auc": auc, "ci_low": float(lo), "ci_high": float(hi), "chance_auc": c_auc, "chance_low": float(c_lo),
            "chance_high": float(c_hi), "n_train": len(ctx.idx["train"]), "n_val": len(ctx.idx["val"]),
            "n_test": n_test, "selected": selected, "groups": "|".join(ctx.attr.groups), "n_perm": len(chance),
            "note": ""}


def _condition_problem(attr: Attribute, test_codes: np.ndarray, condition: str, minimum: int) -> str | None:
    counts = np.bincount(test_codes, minlength=len(attr.groups))
    low = int(np.argmin(counts))
    if counts[low] < minimum:
        return (f"attribute {attr.name} within {condition}: group {attr.groups[low]} has {counts[low]} test "
                f"image(s), fewer than the minimum {minimum}")
    return None


def _skipped(model: str, attr: Attribute, condition: str, probe: str, note: str) -> dict:
    return {"model": model, "attribute": attr.name, "condition": condition, "probe": probe, "auc": np.nan,
            "ci_low": np.nan, "ci_high": np.nan, "chance_auc": np.nan, "chance_low": np.nan, "chance_high": np.nan,
            "n_train": 0, "n_val": 0, "n_test": 0, "selected": "", "groups": "|".join(attr.groups), "n_perm": 0,
            "note": note}


def _split_table(data: EmbeddingData, split: np.ndarray) -> pd.DataFrame:
    t = data.table
    return pd.DataFrame({"image_id": t["image_id"], "patient_id": t["patient_id"],
                         "cohort_split": t["split"] if "split" in t else "", "split": np.array(SPLIT_NAMES)[split]})


def _meta(data: EmbeddingData, cfg: LeakageConfig, attrs: list, timings: dict, notes: list) -> dict:
    return {"format": "cxrfair-leakage", "version": 1, "model": data.model, "cache": data.source,
            "cohort_hash": data.cohort_hash, "task": data.task, "config": asdict(cfg),
            "attributes": {a.name: list(a.groups) for a in attrs},
            "split_rule": "patient-grouped, stratified by the joint cell of the cohort's sensitive attributes",
            "selection": {"linear": "lowest validation loss (probe sweep)", "mlp": "lowest validation loss (probe sweep)",
                          "knn": "highest validation AUC over metric x k"},
            "timings_s": timings, "notes": notes, "cxrfair_version": cxrfair.__version__}


def _bar(total: int, progress: bool, model: str):
    return tqdm(total=total, desc=f"leakage {model}", unit="fit", disable=None if progress else True)


def _tick(bar) -> None:
    if bar is not None:
        bar.update(1)


# ---------------------------------------------------------------- files


def write_leakage(result: LeakageResult, out: Path | str, force: bool = False) -> Path:
    """Write the result folder atomically: leakage.csv, leakage_permutations.csv,
    leakage_split.csv, leakage.json and leakage.png."""
    from cxrfair.embedding_figures import leakage_bars, save  # matplotlib: see the note under the imports

    with atomic_dir(out, force=force, inputs=(result.meta["cache"],), writes=LEAKAGE_FILES) as tmp:
        result.table.to_csv(tmp / "leakage.csv", index=False)
        result.permutations.to_csv(tmp / "leakage_permutations.csv", index=False)
        result.split.to_csv(tmp / "leakage_split.csv", index=False)
        write_json_atomic(tmp / "leakage.json", result.meta)
        save(leakage_bars(result.table).figure, tmp / "leakage.png")
    return Path(out)


# The top-level names each command writes into its --out (what --force may replace).
LEAKAGE_FILES = ("leakage.csv", "leakage_permutations.csv", "leakage_split.csv", "leakage.json", "leakage.png")


def check_out(out: Path | str, force: bool, inputs=(), writes=LEAKAGE_FILES) -> None:
    """Refuse, before any work, an ``--out`` that is not a folder, is or holds an input, exists
    without ``force``, or holds files the command does not write (``cxrfair.io.check_replace``;
    atomic_dir checks again at the end)."""
    check_replace(out, force, "--out", inputs, writes)


def leakage_cache(cache_path: Path | str, out: Path | str, cfg: LeakageConfig, force: bool = False,
                  progress: bool = True) -> LeakageResult:
    """Read a cache, run the analysis, write ``out`` (the ``cxrfair embeddings leakage`` command)."""
    cfg.validate()
    check_out(out, force, inputs=(cache_path,))
    result = leakage(load_embedding_data(cache_path, tuple(cfg.cohort_splits)), cfg, progress=progress)
    write_leakage(result, out, force=force)
    return result
