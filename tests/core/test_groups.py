"""The group-metric engine both tasks share: one spec vocabulary, one by_group, one combine_groups."""

from __future__ import annotations

import numpy as np
import pytest

from cxrfair.core import groups as G
from cxrfair.core import metrics as M
from cxrfair.core import multilabel as ML

TABLES = {"multiclass": M.GROUP_METRICS, "multilabel": ML.GROUP_METRICS}


def test_both_tasks_write_their_spec_tables_in_one_vocabulary():
    for task, table in TABLES.items():
        assert all(isinstance(s, G.GroupMetric) for s in table), task
        assert {s.combine for s in table} <= set(G.COMBINES), task
        names = [s.name for s in table]
        assert len(names) == len(set(names)), f"{task}: a group metric name twice"
    # One name per idea: the worst-case equalised odds is one spec in both tables.
    worst = [next(s for s in t if s.name == "eqodds_worst") for t in TABLES.values()]
    assert {(s.bases, s.combine) for s in worst} == {(("tpr", "fpr"), "max_range")}
    mean = [next(s for s in t if s.name == "eqodds") for t in TABLES.values()]
    assert {(s.bases, s.combine) for s in mean} == {(("tpr", "fpr"), "abs_difference")}
    # Retired names of the former second engine stay retired.
    every = {s.name for t in TABLES.values() for s in t} | set(M.METRIC_DEFINITIONS)
    assert "eqodds_max" not in every and "range" not in G.COMBINES


def test_every_group_metric_is_defined_once():
    for task, table in TABLES.items():
        own = M.metric_definitions(task)
        for spec in table:
            assert own[spec.name] == spec.doc, (task, spec.name)  # the spec's doc is the definition
            assert spec.name in M.METRIC_DEFINITIONS
    # A name in both tasks is one key of METRIC_DEFINITIONS (both sentences when they differ).
    shared = {s.name for s in M.GROUP_METRICS} & {s.name for s in ML.GROUP_METRICS}
    assert {"eqodds", "eqodds_worst", "es_auc", "fnr_gap", "ece_gap"} <= shared
    for name in shared:
        text = M.METRIC_DEFINITIONS[name]
        mc, ml = M.metric_definitions("multiclass")[name], M.metric_definitions("multilabel")[name]
        assert text == mc if mc == ml else (text.count("Multi-class:") == 1 and text.count("Multi-label:") == 1)


def test_a_spec_outside_the_vocabulary_is_one_clear_error():
    with pytest.raises(ValueError, match="unknown combine 'range'"):
        G.GroupMetric("x", ("tpr", "fpr"), "range", "doc")
    with pytest.raises(ValueError, match="one base"):
        G.GroupMetric("x", ("auc", "ap"), "min", "doc")
    with pytest.raises(ValueError, match="one to one"):
        G.GroupMetric("x", ("tpr", "fpr"), "abs_difference", "doc", debiased=("tpr_debiased",))
    with pytest.raises(ValueError, match="one to one"):
        G.GroupMetric("x", ("f1",), "difference", "doc", debiased=("f1_debiased",))


def test_a_debiased_base_is_a_per_sample_metric_of_the_same_task():
    """Every spec's debiased bases are metrics its task computes per group (the interval reads their columns)."""
    for task, table, values in (("multiclass", M.GROUP_METRICS, M.GROUP_VALUE_METRICS),
                                ("multilabel", ML.GROUP_METRICS, ML.CONDITION_METRICS)):
        for spec in table:
            assert set(spec.debiased) <= set(values), (task, spec.name)
    assert [s.debiased for s in (*M.GROUP_METRICS, *ML.GROUP_METRICS) if s.name == "ece_gap"] == [("ece_debiased",)] * 2


def test_combine_groups_shapes_and_values_by_hand():
    # (G=3, R=2, C=2) per-group values of two bases; reference group first.
    tpr = np.array([[[1.0, 0.5], [0.8, np.nan]], [[0.5, 0.5], [0.6, 0.2]], [[0.9, 0.0], [0.8, 0.4]]])
    fpr = np.zeros_like(tpr)
    per = {"tpr": tpr, "fpr": fpr}
    worst = G.GroupMetric("eqodds_worst", ("tpr", "fpr"), "max_range", "d")
    per_c, value = G.combine_groups(worst, per, per_class=True)
    assert per_c.shape == (2, 2) and value.shape == (2,)
    np.testing.assert_allclose(per_c, [[0.5, 0.5], [0.2, np.nan]])
    np.testing.assert_allclose(value, [0.5, 0.2])  # the class mean skips NaN
    assert np.array_equal(G.combine_groups(worst, per), value)  # the default returns the summary only
    gap = G.GroupMetric("tpr_gap", ("tpr",), "difference", "d")
    two = {"tpr": tpr[:2]}
    per_c, value = G.combine_groups(gap, two, per_class=True)
    np.testing.assert_array_equal(per_c, tpr[0] - tpr[1])
    np.testing.assert_allclose(value, [0.25, 0.8 - 0.6])  # class mean of the differences, NaN skipped
    # A base given as {group: (..., C)} is the same as the stacked array.
    as_dict = {"tpr": {"a": tpr[0], "b": tpr[1]}}
    assert np.array_equal(G.combine_groups(gap, as_dict), value)
    # Fewer than two groups: no gap; the range of one group is NaN unless asked otherwise.
    one = {"tpr": tpr[:1], "fpr": fpr[:1]}
    assert np.isnan(G.combine_groups(gap, one)).all() and np.isnan(G.combine_groups(worst, one)).all()
    np.testing.assert_array_equal(G.combine_groups(worst, one, min_range_groups=1), [0.0, 0.0])
    none = {"tpr": np.empty((0, 2, 2)), "fpr": np.empty((0, 2, 2))}
    assert all(np.isnan(G.combine_groups(s, none)).all() for s in (gap, worst, G.GroupMetric("m", ("tpr",), "min", "d")))


def test_by_group_serves_both_tasks():
    y = np.array([0, 1, 1, 0])
    p = np.array([[.9, .1], [.2, .8], [.6, .4], [.3, .7]])
    g = np.array(["a", "a", "b", "b"])
    mc = G.by_group(M.accuracy, y, p, g, levels=["b", "a", "none"])
    assert list(mc) == ["b", "a", "none"] and mc["a"] == 1.0 and mc["b"] == 0.0 and np.isnan(mc["none"])
    Y = np.array([[0.0], [1.0], [1.0], [0.0]])
    ml = G.by_group(ML.condition_metrics, Y, p[:, 1:], g, levels=["a", "b"], thresholds=[0.5])
    assert ml["a"]["auc"].shape == (1,) and ml["a"]["auc"][0] == 1.0 and ml["b"]["tpr"][0] == 0.0
    w = np.ones((3, 4))
    assert G.by_group(M.accuracy, y, p, g, weights=w)["a"].shape == (3,)
    with pytest.raises(ValueError, match="one per sample"):
        G.by_group(M.accuracy, y, p, g[:3])


def test_the_nan_rule_helpers():
    np.testing.assert_array_equal(G.ratio([1.0, 1.0], [2.0, 0.0]), [0.5, np.nan])
    np.testing.assert_array_equal(G.nanmean_last(np.array([[1.0, np.nan, 3.0], [np.nan, np.nan, np.nan]])), [2.0, np.nan])
    assert G.as_weights(None, 3).tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="columns"):
        G.as_weights(np.ones((2, 4)), 3)
