"""Zero-shot probabilities against a direct NumPy computation; prompt-set selection; runs."""

from __future__ import annotations

import json

import numpy as np

from cxrfair.core.runs import read_runs
from cxrfair.extract.cache import TextEmbeddings
from cxrfair.probe.zeroshot import SELECTION, macro_f1, zeroshot_cache, zeroshot_probs
from tests.probe.synth import make_cache


def test_probabilities_match_numpy():
    rng = np.random.default_rng(0)
    img, txt = rng.normal(size=(7, 5)) * 3, rng.normal(size=(2, 4, 5))
    got = zeroshot_probs(img, txt, 42.0)
    for t in range(2):
        for n in range(7):
            cos = np.array([img[n] @ txt[t, c] / np.linalg.norm(img[n]) / np.linalg.norm(txt[t, c]) for c in range(4)])
            want = np.exp(42.0 * cos) / np.exp(42.0 * cos).sum()
            np.testing.assert_allclose(got[t, n], want, rtol=1e-4, atol=1e-6)


def test_macro_f1_matches_sklearn():
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(1)
    y, p = rng.integers(0, 4, 50), rng.integers(0, 3, 50)  # class 3 never predicted
    assert np.isclose(macro_f1(y, p, 4), f1_score(y, p, average="macro", labels=range(4), zero_division=0))


def _text_sets(x, rng):
    """'good': class means (plus noise) as text embeddings, 3 draws; 'bad': random, 2 draws; 'fixed': identical draws."""
    means = np.stack([x["train"][np.arange(len(x["train"])) % 6 == c].mean(0) for c in range(6)])
    good = np.stack([means + 0.3 * rng.normal(size=means.shape) for _ in range(3)]).astype(np.float32)
    bad = rng.normal(size=(2, 6, means.shape[1])).astype(np.float32)
    fixed = np.repeat(rng.normal(size=(1, 6, means.shape[1])), 4, axis=0).astype(np.float32)
    prompts = lambda d: [[["p"]] * 6] * d  # noqa: E731
    return {"good": TextEmbeddings(good, prompts(3)), "bad": TextEmbeddings(bad, prompts(2)),
            "fixed": TextEmbeddings(fixed, prompts(4))}


def test_chosen_set_on_validation_and_one_run_per_draw(tmp_path):
    from tests.probe.synth import clusters

    x, _ = clusters({"train": 60, "val": 24, "test": 30}, 16, 6, 3.0, 0)  # the cache's own features
    path, x, y, text = make_cache(tmp_path / "c.h5", text=_text_sets(x, np.random.default_rng(2)), logit_scale=30.0)
    paths = zeroshot_cache(path, tmp_path / "runs")
    assert [p.name for p in paths] == [f"tiny-clip__zeroshot__good-d{d}__s{d}" for d in range(3)]
    runs = read_runs(tmp_path / "runs")
    meta = runs[1].meta
    assert meta["prompt_set"] == "good" and meta["draw"] == 1 and meta["prompt_set_selected"]
    assert meta["selection"]["criterion"] == SELECTION and set(meta["selection"]["val_scores"]) == {"good", "bad", "fixed"}
    # The written test probabilities are the NumPy computation's, for that draw.
    emb, t = x["test"], text["good"].embeddings[1]
    cos = (emb / np.linalg.norm(emb, axis=1, keepdims=True)) @ (t / np.linalg.norm(t, axis=1, keepdims=True)).T
    want = np.exp(30 * cos - (30 * cos).max(1, keepdims=True))
    _, probs = runs[1].arrays("test")
    np.testing.assert_allclose(probs, want / want.sum(1, keepdims=True), atol=1e-5)


def test_all_sets_and_identical_draws_written_once(tmp_path):
    from tests.probe.synth import clusters

    x, _ = clusters({"train": 60, "val": 24, "test": 30}, 16, 6, 3.0, 0)
    path, *_ = make_cache(tmp_path / "c.h5", text=_text_sets(x, np.random.default_rng(2)))
    names = sorted(p.name for p in zeroshot_cache(path, tmp_path / "runs", all_sets=True))
    assert len(names) == 3 + 2 + 1 and "tiny-clip__zeroshot__fixed-d0__s0" in names
    meta = json.loads((tmp_path / "runs" / "tiny-clip__zeroshot__bad-d1__s1" / "run.json").read_text())
    assert meta["prompt_set_selected"] is False and meta["selection"]["chosen"] == "good"


# ---------------------------------------------------------------- GLoRIA's scoring (term "both")


def gloria_zero_shot_classification(sim_by_class: dict) -> "pd.DataFrame":
    """GLoRIA's ``zero_shot_classification`` after ``get_similarities``, transcribed: per class the
    max over its prompts' similarities, then each class column standardised over the images
    scored together (numpy std, ddof 0)."""
    import pandas as pd

    class_similarities = np.stack([s.max(axis=1) for s in sim_by_class.values()], axis=1)
    class_similarities = (class_similarities - class_similarities.mean(axis=0)) / class_similarities.std(axis=0)
    return pd.DataFrame(class_similarities, columns=list(sim_by_class))


def _gloria_cache(path, with_scores=True, seed=0):
    """A cache with 2 prompt sets over distinct prompts and stored (N, P) global/local scores whose
    class-0..5 prompts carry the label signal; returns (path, x, y, prompts, scores)."""
    from cxrfair.extract.cache import PromptScores
    from tests.probe.synth import clusters

    rng = np.random.default_rng(seed)
    x, y = clusters({"train": 60, "val": 24, "test": 30}, 16, 6, 3.0, seed)
    pool = {c: [f"class {c} prompt {j}" for j in range(5)] for c in range(6)}
    sets = {"gloria": [[list(rng.choice(pool[c], 3, replace=False)) for c in range(6)] for _ in range(3)],
            "clip": [[pool[c][:2] for c in range(6)]] * 2}
    prompts = sorted({p for draws in sets.values() for d in draws for pl in d for p in pl})
    labels = np.concatenate([y["train"], y["val"], y["test"]])
    owner = np.array([int(p.split()[1]) for p in prompts])
    signal = (owner[None, :] == labels[:, None]).astype(np.float32)
    scores = PromptScores(prompts, 0.3 * signal + rng.normal(size=signal.shape).astype(np.float32),
                          2.0 * signal + 3 * rng.normal(size=signal.shape).astype(np.float32))
    text = {n: TextEmbeddings(rng.normal(size=(len(d), 6, 16)).astype(np.float32), d) for n, d in sets.items()}
    text["clip"] = TextEmbeddings(np.repeat(text["clip"].embeddings[:1], 2, 0), sets["clip"])
    make_cache(path, text=text, seed=seed, prompt_scores=scores if with_scores else None)
    return path, x, y, sets, scores


def test_gloria_scoring_matches_a_transcription_of_gloria_zero_shot(tmp_path):
    from cxrfair.probe.zeroshot import nll

    path, x, y, sets, scores = _gloria_cache(tmp_path / "g.h5")
    paths = zeroshot_cache(path, tmp_path / "runs", all_sets=True)
    runs = {r.run_id: r for r in read_runs(tmp_path / "runs")}
    assert len(paths) == 3 + 1 and all(r.meta["zero_shot_term"] == "both" for r in runs.values())
    val, test = slice(60, 84), slice(84, 114)
    run = runs["tiny-clip__zeroshot__gloria-d2__s2"]
    columns = {c: [scores.prompts.index(p) for p in sets["gloria"][2][c]] for c in range(6)}
    both = (scores.global_sim + scores.local_sim) / 2
    # On val, our standardised scores are GLoRIA's (it standardises over the images scored together).
    z_val = gloria_zero_shot_classification({c: both[val][:, cols] for c, cols in columns.items()}).to_numpy()
    hyper = run.meta["hyperparameters"]
    scale = hyper["scale"]
    _, probs_val = run.arrays("val")
    np.testing.assert_allclose(probs_val, np.exp(scale * z_val) / np.exp(scale * z_val).sum(1, keepdims=True), atol=1e-5)
    # On test: the validation mean and sd, not the test images' own.
    s_test = np.stack([both[test][:, cols].max(1) for cols in columns.values()], 1)
    s_val = np.stack([both[val][:, cols].max(1) for cols in columns.values()], 1)
    z_test = (s_test - s_val.mean(0)) / s_val.std(0)
    _, probs_test = run.arrays("test")
    np.testing.assert_allclose(probs_test, np.exp(scale * z_test) / np.exp(scale * z_test).sum(1, keepdims=True), atol=1e-5)
    np.testing.assert_allclose(hyper["class_mean"], s_val.mean(0), rtol=1e-5)
    # The scale is the validation-NLL minimiser (no better value nearby).
    best = nll(z_val, y["val"], scale)
    assert all(best <= nll(z_val, y["val"], scale * f) + 1e-9 for f in (0.9, 1.1, 0.5, 2.0))
    assert "validation" in run.meta["notes"] and "GLoRIA" in run.meta["notes"]


def test_term_global_is_the_embedding_scoring_and_both_needs_prompt_scores(tmp_path):
    from cxrfair.errors import CxrfairError
    import pytest

    path, *_ = _gloria_cache(tmp_path / "g.h5")
    zeroshot_cache(path, tmp_path / "runs", term="global")
    meta = read_runs(tmp_path / "runs")[0].meta
    assert meta["zero_shot_term"] == "global" and meta["hyperparameters"]["logit_scale"] == 100.0
    plain, *_ = _gloria_cache(tmp_path / "plain.h5", with_scores=False)
    zeroshot_cache(plain, tmp_path / "runs2")
    assert all(r.meta["zero_shot_term"] == "global" for r in read_runs(tmp_path / "runs2"))
    with pytest.raises(CxrfairError, match="--term both: cache .* holds no prompt scores"):
        zeroshot_cache(plain, tmp_path / "runs3", term="both")
    assert not (tmp_path / "runs3").exists()


# ---------------------------------------------------------------- multi-label (per-condition prompt pairs)


def _sklearn_macro_auc(y, p):
    """Mean over conditions of scikit-learn's ROC AUC on the rows whose label is not NaN."""
    from sklearn.metrics import roc_auc_score

    return float(np.mean([roc_auc_score(y[~np.isnan(y[:, c]), c], p[~np.isnan(y[:, c]), c]) for c in range(y.shape[1])]))


def test_pair_probabilities_are_a_softmax_over_each_conditions_pair():
    from cxrfair.probe.zeroshot import pair_probs

    rng = np.random.default_rng(3)
    img, txt = rng.normal(size=(5, 4)) * 2, rng.normal(size=(2, 3, 2, 4))
    got = pair_probs(img, txt, 30.0)
    assert got.shape == (2, 5, 3)
    for t in range(2):
        for n in range(5):
            for c in range(3):
                cos = [img[n] @ txt[t, c, k] / np.linalg.norm(img[n]) / np.linalg.norm(txt[t, c, k]) for k in (0, 1)]
                want = np.exp(30 * cos[1]) / (np.exp(30 * cos[0]) + np.exp(30 * cos[1]))
                np.testing.assert_allclose(got[t, n, c], want, rtol=1e-4, atol=1e-6)


def test_multilabel_zeroshot_chooses_the_set_by_masked_macro_auc_and_writes_multilabel_runs(tmp_path):
    from cxrfair.probe.zeroshot import SELECTION_MULTILABEL
    from tests.probe.synth import CONDITIONS, ML_ATTRIBUTES, make_multilabel_cache

    path, x, y, text = make_multilabel_cache(tmp_path / "ml.h5")
    paths = zeroshot_cache(path, tmp_path / "runs", all_sets=True)
    runs = {r.run_id: r for r in read_runs(tmp_path / "runs")}
    assert len(paths) == 3 + 2 + 1 and "tiny-clip__zeroshot__fixed-d0__s0" in runs
    meta = runs["tiny-clip__zeroshot__good-d1__s1"].meta
    assert meta["task"] == "multilabel" and meta["attributes"] == ML_ATTRIBUTES and meta["classes"] == CONDITIONS
    assert meta["zero_shot_term"] == "global" and meta["selection"]["criterion"] == SELECTION_MULTILABEL
    # Every set's recorded validation score is scikit-learn's masked macro AUC of its draws' probabilities.
    val = meta["selection"]["val_scores"]
    for name, te in text.items():
        for d, emb in enumerate(te.embeddings):
            unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)  # noqa: E731
            cos = np.einsum("nd,ckd->nck", unit(x["val"]), unit(emb))
            p = 1 / (1 + np.exp(-50.0 * (cos[..., 1] - cos[..., 0])))
            assert np.isclose(val[name]["auc_macro"][d], _sklearn_macro_auc(y["val"], p), atol=1e-6)
            if name == "good" and d == 1:
                _, probs = runs["tiny-clip__zeroshot__good-d1__s1"].arrays("val")
                np.testing.assert_allclose(probs, p, atol=1e-5)
    best = max(val, key=lambda n: val[n]["mean_auc_macro"])
    assert meta["selection"]["chosen"] == best == "good"
    assert [r.meta["prompt_set_selected"] for r in runs.values()].count(True) == 3
    pred = runs["tiny-clip__zeroshot__good-d0__s0"].predictions
    assert {"race", "y_Pleural Effusion", "p_Pleural Effusion"} <= set(pred.columns) and "label" not in pred.columns
    Y, _ = runs["tiny-clip__zeroshot__good-d0__s0"].arrays("test")
    np.testing.assert_array_equal(Y, y["test"])  # NaN (masked) labels travel as empty cells


def test_multilabel_zeroshot_refuses_gloria_scoring(tmp_path):
    import pytest

    from cxrfair.errors import CxrfairError
    from tests.probe.synth import make_multilabel_cache

    path, *_ = make_multilabel_cache(tmp_path / "ml.h5")
    with pytest.raises(CxrfairError, match="multi-label cohort; GLoRIA's scoring is multi-class only"):
        zeroshot_cache(path, tmp_path / "runs", term="both")


def test_multiclass_zeroshot_runs_carry_the_caches_task_and_attributes(tmp_path):
    path, *_ = make_cache(tmp_path / "c.h5")
    zeroshot_cache(path, tmp_path / "runs")
    meta = read_runs(tmp_path / "runs")[0].meta
    assert meta["task"] == "multiclass" and list(meta["attributes"]) == ["sex", "age_group"]
