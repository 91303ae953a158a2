"""Zero-shot probabilities against a direct NumPy computation; prompt-set selection; runs."""

from __future__ import annotations

import json

import numpy as np

from cxrfair.analysis.runs import read_runs
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
