"""Few-shot probes: the draw (K per class, train only, per seed), run identity per K, `probe linear --shots`."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from cxrfair.cli import main
from cxrfair.core.runs import RunKey, parse_run_id, read_runs
from cxrfair.errors import CxrfairError
from cxrfair.probe.inputs import draw_shots, load_inputs, short_note
from cxrfair.probe.sweep import FEWSHOT_L2_GRIDS, L2_GRIDS, SweepConfig, SweepResult, merge_seeds
from tests.probe.synth import CLASSES, make_cache


def _labels(counts: list[int]) -> np.ndarray:
    return np.repeat(np.arange(len(counts)), counts).astype(np.int32)


# ---------------------------------------------------------------- the draw


def test_draw_takes_k_per_class_deterministic_per_seed_and_different_across_seeds():
    y = _labels([30, 20, 12])
    patients = np.arange(len(y))
    draws = {s: draw_shots(y, patients, 5, s, ["a", "b", "c"]) for s in range(4)}
    for d in draws.values():
        assert np.bincount(y[d.index], minlength=3).tolist() == [5, 5, 5]
        assert len(set(d.index.tolist())) == 15 and d.index.min() >= 0 and d.index.max() < len(y)
        assert d.counts == {"a": 5, "b": 5, "c": 5} and d.short == ()
    again = draw_shots(y, patients, 5, 2, ["a", "b", "c"])
    assert np.array_equal(again.index, draws[2].index)
    assert len({tuple(d.index) for d in draws.values()}) == 4  # every seed its own draw


def test_draw_is_nested_in_k_and_a_short_class_uses_all_it_has():
    y = _labels([40, 3])
    patients = np.arange(len(y))
    small, large = draw_shots(y, patients, 1, 7, ["a", "b"]), draw_shots(y, patients, 5, 7, ["a", "b"])
    assert set(small.index) <= set(large.index)
    assert large.counts == {"a": 5, "b": 3} and large.short == ("b",)
    assert sorted(large.index[y[large.index] == 1].tolist()) == [40, 41, 42]


def test_a_short_class_is_said_once_per_sweep():
    y = _labels([40, 3])
    draws = [draw_shots(y, np.arange(len(y)), 5, s, ["Atel", "Edema"]) for s in range(3)]
    note = short_note(draws)
    assert note.count("Edema") == 1 and "Atel" not in note and "fewer than 5" in note and "fewshot.short" in note
    assert short_note([draw_shots(y, np.arange(len(y)), 3, 0, ["a", "b"])]) is None


def test_draw_spreads_over_patients_before_repeating_one():
    # Class 0: 4 patients with 5 images each; K = 4 must take one image of each patient.
    y = np.zeros(20, np.int32)
    patients = np.repeat(np.arange(4), 5)
    for seed in range(10):
        d = draw_shots(y, patients, 4, seed, ["a"])
        assert sorted(patients[d.index].tolist()) == [0, 1, 2, 3]
    # K = 6 > 4 patients: every patient once, then two second images.
    d = draw_shots(y, patients, 6, 0, ["a"])
    assert len(d.index) == 6 and set(patients[d.index].tolist()) == {0, 1, 2, 3}


def test_multilabel_draw_holds_k_positives_and_negatives_per_condition():
    rng = np.random.default_rng(0)
    y = (rng.random((200, 3)) < np.array([0.1, 0.3, 0.6])).astype(np.float32)
    y[rng.random((200, 3)) < 0.1] = np.nan  # masked labels count as neither
    d = draw_shots(y, np.arange(200), 4, 1, ["p", "q", "r"])
    sub = y[d.index]
    assert ((sub == 1).sum(0) >= 4).all() and ((sub == 0).sum(0) >= 4).all()
    assert d.counts == {c: [int((sub[:, j] == 1).sum()), int((sub[:, j] == 0).sum())] for j, c in enumerate("pqr")}
    assert np.array_equal(draw_shots(y, np.arange(200), 4, 1, ["p", "q", "r"]).index, d.index)
    # One positive of condition p only: it is taken, and p is short.
    y1 = np.zeros((50, 1), np.float32)
    y1[10] = 1
    d1 = draw_shots(y1, np.arange(50), 3, 0, ["p"])
    assert 10 in d1.index and d1.counts == {"p": [1, 3]} and d1.short == ("p",)


# ---------------------------------------------------------------- identity


def test_run_ids_carry_the_shots():
    ids = {k: RunKey("m", "linear", "best", 0, shots=k).run_id for k in (None, 1, 5, 10)}
    assert ids == {None: "m__linear__best__s0", 1: "m__linear-k1__best__s0", 5: "m__linear-k5__best__s0",
                   10: "m__linear-k10__best__s0"}
    for k, rid in ids.items():
        key = parse_run_id(rid)
        assert key.shots == k and key.method == "linear" and key.run_id == rid
    families = {RunKey("m", "mlp", "best", 0, shots=k).family for k in (None, 1, 5)}
    assert len(families) == 3
    assert RunKey("m", "mlp", "best", 0, shots=5).sweep_file == "m__mlp-k5__sweep.csv"
    # A model name with a dash and k in it still parses.
    assert parse_run_id("tiny-k5__linear-k5__best__s2").model == "tiny-k5"


@pytest.mark.parametrize("kwargs", [dict(method="zeroshot", shots=5), dict(shots=0),
                                    dict(shots=5, mitigation="reweight", sensitive="sex")])
def test_run_key_refuses_shots_where_they_do_not_apply(kwargs):
    base = dict(model="m", method="linear", tag="best", seed=0)
    with pytest.raises(CxrfairError, match="shots"):
        RunKey(**(base | kwargs))


def test_the_cli_mirrors_the_fewshot_grids():
    from cxrfair.probe import cli, sweep

    assert cli.FEWSHOT_L2_GRIDS == sweep.FEWSHOT_L2_GRIDS and cli.FEWSHOT_L2_SKIP_GRID == sweep.FEWSHOT_L2_SKIP_GRID


def test_default_grid_goes_high_with_shots():
    assert SweepConfig(shots=5).l2_grid == FEWSHOT_L2_GRIDS["linear"]
    assert SweepConfig().l2_grid == L2_GRIDS["linear"]
    assert max(FEWSHOT_L2_GRIDS["linear"]) >= 100 * max(L2_GRIDS["linear"])
    assert SweepConfig(shots=5, l2s=(0.5,)).l2_grid == (0.5,)  # a given grid is kept
    with pytest.raises(CxrfairError, match="--shots"):
        SweepConfig(shots=5, mitigation="reweight", sensitive="sex").validate()


def _part(seed: int, losses: list[float], accs: list[float]) -> SweepResult:
    """A one-seed sweep result of 3 configurations (what ``run_sweep`` returns for one draw)."""
    K, nv, nt, C = len(losses), 2, 3, 2
    table = pd.DataFrame({"config": range(K), "l2": [0.1, 1.0, 10.0], "seed": seed, "best_val_loss": losses,
                          "val_accuracy": accs, "selected": False})
    full = lambda *shape: np.full((1, K, *shape), float(seed))  # noqa: E731
    return SweepResult([{"l2": v} for v in (0.1, 1.0, 10.0)], (seed,), table, 0, np.array([losses]),
                       np.zeros((1, K), int), full(5), full(5), full(nv, C), full(nt, C),
                       {"compile_s": 1.0, "train_s": 2.0, "chunks": 1})


@pytest.mark.parametrize("select, expect", [("loss", 2), ("accuracy", 0)])
def test_merge_seeds_selects_on_the_mean_over_draws(select, expect):
    # Seed 0 alone would choose config 0 by loss, seed 1 config 1; the mean over both chooses 2.
    parts = [_part(0, [0.5, 0.9, 0.6], [0.9, 0.5, 0.5]), _part(1, [0.9, 0.5, 0.6], [0.5, 0.6, 0.6])]
    merged = merge_seeds(parts, select)
    assert merged.selected == expect and merged.seeds == (0, 1)
    assert merged.table["selected"].tolist() == [c == expect for c in (0, 0, 1, 1, 2, 2)]
    assert merged.table[["config", "seed"]].values.tolist() == [[0, 0], [0, 1], [1, 0], [1, 1], [2, 0], [2, 1]]
    assert merged.val_probs.shape == (2, 3, 2, 2) and (merged.val_probs[1] == 1).all()
    assert merged.timings["compile_s"] == 2.0 and merged.timings["train_s"] == 4.0


# ---------------------------------------------------------------- the command


def _cli(*args):
    return CliRunner().invoke(main, ["probe", *map(str, args)])


LBFGS = ["--seeds", "3", "--l2", "1e-2,1,100", "--max-iter", "200"]


def test_probe_linear_shots_runs_in_the_default_suite(tmp_path):
    """A fast smoke test of the whole ``--shots`` path (the end-to-end checks are the slow test below):
    a merge once broke ``run_fewshot_sweep`` while every fast test passed."""
    cache = make_cache(tmp_path / "c.h5", sizes={"train": 60, "val": 18, "test": 18})[0]
    res = _cli("linear", "--cache", cache, "--out", tmp_path / "runs", "--shots", 2, "--seeds", "1", "--l2", "1",
               "--max-iter", "20")
    assert res.exit_code == 0, res.output
    meta = read_runs(tmp_path / "runs")[0].meta
    assert meta["fewshot"]["shots"] == 2 and meta["fewshot"]["n_train"] == 2 * len(CLASSES)


@pytest.mark.slow  # compiles several sweeps (~20-40 s on 2 shared cores)
def test_probe_linear_shots_end_to_end(tmp_path):
    cache = make_cache(tmp_path / "c.h5", sizes={"train": 120, "val": 30, "test": 36})[0]
    out = tmp_path / "runs"
    for k in (1, 3):
        res = _cli("linear", "--cache", cache, "--out", out, "--shots", k, *LBFGS)
        assert res.exit_code == 0, res.output
    res = _cli("linear", "--cache", cache, "--out", out, *LBFGS)
    assert res.exit_code == 0, res.output
    runs = {r.run_id: r for r in read_runs(out)}
    assert sorted(runs) == sorted(f"tiny-clip__linear{p}__best__s{s}" for p in ("", "-k1", "-k3") for s in range(3))
    assert sorted(p.name for p in out.glob("*.csv")) == ["tiny-clip__linear-k1__sweep.csv", "tiny-clip__linear-k3__sweep.csv",
                                                         "tiny-clip__linear__sweep.csv"]
    inputs = load_inputs(cache)
    train = inputs.train_rows.set_index("image_id")
    drawn = {}
    for s in range(3):
        meta = runs[f"tiny-clip__linear-k3__best__s{s}"].meta
        few = meta["fewshot"]
        assert few["shots"] == 3 and few["draw_seed"] == s and few["n_train"] == 18 and few["short"] == []
        ids = few["image_ids"]
        assert set(ids) <= set(train.index)  # train only
        assert train.loc[ids, "label"].value_counts().to_dict() == {c: 3 for c in CLASSES}
        drawn[s] = frozenset(ids)
        # The seed's draw is the library's draw for that seed.
        expect = draw_shots(inputs.y["train"], inputs.train_rows["patient_id"], 3, s, inputs.classes)
        assert sorted(ids) == sorted(inputs.train_rows["image_id"].to_numpy()[expect.index])
        # Val and test untouched: every val and test image predicted, as the full probe's run.
        pred = runs[f"tiny-clip__linear-k3__best__s{s}"].predictions
        assert pred["image_id"].tolist() == runs[f"tiny-clip__linear__best__s{s}"].predictions["image_id"].tolist()
        assert meta["standardization"]["n"] == 120  # statistics of the whole training split, no labels
        assert meta["hyperparameters"]["grid"]["l2"] == [1e-2, 1.0, 100.0]
        assert "fewshot" not in runs[f"tiny-clip__linear__best__s{s}"].meta
    assert len(set(drawn.values())) == 3
    # Selection: the configuration with the lowest validation loss, mean over the seeds' draws.
    table = pd.read_csv(out / "tiny-clip__linear-k3__sweep.csv")
    mean = table.groupby("config")["best_val_loss"].mean()
    assert table.loc[table["selected"], "config"].unique().tolist() == [int(mean.idxmin())]
    chosen = table.loc[table["selected"], "l2"].iloc[0]
    assert all(runs[f"tiny-clip__linear-k3__best__s{s}"].meta["hyperparameters"]["l2"] == chosen for s in range(3))


@pytest.mark.slow  # compiles several sweeps (~20-40 s on 2 shared cores)
def test_fewshot_probabilities_match_a_logistic_regression_on_the_draw(tmp_path):
    """The slow reference: scikit-learn's LogisticRegression on the drawn rows alone (standardised
    with the whole training split's statistics), at the l2 the sweep chose (C = 1 / (l2 N))."""
    from sklearn.linear_model import LogisticRegression

    cache = make_cache(tmp_path / "c.h5", sizes={"train": 120, "val": 30, "test": 36}, spread=0.6)[0]
    res = _cli("linear", "--cache", cache, "--out", tmp_path / "runs", "--shots", 4, "--seeds", "0,1", "--l2", "0.3",
               "--max-iter", "1000")
    assert res.exit_code == 0, res.output
    inputs = load_inputs(cache)
    mean, sd = inputs.x["train"].mean(0), inputs.x["train"].std(0)
    for run in read_runs(tmp_path / "runs"):
        ids = run.meta["fewshot"]["image_ids"]
        rows = inputs.train_rows["image_id"].isin(ids).to_numpy()
        x, y = (inputs.x["train"][rows] - mean) / sd, inputs.y["train"][rows]
        lr = LogisticRegression(C=1 / (0.3 * len(y)), tol=1e-10, max_iter=10_000).fit(x, y)
        test = run.split("test")
        order = pd.Series(np.arange(len(inputs.rows)), index=inputs.rows["image_id"])[test["image_id"]].to_numpy()
        expect = lr.predict_proba((inputs.x["test"][order - len(inputs.x["val"])] - mean) / sd)
        got = test[[f"p_{c}" for c in inputs.classes]].to_numpy()
        np.testing.assert_allclose(got, expect, atol=2e-3)


def test_shots_option_is_refused_where_it_does_not_apply(tmp_path):
    cache = make_cache(tmp_path / "c.h5")[0]
    res = _cli("linear", "--cache", cache, "--out", tmp_path / "r", "--shots", 0)
    assert res.exit_code == 2 and "--shots" in res.output
    res = _cli("linear", "--cache", cache, "--out", tmp_path / "r", "--shots", 2, "--mitigation", "reweight",
               "--sensitive", "sex")
    assert res.exit_code == 1 and "--shots" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())


@pytest.mark.slow  # compiles several sweeps (~20-40 s on 2 shared cores)
def test_mlp_takes_shots_too(tmp_path):
    cache = make_cache(tmp_path / "c.h5", sizes={"train": 60, "val": 24, "test": 30})[0]
    res = _cli("mlp", "--cache", cache, "--out", tmp_path / "runs", "--shots", 2, "--seeds", "2", "--hidden", "4",
               "--l2", "1", "--l2-skip", "1", "--max-iter", "30")
    assert res.exit_code == 0, res.output
    runs = read_runs(tmp_path / "runs")
    assert [r.run_id for r in runs] == ["tiny-clip__mlp-k2__best__s0", "tiny-clip__mlp-k2__best__s1"]
    assert json.loads((tmp_path / "runs" / runs[0].run_id / "run.json").read_text())["fewshot"]["n_train"] == 12
