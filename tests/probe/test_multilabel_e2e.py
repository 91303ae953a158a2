"""A multi-label cohort end to end: synthetic MIMIC files -> mimic-sourget cohort -> tiny-clip
cache -> zero-shot and linear probe -> analysis with per-condition, per-group AUC (race too)."""

from __future__ import annotations

import numpy as np
import pytest

from cxrfair.analysis.analyze import AnalyzeConfig, compute
from cxrfair.core.runs import read_runs
from cxrfair.extract.cache import read_cache
from cxrfair.extract.cohort import CohortConfig, build_cohort
from cxrfair.extract.extractor import ExtractConfig, extract
from cxrfair.extract.synth import SynthConfig, make_synth
from cxrfair.probe.sweep import SweepConfig, probe_cache
from cxrfair.probe.zeroshot import zeroshot_cache

CONDITIONS = ["Atelectasis", "Cardiomegaly", "Consolidation", "Pleural Effusion", "Pneumonia", "Pneumothorax"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ml-e2e")
    make_synth(SynthConfig(out=root / "synth", format="mimic", patients=120, size=32))
    mimic = root / "synth/mimic-cxr-jpg/2.0.0"
    # ~170 images: the official test and validation splits whole, training capped (whole patients).
    cohort = build_cohort(CohortConfig.from_preset("mimic-sourget", out=root / "cohort", metadata=mimic,
                                                   mimic_iv=root / "synth/mimiciv/2.2", images=mimic, max_train=60))
    cache = root / "tiny-clip.h5"
    extract(ExtractConfig(model="tiny-clip", cohort=root / "cohort", out=cache, batch_size=64, workers=0, progress=False))
    zeroshot_cache(cache, root / "runs")
    probe_cache(cache, root / "runs", SweepConfig(l2s=(1e-2, 1e-1), seeds=(0,), max_iter=30))
    return cohort, read_cache(cache), read_runs(root / "runs")


def test_the_cache_carries_the_cohorts_task_attributes_targets_and_pair_prompts(runs):
    cohort, cache, _ = runs
    assert cache.task == "multilabel" and cache.attributes == cohort.attributes and "race" in cache.attributes
    np.testing.assert_array_equal(cache.targets(), cohort.targets())
    assert list(cache.table.columns) == list(cohort.table.columns)
    assert set(cache.text) == {"sourget", "chexzero", "clip"}
    assert all(te.embeddings.shape == (10, 6, 2, 64) for te in cache.text.values())
    assert cache.text["sourget"].prompts[0][3] == [["Chest No findings"], ["Chest Pleural Effusion"]]
    assert "prompt_scores" not in cache.attrs and cache.prompt_scores is None


def test_analysis_reports_per_condition_per_group_auc_of_every_method(runs):
    from sklearn.metrics import roc_auc_score

    cohort, _, runs = runs
    assert {r.method for r in runs} == {"zeroshot", "linear"} and all(r.task == "multilabel" for r in runs)
    results = compute(runs, AnalyzeConfig(runs_dir=runs[0].path.parent, out=runs[0].path.parent / "report", n_boot=0,
                                          figures=False))
    m = results.metrics
    auc = m[(m.metric == "auc") & (m.split == "test") & m.group.notna() & (m.group != "")]
    assert set(auc.attribute) >= {"sex", "age_group", "race"}
    assert set(auc[auc.attribute == "race"].group) == {"White", "Black", "Asian"}
    assert set(auc["class"]) == set(CONDITIONS)
    # One cell recomputed from the written predictions with scikit-learn (masked labels out).
    linear = next(r for r in runs if r.method == "linear")
    pred = linear.predictions[(linear.predictions.split == "test") & (linear.predictions.race == "White")]
    y = pred["y_Pneumothorax"].to_numpy()
    keep = ~np.isnan(y)
    want = roc_auc_score(y[keep], pred.loc[keep, "p_Pneumothorax"])
    got = auc[(auc.run_id == linear.run_id) & (auc.attribute == "race") & (auc.group == "White")
              & (auc["class"] == "Pneumothorax")]["value"]
    assert len(got) == 1 and np.isclose(float(got.iloc[0]), want)
