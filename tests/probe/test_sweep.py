"""The grid, the chunk plan and the config checks (no training)."""

from __future__ import annotations

import dataclasses
import math

import pytest

from cxrfair.errors import CxrfairError
from cxrfair.probe.sweep import L2_GRIDS, L2_SKIP_GRID, SweepConfig, lane_bytes, plan_chunks
from cxrfair.probe.train import count_params


def test_grid_order_and_linear_ignores_hidden():
    mlp = SweepConfig(method="mlp", solver="adamw", lrs=(1e-3, 1e-2), weight_decays=(0.0, 0.1), hiddens=(4, 8)).configurations()
    assert [(c["hidden"], c["lr"], c["weight_decay"]) for c in mlp[:3]] == [(4, 1e-3, 0.0), (4, 1e-3, 0.1), (4, 1e-2, 0.0)]
    assert len(mlp) == 8 and all(math.isnan(c["l2"]) for c in mlp)
    assert {c["hidden"] for c in SweepConfig(hiddens=(4, 8)).configurations()} == {0}


def test_lbfgs_grid_is_hidden_then_l2_with_a_default_per_method():
    mlp = SweepConfig(method="mlp", architecture="plain", l2s=(1e-3, 1e-1), hiddens=(4, 8)).configurations()
    assert [(c["hidden"], c["l2"]) for c in mlp] == [(4, 1e-3), (4, 1e-1), (8, 1e-3), (8, 1e-1)]
    assert all(math.isnan(c["lr"]) and math.isnan(c["weight_decay"]) and "l2_skip" not in c for c in mlp)
    assert [c["l2"] for c in SweepConfig().configurations()] == list(L2_GRIDS["linear"])
    plain = SweepConfig(method="mlp", architecture="plain", hiddens=(8,)).configurations()
    assert [c["l2"] for c in plain] == list(L2_GRIDS["mlp"])


def test_the_default_mlp_is_the_skip_mlp_with_a_grid_over_both_penalties():
    cfg = SweepConfig(method="mlp", hiddens=(8,))
    assert cfg.architecture == "skip" and cfg.family == "mlp+skip" and cfg.ftol_value > 0
    grid = [(c["l2"], c["l2_skip"]) for c in cfg.configurations()]
    assert grid == [(a, b) for a in L2_GRIDS["mlp+skip"] for b in L2_SKIP_GRID]
    assert SweepConfig().ftol_value == 0 and SweepConfig().family == "linear"  # the linear probe: gradient test only
    assert (cfg.max_iter, SweepConfig().max_iter, SweepConfig(method="mlp", max_iter=50).max_iter) == (300, 1000, 50)
    adamw = SweepConfig(method="mlp", solver="adamw", hiddens=(8,))
    assert adamw.skip and all("l2_skip" not in c for c in adamw.configurations())  # weight decay covers W0


def test_run_json_names_the_architecture_and_the_stopping_rule():
    from cxrfair.probe.sweep import _hyperparameters

    best = {"lr": math.nan, "weight_decay": math.nan, "l2": 0.1, "hidden": 8}
    plain = _hyperparameters(SweepConfig(method="mlp", architecture="plain"), best)
    assert plain["architecture"] == "mlp" and "W0" not in plain["forward"] and "l2_skip" not in plain
    assert plain["ftol"] == 1e-5 and "1e-05 * max(|f|, 1)" in plain["stopping"] and "300 iterations" in plain["stopping"]
    skip = _hyperparameters(SweepConfig(method="mlp"), best | {"l2_skip": 1e-4})
    assert skip["architecture"] == "mlp+skip" and skip["l2_skip"] == 1e-4 and skip["grid"]["l2_skip"] == list(L2_SKIP_GRID)
    # Where lanes start: the skip MLP's every lane from the linear probe and its seed (no chain);
    # the plain MLP's and the linear probe's chains from the largest l2 down.
    assert skip["warm_start"] == [] and skip["start"].startswith("every lane: W0 and b2 from the linear probe")
    assert plain["warm_start"] == ["l2"] and "next larger l2; the largest: from its seed's" in plain["start"]
    cold = _hyperparameters(SweepConfig(method="mlp", warm_start=False), best | {"l2_skip": 1e-4})
    assert cold["start"] == "every lane from its seed's initialisation"
    linear = _hyperparameters(SweepConfig(), best | {"hidden": 0})
    assert linear["architecture"] == "linear" and linear["ftol"] == 0 and "max(|f|" not in linear["stopping"]
    assert "next larger l2; the largest" in linear["start"]
    adamw = _hyperparameters(SweepConfig(method="mlp", solver="adamw"), best)
    assert adamw["architecture"] == "mlp+skip" and "stopping" not in adamw


@pytest.mark.parametrize("change, option", [
    ({"solver": "adamw", "lrs": ()}, "--lr"), ({"solver": "adamw", "weight_decays": ()}, "--weight-decay"),
    ({"seeds": ()}, "--seeds"), ({"l2s": ()}, "--l2"), ({"l2s": (-1e-3,)}, "--l2"), ({"l2s": (float("inf"),)}, "--l2"),
    ({"method": "mlp", "hiddens": ()}, "--hidden"), ({"lrs": (-1.0,)}, "--lr"), ({"lrs": (float("nan"),)}, "--lr"),
    ({"method": "mlp", "hiddens": (12.5,)}, "--hidden"), ({"method": "mlp", "hiddens": (0,)}, "--hidden"),
    ({"weight_decays": (-0.1,)}, "--weight-decay"), ({"epochs": 0}, "--epochs"), ({"method": "svm"}, "method"),
    ({"solver": "sgd"}, "--solver"), ({"select": "f1"}, "--select"), ({"max_iter": 0}, "--max-iter"),
    ({"seeds": (1, 1)}, "--seeds"), ({"memory_budget_mb": 0}, "--memory-budget"),
    ({"method": "mlp", "architecture": "resnet"}, "--architecture"), ({"l2s_skip": (1e-3,)}, "--l2-skip"),
    ({"method": "mlp", "architecture": "plain", "l2s_skip": (1e-3,)}, "--l2-skip"),
    ({"method": "mlp", "l2s_skip": (-1.0,)}, "--l2-skip"), ({"method": "mlp", "l2s_skip": ()}, "--l2-skip"),
    ({"ftol": -1e-3}, "--ftol"), ({"ftol": float("nan")}, "--ftol"),
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
    assert count_params(512, 6, 256, skip=True) == 512 * 256 + 256 + 256 * 6 + 6 + 512 * 6


def test_warm_start_chains_walk_the_linear_path_down_and_the_mlps_path_up():
    from cxrfair.probe.sweep import warm_start_chains

    linear = SweepConfig(l2s=(1e-3, 1e-1, 1e-2))
    assert warm_start_chains(linear.configurations(), linear.warm_path) == [[1, 2, 0]]
    cold = SweepConfig(l2s=(1e-3, 1e-1), warm_start=False)
    assert warm_start_chains(cold.configurations(), cold.warm_path) == [[0], [1]]
    assert SweepConfig(solver="adamw").warm_path == ()  # AdamW lanes never chain
    mlp = SweepConfig(method="mlp", hiddens=(4, 8), l2s=(0.01, 1.0), l2s_skip=(1e-5, 1e-3))
    configs = mlp.configurations()
    # The plain MLP walks l2 from the largest down, one chain per width, like the linear probe;
    # ``ascending`` (WARM_ASCENDING, empty by default) walks it up.
    plain = SweepConfig(method="mlp", architecture="plain", hiddens=(4, 8), l2s=(0.01, 0.1, 1.0))
    walk = [[(plain.configurations()[k]["hidden"], plain.configurations()[k]["l2"]) for k in chain]
            for chain in warm_start_chains(plain.configurations(), plain.warm_path, plain.warm_ascending)]
    assert plain.warm_path == ("l2",) and not plain.warm_ascending and not linear.warm_ascending and not plain.linear_start
    assert walk == [[(4, 1.0), (4, 0.1), (4, 0.01)], [(8, 1.0), (8, 0.1), (8, 0.01)]]
    up = warm_start_chains(plain.configurations(), plain.warm_path, True)
    assert warm_start_chains(plain.configurations(), plain.warm_path) == [chain[::-1] for chain in up]
    # The skip MLP does not chain: every lane alone, W0 and b2 from the linear probe at its l2_skip.
    assert mlp.warm_path == () and mlp.linear_start
    assert warm_start_chains(configs, mlp.warm_path, mlp.warm_ascending) == [[k] for k in range(len(configs))]
    # Two keys still snake: (l2, l2_skip), the second down then up.
    two = warm_start_chains(configs, ("l2", "l2_skip"))
    assert [[(configs[k]["l2"], configs[k]["l2_skip"]) for k in chain] for chain in two][0] == \
        [(1.0, 1e-3), (1.0, 1e-5), (0.01, 1e-5), (0.01, 1e-3)]
    assert not dataclasses.replace(mlp, warm_start=False).linear_start
    assert not SweepConfig(method="mlp", architecture="plain").linear_start  # no skip weight to start
