"""The shared option vocabulary (cxrfair/options.py, docs/cli.md): one meaning per name, and the
retired spellings refused with a message naming the new one."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from cxrfair.cli import main
from cxrfair.errors import CxrfairError
from cxrfair.options import parse_floats, parse_seeds


@pytest.mark.parametrize("text, seeds", [("3", (0, 1, 2)), ("1", (0,)), ("0,4", (0, 4)), ("5,", (5,)), (" 2 , 7 ", (2, 7))])
def test_seeds_are_a_count_or_a_list(text, seeds):
    assert parse_seeds(text) == seeds


@pytest.mark.parametrize("text", ["0", "-1", "x", "1,1", ",", "1.5", "-2,3"])
def test_bad_seeds_name_the_option(text):
    with pytest.raises(CxrfairError, match="--seeds"):
        parse_seeds(text)


def test_floats():
    assert parse_floats("0.1, 1,10", "--strength") == (0.1, 1.0, 10.0)
    for bad in ("", "a", "1,,x"):
        with pytest.raises(CxrfairError, match="--strength"):
            parse_floats(bad, "--strength")


@pytest.mark.parametrize("args, old, new", [
    (["finetune", "lora", "--seed", "1"], "--seed", "--seeds"),
    (["finetune", "full", "--cache", "memory"], "--cache", "--image-cache"),
    (["extract", "--model", "tiny-clip", "--cohort", "c", "--out", "work/cache/tiny-clip.h5"], "--out", "folder"),
])
def test_old_spellings_are_refused_naming_the_new_one(args, old, new, tmp_path):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("Error: ") and old in last and new in last, last


def test_every_command_speaks_the_one_vocabulary():
    """--cache is an embedding file, --out a folder, --seeds the training seeds, wherever they appear."""
    from cxrfair.cli import COMMANDS, LazyGroup

    group = LazyGroup(name="cxrfair")
    seen = {}
    ctx = click_context()
    for name in COMMANDS:
        command = group.get_command(ctx, name)
        for path, cmd in walk(name, command):
            for p in cmd.get_params(ctx):
                if getattr(p, "hidden", False) or not p.opts or not p.opts[0].startswith("--"):
                    continue
                seen.setdefault(p.opts[0], []).append((path, (p.help or "").lower()))
    for path, text in seen["--cache"]:
        assert "embedding cache" in text, path
    for path, text in seen["--out"]:
        assert "folder" in text, (path, text)
    for path, text in seen["--seeds"]:
        assert "training seeds" in text, path
    assert {p for p, _ in seen["--seeds"]} >= {"probe linear", "probe mlp", "finetune lora", "finetune full"}
    assert "--seed" not in {o for o in seen if any(p.startswith(("probe l", "probe m", "finetune")) for p, _ in seen[o])}


def click_context():
    import click

    return click.Context(click.Command("x"))


def walk(path, command):
    import click

    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            yield from walk(f"{path} {name}", sub)
        if not getattr(command, "invoke_without_command", False):
            return
    yield path, command


@pytest.mark.slow
def test_finetune_trains_one_run_per_seed_and_strength(tmp_path):
    from tests.finetune.helpers import make_cohort

    cohort = make_cohort(tmp_path / "cohort", tmp_path / "images")
    args = ["finetune", "full", "--model", "tiny-clip", "--cohort", str(cohort), "--out", str(tmp_path / "runs"),
            "--epochs", "1", "--batch-size", "12", "--workers", "1", "--device", "cpu",
            "--mitigation", "reweight", "--sensitive", "sex", "--strength", "0.5,1", "--seeds", "3,"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "runs").iterdir() if not p.name.startswith(".")) == [
        "tiny-clip__full+reweight-sex__st0.5__s3", "tiny-clip__full+reweight-sex__st1__s3"]
    # A bad value anywhere in the list stops the command before any training.
    bad = CliRunner().invoke(main, [*args[:-4], "--strength", "0.5,7", "--seeds", "2", "--out", str(tmp_path / "none")])
    assert bad.exit_code == 1 and "--strength 7" in bad.output and not (tmp_path / "none").exists()
