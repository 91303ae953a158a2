"""`cxrfair cohort build|synth` through click: the happy paths and every bad input, cleanly rejected."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest
from click.testing import CliRunner

from cxrfair.cli import main
from cxrfair.extract.cohort import load_cohort, vendored_metadata


def run(*args):
    return CliRunner().invoke(main, ["cohort", *map(str, args)])


def assert_clean_error(result, out, *needles):
    """Non-zero exit, exactly one line 'Error: ...' naming what is wrong, no traceback, no output."""
    lines = result.output.strip().splitlines()
    assert result.exit_code != 0, result.output
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit), result.exception
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    if out is not None:
        assert not out.exists()
        assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]  # no temp folders


@pytest.fixture(scope="module")
def nih_head() -> pd.DataFrame:
    """The first 300 real metadata rows, as strings, for corrupting one value at a time."""
    return pd.read_csv(vendored_metadata(), nrows=300, dtype=str)


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "nih"
    result = run("synth", "--out", out, "--seed", 0)
    assert result.exit_code == 0, result.output
    return out


def test_build_preset_from_vendored_metadata(tmp_path):
    result = run("build", "--out", tmp_path / "c")
    assert result.exit_code == 0, result.output
    assert "Edema           old_F          33      5      9     47" in result.output
    assert "all                           840    120    240   1200" in result.output
    cohort = load_cohort(tmp_path / "c")
    assert len(cohort.table) == 1200 and cohort.meta["preset"] == "nih-6x200"


def test_synth_then_build_with_nested_images(synth_dir, tmp_path):
    result = run("build", "--metadata", synth_dir / "Data_Entry_2017.csv", "--images", synth_dir, "--out", tmp_path / "c")
    assert result.exit_code == 0, result.output
    cohort = load_cohort(tmp_path / "c")
    t = cohort.table
    assert len(t) == 1200 and t["split"].value_counts().to_dict() == {"train": 840, "val": 120, "test": 240}
    assert t.groupby("patient_id")["split"].nunique().max() == 1
    assert t["path"].str.fullmatch(r"images_00\d/images/\d{8}_\d{3}\.png").all()
    assert cohort.meta["images_root"] == str(synth_dir.resolve())
    assert all(p.is_file() for p in cohort.image_paths())


def test_synth_command_reports_and_refuses_to_overwrite(synth_dir):
    assert (synth_dir / "synth_info.json").is_file()
    assert_clean_error(run("synth", "--out", synth_dir), None, "--out", "--force")
    assert_clean_error(run("synth", "--out", synth_dir.parent / "s2", "--size", 4), synth_dir.parent / "s2", "--size 4")


def test_force_replaces_an_existing_cohort(tmp_path):
    out = tmp_path / "c"
    assert run("build", "--out", out, "--diseases", "Edema", "--per-group", 5).exit_code == 0
    assert_clean_error(run("build", "--out", out), None, f"--out {out}: already exists; pass --force")
    assert len(load_cohort(out).table) == 20  # untouched
    assert run("build", "--out", out, "--diseases", "Edema", "--per-group", 6, "--force").exit_code == 0
    assert len(load_cohort(out).table) == 24


@pytest.mark.parametrize(
    "column, value, needles",
    [
        ("Patient Age", "abc", ["bad.csv", "'Patient Age'", "'abc'", "line 12"]),
        ("Patient Age", "413", ["bad.csv", "'Patient Age'", "impossible value '413'", "0-120"]),
        ("Patient Gender", "O", ["bad.csv", "'Patient Gender'", "unknown code 'O'", "M and F"]),
        ("Patient ID", "", ["bad.csv", "'Patient ID'"]),
    ],
)
def test_bad_metadata_values(nih_head, tmp_path, column, value, needles):
    rows = nih_head.copy()
    rows.loc[10, column] = value
    rows.to_csv(tmp_path / "bad.csv", index=False)
    assert_clean_error(run("build", "--metadata", tmp_path / "bad.csv", "--out", tmp_path / "c"), tmp_path / "c", *needles)


def test_missing_column(nih_head, tmp_path):
    nih_head.drop(columns=["Finding Labels"]).to_csv(tmp_path / "bad.csv.gz", index=False)
    assert_clean_error(run("build", "--metadata", tmp_path / "bad.csv.gz", "--out", tmp_path / "c"),
                       tmp_path / "c", "bad.csv.gz", "missing column(s) 'Finding Labels'")


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--diseases", "Edema,Pneumonitis"], ["--diseases", "'Pneumonitis' is not a finding", "Data_Entry_2017_v2020"]),
        (["--per-group", 60], ["cell old Edema", "53 M + 47 F", "120 needed", "--per-group"]),
        (["--diseases", "Hernia"], ["cell", "Hernia", "lower --per-group"]),
        (["--split", "0.8,0.2"], ["--split 0.8,0.2"]),
        (["--preset", "chexpert"], ["--preset chexpert: unknown preset"]),
        (["--metadata", "no/such/Data_Entry_2017.csv"], ["metadata no/such/Data_Entry_2017.csv: file not found"]),
    ],
)
def test_bad_options(tmp_path, args, needles):
    assert_clean_error(run("build", *args, "--out", tmp_path / "c"), tmp_path / "c", *needles)


def test_unwritable_output_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = run("build", "--diseases", "Edema", "--per-group", 5, "--out", blocker / "c")
    assert_clean_error(result, None, "--out", str(blocker))
    assert blocker.read_text() == "not a folder"


def test_missing_images(synth_dir, tmp_path):
    # The real metadata's images are not in the synthetic folder.
    result = run("build", "--images", synth_dir, "--diseases", "Edema", "--per-group", 5, "--out", tmp_path / "c")
    assert_clean_error(result, tmp_path / "c", f"--images {synth_dir}", "20 of 20 cohort images not found", "(first: ")


def test_help_lists_the_options():
    result = run("build", "--help")
    assert result.exit_code == 0
    for option in ("--metadata", "--images", "--preset", "--diseases", "--per-group", "--age-threshold",
                   "--split", "--seed", "--out", "--force"):
        assert option in result.output


def test_cli_module_imports_only_click():
    code = "import sys, cxrfair.extract.cohort_cli; print(sorted({'pandas', 'numpy', 'PIL'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"


# --- other datasets, presets and options --------------------------------------------------------


@pytest.fixture(scope="module")
def cxr_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cxr")
    for fmt in ("chexpert", "mimic"):
        result = run("synth", "--format", fmt, "--out", root / fmt, "--patients", 200, "--no-images", "--seed", 3)
        assert result.exit_code == 0, result.output
        assert f"--dataset {fmt}" in result.output
    return root


def test_chexpert_and_mimic_presets_from_the_command_line(cxr_dirs, tmp_path):
    chx, mim = cxr_dirs / "chexpert", cxr_dirs / "mimic"
    result = run("build", "--dataset", "chexpert", "--preset", "chexpert-6", "--metadata", chx / "CheXpert-v1.0-small/train.csv",
                 "--demographics", chx / "CHEXPERT DEMO.csv", "--out", tmp_path / "c")
    assert result.exit_code == 0, result.output
    assert "race Asian" in result.output and "preset chexpert-6" in result.output and "left out: not_frontal" in result.output
    result = run("build", "--preset", "mimic-sourget", "--metadata", mim / "mimic-cxr-jpg/2.0.0",
                 "--mimic-iv", mim / "mimiciv/2.2", "--out", tmp_path / "m", "--uncertain", "zeros", "--max-train", 300)
    assert result.exit_code == 0, result.output
    cohort = load_cohort(tmp_path / "m")
    assert cohort.dataset == "mimic" and cohort.meta["uncertain"] == "zeros" and cohort.meta["preset"] == "custom"
    assert (cohort.table["split"] == "train").sum() <= 300


def test_nih_neatx_from_the_command_line(synth_dir, tmp_path):
    result = run("build", "--preset", "nih-neatx-pneumothorax", "--metadata", synth_dir / "Data_Entry_2017.csv",
                 "--official-split", synth_dir, "--drains", synth_dir / "NIH-CX14_TubeAnnotations_NonExperts_aggregated.csv",
                 "--images", synth_dir, "--out", tmp_path / "n")
    assert result.exit_code == 0, result.output
    cohort = load_cohort(tmp_path / "n")
    assert cohort.classes == ["Pneumothorax"] and all(p.is_file() for p in cohort.image_paths()[:20])


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--per-group", 1], ["class Cardiomegaly", "val has none", "raise --per-group"]),
        (["--dataset", "mimic", "--preset", "mimic-sourget", "--metadata", "{mimic}/mimic-cxr-jpg/2.0.0"],
         ["--mimic-iv: not given", "hosp/patients.csv.gz"]),
        (["--dataset", "chexpert", "--preset", "chexpert-6", "--metadata", "{chexpert}/CheXpert-v1.0-small/train.csv",
          "--drains", "x.csv"], ["--drains: not used by --dataset chexpert"]),
        (["--dataset", "chexpert", "--preset", "chexpert-6", "--metadata", "{chexpert}/CheXpert-v1.0-small/train.csv",
          "--demographics", "{bad_demo}"], ["bad_demo.csv", "'PRIMARY_RACE'", "unknown race code 'Vulcan'", "--race-map"]),
        (["--dataset", "chexpert", "--preset", "chexpert-6", "--metadata", "{chexpert}/CheXpert-v1.0-small/train.csv",
          "--split", "official"], ["--preset chexpert-6: needs official split data"]),
        (["--preset", "chexpert-6", "--metadata", "{chexpert}/CheXpert-v1.0-small/train.csv", "--images", "{chexpert}"],
         ["--images", "cohort images not found", "(first: CheXpert-v1.0-small/train/patient"]),
        (["--uncertain", "maybe"], ["Invalid value for '--uncertain'"]),
    ],
)
def test_bad_input_on_other_datasets(cxr_dirs, tmp_path, args, needles):
    demo = pd.read_csv(cxr_dirs / "chexpert" / "CHEXPERT DEMO.csv")
    demo.loc[3, "PRIMARY_RACE"] = "Vulcan"
    demo.to_csv(tmp_path / "bad_demo.csv", index=False)
    args = [str(a).format(mimic=cxr_dirs / "mimic", chexpert=cxr_dirs / "chexpert", bad_demo=tmp_path / "bad_demo.csv")
            for a in args]
    result = run("build", *args, "--out", tmp_path / "c")
    if needles[0].startswith("Invalid value"):  # click's own usage error: exit 2, no traceback
        assert result.exit_code == 2 and needles[0] in result.output and "Traceback" not in result.output
        return
    assert_clean_error(result, tmp_path / "c", *needles)


def test_build_help_names_every_dataset_file_and_preset():
    out = run("build", "--help").output
    for needle in ("--dataset", "--demographics", "--drains", "--official-split", "--mimic-iv", "--columns", "--labels",
                   "--attributes", "--age-bins", "--uncertain", "--max-train", "--all-views", "--race-map",
                   "mimic-cxr-2.0.0-metadata.csv.gz", "hosp/patients.csv.gz", "test_list.txt", "chexpert-6",
                   "mimic-sourget", "nih-neatx-pneumothorax"):
        assert needle in out, needle
    assert "--format" in run("synth", "--help").output


def test_a_cohort_warning_is_one_line_on_stderr(tmp_path):
    """CxrfairWarning reaches the user as `Warning: ...` on stderr (no file:line, no source line)."""
    males = tmp_path / "males.csv"
    meta = pd.read_csv(vendored_metadata())
    meta[meta["Patient Gender"] == "M"].to_csv(males, index=False)
    result = run("build", "--metadata", males, "--diseases", "Edema,Effusion", "--per-group", "10",
                 "--out", tmp_path / "c")
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [f"Warning: cohort from metadata {males}: sensitive group sex=F has no images in train, val, test; "
                     "its metrics there are undefined (check the metadata, or leave the attribute out with --attributes)"]
    assert "wrote" in result.stdout and "Warning" not in result.stdout
