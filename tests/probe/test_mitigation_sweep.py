"""Mitigations inside the compiled sweep: each lane equals one unbatched run, erm is unchanged,
selection and runs follow CONTRACTS ("Mitigations"), and groupdro / reweight help a weak minority."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from cxrfair.core.runs import read_runs
from cxrfair.cli import main
from cxrfair.extract.cache import write_cache
from cxrfair.probe import train
from cxrfair.probe.sweep import SweepConfig, mitigation_spec, run_sweep, select_config
from tests.probe.erm_golden import COMMANDS, GOLDEN, erm_outputs
from tests.probe.synth import CLASSES, cohort_table, make_cache


def _tiny(seed=0, n=40, dim=4, n_classes=3):
    rng = np.random.default_rng(seed)
    x = {s: rng.normal(size=(m, dim)).astype(np.float32) + (np.arange(m) % n_classes)[:, None] * 0.8
         for s, m in (("train", n), ("val", 12), ("test", 12))}
    y = {s: (np.arange(len(v)) % n_classes).astype(np.int32) for s, v in x.items()}
    g = {s: (np.arange(len(v)) // n_classes % 2).astype(np.int32) for s, v in x.items()}
    return x, y, {"train": g["train"], "val": g["val"], "names": ["M", "F"]}


LANE_CASES = {
    "groupdro": dict(solver="adamw"), "fairot": dict(solver="adamw"), "adversarial": dict(solver="adamw"),
    "reweight": dict(solver="lbfgs"),
}


@pytest.mark.parametrize("mitigation", ["groupdro", "reweight",
                                        pytest.param("fairot", marks=pytest.mark.slow),
                                        pytest.param("adversarial", marks=pytest.mark.slow)])
def test_each_lane_of_a_mitigation_sweep_equals_one_unbatched_run(mitigation):
    x, y, groups = _tiny()
    strengths = (0.0, 1.0) if mitigation == "reweight" else (0.3, 2.0)
    cfg = SweepConfig(method="mlp", hiddens=(5,), lrs=(1e-2,), weight_decays=(0.0,), l2s=(1e-2,), seeds=(0, 3), epochs=2,
                      batch_size=8, max_iter=8, standardize=False, mitigation=mitigation, sensitive="sex",
                      strengths=strengths, warm_start=False, **LANE_CASES[mitigation])  # cold, as fit_lane
    res = run_sweep(x, y, 3, cfg, groups)
    spec = mitigation_spec(cfg, y["train"], groups, 3)
    recipe = train.Recipe(n_classes=3, epochs=2, batch_size=8, max_hidden=5, solver=cfg.solver, max_iter=8, mitigation=spec,
                          skip=cfg.skip, ftol=cfg.ftol_value)  # the default MLP: the skip MLP
    data = train.Data(*(jnp.asarray(a) for a in (x["train"], y["train"], x["val"], y["val"], x["test"])),
                      jnp.asarray(groups["train"] * 3 + y["train"]), jnp.asarray(groups["train"]))
    one = jax.jit(train.fit_lane, static_argnames="recipe")
    for i, seed in enumerate(cfg.seeds):
        for k, c in enumerate(res.configs):
            hyper = train.Hyper(jnp.float32(c["lr"] if c["lr"] == c["lr"] else 0), jnp.float32(0), jnp.int32(5),
                                jnp.float32(c["l2"] if c["l2"] == c["l2"] else 0), jnp.float32(c["strength"]),
                                jnp.float32(c["l2_skip"]) if "l2_skip" in c else None)
            lane = one(train.seed_keys([seed])[0], hyper, data, recipe)
            np.testing.assert_allclose(res.test_probs[i, k], np.asarray(lane.test_probs), atol=2e-5)
            np.testing.assert_allclose(res.best_val_loss[i, k], float(lane.best_val_loss), rtol=1e-5)


def test_strength_changes_the_fit():
    x, y, groups = _tiny(1)
    cfg = SweepConfig(lrs=(3e-2,), weight_decays=(0.0,), seeds=(0,), epochs=3, batch_size=8, solver="adamw",
                      mitigation="groupdro", sensitive="sex", strengths=(1e-3, 5.0))
    res = run_sweep(x, y, 3, cfg, groups)
    assert not np.allclose(res.test_probs[0, 0], res.test_probs[0, 1], atol=1e-4)
    assert list(res.table.columns[:3]) == ["config", "strength", "lr"] and "val_worst_group" in res.table
    assert set(res.by_strength) == {1e-3, 5.0}


@pytest.mark.parametrize("name", ["linear_lbfgs", pytest.param("mlp_adamw", marks=pytest.mark.slow)])
def test_erm_is_bit_identical_to_before_mitigations(tmp_path, name, monkeypatch):
    """Same probabilities and sweep table as main wrote before issue 13 (tests/probe/erm_golden.py)."""
    golden = np.load(GOLDEN)
    keep = {k: v for k, v in COMMANDS.items() if k == name}
    monkeypatch.setattr("tests.probe.erm_golden.COMMANDS", keep)
    out = erm_outputs(tmp_path)
    keys = [k for k in golden.files if k.startswith(name + "/")]
    assert sorted(keys) == sorted(out)
    for k in keys:
        if k.endswith("/sweep"):
            # The iteration count is where a float path stops, not an output: another CPU's last bits
            # (or the L-BFGS engine of issue 27) move it by one or two (17 for 16 was seen on a fresh
            # machine); every other column of the table, and every probability, is held to 1e-4 below.
            it = list(golden[name + "/sweep_columns"]).index("iterations")
            got, want = out[k][:, it], golden[k][:, it]  # NaN for AdamW sweeps
            assert np.array_equal(np.isnan(got), np.isnan(want)) and np.nan_to_num(np.abs(got - want)).max() <= 3
            out[k][:, it] = golden[k][:, it]
        if golden[k].dtype.kind == "f":
            # Exact on the machine that wrote the record. Another CPU's float32 kernels (vector width,
            # FMA, XLA's fusion choices) change the last bits, and 20 L-BFGS line searches amplify
            # them: 2.5e-6 was seen on a fresh CI machine. 1e-4 still fails for any change to the
            # objective or the data path (a mitigation term leaking into ERM moves these by >1e-2).
            np.testing.assert_allclose(out[k], golden[k], rtol=0, atol=1e-4, equal_nan=True)
        else:
            assert list(out[k]) == list(golden[k])


def test_selection_rules():
    means = {"loss": np.array([0.5, 0.6, 0.7, 0.4]), "accuracy": np.array([0.80, 0.805, 0.70, 0.81]),
             "worst_group": np.array([0.6, 0.7, 0.7, 0.5]), "gap": np.array([0.2, 0.05, 0.01, 0.3])}
    assert select_config(means, "loss") == 3
    assert select_config(means, "worst_group") == 1  # ties (0.7) to the lower loss
    assert select_config(means, "gap") == 1  # config 2 has the smallest gap but is 0.11 below the best accuracy; 1 beats 0 and 3


# ---------------------------------------------------------------- behaviour


def weak_minority(seed: int, n: int = 600):
    """Two classes; the majority group (85%) shows the class on feature 0, the minority mostly on
    feature 1 with feature 0 flipped, so a fit to the pooled data serves the minority badly."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, m in (("train", n), ("val", n // 2), ("test", n // 2)):
        g = (rng.uniform(size=m) < 0.15).astype(np.int32)
        if split != "train":
            g = (np.arange(m) % 2).astype(np.int32)  # balanced evaluation, as worst-group accuracy needs
        y = rng.integers(0, 2, m).astype(np.int32)
        sign = 2.0 * y - 1
        x = rng.normal(size=(m, 3)).astype(np.float32)
        x[:, 0] += np.where(g == 0, 1.5, -0.7) * sign
        x[:, 1] += np.where(g == 0, 0.0, 1.5) * sign
        x[:, 2] += 1.0 * g  # the group itself is visible, as in real embeddings
        out[split] = (x, y, g)
    return out


def _worst(res, k, data, split):
    x, y, g = data[split]
    probs = (res.val_probs if split == "val" else res.test_probs)[:, k]  # (S, N, C)
    correct = probs.argmax(-1) == y
    return min(correct[:, g == v].mean() for v in (0, 1))


def test_groupdro_and_reweight_raise_worst_group_accuracy_over_erm():
    data = weak_minority(0)
    x = {s: v[0] for s, v in data.items()}
    y = {s: v[1] for s, v in data.items()}
    groups = {"train": data["train"][2], "val": data["val"][2], "names": ["a", "b"]}
    common = dict(seeds=(0,), l2s=(1e-3,), lrs=(3e-2,), weight_decays=(0.0,), epochs=15, batch_size=64)
    erm = run_sweep(x, y, 2, SweepConfig(**common), None)
    rew = run_sweep(x, y, 2, SweepConfig(**common, mitigation="reweight", sensitive="g", strengths=(1.0,)), groups)
    dro = run_sweep(x, y, 2, SweepConfig(**common, mitigation="groupdro", sensitive="g", strengths=(0.5,)), groups)
    for split in ("val", "test"):
        base = _worst(erm, erm.selected, data, split)
        assert _worst(rew, rew.selected, data, split) > base + 0.05, split
        assert _worst(dro, dro.selected, data, split) > base + 0.05, split


# ---------------------------------------------------------------- CLI: runs and bad input


def _cli(*args):
    return CliRunner().invoke(main, ["probe", *map(str, args)])


FAST = ["--epochs", "2", "--batch-size", "16", "--seeds", "2", "--lr", "1e-2", "--weight-decay", "0"]


def test_groupdro_cli_writes_best_and_per_strength_runs(tmp_path):
    cache = make_cache(tmp_path / "c.h5")[0]
    res = _cli("linear", "--cache", cache, "--out", tmp_path / "runs", "--mitigation", "groupdro", "--sensitive", "sex",
               "--strength", "0.1,1", *FAST)
    assert res.exit_code == 0, res.output
    runs = {r.run_id: r for r in read_runs(tmp_path / "runs")}
    family = "tiny-clip__linear+groupdro-sex"
    assert sorted(runs) == sorted(f"{family}__{t}__s{s}" for t in ("best", "st0.1", "st1") for s in (0, 1))
    meta = runs[f"{family}__best__s0"].meta
    assert meta["mitigation"] == "groupdro" and meta["sensitive"] == "sex" and meta["select"] == "worst_group"
    assert meta["strength"] in (0.1, 1.0) and meta["solver"] == "adamw"  # the default solver for groupdro
    assert runs[f"{family}__st0.1__s0"].meta["strength"] == 0.1
    table = pd.read_csv(tmp_path / "runs" / f"{family}__sweep.csv")
    assert len(table) == 2 * 2 and {"strength", "val_worst_group", "val_gap"} <= set(table.columns)
    best = table[table.selected]
    assert float(best.strength.iloc[0]) == meta["strength"]


def _cache_with(tmp_path, change):
    """A small cache whose cohort table is edited by ``change(table)``; attributes may be declared."""
    rng = np.random.default_rng(0)
    y = {s: np.arange(n) % len(CLASSES) for s, n in (("train", 36), ("val", 12), ("test", 12))}
    table = cohort_table(y)
    attrs = {"model": "tiny-clip", "weights_id": "t", "cohort_hash": "ab" * 32, "logit_scale": 100.0}
    table, attrs = change(table, attrs)
    write_cache(tmp_path / "c.h5", image_embeddings=rng.normal(size=(len(table), 4)).astype(np.float32),
                cohort_table=table, classes=CLASSES, text={}, attrs=attrs)
    return tmp_path / "c.h5"


def _no_train_f(t, a):
    t.loc[(t.split == "train") & (t.sex == "F"), "sex"] = "M"
    return t, a


def _empty_sex(t, a):
    t.loc[3, "sex"] = ""
    return t, a


BAD = {
    "unknown mitigation": (lambda t, a: (t, a), ["--mitigation", "dropout", "--sensitive", "sex"], "--mitigation"),
    "thresholds": (lambda t, a: (t, a), ["--mitigation", "thresholds", "--sensitive", "sex"], "postprocess"),
    "no sensitive": (lambda t, a: (t, a), ["--mitigation", "groupdro"], "--sensitive"),
    "attribute not in cohort": (lambda t, a: (t, a), ["--mitigation", "reweight", "--sensitive", "race"], "race"),
    "group without training rows": (_no_train_f, ["--mitigation", "reweight", "--sensitive", "sex"], "'F' has no training rows"),
    "empty on a training row": (_empty_sex, ["--mitigation", "groupdro", "--sensitive", "sex"], "is empty"),
    "strength above 1": (lambda t, a: (t, a), ["--mitigation", "reweight", "--sensitive", "sex", "--strength", "1.5"], "[0, 1]"),
    "groupdro strength 0": (lambda t, a: (t, a), ["--mitigation", "groupdro", "--sensitive", "sex", "--strength", "0"], "> 0"),
    "negative lambda": (lambda t, a: (t, a), ["--mitigation", "fairot", "--sensitive", "sex", "--strength", "-1"], ">= 0"),
    "erase with strength": (lambda t, a: (t, a), ["--mitigation", "erase", "--sensitive", "sex", "--strength", "1"], "no strength"),
    "lbfgs for groupdro": (lambda t, a: (t, a), ["--mitigation", "groupdro", "--sensitive", "sex", "--solver", "lbfgs"], "adamw"),
    "declared race missing": (lambda t, a: (t, {**a, "attributes": json.dumps({"sex": {"groups": ["M", "F"], "reference": "M"},
                                                                                  "race": {"groups": ["W", "B"], "reference": "W"}})}),
                              ["--mitigation", "reweight", "--sensitive", "race"], "no column"),
}


LBFGS_FAST = ["--seeds", "2", "--l2", "1e-3", "--max-iter", "20"]


def _fast_for(args: list) -> list:
    """FAST's AdamW options, or L-BFGS ones where the sweep uses L-BFGS (options it would ignore are refused)."""
    from cxrfair.core import mitigations

    name = args[args.index("--mitigation") + 1] if "--mitigation" in args else "erm"
    row = mitigations.MITIGATIONS.get(name)
    solver = args[args.index("--solver") + 1] if "--solver" in args else row.probe_solver if row else "lbfgs"
    return FAST if solver == "adamw" else LBFGS_FAST


@pytest.mark.parametrize("case", list(BAD))
def test_bad_mitigation_input_is_one_line_and_writes_nothing(tmp_path, case):
    change, args, words = BAD[case]
    cache = _cache_with(tmp_path, change)
    res = _cli("linear", "--cache", cache, "--out", tmp_path / "runs", *args, *_fast_for(args))
    assert res.exit_code == 1, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and words in lines[0], res.output
    assert not (tmp_path / "runs").exists()
