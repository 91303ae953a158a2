"""`cxrfair finetune lora|full` through click: a good run, and one-line errors for bad input."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from click.testing import CliRunner

from cxrfair.core.runs import check_runs_folder, read_run
from cxrfair.cli import main
from cxrfair.errors import CxrfairError
from cxrfair.extract.cohort import load_cohort
from cxrfair.extract.registry import get_spec, register
from cxrfair.finetune import train as T
from cxrfair.finetune.config import FinetuneConfig
from tests.finetune.helpers import make_cohort

NO_LORA = "tiny-nolora-test"  # <= 19 characters: `models list` shows registered names whole
FAST = ["--epochs", "2", "--batch-size", "12", "--lr", "1e-2", "--workers", "2", "--device", "cpu"]


def invoke(*args):
    return CliRunner().invoke(main, ["finetune", *map(str, args)])


def assert_one_line_error(result, *needles):
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


def visible(folder):
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) if folder.exists() else []


@pytest.fixture(scope="module")
def no_lora_model():
    """A throwaway registry entry: the tiny model without a LoRA target list."""
    try:
        get_spec(NO_LORA)
    except CxrfairError:
        register(replace(get_spec("tiny-clip"), name=NO_LORA, lora_targets=None))
    return NO_LORA


def test_lora_and_full_write_readable_runs(cohort, tmp_path):
    for method in ("lora", "full"):
        result = invoke(method, "--model", "tiny-clip", "--cohort", cohort, "--out", tmp_path, *FAST)
        assert result.exit_code == 0, result.output
        assert "selected epoch" in result.output
    runs = {read_run(tmp_path / d).method: read_run(tmp_path / d) for d in visible(tmp_path)}
    assert set(runs) == {"lora", "full"}
    assert runs["lora"].meta["hyperparameters"]["lora_rank"] == 8
    assert len(runs["full"].predictions) == 24
    assert (tmp_path / "tiny-clip__lora__best__s0" / "adapter" / "adapter_config.json").is_file()


def test_existing_run_needs_force(cohort, tmp_path):
    args = ["lora", "--model", "tiny-clip", "--cohort", cohort, "--out", tmp_path, *FAST, "--epochs", "1"]
    assert invoke(*args).exit_code == 0
    assert_one_line_error(invoke(*args), "already exists", "--force")
    assert invoke(*args, "--force").exit_code == 0


def test_model_without_lora_targets(cohort, tmp_path, no_lora_model):
    result = invoke("lora", "--model", no_lora_model, "--cohort", cohort, "--out", tmp_path, *FAST)
    assert_one_line_error(result, no_lora_model, "LoRA target", "finetune full")
    assert not tmp_path.exists() or list(tmp_path.iterdir()) == []


def test_cohort_with_an_empty_split(tmp_path):
    cohort = make_cohort(tmp_path / "c", tmp_path / "img", per_split={"train": 2, "val": 0, "test": 1})
    result = invoke("full", "--model", "tiny-clip", "--cohort", cohort, "--out", tmp_path / "runs", *FAST)
    assert_one_line_error(result, "split 'val' is empty")
    assert visible(tmp_path / "runs") == []


def test_resume_from_another_configuration(cohort, tmp_path):
    cfg = FinetuneConfig(model="tiny-clip", cohort=cohort, out=tmp_path, epochs=3, batch_size=12, lr=1e-2, workers=2)

    def stop(log):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        T.finetune(cfg, on_epoch_end=stop, progress=False)
    ckpt = tmp_path / f".{cfg.run_id}.work" / T.CHECKPOINT
    before = ckpt.read_bytes()
    base = ["lora", "--model", "tiny-clip", "--cohort", cohort, "--out", tmp_path, "--batch-size", "12", "--workers", "2"]

    assert_one_line_error(invoke(*base, "--epochs", "3", "--lr", "1e-2"), "--resume", "--force")  # not silently ignored
    result = invoke(*base, "--epochs", "5", "--lr", "2e-2", "--resume")
    assert_one_line_error(result, "another configuration", "epochs: 3 -> 5", "lr: 0.01 -> 0.02")
    assert ckpt.read_bytes() == before and visible(tmp_path) == []  # nothing touched, nothing half-written

    assert invoke(*base, "--epochs", "3", "--lr", "1e-2", "--resume").exit_code == 0
    assert read_run(tmp_path / cfg.run_id).meta["selected_epoch"] in (1, 2, 3)


def test_resume_with_force_discards_a_foreign_checkpoint(cohort, tmp_path):
    cfg = FinetuneConfig(model="tiny-clip", cohort=cohort, out=tmp_path, epochs=2, batch_size=12, lr=1e-2, workers=2)
    with pytest.raises(KeyboardInterrupt):
        T.finetune(cfg, on_epoch_end=lambda log: (_ for _ in ()).throw(KeyboardInterrupt), progress=False)
    result = invoke("lora", "--model", "tiny-clip", "--cohort", cohort, "--out", tmp_path, *FAST, "--epochs", "1",
                    "--resume", "--force")
    assert result.exit_code == 0, result.output
    assert "--force: discarded checkpoint" in result.stderr and "no checkpoint" not in result.stderr
    assert len(read_run(tmp_path / cfg.run_id).meta["curves"]["val_loss"]) == 1  # started over


def test_resume_without_a_checkpoint_says_so(cohort, tmp_path):
    result = invoke("lora", "--model", "tiny-clip", "--cohort", cohort, "--out", tmp_path, *FAST, "--epochs", "1",
                    "--resume")
    assert result.exit_code == 0, result.output
    [note] = [ln for ln in result.stderr.splitlines() if ln.startswith("note:")]
    assert "--resume: no checkpoint of tiny-clip__lora__best__s0" in note and "starting from epoch 1" in note
    assert "selected epoch" in result.stdout


def fake_run(out, run_id: str, cohort_hash: str) -> None:
    (out / run_id).mkdir(parents=True)
    (out / run_id / "run.json").write_text(json.dumps({"run_id": run_id, "cohort_hash": cohort_hash}))


def test_runs_folder_holding_another_cohorts_runs_is_refused_before_any_work(cohort, tmp_path):
    fake_run(tmp_path, "tiny-clip__linear__best__s0", "f" * 64)
    result = invoke("lora", "--model", "tiny-clip", "--cohort", cohort, "--out", tmp_path, *FAST)
    assert_one_line_error(result, f"--out {tmp_path}", "tiny-clip__linear__best__s0", "ffffffffffff",
                          "different folders")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-clip__linear__best__s0"]  # no cache, no checkpoint


def test_check_runs_folder(cohort, tmp_path):
    own = load_cohort(cohort).hash
    check_runs_folder(tmp_path / "new", own, ["a__lora__best__s0"], force=False)  # absent: fine
    fake_run(tmp_path, "m__linear__best__s0", own)
    fake_run(tmp_path, ".m__lora__best__s0.x.tmp", "0" * 64)  # hidden temporaries are not runs
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "run.json").write_text("{not json")  # left for `cxrfair analyze` to report
    check_runs_folder(tmp_path, own, ["m__lora__best__s0"], force=False)
    with pytest.raises(CxrfairError, match=r"run m__linear__best__s0 already exists \(1 of 2\); pass --force"):
        check_runs_folder(tmp_path, own, ["m__lora__best__s0", "m__linear__best__s0"], force=False)
    check_runs_folder(tmp_path, own, ["m__linear__best__s0"], force=True)
    with pytest.raises(CxrfairError, match="made on cohort"):
        check_runs_folder(tmp_path, "1" * 64, [], force=True)  # force never mixes cohorts
    with pytest.raises(CxrfairError, match="not a folder"):
        check_runs_folder(tmp_path / "broken" / "run.json", own, [], force=False)


def test_bad_option_value_is_one_line(cohort, tmp_path):
    result = invoke("lora", "--model", "tiny-clip", "--cohort", cohort, "--out", tmp_path, "--epochs", "0")
    assert_one_line_error(result, "--epochs")
    result = invoke("lora", "--model", "tiny-clip", "--cohort", cohort, "--out", tmp_path, "--micro-batch", "0")
    assert_one_line_error(result, "--micro-batch")


def test_unknown_model_is_one_line(cohort, tmp_path):
    assert_one_line_error(invoke("full", "--model", "nope", "--cohort", cohort, "--out", tmp_path), "'nope'", "tiny-clip")


@pytest.mark.slow
def test_lora_learns_the_project_synth_cohort(tmp_path):
    """End to end on `cxrfair cohort synth` + `cohort build` data (~15 s): validation loss falls."""
    from cxrfair.cli import main as root

    runner = CliRunner()
    raw, cohort, runs = tmp_path / "raw", tmp_path / "cohort", tmp_path / "runs"
    assert runner.invoke(root, ["cohort", "synth", "--out", str(raw), "--per-cell", "10"]).exit_code == 0
    built = runner.invoke(root, ["cohort", "build", "--metadata", str(raw / "Data_Entry_2017.csv"),
                                 "--images", str(raw), "--per-group", "10", "--out", str(cohort)])
    assert built.exit_code == 0, built.output
    result = invoke("lora", "--model", "tiny-clip", "--cohort", cohort, "--out", runs, "--epochs", "10",
                    "--batch-size", "32", "--lr", "1e-2", "--workers", "2", "--device", "cpu")
    assert result.exit_code == 0, result.output
    meta = read_run(runs / "tiny-clip__lora__best__s0").meta
    val = meta["curves"]["val_loss"]
    assert min(val) < val[0] - 0.3 and meta["selected_epoch"] == val.index(min(val)) + 1
