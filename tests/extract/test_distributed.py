"""Sharded extraction: 2 CPU ranks under torchrun (gloo) merge to the single-process cache; merge checks."""

from __future__ import annotations

import multiprocessing
import os
import socket
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch

from cxrfair.errors import CxrfairError
from cxrfair.extract.cache import read_cache
from cxrfair.extract.distributed import default_parts_dir, find_parts, merge_parts, run_distributed, shard_rows
from cxrfair.extract.extractor import ExtractConfig, extract
from tests.extract.extract_helpers import fake_parts, make_cohort


@pytest.mark.parametrize("n,world", [(48, 2), (10, 3), (2, 4), (1000, 7)])
def test_shards_are_contiguous_disjoint_balanced_and_cover_every_row(n, world):
    shards = [shard_rows(n, r, world) for r in range(world)]
    assert shards[0][0] == 0 and shards[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(shards, shards[1:]))
    sizes = [b - a for a, b in shards]
    assert max(sizes) - min(sizes) <= 1


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """(cohort, single-process tiny-clip cache) over 48 images, batches of 8."""
    root = tmp_path_factory.mktemp("dist")
    cohort = make_cohort(root)
    out = root / "single.h5"
    extract(ExtractConfig(model="tiny-clip", cohort=cohort, out=out, batch_size=8, workers=0, progress=False))
    return cohort, out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, config: ExtractConfig) -> None:
    """One rank, as torchrun would start it (same env variables), in a forked child."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    code = 1
    try:
        run_distributed(config)
        code = 0
    except BaseException:  # report, then leave without running the parent's pytest teardown
        traceback.print_exc()
    finally:
        os._exit(code)


def assert_merged_equals_single(out: Path, single: Path) -> None:
    parts = find_parts(default_parts_dir(out))
    assert [p.name for p in parts] == ["part-00000-of-00002.h5", "part-00001-of-00002.h5"]
    assert [len(read_cache(p).table) for p in parts] == [24, 24]
    a, b = read_cache(single), read_cache(out)
    assert b.table.equals(a.table) and b.classes == a.classes and b.cohort_hash == a.cohort_hash
    # Each row goes through the same batch of 8 in both runs (24 = 3 x 8); the ranks ran with one
    # thread each, so rows agree to float rounding rather than bitwise.
    np.testing.assert_allclose(b.image_embeddings, a.image_embeddings, rtol=1e-5, atol=1e-6)
    for name in a.text:
        np.testing.assert_allclose(b.text[name].embeddings, a.text[name].embeddings, rtol=1e-5, atol=1e-6)
    assert [m["file"] for m in b.attrs["merged_from"]] == [p.name for p in parts]
    assert "shard" not in b.attrs


def test_two_gloo_ranks_merged_equal_a_single_process_run(single, tmp_path):
    cohort, ref = single
    out = tmp_path / "sharded.h5"
    config = ExtractConfig(model="tiny-clip", cohort=cohort, out=out, batch_size=8, workers=0, device="cpu",
                           progress=False)
    # Forked ranks skip re-importing torch (seconds per process on 2 shared cores); the slow test
    # below runs the same through the real `torchrun` CLI.
    ctx, port = multiprocessing.get_context("fork"), _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, 2, port, config)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=180)
    assert [p.exitcode for p in procs] == [0, 0]
    assert_merged_equals_single(out, ref)


@pytest.mark.slow
def test_torchrun_cli_two_cpu_ranks_merged_equal_a_single_process_run(single, tmp_path):
    cohort, ref = single
    out = tmp_path / "sharded" / "tiny-clip.h5"  # --out is the folder
    torchrun = Path(sys.executable).with_name("torchrun")
    cli = Path(sys.executable).with_name("cxrfair")
    cmd = [str(torchrun), "--standalone", "--nproc-per-node", "2", "--no-python", str(cli), "extract",
           "--model", "tiny-clip", "--cohort", str(cohort), "--out", str(out.parent), "--batch-size", "8", "--workers", "0",
           "--device", "cpu"]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "merged into" in proc.stdout
    assert_merged_equals_single(out, ref)


def test_merge_joins_parts_in_row_order_whatever_the_argument_order(tmp_path):
    paths = fake_parts(tmp_path, world=3)
    merged = read_cache(merge_parts(paths[::-1], tmp_path / "m.h5"))
    assert list(merged.table["patient_id"]) == list(range(6))
    np.testing.assert_array_equal(merged.image_embeddings, np.concatenate([read_cache(p).image_embeddings for p in paths]))


def test_merge_refuses_missing_parts_and_mixed_models(tmp_path):
    paths = fake_parts(tmp_path, world=3)
    with pytest.raises(CxrfairError, match="2 file\\(s\\) given, but the extraction had 3 shards"):
        merge_parts(paths[:2], tmp_path / "m.h5")
    other = fake_parts(tmp_path / "o", world=3, model="other")
    with pytest.raises(CxrfairError, match="differ \\(model 'm' vs 'other'\\)"):
        merge_parts([paths[0], other[1], paths[2]], tmp_path / "m.h5")
    with pytest.raises(CxrfairError, match="covers rows from 0, already covered"):
        merge_parts([paths[0], paths[0], paths[2]], tmp_path / "m.h5")
    with pytest.raises(CxrfairError, match="rows 2..3 of 6 are missing"):
        merge_parts([paths[0], paths[2], fake_parts(tmp_path / "x", world=3)[2]], tmp_path / "m.h5")
    assert not (tmp_path / "m.h5").exists()


def test_merge_refuses_a_plain_cache_and_an_existing_output(tmp_path):
    paths = fake_parts(tmp_path, world=2)
    merge_parts(paths, tmp_path / "m.h5")
    with pytest.raises(CxrfairError, match="already exists; pass --force"):
        merge_parts(paths, tmp_path / "m.h5")
    with pytest.raises(CxrfairError, match="not a shard"):
        merge_parts([tmp_path / "m.h5"], tmp_path / "m2.h5")
