"""Embedding geometry: PCA coloured by attribute, tests along the components, per-dimension
centroid differences between groups, and the image-text modality gap.

A 2-D PCA picture alone misleads (Sourget et al.: groups overlap in the plot while probes read
the attribute), so each of the first components also gets a test of whether the groups differ
along it: the two-sample Kolmogorov-Smirnov statistic (two groups) or the largest pairwise KS
statistic (more groups), with a p-value from shuffling the attribute across patients (images of
one patient are not independent, which the textbook KS p-value assumes; that one is reported
too, for two groups), Holm-corrected over the components of each attribute.

All analyses use one feature transform (``normalize``: L2 rows by default, the geometry the
model itself compares by) and one PCA fit, whose scores every figure panel shares.

References:
    Sourget et al., "Fairness and Robustness of CLIP-Based Models for Chest X-rays", FAIMI 2025.
    Liang et al., "Mind the Gap: Understanding the Modality Gap in Multi-modal Contrastive
    Representation Learning", NeurIPS 2022.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

import cxrfair
from cxrfair.core.bootstrap import holm, interval
from cxrfair.errors import CxrfairError
from cxrfair.io import atomic_dir, write_json_atomic
from cxrfair.probe.embeddings.data import (
    Attribute,
    EmbeddingData,
    group_problem,
    load_embedding_data,
    patient_counts,
    permute_by_patient,
    resolve_attributes,
    seeded_rng,
)
from cxrfair.probe.embeddings.leakage import check_out

# The figures (``cxrfair.embedding_figures``) are imported by the writer only: matplotlib costs
# about 1 s, and the analysis, its config and the CLI's option checks need none of it.

NORMALIZE = ("l2", "standard", "none")
# The top-level names ``write_geometry`` writes into its --out (what --force may replace).
GEOMETRY_FILES = ("pca.csv", "pca_scores.csv", "pca_tests.csv", "centroids.csv", "modality_gap.csv", "geometry.json",
                  "pca.png", "centroids.png")
ALPHA = 0.05  # family-wise error rate of the component tests (Holm)


@dataclass(frozen=True)
class GeometryConfig:
    """What the geometry analysis computes."""

    attributes: tuple = ()  # columns to analyse; empty = every sensitive attribute of the cohort
    components: int = 10  # principal components kept (and tested)
    normalize: str = "l2"  # features: "l2" (unit rows), "standard" (z-scored dims) or "none"
    n_perm: int = 1000  # patient shuffles per component test
    n_boot: int = 1000  # patient-bootstrap replicates for centroid and gap intervals
    top: int = 20  # dimensions drawn per group pair in centroids.png
    min_group: int = 10  # fewest images per group
    seed: int = 0  # fixes permutations and bootstrap
    cohort_splits: tuple = ()  # use only these cohort splits' rows; empty = every row

    @property
    def min_permutations(self) -> int:
        """Fewest shuffles with which a component can pass Holm at ALPHA."""
        return int(round(self.components / ALPHA)) - 1

    def validate(self) -> "GeometryConfig":
        """Raise CxrfairError naming the option that is unusable; return self."""
        checks = [(self.components >= 2, "--components", "must be >= 2"),
                  (self.normalize in NORMALIZE, "--normalize", f"choose from {', '.join(NORMALIZE)}"),
                  (self.n_perm >= self.min_permutations, "--permutations",
                   f"the smallest Holm-adjusted p over {self.components} components is {self.components}/(permutations + 1); "
                   f"use at least {self.min_permutations} so that {ALPHA} is reachable, or fewer --components"),
                  (self.n_boot >= 100, "--bootstrap", "at least 100 replicates for a 95% interval"),
                  (self.top >= 1, "--top", "must be >= 1"), (self.min_group >= 2, "--min-group", "must be >= 2")]
        for ok, option, why in checks:
            if not ok:
                raise CxrfairError(f"{option}: {why}")
        return self


@dataclass
class PCA:
    """A PCA fit.

    Attributes:
        scores: (N, K) projections of the centred features.
        components: (K, D) unit axes; each axis' largest-magnitude loading is positive
            (scikit-learn's sign convention).
        explained_variance: (K,) variance along each axis (ddof 1).
        explained_variance_ratio: (K,) its share of the total variance.
        mean: (D,) the centre.
    """

    scores: np.ndarray
    components: np.ndarray
    explained_variance: np.ndarray
    explained_variance_ratio: np.ndarray
    mean: np.ndarray


@dataclass
class GeometryResult:
    """Tables (one per CSV), the PCA fit, and what the figures need."""

    pca: PCA
    variance: pd.DataFrame  # pca.csv
    scores: pd.DataFrame  # pca_scores.csv
    tests: pd.DataFrame  # pca_tests.csv
    centroids: pd.DataFrame  # centroids.csv
    modality_gap: pd.DataFrame | None  # modality_gap.csv; None without text embeddings
    attributes: list  # the Attributes analysed
    notes: list
    meta: dict


# ---------------------------------------------------------------- building blocks


def features(x: np.ndarray, normalize: str) -> np.ndarray:
    """(N, D) float64 features: unit rows ("l2"), z-scored dimensions ("standard") or as given."""
    x = np.asarray(x, dtype=np.float64)
    if normalize == "l2":
        return _unit(x)
    if normalize == "standard":
        sd = x.std(0)
        return (x - x.mean(0)) / np.where(sd > 1e-12, sd, 1.0)
    return x


def _unit(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


def pca(x: np.ndarray, k: int) -> PCA:
    """PCA by SVD of the centred data, k = min(k, N - 1, D) components.

    Args:
        x: (N, D) features.
    """
    x = np.asarray(x, dtype=np.float64)
    mean = x.mean(0)
    u, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    k = min(k, len(x) - 1, x.shape[1])
    sign = np.sign(vt[np.arange(len(vt)), np.abs(vt).argmax(1)])
    u, vt = u * sign, vt * sign[:, None]
    var = s**2 / (len(x) - 1)
    return PCA((u * s)[:, :k], vt[:k], var[:k], var[:k] / var.sum(), mean)


def ks_statistics(values: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Two-sample KS statistic sup |F_a - F_b| for many labellings of one sample at once.

    Args:
        values: (N,) observations.
        a, b: (B, N) bool membership of the two groups in each labelling.

    Returns:
        (B,) statistics (NaN where a group is empty).
    """
    order = np.argsort(values, kind="stable")
    v = values[order]
    a, b = a[:, order], b[:, order]
    with np.errstate(invalid="ignore", divide="ignore"):
        fa = np.cumsum(a, 1) / a.sum(1, keepdims=True)
        fb = np.cumsum(b, 1) / b.sum(1, keepdims=True)
    level_end = np.r_[v[1:] != v[:-1], True]  # the CDFs are compared after each tie level
    return np.abs(fa - fb)[:, level_end].max(1)


def kolmogorov_sf(lam) -> np.ndarray:
    """Survival function of the Kolmogorov distribution, P(K > lam) (scipy's ``kstwobign.sf``).

    Two series, each fast where the other is slow: the alternating one for lam >= 1 and the
    Jacobi-transformed one below.
    """
    lam = np.atleast_1d(np.asarray(lam, dtype=np.float64))
    k = np.arange(1, 101)[:, None]
    big = 2 * np.sum((-1.0) ** (k - 1) * np.exp(-2 * k**2 * np.maximum(lam, 1.0) ** 2), 0)
    small_lam = np.clip(lam, 1e-3, 1.0)
    small = 1 - math.sqrt(2 * math.pi) / small_lam * np.sum(np.exp(-((2 * k - 1) ** 2) * math.pi**2 / (8 * small_lam**2)), 0)
    return np.clip(np.where(lam >= 1.0, big, np.where(lam < 1e-3, 1.0, small)), 0.0, 1.0)


def group_statistic(values: np.ndarray, codes: np.ndarray, n_groups: int) -> np.ndarray:
    """KS statistic (two groups) or the largest pairwise KS statistic (more), per labelling.

    Args:
        values: (N,). codes: (B, N) group codes in [0, n_groups) of each labelling.

    Returns:
        (B,).
    """
    stats = [ks_statistics(values, codes == i, codes == j) for i in range(n_groups) for j in range(i + 1, n_groups)]
    return np.nanmax(np.stack(stats), 0)


# ---------------------------------------------------------------- analyses


def component_tests(scores: np.ndarray, attr: Attribute, patients, n_perm: int, rng: np.random.Generator,
                    chunk: int = 200) -> pd.DataFrame:
    """Does ``attr`` differ along each component? One row per component.

    p_perm = (1 + #{shuffles with statistic >= observed}) / (1 + n_perm), the attribute shuffled
    across patients (each keeps one group for all their images); p_holm over the components.

    Args:
        scores: (N, K) PCA scores; rows with a missing attribute are left out.
    """
    keep = attr.codes >= 0
    s, codes, patients = scores[keep], attr.codes[keep], np.asarray(patients)[keep]
    zeros = np.zeros(len(codes), dtype=np.int64)
    shuffled = np.stack([permute_by_patient(codes, patients, zeros, rng) for _ in range(n_perm)])  # (P, N)
    g = len(attr.groups)
    observed = np.array([group_statistic(s[:, c], codes[None], g)[0] for c in range(s.shape[1])])
    exceed = np.zeros(s.shape[1])
    for c0 in range(0, n_perm, chunk):
        block = shuffled[c0:c0 + chunk]
        exceed += [np.sum(group_statistic(s[:, c], block, g) >= observed[c] - 1e-12) for c in range(s.shape[1])]
    p_perm = (1 + exceed) / (1 + n_perm)
    n = np.bincount(codes, minlength=g)
    p_asym = kolmogorov_sf(np.sqrt(n[0] * n[1] / (n[0] + n[1])) * observed) if g == 2 else np.full(len(observed), np.nan)
    p_holm = holm(p_perm)
    return pd.DataFrame({"attribute": attr.name, "component": np.arange(1, s.shape[1] + 1),
                         "statistic": "ks" if g == 2 else "max_pairwise_ks", "value": observed, "p_perm": p_perm,
                         "p_holm": p_holm, "p_asymptotic": p_asym, "significant": p_holm <= ALPHA, "n_groups": g,
                         "groups": "|".join(attr.groups), "n_images": len(codes), "n_patients": len(np.unique(patients)),
                         "n_perm": n_perm})


def centroid_differences(x: np.ndarray, attr: Attribute, counts: np.ndarray) -> pd.DataFrame:
    """Standardised mean difference of every dimension, each group against the reference.

    diff = (mean_g - mean_ref) / pooled sd; the interval is the percentile interval of the same
    quantity over bootstrap replicates. Rows sorted by |diff| (rank 1 = largest) per group.

    Args:
        x: (N, D) features. counts: (R, N) bootstrap counts (rows of a missing group get 0 weight
            through the masks).
    """
    ref = attr.codes == 0
    out = []
    for g in range(1, len(attr.groups)):
        grp = attr.codes == g
        diff = mean_difference(x, grp, ref, np.ones(len(x)))  # (D,)
        lo, hi = interval(mean_difference(x, grp, ref, counts))  # (D,) each
        order = np.argsort(-np.abs(diff), kind="stable")
        out.append(pd.DataFrame({"attribute": attr.name, "group": attr.groups[g], "reference": attr.reference,
                                 "dim": order, "diff": diff[order], "abs_diff": np.abs(diff[order]), "ci_low": lo[order],
                                 "ci_high": hi[order], "rank": np.arange(1, len(order) + 1), "n_group": int(grp.sum()),
                                 "n_reference": int(ref.sum())}))
    return pd.concat(out, ignore_index=True)


def mean_difference(x: np.ndarray, a: np.ndarray, b: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Standardised mean difference (mean_a - mean_b) / pooled sd, per dimension, under weights.

    Args:
        x: (N, D). a, b: (N,) bool rows of the two groups. w: (N,) or (R, N) weights.

    Returns:
        (D,) or (R, D); NaN where the pooled sd is 0.
    """
    x = x - x.mean(0)  # shift-invariant; centring keeps the sum-of-squares variance accurate
    stats = []
    for m in (a, b):
        wm = w[..., m]
        n = wm.sum(-1)[..., None]
        mean = (wm @ x[m]) / n
        var = ((wm @ (x[m] ** 2)) - n * mean**2) / np.maximum(n - 1, 1)
        stats.append((n, mean, np.maximum(var, 0.0)))
    (na, ma, va), (nb, mb, vb) = stats
    pooled = np.sqrt(((na - 1) * va + (nb - 1) * vb) / np.maximum(na + nb - 2, 1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pooled > 0, (ma - mb) / pooled, np.nan)


def modality_gap(x: np.ndarray, text: dict, subsets: list) -> pd.DataFrame:
    """Distance between the mean unit image embedding and the mean unit text embedding of each
    prompt set, for each subset of images (Liang et al. 2022).

    Text embeddings are L2-normalised per class (and per draw, and per prompt of a pair) before
    averaging: the cache's class embedding is a mean of unit prompt embeddings, not itself unit
    length (Sourget et al. left BioViL's unnormalised).

    Args:
        x: (N, D) raw image embeddings.
        text: prompt set -> (..., D) class text embeddings.
        subsets: [(attribute, group, mask (N,) bool, counts (R, mask.sum()))]; ("", "") = all images.
    """
    img = _unit(np.asarray(x, np.float64))
    rows = []
    for name, emb in text.items():
        t = _unit(np.asarray(emb, np.float64).reshape(-1, emb.shape[-1])).mean(0)  # (D,)
        for attr, group, m, w in subsets:
            centre = img[m].mean(0)
            lo, hi = interval(np.linalg.norm((w @ img[m]) / w.sum(1, keepdims=True) - t, axis=1))
            rows.append({"prompt_set": name, "attribute": attr, "group": group, "gap": float(np.linalg.norm(centre - t)),
                         "ci_low": float(lo), "ci_high": float(hi), "cosine": float(_unit(centre) @ _unit(t)),
                         "n_images": int(m.sum()), "n_text": int(np.prod(emb.shape[:-1]))})
    return pd.DataFrame(rows)


def gap_subsets(data: EmbeddingData, attrs: list, n_boot: int, seed: int) -> list:
    """All images, then each group of each attribute, with a patient bootstrap of each."""
    everyone = np.ones(len(data.x), bool)
    masks = [("", "", everyone)] + [(a.name, g, a.codes == i) for a in attrs for i, g in enumerate(a.groups)]
    return [(attr, group, m, patient_counts(data.patients[m], np.zeros(int(m.sum())), n_boot,
                                            seeded_rng(seed, "gap", attr, group)))
            for attr, group, m in masks]


# ---------------------------------------------------------------- the analysis


def geometry(data: EmbeddingData, cfg: GeometryConfig) -> GeometryResult:
    """PCA, component tests, centroid differences and the modality gap of one cache."""
    check_components(cfg.components, data)  # first: too many components is why too few permutations
    cfg.validate()
    t0 = time.perf_counter()
    attrs, notes = _usable(resolve_attributes(data, cfg.attributes), cfg.min_group)
    x = features(data.x, cfg.normalize)
    fit = pca(x, cfg.components)
    tests, centroids = [], []
    for a in attrs:
        tests.append(component_tests(fit.scores, a, data.patients, cfg.n_perm, seeded_rng(cfg.seed, "pca-test", a.name)))
        keep = a.codes >= 0
        counts = patient_counts(data.patients[keep], a.codes[keep], cfg.n_boot, seeded_rng(cfg.seed, "centroids", a.name))
        centroids.append(centroid_differences(x[keep], _subset(a, keep), counts))
    gap = None
    if data.text:
        gap = modality_gap(data.x, data.text, gap_subsets(data, attrs, cfg.n_boot, cfg.seed))
    else:
        notes.append("modality gap skipped: the cache has no text embeddings")
    model = {"model": data.model}
    result = GeometryResult(
        fit, _variance_table(fit, cfg.normalize).assign(**model), _scores_table(data, attrs, fit),
        pd.concat(tests, ignore_index=True).assign(**model), pd.concat(centroids, ignore_index=True).assign(**model),
        None if gap is None else gap.assign(**model), attrs, notes, {})
    result.meta = _meta(data, cfg, attrs, notes, time.perf_counter() - t0)
    _model_first(result)
    return result


def check_components(components: int, data: EmbeddingData) -> None:
    """CxrfairError naming both numbers when ``components`` exceeds what a PCA of ``data`` has,
    min(D dimensions, N - 1 images); ``pca`` would otherwise keep fewer than asked, unsaid."""
    n, d = data.x.shape
    if components > min(d, n - 1):
        why = (f"the embeddings in cache {data.source} have {d} dimensions ({n} images)" if d <= n - 1 else
               f"cache {data.source} has {n} images of {d} dimensions")
        raise CxrfairError(f"--components {components}: {why}, so a PCA has at most {min(d, n - 1)} components; "
                           f"use --components {min(d, n - 1)} or fewer")


def _usable(attrs: list, minimum: int) -> tuple[list, list]:
    ok, notes = [], []
    for a in attrs:
        problem = group_problem(a, None, minimum)
        if problem and a.requested:
            raise CxrfairError(problem)
        if problem:
            notes.append(f"skipped {problem}")
        else:
            ok.append(a)
    if not ok:
        raise CxrfairError(f"no attribute can be analysed ({'; '.join(notes) or 'none found'})")
    return ok, notes


def _subset(a: Attribute, keep: np.ndarray) -> Attribute:
    return Attribute(a.name, a.groups, a.codes[keep], a.requested)


def _variance_table(fit: PCA, normalize: str) -> pd.DataFrame:
    return pd.DataFrame({"component": np.arange(1, len(fit.explained_variance) + 1),
                         "explained_variance": fit.explained_variance,
                         "explained_variance_ratio": fit.explained_variance_ratio,
                         "cumulative_ratio": np.cumsum(fit.explained_variance_ratio), "normalize": normalize})


def _scores_table(data: EmbeddingData, attrs: list, fit: PCA) -> pd.DataFrame:
    cols = ["image_id", "patient_id"] + [c for c in ["split"] if c in data.table] + [a.name for a in attrs]
    scores = pd.DataFrame(fit.scores, columns=[f"pc{k}" for k in range(1, fit.scores.shape[1] + 1)])
    return pd.concat([data.table[cols].reset_index(drop=True), scores], axis=1)


def _model_first(result: GeometryResult) -> None:
    for name in ("variance", "tests", "centroids", "modality_gap"):
        table = getattr(result, name)
        if table is not None:
            setattr(result, name, table[["model"] + [c for c in table.columns if c != "model"]])


def _meta(data: EmbeddingData, cfg: GeometryConfig, attrs: list, notes: list, seconds: float) -> dict:
    return {"format": "cxrfair-geometry", "version": 1, "model": data.model, "cache": data.source,
            "cohort_hash": data.cohort_hash, "n_images": len(data.x), "config": asdict(cfg),
            "attributes": {a.name: list(a.groups) for a in attrs},
            "tests": "KS (2 groups) / largest pairwise KS (more) per component; p from shuffling the attribute "
                     "across patients; Holm over the components of each attribute",
            "timings_s": {"total": seconds}, "notes": notes, "cxrfair_version": cxrfair.__version__}


# ---------------------------------------------------------------- files


def write_geometry(result: GeometryResult, out: Path | str, force: bool = False, top: int = 20) -> Path:
    """Write pca.csv, pca_scores.csv, pca_tests.csv, centroids.csv, modality_gap.csv (with text
    embeddings), geometry.json, pca.png and centroids.png into ``out``, atomically."""
    from cxrfair.embedding_figures import centroid_panels, pca_panels, save  # matplotlib: see the note under the imports

    with atomic_dir(out, force=force, inputs=(result.meta["cache"],), writes=GEOMETRY_FILES) as tmp:
        result.variance.to_csv(tmp / "pca.csv", index=False)
        result.scores.to_csv(tmp / "pca_scores.csv", index=False)
        result.tests.to_csv(tmp / "pca_tests.csv", index=False)
        result.centroids.to_csv(tmp / "centroids.csv", index=False)
        if result.modality_gap is not None:
            result.modality_gap.to_csv(tmp / "modality_gap.csv", index=False)
        write_json_atomic(tmp / "geometry.json", result.meta)
        panels = {a.name: (np.where(a.codes >= 0, np.array(a.groups, dtype=object)[a.codes], None), a.groups)
                  for a in result.attributes}
        save(pca_panels(result.pca.scores[:, :2], panels, result.pca.explained_variance_ratio[:2],
                        title=f"PCA of {result.meta['model']} image embeddings ({result.meta['config']['normalize']})"),
             tmp / "pca.png")
        save(centroid_panels(result.centroids, top=top), tmp / "centroids.png")
    return Path(out)


def geometry_cache(cache_path: Path | str, out: Path | str, cfg: GeometryConfig, force: bool = False) -> GeometryResult:
    """Read a cache, run the analysis, write ``out`` (the ``cxrfair embeddings geometry`` command)."""
    check_out(out, force, inputs=(cache_path,), writes=GEOMETRY_FILES)
    result = geometry(load_embedding_data(cache_path, tuple(cfg.cohort_splits)), cfg)  # validates cfg
    write_geometry(result, out, force=force, top=cfg.top)
    return result
