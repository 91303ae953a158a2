"""Attribute leakage: probes against scikit-learn, the planted sex marker found and a random
attribute not, patient-grouped splits and shuffles, label conditioning, and bad input."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss, roc_auc_score
from sklearn.neighbors import KNeighborsClassifier

from cxrfair.cli import main
from cxrfair.extract.cache import write_cache
from cxrfair.errors import CxrfairError
from cxrfair.probe.embeddings.attribute_probes import SweepGrid, knn_fit, knn_index, knn_probs, leakage_auc, neighbours, standardize
from cxrfair.probe.embeddings.data import (
    EmbeddingData,
    conditions,
    load_embedding_data,
    patient_counts,
    patient_split,
    permute_by_patient,
    resolve_attributes,
)
from cxrfair.probe.embeddings.leakage import COLUMNS, MIN_PERMUTATIONS, LeakageConfig, leakage, shuffled_codes
from tests.probe.embedding_synth import cohort, embeddings, make_cache

V2 = {"sex": {"groups": ["M", "F"], "reference": "M"}, "age_group": {"groups": ["young", "old"], "reference": "young"},
      "race": {"groups": ["White", "Black", "Asian"], "reference": "White"}}
FAST = SweepGrid(l2s=(1e-3, 1e-1))


def _cli(*args):
    return CliRunner().invoke(main, ["embeddings", *map(str, args)])


def _data(tmp_path, **kw) -> EmbeddingData:
    return load_embedding_data(make_cache(tmp_path / "c.h5", **kw)[0])


# ---------------------------------------------------------------- kNN against scikit-learn


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_knn_probabilities_match_sklearn(metric):
    rng = np.random.default_rng(0)
    xt, yt, xq = rng.normal(size=(80, 7)), rng.integers(0, 3, 80), rng.normal(size=(30, 7))
    nbrs = neighbours(xt, xq, 21, metric)
    ks = (1, 4, 9, 21)
    ours = knn_probs(yt[nbrs], 3, ks)
    for i, k in enumerate(ks):
        ref = KNeighborsClassifier(n_neighbors=k, metric=metric, algorithm="brute").fit(xt, yt).predict_proba(xq)
        np.testing.assert_allclose(ours[i], ref, atol=1e-12)


def test_knn_choice_on_validation_matches_a_plain_sklearn_search():
    rng = np.random.default_rng(1)
    y = {s: rng.integers(0, 2, n) for s, n in (("train", 120), ("val", 50), ("test", 50))}
    x = standardize({s: rng.normal(size=(len(v), 5)) + 0.8 * v[:, None] * np.r_[1, 0.5, 0, 0, 0] for s, v in y.items()})
    fit = knn_fit(knn_index(x, range(1, 22, 2)), y, 2)
    best = None
    for metric in ("cosine", "euclidean"):
        for k in range(1, 22, 2):
            model = KNeighborsClassifier(n_neighbors=k, metric=metric, algorithm="brute").fit(x["train"], y["train"])
            score = roc_auc_score(y["val"], model.predict_proba(x["val"])[:, 1])
            if best is None or score > best[0]:
                best = (score, f"k={k} metric={metric}", model.predict_proba(x["test"]))
    assert fit.selected == best[1]
    np.testing.assert_allclose(fit.test_probs, best[2])


def test_auc_binary_and_one_vs_rest_macro_match_sklearn_on_every_bootstrap_replicate():
    rng = np.random.default_rng(2)
    for n_groups in (2, 3):
        y = rng.integers(0, n_groups, 90)
        probs = rng.dirichlet(np.ones(n_groups), 90)
        ref = (roc_auc_score(y, probs[:, 1]) if n_groups == 2 else roc_auc_score(y, probs, multi_class="ovr", average="macro"))
        assert leakage_auc(y, probs) == pytest.approx(ref, abs=1e-12)
        patients = np.arange(90) // 3
        counts = patient_counts(patients, y, 5, np.random.default_rng(0))
        reps = leakage_auc(y, probs, weights=counts)
        for r in range(5):
            idx = np.repeat(np.arange(90), counts[r].astype(int))
            ref = (roc_auc_score(y[idx], probs[idx, 1]) if n_groups == 2
                   else roc_auc_score(y[idx], probs[idx], multi_class="ovr", average="macro"))
            assert reps[r] == pytest.approx(ref, abs=1e-12)


# ---------------------------------------------------------------- splits, shuffles, resamples


def test_patient_split_keeps_every_patient_in_one_split_and_follows_the_fractions():
    table = cohort(n_patients=400, seed=3)
    assert table["patient_id"].value_counts().max() > 1  # several images per patient
    strata = (table["sex"] + table["age_group"]).to_numpy()
    split = patient_split(table["patient_id"], strata, (0.6, 0.2, 0.2), seed=5)
    assert (pd.Series(split).groupby(table["patient_id"].to_numpy()).nunique() == 1).all()
    per_patient = pd.Series(split).groupby(table["patient_id"].to_numpy()).first()
    np.testing.assert_allclose(np.bincount(per_patient, minlength=3) / len(per_patient), [0.6, 0.2, 0.2], atol=0.02)
    first = table.groupby("patient_id").head(1)
    for s in set(strata):  # every stratum is split in proportion, to within one patient per split
        mine = per_patient[first["patient_id"][strata[first.index] == s].to_numpy()]
        assert np.all(np.abs(np.bincount(mine, minlength=3) - np.array([0.6, 0.2, 0.2]) * len(mine)) <= 1)
    assert np.array_equal(split, patient_split(table["patient_id"], strata, (0.6, 0.2, 0.2), seed=5))
    assert not np.array_equal(split, patient_split(table["patient_id"], strata, (0.6, 0.2, 0.2), seed=6))


def test_permutation_shuffles_patients_not_images():
    table = cohort(n_patients=200, seed=4)
    patients = table["patient_id"].to_numpy()
    codes = (table["sex"] == "F").to_numpy().astype(np.int64)
    split = patient_split(patients, codes.astype(str), (0.6, 0.2, 0.2), 0)
    shuffled = permute_by_patient(codes, patients, split, np.random.default_rng(0))
    assert (pd.Series(shuffled).groupby(patients).nunique() == 1).all()  # a patient's images move together
    assert (shuffled != codes).mean() > 0.3  # it really shuffles
    for s in range(3):  # each split keeps its patients' group counts
        m = split == s
        before = pd.Series(codes[m]).groupby(patients[m]).first().value_counts().sort_index()
        after = pd.Series(shuffled[m]).groupby(patients[m]).first().value_counts().sort_index()
        assert before.equals(after)


def test_shuffled_attribute_keeps_missing_values_missing(tmp_path):
    table = cohort(n_patients=60)
    table.loc[table["patient_id"] < 10, "race"] = ""
    data = _data(tmp_path, table=table, attributes=V2)
    race = resolve_attributes(data, ("race",))[0]
    split = patient_split(data.patients, np.zeros(len(table)).astype(str), (0.6, 0.2, 0.2), 0)
    codes = shuffled_codes(race, data.patients, split, np.random.default_rng(0))
    assert np.array_equal(codes < 0, race.codes < 0) and (race.codes < 0).sum() > 0


def test_patient_bootstrap_moves_a_patients_images_together():
    patients = np.repeat(np.arange(30), 3)
    counts = patient_counts(patients, patients % 2, 50, np.random.default_rng(0))
    assert counts.shape == (50, 90)
    assert (counts.reshape(50, 30, 3) == counts.reshape(50, 30, 3)[..., :1]).all()
    # stratified: each replicate keeps 15 patients (45 images) per stratum
    assert (counts[:, patients % 2 == 0].sum(1) == 45).all()


# ---------------------------------------------------------------- the analysis


LINEAR = SweepGrid()  # the default: L-BFGS over the probe stage's L2 grid


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """One leakage run on a cache with a strong sex direction, a weak age direction and a random
    attribute (one run, so each probe program compiles once)."""
    path = make_cache(tmp_path_factory.mktemp("planted") / "c.h5", attributes=V2, age_shift=0.4)[0]
    data = load_embedding_data(path)
    cfg = LeakageConfig(attributes=("sex", "coin", "age_group"), n_perm=2, n_boot=300, linear=LINEAR,
                        mlp=SweepGrid(l2s=(1e-2, 1e-1), hiddens=(16,)))
    return data, leakage(data, cfg)


def test_planted_sex_is_found_and_a_random_attribute_is_not(planted):
    _, result = planted
    t = result.table
    overall = t[t["condition"] == ""].set_index(["attribute", "probe"])
    for probe in ("linear", "mlp", "knn"):
        sex, coin = overall.loc[("sex", probe)], overall.loc[("coin", probe)]
        assert sex["auc"] > 0.95 and sex["ci_low"] > sex["chance_high"], probe
        # The coin's AUC sits inside its measured chance range. Each interval is a 95% one, so
        # with three probes one may miss 0.5 (the MLP does here: stopped after an epoch or two, it
        # scores by what its random start reads, which a finite test set ties to the coin by
        # chance) -- the reason chance is measured rather than assumed to be 0.5.
        assert coin["chance_low"] <= coin["auc"] <= coin["chance_high"], probe
        if probe != "mlp":
            assert coin["ci_low"] <= 0.5 <= coin["ci_high"], probe
        for row in (sex, coin):  # chance is measured near 0.5, with a range around it
            assert abs(row["chance_auc"] - 0.5) < 0.1 and row["chance_low"] < 0.5 < row["chance_high"]
            assert row["n_perm"] == 2 and row["selected"]


def test_leakage_table_has_the_documented_columns_and_conditions(planted):
    data, result = planted
    t = result.table
    assert list(t.columns) == COLUMNS
    assert set(t["condition"]) == {""} | {f"label={c}" for c in data.classes}
    assert (t["note"].fillna("") == "").all() and not t["auc"].isna().any()
    n = t[(t["condition"] == "") & (t["attribute"] == "sex")].iloc[0]
    assert n["n_train"] + n["n_val"] + n["n_test"] == len(data.x)
    cond = t[(t["condition"] != "") & (t["probe"] == "knn")].groupby("attribute")["n_test"].sum()
    assert (cond == n["n_test"]).all()  # the conditions partition the test rows
    perms = result.permutations
    assert len(perms) == 2 * len(t) and perms["auc"].between(0, 1).all()


def test_no_patient_crosses_the_leakage_split(planted):
    _, result = planted
    split = result.split
    assert (split.groupby("patient_id")["split"].nunique() == 1).all()
    assert set(split["split"]) == {"train", "val", "test"}


def test_linear_and_knn_auc_match_sklearn_on_the_same_split(planted):
    data, result = planted
    rows = result.table[(result.table["attribute"] == "age_group") & (result.table["condition"] == "")].set_index("probe")
    split = result.split["split"].to_numpy()
    y = (data.table["age_group"] == "old").to_numpy().astype(int)
    xs = standardize({s: data.x[split == s] for s in ("train", "val", "test")})
    ys = {s: y[split == s] for s in ("train", "val", "test")}
    # Tuned reference: C chosen on validation log-loss.
    fits = [LogisticRegression(C=c, max_iter=5000).fit(xs["train"], ys["train"]) for c in (1e-3, 1e-2, 1e-1, 1, 10, 100)]
    best = min(fits, key=lambda m: log_loss(ys["val"], m.predict_proba(xs["val"])))
    ref = roc_auc_score(ys["test"], best.predict_proba(xs["test"])[:, 1])
    assert 0.65 < ref < 0.95  # a task where probes can differ
    assert rows.loc["linear", "auc"] == pytest.approx(ref, abs=0.02)
    k, metric = (w.split("=")[1] for w in rows.loc["knn", "selected"].split())
    knn = KNeighborsClassifier(n_neighbors=int(k), metric=metric, algorithm="brute").fit(xs["train"], ys["train"])
    assert rows.loc["knn", "auc"] == pytest.approx(roc_auc_score(ys["test"], knn.predict_proba(xs["test"])[:, 1]), abs=1e-12)


def test_without_permutations_there_is_no_chance_level(tmp_path):
    data = _data(tmp_path)
    result = leakage(data, LeakageConfig(attributes=("sex",), probes=("knn",), n_perm=0, n_boot=200, conditional=False))
    assert np.isnan(result.table["chance_auc"]).all() and (result.table["n_perm"] == 0).all()


def test_fewer_than_the_minimum_permutations_add_a_note_with_the_chance_levels_sd(tmp_path):
    data = _data(tmp_path)
    base = dict(attributes=("sex",), probes=("knn",), n_boot=200, conditional=False)
    result = leakage(data, LeakageConfig(n_perm=3, **base))
    sd = result.permutations["auc"].std(ddof=1)  # one (attribute, condition, probe) row here
    note = [n for n in result.notes if "permutation(s)" in n]
    assert len(note) == 1 and result.meta["notes"] == result.notes
    assert f"fewer than {MIN_PERMUTATIONS}" in note[0] and f"up to {sd:.3f}" in note[0]
    assert f"+-{sd / np.sqrt(3):.3f}" in note[0] and f"--permutations {MIN_PERMUTATIONS}" in note[0]
    one = leakage(data, LeakageConfig(n_perm=1, **base)).notes
    assert any("1 permutation(s)" in n and "cannot measure" in n for n in one)
    assert not any("permutation(s)" in n for n in leakage(data, LeakageConfig(n_perm=0, **base)).notes)


def test_the_chance_level_defaults_to_twenty_permutations_everywhere(tmp_path):
    from cxrfair.config import EmbeddingsSettings
    from cxrfair.pipeline import demo_config

    assert MIN_PERMUTATIONS == 20 and LeakageConfig().n_perm == MIN_PERMUTATIONS
    assert EmbeddingsSettings().permutations == MIN_PERMUTATIONS
    assert demo_config(tmp_path).embeddings.permutations == MIN_PERMUTATIONS
    cache = make_cache(tmp_path / "c.h5")[0]
    res = _cli("leakage", "--cache", cache, "--out", tmp_path / "leak", "--probes", "knn", "--attributes", "sex",
               "--no-conditional", "--bootstrap", "100")
    assert res.exit_code == 0, res.output
    assert "permutation(s)" not in res.output  # no note at the default
    table = pd.read_csv(tmp_path / "leak" / "leakage.csv", keep_default_na=False)
    assert (table["n_perm"] == MIN_PERMUTATIONS).all()
    few = _cli("leakage", "--cache", cache, "--out", tmp_path / "few", "--probes", "knn", "--attributes", "sex",
               "--no-conditional", "--bootstrap", "100", "--permutations", "2")
    assert few.exit_code == 0 and "note: chance level from 2 permutation(s)" in few.output


def test_an_attribute_that_only_follows_disease_prevalence_is_not_leakage_within_a_class(tmp_path):
    rng = np.random.default_rng(9)
    table = cohort(n_patients=2000, seed=9, max_images=1)
    # "ward" agrees with the label 75% of the time; the embedding carries the label only.
    is_a = (table["label"] == "Atelectasis").to_numpy()
    table["ward"] = np.where(is_a ^ (rng.random(len(table)) < 0.25), "chest", "general")
    x = embeddings(table, dim=8, sex_shift=0.0, label_shift=3.0, seed=9)
    data = _data(tmp_path, table=table, x=x)
    result = leakage(data, LeakageConfig(attributes=("ward",), probes=("knn",), n_perm=3, n_boot=300))
    t = result.table.set_index("condition")
    assert t.loc["", "auc"] > 0.65 and t.loc["", "ci_low"] > t.loc["", "chance_high"]  # disease as a proxy
    for c in ("label=Atelectasis", "label=Cardiomegaly", "label=Effusion"):
        assert t.loc[c, "note"] == "" and t.loc[c, "ci_low"] <= 0.5 <= t.loc[c, "ci_high"], c


def test_more_than_two_groups_use_one_vs_rest_macro_auc(tmp_path):
    table = cohort(n_patients=300, seed=10)
    x = embeddings(table, dim=8, sex_shift=0.0, seed=10)
    race = table["race"].map({"White": 0, "Black": 1, "Asian": 2}).to_numpy()
    x[:, 1] += 3.0 * race
    data = _data(tmp_path, table=table, x=x, attributes=V2)
    result = leakage(data, LeakageConfig(attributes=("race",), probes=("knn",), n_perm=1, n_boot=200, conditional=False))
    row = result.table.iloc[0]
    assert row["groups"] == "White|Black|Asian"
    split = result.split["split"].to_numpy()
    xs = standardize({s: x[split == s] for s in ("train", "test")})
    k, metric = (w.split("=")[1] for w in row["selected"].split())
    knn = KNeighborsClassifier(n_neighbors=int(k), metric=metric, algorithm="brute").fit(xs["train"], race[split == "train"])
    ref = roc_auc_score(race[split == "test"], knn.predict_proba(xs["test"]), multi_class="ovr", average="macro")
    assert row["auc"] == pytest.approx(ref, abs=1e-12) and row["auc"] > 0.75


# ---------------------------------------------------------------- attributes and conditions


def test_default_attributes_come_from_the_cache(tmp_path):
    assert [a.name for a in resolve_attributes(_data(tmp_path, attributes=V2))] == ["sex", "age_group", "race"]
    v1 = load_embedding_data(make_cache(tmp_path / "v1.h5")[0])
    assert [(a.name, a.groups) for a in resolve_attributes(v1)] == [("sex", ("M", "F")), ("age_group", ("young", "old"))]
    coin = resolve_attributes(v1, ("coin",))[0]
    assert coin.groups == ("heads", "tails") and coin.requested


def test_multilabel_conditions_are_positives_and_negatives_of_each_condition():
    table = pd.DataFrame({"y_Pneumothorax": [1.0, 0.0, np.nan, 1.0], "y_Effusion": [0.0, 0.0, 1.0, np.nan]})
    data = EmbeddingData(np.zeros((4, 2), np.float32), table, "m", "h", "s", "multilabel", ["Pneumothorax", "Effusion"], {}, {})
    found = dict(conditions(data))
    assert list(found) == ["y_Pneumothorax=1", "y_Pneumothorax=0", "y_Effusion=1", "y_Effusion=0"]
    assert found["y_Pneumothorax=1"].tolist() == [True, False, False, True]
    assert found["y_Effusion=0"].tolist() == [True, True, False, False]  # uncertain rows in neither


def test_a_multilabel_cache_is_conditioned_on_each_conditions_positives_and_negatives(tmp_path):
    table = cohort(n_patients=400, seed=11)
    rng = np.random.default_rng(11)
    for c in ("Atelectasis", "Effusion"):
        table[f"y_{c}"] = np.where(rng.random(len(table)) < 0.1, np.nan, (rng.random(len(table)) < 0.4).astype(float))
    table = table.drop(columns="label")
    x = np.random.default_rng(12).normal(size=(len(table), 8)).astype(np.float32)
    x[:, 0] += np.where(table["sex"] == "M", 2.0, -2.0)
    path = tmp_path / "ml.h5"
    write_cache(path, image_embeddings=x, cohort_table=table, classes=["Atelectasis", "Effusion"], text={},
                attrs={"model": "m", "weights_id": "w", "cohort_hash": "h", "logit_scale": 1.0, "task": "multilabel"})
    result = leakage(load_embedding_data(path), LeakageConfig(attributes=("sex",), probes=("knn",), n_perm=1, n_boot=200))
    t = result.table.set_index("condition")
    assert list(t.index) == ["", "y_Atelectasis=1", "y_Atelectasis=0", "y_Effusion=1", "y_Effusion=0"]
    assert (t["auc"] > 0.9).all()
    assert t.loc["y_Atelectasis=1", "n_test"] + t.loc["y_Atelectasis=0", "n_test"] < t.loc["", "n_test"]  # uncertain rows out


def test_a_defaulted_attribute_with_one_group_is_a_skipped_row_with_a_note(tmp_path):
    table = cohort(n_patients=200)
    table["sex"] = "M"
    data = _data(tmp_path, table=table)
    result = leakage(data, LeakageConfig(probes=("knn",), n_perm=1, n_boot=200, conditional=False))
    sex = result.table[result.table["attribute"] == "sex"]
    assert len(sex) == 1 and sex["auc"].isna().all() and "one group" in sex["note"].iloc[0]
    assert result.table[result.table["attribute"] == "age_group"]["auc"].notna().all()
    assert any("one group" in n for n in result.notes)


# ---------------------------------------------------------------- CLI and bad input


def test_cli_writes_every_output(tmp_path):
    cache = make_cache(tmp_path / "c.h5")[0]
    res = _cli("leakage", "--cache", cache, "--out", tmp_path / "leak", "--probes", "knn", "--permutations", "2",
               "--bootstrap", "200")
    assert res.exit_code == 0, res.output
    files = sorted(p.name for p in (tmp_path / "leak").iterdir())
    assert files == ["leakage.csv", "leakage.json", "leakage.png", "leakage_permutations.csv", "leakage_split.csv"]
    table = pd.read_csv(tmp_path / "leak" / "leakage.csv", keep_default_na=False)
    assert list(table.columns) == COLUMNS and set(table["attribute"]) == {"sex", "age_group"}
    again = _cli("leakage", "--cache", cache, "--out", tmp_path / "leak", "--probes", "knn")
    assert again.exit_code == 1 and "--force" in again.output


@pytest.mark.parametrize("args, message", [
    (["--attributes", "shoe_size"], "--attributes shoe_size: not a column"),
    (["--attributes", "age"], "distinct values"),
    (["--attributes", "sex", "--min-group", "500"], "fewer than the minimum 500"),
    (["--probes", "svm"], "--probes"),
    (["--fractions", "0.5,0.5"], "--fractions"),
    (["--cohort-split", "holdout"], "--cohort-split holdout"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, args, message):
    cache = make_cache(tmp_path / "c.h5")[0]
    res = _cli("leakage", "--cache", cache, "--out", tmp_path / "leak", "--probes", "knn", *args)
    assert res.exit_code == 1 and message in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1 and "Traceback" not in res.output
    assert not (tmp_path / "leak").exists() and not list(tmp_path.glob(".leak*"))


def test_an_explicit_attribute_with_one_group_is_an_error(tmp_path):
    table = cohort(n_patients=100)
    table["sex"] = "F"
    data = _data(tmp_path, table=table)
    with pytest.raises(CxrfairError, match="attribute sex: has one group"):
        leakage(data, LeakageConfig(attributes=("sex",), probes=("knn",)))


def test_probe_modules_do_not_import_torch(tmp_path):
    cache = make_cache(tmp_path / "c.h5")[0]
    code = ("import sys; import cxrfair.probe.embeddings.leakage, cxrfair.probe.embeddings.geometry, cxrfair.probe.embeddings.cli; "
            f"from cxrfair.probe.embeddings.data import load_embedding_data; load_embedding_data({str(cache)!r}); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------- real pixels (slow)


@pytest.mark.slow
def test_sex_is_found_in_a_real_tiny_clip_extraction_of_the_synthetic_images(tmp_path):
    """Pixels -> tiny-clip -> cache -> leakage. The synthetic images reveal sex (a corner marker,
    fainter and noisier findings for F). tiny-clip has random weights and sees 64 px images, in
    which the marker is 3 x 3 pixels, so the probes find sex well above the measured chance level
    but not near 1 (about 0.7 here); the planted-direction tests above check "near 1"."""
    from cxrfair.extract.extractor import ExtractConfig, extract
    from tests.extract.extract_helpers import make_cohort

    folder = make_cohort(tmp_path, per_group=30, size=64)
    extract(ExtractConfig(model="tiny-clip", cohort=folder, out=tmp_path / "c.h5", workers=0, progress=False))
    data = load_embedding_data(tmp_path / "c.h5")
    result = leakage(data, LeakageConfig(attributes=("sex",), probes=("linear", "knn"), n_perm=2, n_boot=300,
                                         conditional=False, linear=LINEAR))
    for _, row in result.table.iterrows():
        assert row["auc"] > 0.6 and row["ci_low"] > row["chance_high"], row.to_dict()
