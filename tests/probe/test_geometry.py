"""Embedding geometry: PCA against numpy/scikit-learn, KS against scipy, Holm against a loop,
centroid differences and modality gap against plain computations, one projection per figure."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from scipy import stats
from sklearn.decomposition import PCA as SkPCA

from cxrfair.cli import main
from cxrfair.embedding_figures import pca_panels
from cxrfair.errors import CxrfairError
from cxrfair.probe.embeddings.data import Attribute, load_embedding_data, patient_counts
from cxrfair.probe.embeddings.geometry import (
    GeometryConfig,
    centroid_differences,
    component_tests,
    features,
    geometry,
    group_statistic,
    holm,
    kolmogorov_sf,
    ks_statistics,
    mean_difference,
    modality_gap,
    pca,
)
from tests.probe.embedding_synth import cohort, make_cache

FILES = ["centroids.csv", "centroids.png", "geometry.json", "modality_gap.csv", "pca.csv", "pca.png", "pca_scores.csv",
         "pca_tests.csv"]


def _cli(*args):
    return CliRunner().invoke(main, ["embeddings", *map(str, args)])


# ---------------------------------------------------------------- PCA


def test_pca_matches_sklearn_and_numpy_svd():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 9)) @ rng.normal(size=(9, 9)) + 3.0
    ours = pca(x, 5)
    ref = SkPCA(n_components=5, svd_solver="full").fit(x)
    np.testing.assert_allclose(ours.explained_variance_ratio, ref.explained_variance_ratio_, rtol=1e-10)
    np.testing.assert_allclose(ours.explained_variance, ref.explained_variance_, rtol=1e-10)
    np.testing.assert_allclose(ours.components, ref.components_, atol=1e-10)  # the same sign convention
    np.testing.assert_allclose(ours.scores, ref.transform(x), atol=1e-9)
    s = np.linalg.svd(x - x.mean(0), compute_uv=False)
    np.testing.assert_allclose(ours.explained_variance_ratio, (s**2 / (s**2).sum())[:5], rtol=1e-10)
    assert pca(x[:4], 10).scores.shape == (4, 3)  # at most N - 1 components


def test_features_l2_and_standard():
    x = np.array([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]])
    np.testing.assert_allclose(np.linalg.norm(features(x, "l2"), axis=1), 1.0)
    z = features(x, "standard")
    np.testing.assert_allclose(z.mean(0), 0, atol=1e-12)
    np.testing.assert_allclose(z.std(0), 1)


# ---------------------------------------------------------------- tests along components


def test_ks_statistic_matches_scipy_with_and_without_ties():
    rng = np.random.default_rng(1)
    for values in (rng.normal(size=70), np.round(rng.normal(size=70), 1)):
        labels = rng.integers(0, 2, (6, 70)).astype(bool)
        ours = ks_statistics(values, labels, ~labels)
        for b in range(6):
            assert ours[b] == pytest.approx(stats.ks_2samp(values[labels[b]], values[~labels[b]]).statistic, abs=1e-12)


def test_kolmogorov_distribution_matches_scipy():
    lam = np.r_[0.0, 1e-4, np.linspace(0.05, 3.0, 60)]
    np.testing.assert_allclose(kolmogorov_sf(lam), stats.kstwobign.sf(lam), atol=1e-10)


def test_asymptotic_p_value_is_scipys_asymptotic_ks_test():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=400), rng.normal(0.15, 1, size=300)
    ks = stats.ks_2samp(a, b, method="asymp")
    lam = np.sqrt(400 * 300 / 700) * ks.statistic
    # scipy's finite-n asymptotic (kstwo at n = round(en)) and the limit differ by O(1/sqrt(n)).
    assert kolmogorov_sf(lam)[0] == pytest.approx(ks.pvalue, abs=0.01)


def test_more_groups_use_the_largest_pairwise_ks():
    rng = np.random.default_rng(3)
    values, codes = rng.normal(size=90), rng.integers(0, 3, 90)
    pairs = [stats.ks_2samp(values[codes == i], values[codes == j]).statistic for i, j in ((0, 1), (0, 2), (1, 2))]
    assert group_statistic(values, codes[None], 3)[0] == pytest.approx(max(pairs), abs=1e-12)


def test_holm_matches_a_plain_loop():
    p = np.array([0.01, 0.04, 0.03, 0.2, np.nan, 0.005])
    ok = [0, 1, 2, 3, 5]
    order = sorted(ok, key=lambda i: p[i])
    ref, running = {}, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p[i]))
        ref[i] = running
    out = holm(p)
    assert np.isnan(out[4])
    np.testing.assert_allclose([out[i] for i in ok], [ref[i] for i in ok])


def _attr(name, labels, groups):
    index = {g: i for i, g in enumerate(groups)}
    return Attribute(name, tuple(groups), np.array([index.get(v, -1) for v in labels]), True)


def test_component_tests_find_the_planted_direction_and_shuffle_patients():
    table = cohort(n_patients=150, seed=4)
    rng = np.random.default_rng(4)
    scores = rng.normal(size=(len(table), 3))
    scores[:, 0] += np.where(table["sex"] == "M", 1.0, -1.0)
    sex = _attr("sex", table["sex"], ["M", "F"])
    out = component_tests(scores, sex, table["patient_id"], 199, np.random.default_rng(0))
    assert list(out["component"]) == [1, 2, 3] and (out["statistic"] == "ks").all()
    assert out["p_perm"].iloc[0] == pytest.approx(1 / 200) and out["significant"].iloc[0]
    assert not out["significant"].iloc[1:].any()
    ref = stats.ks_2samp(scores[sex.codes == 0, 0], scores[sex.codes == 1, 0]).statistic
    assert out["value"].iloc[0] == pytest.approx(ref)
    np.testing.assert_allclose(out["p_holm"], holm(out["p_perm"].to_numpy()))
    coin = _attr("coin", table["coin"], ["heads", "tails"])
    assert not component_tests(scores, coin, table["patient_id"], 199, np.random.default_rng(0))["significant"].any()


# ---------------------------------------------------------------- centroids and the modality gap


def test_centroid_differences_match_a_plain_computation_and_a_resample():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(60, 4))
    x[:30, 2] += 2.0
    attr = _attr("sex", ["M"] * 30 + ["F"] * 30, ["M", "F"])
    counts = patient_counts(np.arange(60) // 2, attr.codes, 200, np.random.default_rng(0))
    out = centroid_differences(x, attr, counts).set_index("dim")
    m, f = x[:30], x[30:]
    pooled = np.sqrt((29 * m.var(0, ddof=1) + 29 * f.var(0, ddof=1)) / 58)
    np.testing.assert_allclose(out.sort_index()["diff"], (f.mean(0) - m.mean(0)) / pooled, rtol=1e-10)
    assert out["rank"].loc[2] == 1 and out.loc[2, "ci_high"] < 0  # F lower on dim 2, clearly
    # One bootstrap replicate equals the plain difference on the resampled rows.
    idx = np.repeat(np.arange(60), counts[0].astype(int))
    xm, xf = x[idx][attr.codes[idx] == 0], x[idx][attr.codes[idx] == 1]
    nm, nf = len(xm), len(xf)
    rep = (xf.mean(0) - xm.mean(0)) / np.sqrt(((nm - 1) * xm.var(0, ddof=1) + (nf - 1) * xf.var(0, ddof=1)) / (nm + nf - 2))
    np.testing.assert_allclose(mean_difference(x, attr.codes == 1, attr.codes == 0, counts[:1])[0], rep, rtol=1e-9)


def test_modality_gap_is_the_distance_between_unit_centroids():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(40, 5)) + 1.0
    text = {"a": rng.normal(size=(2, 3, 5)), "pairs": rng.normal(size=(2, 3, 2, 5))}  # multi-label shape too
    counts = patient_counts(np.arange(40), np.zeros(40), 100, np.random.default_rng(0))
    out = modality_gap(x, text, [("", "", np.ones(40, bool), counts)]).set_index("prompt_set")
    for name, t in text.items():
        unit_t = t.reshape(-1, 5) / np.linalg.norm(t.reshape(-1, 5), axis=1, keepdims=True)
        unit_x = x / np.linalg.norm(x, axis=1, keepdims=True)
        assert out.loc[name, "gap"] == pytest.approx(np.linalg.norm(unit_x.mean(0) - unit_t.mean(0)))
        assert out.loc[name, "ci_low"] <= out.loc[name, "gap"] <= out.loc[name, "ci_high"]
    scaled = modality_gap(x, {k: 7.0 * v for k, v in text.items()}, [("", "", np.ones(40, bool), counts)])
    np.testing.assert_allclose(scaled["gap"], out["gap"].to_numpy())  # unnormalised text is normalised first


# ---------------------------------------------------------------- figures


def test_every_pca_panel_draws_the_same_projection(tmp_path):
    data = load_embedding_data(make_cache(tmp_path / "c.h5")[0])
    result = geometry(data, GeometryConfig(n_perm=199, n_boot=100))
    panels = {a.name: (np.array(a.groups, dtype=object)[a.codes], a.groups) for a in result.attributes}
    fig = pca_panels(result.pca.scores[:, :2], panels, result.pca.explained_variance_ratio[:2])
    expected = np.sort(result.pca.scores[:, :2].view("f8,f8").ravel())
    drawn = []
    for ax in fig.axes:
        points = np.concatenate([c.get_offsets() for c in ax.collections])
        drawn.append(np.sort(np.ascontiguousarray(points).view("f8,f8").ravel()))
    assert len(drawn) == 2 and all(np.array_equal(d, expected) for d in drawn)


# ---------------------------------------------------------------- the command


def test_cli_writes_every_output(tmp_path):
    cache = make_cache(tmp_path / "c.h5")[0]
    res = _cli("geometry", "--cache", cache, "--out", tmp_path / "geo", "--permutations", "199", "--bootstrap", "100")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "geo").iterdir()) == FILES
    tests = pd.read_csv(tmp_path / "geo" / "pca_tests.csv")
    assert len(tests) == 2 * 10 and tests.set_index(["attribute", "component"]).loc[("sex", 1), "significant"]
    variance = pd.read_csv(tmp_path / "geo" / "pca.csv")
    assert list(variance["component"]) == list(range(1, 11)) and variance["explained_variance_ratio"].is_monotonic_decreasing
    scores = pd.read_csv(tmp_path / "geo" / "pca_scores.csv")
    assert [c for c in scores.columns if c.startswith("pc")] == [f"pc{k}" for k in range(1, 11)]
    centroids = pd.read_csv(tmp_path / "geo" / "centroids.csv")
    assert centroids[centroids["attribute"] == "sex"].sort_values("rank")["dim"].iloc[0] == 0


def test_without_text_embeddings_the_gap_is_skipped_with_a_note(tmp_path):
    cache = make_cache(tmp_path / "c.h5", text=False)[0]
    res = _cli("geometry", "--cache", cache, "--out", tmp_path / "geo", "--permutations", "199", "--bootstrap", "100")
    assert res.exit_code == 0 and "note: modality gap skipped" in res.output
    assert not (tmp_path / "geo" / "modality_gap.csv").exists() and (tmp_path / "geo" / "pca.csv").exists()


@pytest.mark.parametrize("args, message", [
    (["--attributes", "nope"], "--attributes nope: not a column"),
    (["--attributes", "sex", "--min-group", "5000"], "fewer than the minimum 5000"),
    (["--components", "1"], "--components"),
    (["--permutations", "100"], "use at least 199"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, args, message):
    cache = make_cache(tmp_path / "c.h5")[0]
    res = _cli("geometry", "--cache", cache, "--out", tmp_path / "geo", *args)
    assert res.exit_code == 1 and message in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "geo").exists()


def test_an_explicit_attribute_with_one_group_is_an_error(tmp_path):
    table = cohort(n_patients=50)
    table["sex"] = "M"
    data = load_embedding_data(make_cache(tmp_path / "c.h5", table=table)[0])
    with pytest.raises(CxrfairError, match="has one group"):
        geometry(data, GeometryConfig(attributes=("sex",), n_perm=199, n_boot=100))


def test_more_components_than_dimensions_names_both_numbers(tmp_path):
    """Not "use at least 19999 permutations": the cause is 1000 components of 16-d embeddings."""
    cache = make_cache(tmp_path / "c.h5")[0]
    res = _cli("geometry", "--cache", cache, "--out", tmp_path / "geo", "--components", "1000")
    assert res.exit_code == 1 and res.output.startswith("Error: --components 1000: the embeddings in cache ")
    assert "have 16 dimensions (751 images), so a PCA has at most 16 components; use --components 16 or fewer" in (
        res.output), res.output
    assert "permutations" not in res.output and not (tmp_path / "geo").exists()
    with pytest.raises(CxrfairError, match=r"--components 17: .* use --components 16 or fewer"):
        geometry(load_embedding_data(cache), GeometryConfig(components=17, n_perm=400, n_boot=100))
    # Without the data at hand (cxrfair run's planning), the permutation message names --components too.
    with pytest.raises(CxrfairError, match=r"use at least 19999 .*, or fewer --components"):
        GeometryConfig(components=1000).validate()


@pytest.mark.parametrize("command", ["geometry", "leakage"])
def test_a_declared_attribute_missing_from_the_cache_table_is_an_error(tmp_path, command):
    """Not skipped unseen: the cohort declares insurance, the cache's rows have no such column."""
    declared = {"sex": {"groups": ["M", "F"], "reference": "M"}, "age_group": {"groups": ["young", "old"],
                "reference": "young"}, "insurance": {"groups": ["public", "private"], "reference": "public"}}
    cache = make_cache(tmp_path / "c.h5", attributes=declared)[0]
    res = _cli(command, "--cache", cache, "--out", tmp_path / "out", "--permutations", "199")
    assert res.exit_code == 1, res.output
    assert res.output.startswith(f"Error: cache {cache}: the cohort declares sensitive attribute insurance but the "
                                 "cache's cohort rows have no column insurance"), res.output
    assert not (tmp_path / "out").exists()
