"""`cxrfair models list` and `cxrfair extract [merge]` through click: happy paths and clean one-line errors."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from cxrfair.cli import main
from cxrfair.extract.cache import read_cache
from cxrfair.extract.cohort import load_cohort
from tests.extract.extract_helpers import copy_images, fake_parts, make_cohort


def run(*args):
    return CliRunner().invoke(main, [*map(str, args)])


def assert_clean_error(result, *needles):
    """Non-zero exit, one line 'Error: ...' naming what is wrong, no traceback."""
    lines = result.output.strip().splitlines()
    assert result.exit_code != 0, result.output
    assert lines and lines[-1].startswith("Error: ") and "Traceback" not in result.output, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    for needle in needles:
        assert needle in lines[-1], (needle, lines[-1])


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return make_cohort(tmp_path_factory.mktemp("cli"))


def test_models_list_fits_100_columns_and_json_csv_carry_every_field(monkeypatch):
    import csv
    import io
    import json

    from cxrfair.extract import registry
    from cxrfair.extract.cli import FIELDS
    from cxrfair.extract.registry import list_specs

    # Only the built-in models, as in a fresh process: other tests in this process may have
    # registered throwaway models (contrastive:FOLDER specs, a model without LoRA targets).
    list_specs()
    monkeypatch.setattr(registry, "_REGISTRY", {name: spec for name, spec in registry._REGISTRY.items()
                                                if getattr(spec.loader, "__module__", "") in registry.BUILTIN_MODULES})

    result = run("models", "list")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert max(map(len, lines)) <= 100
    assert lines[0].split() == ["name", "image", "encoder", "dim", "zs", "weights", "licence"]
    names = [s.name for s in list_specs()]
    assert [line.split()[0] for line in lines[2:2 + len(names)]] == names  # every name whole, in registry order
    assert "  by hand  " in next(line for line in lines if line.startswith("gloria-rn50 "))
    assert "--format json" in lines[-1]

    rows = json.loads(run("models", "list", "--format", "json").output)
    assert [r["name"] for r in rows] == names and all(tuple(r) == FIELDS for r in rows)
    clip = next(r for r in rows if r["name"] == "clip-vit-b16")
    assert clip["dim"] == 512 and "QuickGELU" in clip["image_encoder"] and clip["lora_targets"] == ["attn", "c_fc", "c_proj"]
    assert clip["weights_env"] == "CXRFAIR_CLIP_VIT_B16_WEIGHTS" and clip["fetch"] == "weights fetch"
    table = list(csv.DictReader(io.StringIO(run("models", "list", "--format", "csv").output)))
    assert [r["name"] for r in table] == names and tuple(table[0]) == FIELDS
    assert next(r for r in table if r["name"] == "clip-vit-b16")["lora_targets"] == "attn,c_fc,c_proj"


def test_extract_writes_then_leaves_a_complete_cache_alone(cohort, tmp_path):
    args = ("extract", "--model", "tiny-clip", "--cohort", cohort, "--out", tmp_path, "--batch-size", 16, "--workers", 0)
    out = tmp_path / "tiny-clip.h5"  # --out is a folder; the cache is named after the model
    result = run(*args)
    assert result.exit_code == 0, result.output
    assert f"wrote {out}: 48 images" in result.output and "images/s" in result.output
    assert read_cache(out).model == "tiny-clip"
    again = run(*args)
    assert again.exit_code == 0 and "already complete" in again.output and "--force" in again.output


def test_extract_errors_are_one_line(cohort, tmp_path):
    assert_clean_error(run("extract", "--model", "nope", "--cohort", cohort, "--out", tmp_path),
                       "unknown model; known models:", "tiny-clip")
    assert_clean_error(run("extract", "--cohort", cohort), "--model", "--out")
    assert_clean_error(run("extract", "--model", "tiny-clip", "--cohort", tmp_path / "none", "--out", tmp_path),
                       "cohort.json")
    assert_clean_error(run("extract", "--model", "tiny-clip", "--cohort", cohort, "--out", tmp_path,
                           "--device", "cuda:7"), "--device cuda:7")
    assert_clean_error(run("extract", "--model", "tiny-clip", "--cohort", cohort, "--out", tmp_path / "x.h5"),
                       "--out is a folder now", f"--out {tmp_path}")
    assert list(tmp_path.iterdir()) == []


def test_corrupt_image_named_then_skipped(cohort, tmp_path):
    images = copy_images(cohort, tmp_path / "imgs")
    row = load_cohort(cohort).table.iloc[-1]
    (images / row["path"]).write_bytes(b"\x89PNG truncated")
    args = ("extract", "--model", "tiny-clip", "--cohort", cohort, "--out", tmp_path / "b", "--images", images,
            "--workers", 0)
    assert_clean_error(run(*args), row["image_id"], "--skip-bad")
    result = run(*args, "--skip-bad")
    assert result.exit_code == 0 and "skipped 1 unreadable image" in result.output, result.output
    assert read_cache(tmp_path / "b" / "tiny-clip.h5").attrs["skipped_images"][0]["image_id"] == row["image_id"]


def test_merge_needs_parts_and_names_problems(tmp_path):
    assert_clean_error(run("extract", "merge", "--out", tmp_path / "m"), "PARTS", "--parts-dir")
    assert_clean_error(run("extract", "merge", "--parts-dir", tmp_path, "--out", tmp_path / "m"), "no part-")
    assert_clean_error(run("extract", "merge", tmp_path / "p.h5", "--out", tmp_path / "m"), "no such file")
    assert_clean_error(run("extract", "merge", "--parts-dir", tmp_path, "--out", tmp_path / "m.h5"), "a folder now")


def test_merge_cli_joins_parts(tmp_path):
    paths = fake_parts(tmp_path, world=2)
    result = run("extract", "merge", "--parts-dir", paths[0].parent, "--out", tmp_path / "m")
    assert result.exit_code == 0 and "merged 2 part(s)" in result.output, result.output
    model = read_cache(paths[0]).model
    assert len(read_cache(tmp_path / "m" / f"{model}.h5").table) == 6
