"""The grid, the chunk plan and the config checks (no training)."""

from __future__ import annotations

import math

import pytest

from cxrfair.errors import CxrfairError
from cxrfair.probe.sweep import L2_GRIDS, SweepConfig, lane_bytes, plan_chunks
from cxrfair.probe.train import count_params


def test_grid_order_and_linear_ignores_hidden():
    mlp = SweepConfig(method="mlp", solver="adamw", lrs=(1e-3, 1e-2), weight_decays=(0.0, 0.1), hiddens=(4, 8)).configurations()
    assert [(c["hidden"], c["lr"], c["weight_decay"]) for c in mlp[:3]] == [(4, 1e-3, 0.0), (4, 1e-3, 0.1), (4, 1e-2, 0.0)]
    assert len(mlp) == 8 and all(math.isnan(c["l2"]) for c in mlp)
    assert {c["hidden"] for c in SweepConfig(hiddens=(4, 8)).configurations()} == {0}


def test_lbfgs_grid_is_hidden_then_l2_with_a_default_per_method():
    mlp = SweepConfig(method="mlp", l2s=(1e-3, 1e-1), hiddens=(4, 8)).configurations()
    assert [(c["hidden"], c["l2"]) for c in mlp] == [(4, 1e-3), (4, 1e-1), (8, 1e-3), (8, 1e-1)]
    assert all(math.isnan(c["lr"]) and math.isnan(c["weight_decay"]) for c in mlp)
    assert [c["l2"] for c in SweepConfig().configurations()] == list(L2_GRIDS["linear"])
    assert [c["l2"] for c in SweepConfig(method="mlp", hiddens=(8,)).configurations()] == list(L2_GRIDS["mlp"])


@pytest.mark.parametrize("change, option", [
    ({"solver": "adamw", "lrs": ()}, "--lr"), ({"solver": "adamw", "weight_decays": ()}, "--weight-decay"),
    ({"seeds": ()}, "--seeds"), ({"l2s": ()}, "--l2"), ({"l2s": (-1e-3,)}, "--l2"), ({"l2s": (float("inf"),)}, "--l2"),
    ({"method": "mlp", "hiddens": ()}, "--hidden"), ({"lrs": (-1.0,)}, "--lr"), ({"lrs": (float("nan"),)}, "--lr"),
    ({"method": "mlp", "hiddens": (12.5,)}, "--hidden"), ({"method": "mlp", "hiddens": (0,)}, "--hidden"),
    ({"weight_decays": (-0.1,)}, "--weight-decay"), ({"epochs": 0}, "--epochs"), ({"method": "svm"}, "method"),
    ({"solver": "sgd"}, "--solver"), ({"select": "f1"}, "--select"), ({"max_iter": 0}, "--max-iter"),
    ({"seeds": (1, 1)}, "--seeds"), ({"memory_budget_mb": 0}, "--memory-budget"),
])
def test_bad_configs_name_the_option(change, option):
    with pytest.raises(CxrfairError, match=option):
        SweepConfig(**change).validate()


def test_chunk_plan_keeps_configurations_together_and_fits_the_budget():
    per = lane_bytes(512, 6, 0, 64, 360, 150)
    assert plan_chunks(3, 64, per, 1e12) == (3, 64)  # everything fits: one chunk
    assert plan_chunks(3, 64, per, 100 * per) == (1, 64)  # configurations first, then seeds
    assert plan_chunks(3, 64, per, 10.5 * per) == (1, 10)
    assert plan_chunks(3, 64, per, 1) == (1, 1)  # never below one lane
    assert lane_bytes(512, 6, 512, 64, 360, 150) > 50 * per  # the MLP's lanes are much larger


def test_parameter_counts():
    assert count_params(512, 6, 0) == 512 * 6 + 6
    assert count_params(512, 6, 256) == 512 * 256 + 256 + 256 * 6 + 6
