"""Multi-label fine-tuning and mitigations end to end with the tiny model (2 epochs, tiny images).

erm's own equivalence to the code before mitigations existed is checked by the existing
fine-tuning tests plus: a mitigation that changes nothing (reweight s = 0, an adversary with
λ = 0) trains bit-identically to erm.
"""

from __future__ import annotations

import json
from dataclasses import replace
from functools import partial

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cxrfair.core.runs import read_run
from cxrfair.cli import main
from cxrfair.extract.cohort import load_cohort
from cxrfair.finetune import train as T
from cxrfair.finetune.config import FinetuneConfig
from tests.finetune.helpers import CONDITIONS, make_multilabel_cohort
from tests.finetune.test_cli import assert_one_line_error
from tests.finetune.test_train import Stop, eval_pixels, stop_after

FAST = dict(model="tiny-clip", epochs=2, batch_size=12, lr=1e-2, workers=1, device="cpu")


@pytest.fixture(scope="module")
def ml_cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("mldata")
    return make_multilabel_cohort(root / "cohort", root / "images")


@pytest.fixture(scope="module")
def ml_run(ml_cohort, tmp_path_factory):
    return T.finetune(FinetuneConfig(cohort=ml_cohort, out=tmp_path_factory.mktemp("mlruns"), **FAST), progress=False)


@pytest.fixture(scope="module")
def erm_run(cohort, tmp_path_factory):
    return T.finetune(FinetuneConfig(cohort=cohort, out=tmp_path_factory.mktemp("erm"), **FAST), progress=False)


# ---------------------------------------------------------------------------------------------
# Multi-label


def test_multilabel_run_writes_one_sigmoid_probability_per_condition(ml_cohort, ml_run):
    run = read_run(ml_run.run_dir)
    assert run.task == "multilabel" and run.meta["attributes"]["race"]["groups"] == ["White", "Black", "Asian"]
    assert [c for c in run.predictions.columns if c.startswith(("p_", "y_"))] == \
        [f"y_{c}" for c in CONDITIONS] + [f"p_{c}" for c in CONDITIONS]
    assert "race" in run.predictions.columns and "label" not in run.predictions.columns
    assert run.meta["selected_epoch"] == int(np.argmin(run.meta["curves"]["val_loss"])) + 1
    # The saved head has one logit per condition; p = sigmoid(logit), rows need not sum to 1.
    model = T.load_finetuned(ml_run.run_dir)
    with torch.no_grad():
        probs = torch.sigmoid(model(eval_pixels(ml_cohort))).double().numpy()
    assert probs.shape == (24, len(CONDITIONS))
    np.testing.assert_allclose(probs, ml_run.probs, atol=1e-6)
    assert not np.allclose(probs.sum(1), 1)


def test_multilabel_validation_loss_is_the_masked_binary_cross_entropy(ml_cohort, ml_run):
    # Recompute the selected epoch's validation loss by hand from the written probabilities.
    co = load_cohort(ml_cohort)
    val = co.table["split"].to_numpy() == "val"
    y = co.targets()[val].astype(np.float64)
    p = ml_run.probs[: val.sum()]
    terms = -(y * np.log(p) + (1 - y) * np.log(1 - p))
    per_row = [np.mean(t[~np.isnan(t)]) if (~np.isnan(t)).any() else 0.0 for t in terms]
    assert np.mean(per_row) == pytest.approx(ml_run.curves["val_loss"][ml_run.selected_epoch - 1], rel=1e-5)


def test_one_condition_binary_task_and_groupdro_run(tmp_path):
    co = make_multilabel_cohort(tmp_path / "c", tmp_path / "img", conditions=["Pneumothorax"], empty_row=False)
    r = T.finetune(FinetuneConfig(cohort=co, out=tmp_path / "runs", mitigation="groupdro", sensitive="race",
                                  strength=0.5, **FAST), progress=False)
    run = read_run(r.run_dir)
    assert r.run_id == "tiny-clip__lora+groupdro-race__st0.5__s0"
    assert (run.meta["mitigation"], run.meta["sensitive"], run.meta["strength"]) == ("groupdro", "race", 0.5)
    assert r.probs.shape == (24, 1) and "p_Pneumothorax" in run.predictions.columns


# ---------------------------------------------------------------------------------------------
# Mitigations that change nothing train exactly as erm


@pytest.mark.parametrize("mitigation,strength", [("reweight", 0.0), ("adversarial", 0.0)])
def test_a_mitigation_at_zero_strength_is_bit_identical_to_erm(cohort, erm_run, tmp_path, mitigation, strength):
    r = T.finetune(FinetuneConfig(cohort=cohort, out=tmp_path, mitigation=mitigation, sensitive="sex",
                                  strength=strength, **FAST), progress=False)
    np.testing.assert_array_equal(r.probs, erm_run.probs)
    assert r.curves == erm_run.curves
    meta = read_run(erm_run.run_dir).meta
    assert (meta["mitigation"], meta["sensitive"], meta["strength"]) == ("erm", None, None)
    assert "mitigation" not in meta["hyperparameters"]


@pytest.fixture(scope="module")
def erm7(cohort, tmp_path_factory):
    return T.finetune(FinetuneConfig(cohort=cohort, out=tmp_path_factory.mktemp("erm7"), **{**FAST, "batch_size": 7}),
                      progress=False)


@pytest.mark.parametrize("mitigation", ["groupdro", "adversarial", "fairot"])
def test_each_loss_term_changes_training(cohort, erm7, tmp_path, mitigation):
    # (sex x class cells are balanced here, so reweight would give weights 1: see the unit tests.)
    strength = {"groupdro": 1.0, "adversarial": 1.0, "fairot": 5.0}[mitigation]
    r = T.finetune(FinetuneConfig(cohort=cohort, out=tmp_path, mitigation=mitigation, sensitive="sex",
                                  strength=strength, **{**FAST, "batch_size": 7}), progress=False)
    assert r.run_id == f"tiny-clip__lora+{mitigation}-sex__st{strength:g}__s0"
    assert not np.array_equal(r.probs, erm7.probs)
    assert np.isfinite(r.curves["val_loss"]).all()


# ---------------------------------------------------------------------------------------------
# Resume restores the mitigation's state


@pytest.mark.parametrize("mitigation", ["groupdro", "adversarial"])
def test_resume_mid_training_restores_q_and_the_adversary(cohort, tmp_path, mitigation):
    kw = dict(FAST, epochs=3, batch_size=7, mitigation=mitigation, sensitive="age_group", strength=0.5)
    a = T.finetune(FinetuneConfig(cohort=cohort, out=tmp_path / "a", **kw), progress=False)
    cfg = FinetuneConfig(cohort=cohort, out=tmp_path / "b", **kw)
    with pytest.raises(Stop):
        T.finetune(cfg, on_epoch_end=stop_after(1), progress=False)
    saved = T.read_checkpoint(tmp_path / "b" / f".{cfg.run_id}.work" / T.CHECKPOINT)
    state = saved["objective"]
    if mitigation == "groupdro":
        assert not torch.allclose(state["q"], torch.full_like(state["q"], 1 / len(state["q"])))  # q moved
    else:
        assert set(state["adversary"]) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert saved["fingerprint"]["mitigation"] == mitigation and saved["fingerprint"]["strength"] == 0.5
    b = T.finetune(replace(cfg, resume=True), progress=False)
    np.testing.assert_array_equal(a.probs, b.probs)
    assert a.curves == b.curves


# ---------------------------------------------------------------------------------------------
# Bad input: one line, nothing written


def invoke(*args):
    return CliRunner().invoke(main, ["finetune", "lora", *map(str, args)])


def base_args(cohort, out):
    return ["--model", "tiny-clip", "--cohort", cohort, "--out", out, "--epochs", "1", "--device", "cpu"]


@pytest.mark.parametrize("extra,needles", [
    (["--mitigation", "magic", "--sensitive", "sex"], ["--mitigation 'magic'", "unknown", "groupdro"]),
    (["--mitigation", "erase", "--sensitive", "sex"], ["--mitigation erase", "probes only"]),
    (["--mitigation", "groupdro"], ["needs --sensitive"]),
    (["--sensitive", "sex"], ["--sensitive sex", "erm targets no attribute"]),
    (["--mitigation", "groupdro", "--sensitive", "race"], ["--sensitive race", "no such sensitive attribute", "sex"]),
    (["--mitigation", "reweight", "--sensitive", "sex", "--strength", "1.5"], ["--strength 1.5", "[0, 1]"]),
    (["--mitigation", "groupdro", "--sensitive", "sex", "--strength", "0"], ["--strength 0.0", "(0, inf)"]),
    (["--mitigation", "fairot", "--sensitive", "sex", "--strength", "-1"], ["--strength -1.0", "fairot"]),
    (["--mitigation", "fairot", "--sensitive", "sex", "--micro-batch", "2"], ["--micro-batch 2", "one forward pass"]),
])
def test_bad_mitigation_options_are_one_line_errors_and_write_nothing(cohort, tmp_path, extra, needles):
    out = tmp_path / "runs"
    assert_one_line_error(invoke(*base_args(cohort, out), *extra), *needles)
    assert not out.exists() or not any(out.iterdir())


def _edited_cohort(src, dst, edit):
    """A copy of cohort ``src`` with ``edit(table)`` applied and the hash renewed."""
    from cxrfair.extract.cohort_format import cohort_hash, write_cohort_files

    co = load_cohort(src)
    table = edit(co.table.copy())
    meta = dict(co.meta, hash=cohort_hash(table, co.classes, co.task, co.attributes))
    dst.mkdir(parents=True)
    write_cohort_files(dst, table, meta)
    return dst


def test_a_group_without_training_rows_or_an_empty_training_value_is_refused(ml_cohort, tmp_path):
    def no_asian_in_train(t):
        t.loc[(t["split"] == "train") & (t["race"] == "Asian"), "race"] = "White"
        return t

    co = _edited_cohort(ml_cohort, tmp_path / "c1", no_asian_in_train)
    out = tmp_path / "runs"
    result = invoke(*base_args(co, out), "--mitigation", "groupdro", "--sensitive", "race")
    assert_one_line_error(result, "['Asian']", "no training rows")
    assert not out.exists() or not any(out.iterdir())

    meta = json.loads((ml_cohort / "cohort.json").read_text())
    assert meta["attributes"]["race"]["groups"] == ["White", "Black", "Asian"]
    # An empty race in a training row (the cohort loader accepts only declared groups, so the
    # check is the fine-tuning one: exercised on the table directly).
    from cxrfair.finetune.objectives import group_ids

    table = load_cohort(ml_cohort).table.copy()
    table.loc[0, "race"] = ""
    with pytest.raises(Exception, match="empty or undeclared"):
        group_ids(table, "race", ["White", "Black", "Asian"], np.arange(36), "c")


# ---------------------------------------------------------------------------------------------
# Two Gloo processes with GroupDRO equal one process


def _finetune(config, d):
    return T.finetune(config, progress=False)


def test_two_gloo_processes_with_groupdro_equal_one_process(cohort, tmp_path):
    from tests.finetune.test_distributed import in_processes

    # batch 7 over 36 images: shares 4 + 3 and a last batch of one (process 1 pads); micro-batches
    # of 2 take the gradient-free statistics pass.
    kw = dict(FAST, batch_size=7, mitigation="groupdro", sensitive="sex", strength=1.0)
    one = T.finetune(FinetuneConfig(cohort=cohort, out=tmp_path / "one", **kw), progress=False)
    two = in_processes(partial(_finetune, FinetuneConfig(cohort=cohort, out=tmp_path / "two", micro_batch=2, **kw)))
    assert two[0][0] == "ok", two
    r = two[0][1]
    assert r.world_size == 2
    np.testing.assert_allclose(r.curves["train_loss"], one.curves["train_loss"], rtol=1e-5)
    np.testing.assert_allclose(r.curves["val_loss"], one.curves["val_loss"], rtol=1e-5)
    np.testing.assert_allclose(r.probs, one.probs, atol=1e-6)
