"""The run format: write -> read round trip, atomicity, and errors naming the run and column."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from cxrfair.core.runs import (
    BASE_COLUMNS,
    make_predictions,
    prob_columns,
    read_run,
    read_runs,
    run_is_complete,
    write_run,
)
from cxrfair.errors import CxrfairError

from tests.analysis.synth import CLASSES, cohort_rows, meta_for, probs_for


@pytest.fixture
def rows():
    return cohort_rows(12)


def _write(tmp_path, rows, **kw):
    meta = meta_for("tinyclip", "linear", 0)
    preds = make_predictions(rows, probs_for(rows), CLASSES)
    return write_run(tmp_path / "RUNS", meta, preds, **kw)


def test_make_predictions_columns_in_contract_order(rows):
    preds = make_predictions(rows, probs_for(rows), CLASSES)
    assert list(preds.columns) == list(BASE_COLUMNS) + ["view"] + prob_columns(CLASSES)
    assert "path" not in preds.columns


def test_round_trip_is_exact(tmp_path, rows):
    probs = probs_for(rows)
    run_dir = _write(tmp_path, rows)
    assert run_dir.name == "tinyclip__linear__best__s0" and run_is_complete(run_dir)
    run = read_run(run_dir)
    assert run.model == "tinyclip" and run.method == "linear" and run.seed == 0 and run.classes == CLASSES
    assert "created" in run.meta
    y, p = run.arrays("test")
    test = (rows["split"] == "test").to_numpy()
    np.testing.assert_array_equal(p, probs[test])  # bit-exact: ties survive the round trip
    np.testing.assert_array_equal(y, rows["label"][test].map(CLASSES.index).to_numpy())
    assert run.predictions["image_id"].tolist() == rows["image_id"].tolist()
    assert run.predictions["image_id"].map(type).eq(str).all()


def test_existing_run_needs_force(tmp_path, rows):
    _write(tmp_path, rows)
    with pytest.raises(CxrfairError, match="--force"):
        _write(tmp_path, rows)
    _write(tmp_path, rows, force=True)
    assert [p.name for p in (tmp_path / "RUNS").iterdir()] == ["tinyclip__linear__best__s0"]


def test_failed_write_leaves_nothing(tmp_path, rows):
    meta = meta_for("tinyclip", "linear", 0)
    preds = make_predictions(rows, probs_for(rows), CLASSES)
    preds.to_csv = None  # the write inside the temp folder fails
    with pytest.raises(TypeError):
        write_run(tmp_path / "RUNS", meta, preds)
    assert list((tmp_path / "RUNS").iterdir()) == []


def test_read_runs_skips_temporaries_and_sorts(tmp_path, rows):
    for m in ("zeroshot", "full"):
        write_run(tmp_path / "RUNS", meta_for("tinyclip", m, 0), make_predictions(rows, probs_for(rows), CLASSES))
    (tmp_path / "RUNS" / ".half.tmp").mkdir()
    (tmp_path / "RUNS" / "logs").mkdir()
    assert [r.method for r in read_runs(tmp_path / "RUNS")] == ["full", "zeroshot"]


def test_no_runs_is_an_error(tmp_path):
    (tmp_path / "RUNS").mkdir()
    with pytest.raises(CxrfairError, match="no runs found"):
        read_runs(tmp_path / "RUNS")
    with pytest.raises(CxrfairError, match="not a folder"):
        read_runs(tmp_path / "nope")


def test_half_run_folder_is_an_error(tmp_path, rows):
    run_dir = _write(tmp_path, rows)
    (run_dir / "predictions.csv").unlink()
    assert not run_is_complete(run_dir)
    with pytest.raises(CxrfairError, match=r"run tinyclip__linear__best__s0 .*predictions.csv is missing"):
        read_runs(tmp_path / "RUNS")


def _corrupt(run_dir, edit):
    df = pd.read_csv(run_dir / "predictions.csv", dtype={"image_id": str})
    df = edit(df)
    df.to_csv(run_dir / "predictions.csv", index=False)


def _scale(df):
    df["p_Effusion"] *= 0.5
    return df


def _set(df, col, value, row=3):
    df.loc[row, col] = value
    return df


@pytest.mark.parametrize("edit, pattern", [
    (_scale, r"p_Atelectasis..p_No Finding sum to .* image 0000000"),
    (lambda d: d.rename(columns={"p_Effusion": "p_Pneumonia"}), r"p_Pneumonia name class"),
    (lambda d: d.drop(columns=["p_Effusion"]), r"lacks probability column\(s\) p_Effusion"),
    (lambda d: d.drop(columns=["age_group"]), r"lacks column\(s\) age_group"),
    (lambda d: _set(d, "label", "Pneumonia"), r"column label has unknown value\(s\) \['Pneumonia'\]"),
    (lambda d: _set(d, "split", "holdout"), r"column split has unknown value"),
    (lambda d: _set(d, "p_Effusion", np.nan), r"column p_Effusion has nan"),
    (lambda d: _set(d, "sex", np.nan), r"column sex is empty"),
    (lambda d: _set(d, "image_id", "00000000_000.png"), r"image_id repeats"),
])
def test_malformed_predictions_name_run_and_column(tmp_path, rows, edit, pattern):
    run_dir = _write(tmp_path, rows)
    _corrupt(run_dir, edit)
    with pytest.raises(CxrfairError, match=r"run tinyclip__linear__best__s0") as e:
        read_run(run_dir)
    assert e.match(pattern)


@pytest.mark.parametrize("edit, pattern", [
    (lambda m: m.pop("classes"), r"lacks key\(s\) classes"),
    (lambda m: m.update(method="boosting"), r"method 'boosting' is unknown"),
    (lambda m: m.update(run_id="other"), r"run_id 'other' but the folder"),
    (lambda m: m.update(seed="x"), r"seed 'x'"),
])
def test_bad_run_json(tmp_path, rows, edit, pattern):
    run_dir = _write(tmp_path, rows)
    meta = json.loads((run_dir / "run.json").read_text())
    edit(meta)
    (run_dir / "run.json").write_text(json.dumps(meta))
    with pytest.raises(CxrfairError, match=pattern):
        read_run(run_dir)


def test_invalid_json(tmp_path, rows):
    run_dir = _write(tmp_path, rows)
    (run_dir / "run.json").write_text("{")
    assert not run_is_complete(run_dir)
    with pytest.raises(CxrfairError, match="not valid JSON"):
        read_run(run_dir)


def test_make_predictions_rejects_bad_probs(rows):
    with pytest.raises(CxrfairError, match="shape"):
        make_predictions(rows, probs_for(rows)[:, :2], CLASSES)
    logits = np.random.default_rng(0).normal(size=(len(rows), len(CLASSES)))
    with pytest.raises(CxrfairError, match="must be finite and in|sum to"):
        make_predictions(rows, logits, CLASSES)
    with pytest.raises(CxrfairError, match="lack column"):
        make_predictions(rows.drop(columns=["sex"]), probs_for(rows), CLASSES)


# ---------------------------------------------------------------- run identity


def test_run_key_round_trip_and_family():
    from cxrfair.core.runs import RunKey, parse_run_id

    plain = RunKey("clip-vit-b16", "linear", "best", 2)
    assert plain.run_id == "clip-vit-b16__linear__best__s2"
    assert plain.sweep_file == "clip-vit-b16__linear__sweep.csv"
    mitigated = RunKey("tiny-clip", "lora", "lr0.001", 0, mitigation="groupdro", sensitive="age_group")
    assert mitigated.run_id == "tiny-clip__lora+groupdro-age_group__lr0.001__s0"
    assert mitigated.family == "tiny-clip__lora+groupdro-age_group"
    for key in (plain, mitigated, RunKey("m", "zeroshot", "gloria-d3", 3)):
        assert parse_run_id(key.run_id) == key
    # A family prefix must not match another family's runs (the pipeline's cleanup relies on it).
    assert not mitigated.run_id.startswith(plain.family.replace("clip-vit-b16", "tiny-clip") + "__")


@pytest.mark.parametrize("kwargs", [
    dict(method="svm"), dict(mitigation="magic", sensitive="sex"), dict(mitigation="groupdro"),
    dict(sensitive="sex"), dict(tag="a__b"), dict(model="bad name"),
])
def test_run_key_rejects_bad_parts(kwargs):
    from cxrfair.core.runs import RunKey

    base = dict(model="m", method="linear", tag="best", seed=0) | kwargs
    with pytest.raises(CxrfairError):
        RunKey(**base)


def test_parse_run_id_rejects_foreign_names():
    from cxrfair.core.runs import parse_run_id

    for bad in ("m__linear__sweep.csv", "no-seed__linear__best", "m__linear+groupdro__best__s0"):
        with pytest.raises(CxrfairError):
            parse_run_id(bad)


def test_safe_name_never_makes_a_separator():
    from cxrfair.core.runs import safe_name

    assert safe_name("hf-hub:microsoft/x y") == "hf-hub-microsoft-x-y"
    assert "__" not in safe_name("a__b")


# ---------------------------------------------------------------- Runs v2: multi-label, attributes as data

from tests.analysis.synth import CONDITIONS, ML_ATTRIBUTES, multilabel_meta, multilabel_probs, multilabel_rows  # noqa: E402


@pytest.fixture
def ml_rows():
    return multilabel_rows(20)


def _write_ml(tmp_path, rows, conditions=CONDITIONS, **meta):
    preds = make_predictions(rows, multilabel_probs(rows, conditions), conditions, task="multilabel",
                             attributes=ML_ATTRIBUTES)
    return write_run(tmp_path / "RUNS", multilabel_meta("m", "linear", 0, conditions, **meta), preds)


def test_multilabel_predictions_columns_and_round_trip(tmp_path, ml_rows):
    probs = multilabel_probs(ml_rows)
    preds = make_predictions(ml_rows, probs, CONDITIONS, task="multilabel", attributes=ML_ATTRIBUTES)
    ys = [f"y_{c}" for c in CONDITIONS]
    assert list(preds.columns) == ["image_id", "patient_id", "split", "sex", "age", "age_group", "race", "view",
                                   "drain", *ys, *prob_columns(CONDITIONS)]
    assert "label" not in preds.columns and not np.allclose(probs.sum(1), 1)  # no sum-to-one rule
    run = read_run(_write_ml(tmp_path, ml_rows))
    assert run.task == "multilabel" and run.classes == CONDITIONS
    Y, P = run.arrays("test")
    test = (ml_rows["split"] == "test").to_numpy()
    np.testing.assert_array_equal(P, probs[test])
    np.testing.assert_array_equal(Y, ml_rows.loc[test, ys].to_numpy(float))  # NaN (masked) survives
    assert np.isnan(Y).any() and run.predictions["race"].map(type).eq(str).all()


def test_one_condition_is_a_valid_multilabel_run_but_one_class_is_not_a_multiclass_one(tmp_path, ml_rows):
    run = read_run(_write_ml(tmp_path, ml_rows.drop(columns=["y_Atelectasis", "y_Effusion"]), ["Pneumothorax"]))
    assert run.arrays("val")[0].shape[1] == 1
    from cxrfair.core.runs import validate_meta

    with pytest.raises(CxrfairError, match=r"x: classes must be a list of at least 2 distinct"):
        validate_meta(meta_for("m", "full", 0) | {"classes": ["Atelectasis"]}, "x")


def test_v2_multiclass_needs_only_its_declared_attributes(tmp_path):
    rows = cohort_rows(8).drop(columns=["sex", "age", "age_group"]).assign(race="White")
    attrs = {"race": {"groups": ["White", "Black"], "reference": "White"}}
    preds = make_predictions(rows, probs_for(rows), CLASSES, attributes=attrs)
    assert list(preds.columns)[:4] == ["image_id", "patient_id", "split", "label"] and "race" in preds.columns
    run = read_run(write_run(tmp_path, meta_for("m", "linear", 0) | {"attributes": attrs}, preds))
    assert run.task == "multiclass" and run.arrays("test")[1].shape == (8, len(CLASSES))
    with pytest.raises(CxrfairError, match=r"lacks column\(s\) sex, age_group"):  # v1 default without a declaration
        write_run(tmp_path / "V1", meta_for("m", "linear", 0), preds)


def test_make_predictions_names_the_task_it_needs(ml_rows):
    with pytest.raises(CxrfairError, match=r"lack column\(s\) label; for a multi-label cohort pass task='multilabel'"):
        make_predictions(ml_rows, multilabel_probs(ml_rows), CONDITIONS)
    with pytest.raises(CxrfairError, match=r"lack column\(s\) y_Effusion"):
        make_predictions(ml_rows.drop(columns=["y_Effusion"]), multilabel_probs(ml_rows), CONDITIONS, task="multilabel")
    with pytest.raises(CxrfairError, match="task 'binary' is unknown"):
        make_predictions(ml_rows, multilabel_probs(ml_rows), CONDITIONS, task="binary")


@pytest.mark.parametrize("edit, pattern", [
    (lambda d: _set(d, "y_Effusion", -1), r"column y_Effusion has value\(s\) \['-1.0'\]; multi-label targets are 1, 0 or empty"),
    (lambda d: _set(d.astype({"y_Effusion": object}), "y_Effusion", "yes"), r"column y_Effusion has value\(s\) \['yes'\]"),
    (lambda d: _set(d, "p_Effusion", 1.5), r"column p_Effusion has 1.5"),
    (lambda d: d.drop(columns=["y_Pneumothorax"]), r"lacks target column\(s\) y_Pneumothorax"),
    (lambda d: d.assign(y_Nodule=0), r"column\(s\) y_Nodule name condition"),
    (lambda d: d.drop(columns=["race"]), r"lacks column\(s\) race"),
    (lambda d: _set(d, "race", np.nan), r"column race is empty"),
])
def test_malformed_multilabel_predictions(tmp_path, ml_rows, edit, pattern):
    run_dir = _write_ml(tmp_path, ml_rows)
    _corrupt(run_dir, edit)
    with pytest.raises(CxrfairError, match=r"run m__linear__best__s0") as e:
        read_run(run_dir)
    assert e.match(pattern)


def test_run_json_task_and_attributes_are_checked(tmp_path, ml_rows):
    run_dir = _write_ml(tmp_path, ml_rows)
    meta = json.loads((run_dir / "run.json").read_text())
    for bad, pattern in (({"task": "regression"}, "task 'regression' is unknown"),
                         ({"attributes": ["sex"]}, "attributes must map column"),
                         ({"attributes": ML_ATTRIBUTES | {"race": {"groups": ["White"], "reference": "Black"}}},
                          "race needs a list of distinct groups and a reference among them")):
        (run_dir / "run.json").write_text(json.dumps(meta | bad))
        with pytest.raises(CxrfairError, match=pattern):
            read_run(run_dir)


# --- row identity: run.json records each split's row count and image-id hash ------------------

def test_write_run_records_each_splits_rows(tmp_path, rows):
    from cxrfair.core.runs import ids_sha256
    meta = json.loads((_write(tmp_path, rows) / "run.json").read_text())
    test_ids = rows.loc[rows["split"] == "test", "image_id"]
    assert meta["rows"]["test"] == {"n": len(test_ids), "ids_sha256": ids_sha256(test_ids)}
    assert meta["rows"]["val"]["n"] == int((rows["split"] == "val").sum())
    # The hash is of the sorted ids: a reordered file is the same rows, a renamed id is not.
    assert ids_sha256(list(test_ids)[::-1]) == ids_sha256(test_ids)
    assert ids_sha256([*list(test_ids)[:-1], "x.png"]) != ids_sha256(test_ids)


def _cut_at_line(run_dir, keep):
    """predictions.csv cut at a line boundary after ``keep`` data rows (what a half-copied file looks like)."""
    path = run_dir / "predictions.csv"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:1 + keep]))


def test_a_predictions_file_cut_at_a_line_boundary_is_refused(tmp_path, rows):
    run_dir = _write(tmp_path, rows)  # 12 val + 12 test rows
    _cut_at_line(run_dir, 12 + 7)
    with pytest.raises(CxrfairError, match=r"run tinyclip__linear__best__s0: .*predictions\.csv holds 7 test row\(s\) "
                                           r"where run\.json records 12.*cut or edited.*rerun"):
        read_run(run_dir)
    with pytest.raises(CxrfairError, match=r"7 test row\(s\) where run\.json records 12"):
        read_runs(tmp_path / "RUNS")


def test_read_runs_names_the_missing_rows_from_another_run(tmp_path, rows):
    _write(tmp_path, rows)
    other = write_run(tmp_path / "RUNS", meta_for("tinyclip", "full", 0), make_predictions(rows, probs_for(rows), CLASSES))
    _corrupt(other, lambda d: d.drop(index=[20, 22]))
    gone = rows["image_id"].iloc[[20, 22]].tolist()
    with pytest.raises(CxrfairError, match=rf"tinyclip__full__best__s0: .*10 test row\(s\) where run\.json records 12; "
                                           rf"missing {gone[0]}, {gone[1]}"):
        read_runs(tmp_path / "RUNS")


def test_a_renamed_test_image_is_refused(tmp_path, rows):
    run_dir = _write(tmp_path, rows)
    _corrupt(run_dir, lambda d: _set(d, "image_id", "renamed.png", row=20))
    with pytest.raises(CxrfairError, match=r"12 test row\(s\) where run\.json records 12 but other image ids"):
        read_run(run_dir)


def test_a_run_written_before_rows_were_recorded_is_read(tmp_path, rows):
    run_dir = _write(tmp_path, rows)
    meta = json.loads((run_dir / "run.json").read_text())
    del meta["rows"]
    (run_dir / "run.json").write_text(json.dumps(meta))
    _cut_at_line(run_dir, 20)  # nothing recorded to check it against: read (analyze compares runs instead)
    assert len(read_run(run_dir).split("test")) == 8


def test_a_malformed_rows_record_is_refused(tmp_path, rows):
    run_dir = _write(tmp_path, rows)
    meta = json.loads((run_dir / "run.json").read_text())
    (run_dir / "run.json").write_text(json.dumps(meta | {"rows": {"test": 12}}))
    with pytest.raises(CxrfairError, match=r"run\.json rows must map split"):
        read_run(run_dir)
