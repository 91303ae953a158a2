"""Extraction into the HDF5 cache: round trip, reference values, resume after kill -9, refusals, bad images."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from cxrfair.errors import CxrfairError
from cxrfair.io import sha256_file
from cxrfair.extract.cache import read_cache
from cxrfair.extract.cohort import load_cohort
from cxrfair.extract.extractor import (KILL_AFTER_ENV, ExtractConfig, chunk_ranges, class_text_embeddings, extract,
                                       open_partial, partial_dir)
from cxrfair.extract.registry import load_model
from tests.extract.extract_helpers import copy_images, make_cohort, reference_image_embeddings

BATCH = 8


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return make_cohort(tmp_path_factory.mktemp("extract"))


@pytest.fixture(scope="module")
def baseline(cohort, tmp_path_factory):
    """An uninterrupted tiny-clip extraction (48 images, batches of 8, 2 workers)."""
    out = tmp_path_factory.mktemp("base") / "tiny.h5"
    result = extract(ExtractConfig(model="tiny-clip", cohort=cohort, out=out, batch_size=BATCH, workers=2, progress=False))
    assert result.status == "written"
    return out


def config(cohort, out, **kw):
    return ExtractConfig(**{"model": "tiny-clip", "cohort": cohort, "out": out, "batch_size": BATCH, "workers": 0,
                            "progress": False, **kw})


def test_round_trip_matches_a_one_image_at_a_time_reference(cohort, baseline):
    c, co = read_cache(baseline), load_cohort(cohort)
    fm = load_model("tiny-clip")
    assert c.image_embeddings.shape == (48, 64) and c.image_embeddings.dtype == np.float32
    assert c.table[["image_id", "split", "label"]].equals(co.table[["image_id", "split", "label"]])
    assert c.classes == co.classes and c.cohort_hash == co.hash and c.model == "tiny-clip"
    np.testing.assert_allclose(c.image_embeddings, reference_image_embeddings(fm, co.image_paths()), atol=1e-5)
    assert c.logit_scale == pytest.approx(fm.logit_scale)
    assert c.attrs["weights_id"] == "random-init(seed=0)" and c.attrs["precision"] == "fp32"
    assert c.attrs["preprocessing"]["size"] == 64 and c.attrs["skipped_images"] == []
    assert {"torch", "open_clip_torch", "transformers", "cxrfair"} <= set(c.attrs["versions"])
    assert not partial_dir(baseline).exists()


def test_text_embeddings_are_means_of_normalised_prompt_embeddings(baseline):
    c = read_cache(baseline)
    fm = load_model("tiny-clip")
    assert set(c.text) == {"clip", "gloria", "cxr-clip"}
    for name, te in c.text.items():
        assert te.embeddings.shape == (10, 6, 64) and len(te.prompts) == 10
    prompts = c.text["gloria"].prompts[3][4]  # draw 3, Effusion
    with torch.inference_mode():
        ref = torch.nn.functional.normalize(fm.encode_text(fm.tokenize(prompts)), dim=-1).mean(0).numpy()
    np.testing.assert_allclose(c.text["gloria"].embeddings[3, 4], ref, atol=1e-6)
    again = class_text_embeddings(fm, [[prompts]], torch.device("cpu"), "fp32")
    np.testing.assert_allclose(again[0, 0], ref, atol=1e-6)


def test_existing_complete_cache_is_left_alone_and_other_models_refused(cohort, baseline):
    before = baseline.stat().st_mtime_ns
    assert extract(config(cohort, baseline)).status == "exists"
    assert baseline.stat().st_mtime_ns == before
    with pytest.raises(CxrfairError, match=r"holds model 'tiny-clip'.*--force"):
        extract(config(cohort, baseline, model="tiny-biomedclip"))


def test_other_cohort_refused_and_force_rewrites(cohort, baseline, tmp_path):
    other = make_cohort(tmp_path / "o", per_group=3)  # per_group=1 leaves val empty, which cohorts now refuse
    out = tmp_path / "c.h5"
    out.write_bytes(baseline.read_bytes())
    with pytest.raises(CxrfairError, match="for cohort"):
        extract(config(other, out))
    assert extract(config(other, out, force=True)).status == "written"
    assert read_cache(out).cohort_hash == load_cohort(other).hash and len(read_cache(out).table) == 72


def test_partial_from_different_settings_is_refused(cohort, tmp_path):
    out = tmp_path / "p.h5"
    ident = {"model": "tiny-clip", "weights_id": "random-init(seed=0)", "cohort_hash": load_cohort(cohort).hash,
             "precision": "bf16", "rows": [0, 48], "chunk_rows": BATCH}
    open_partial(partial_dir(out), ident, force=False)
    with pytest.raises(CxrfairError, match=r"precision: 'bf16' there, 'fp32' now.*--force"):
        extract(config(cohort, out))
    assert extract(config(cohort, out, force=True)).status == "written"


def test_chunk_ranges_cover_rows_once():
    ranges = chunk_ranges(19, 8)
    assert [(r.start, r.stop) for r in ranges] == [(0, 8), (8, 16), (16, 19)]


KILLED_RUN = textwrap.dedent("""
    import sys, torch
    from pathlib import Path
    torch.set_num_threads(int(sys.argv[3]))
    from cxrfair.extract.extractor import ExtractConfig, extract
    extract(ExtractConfig(model="tiny-clip", cohort=Path(sys.argv[1]), out=Path(sys.argv[2]), batch_size=8,
                          workers=2, progress=False))
""")


@pytest.mark.slow  # keeps the default suite under ~10 min; `make test-all` runs it
def test_resume_after_kill_9_equals_an_uninterrupted_run(cohort, baseline, tmp_path):
    out = tmp_path / "k.h5"
    env = {**os.environ, KILL_AFTER_ENV: "2"}
    proc = subprocess.run([sys.executable, "-c", KILLED_RUN, str(cohort), str(out), str(torch.get_num_threads())],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    part = partial_dir(out)
    assert sorted(p.name for p in part.glob("chunk-*.npy")) == ["chunk-000000.npy", "chunk-000001.npy"]
    assert json.loads((part / "manifest.json").read_text())["model"] == "tiny-clip"
    assert not out.exists()
    with pytest.raises(CxrfairError, match="interrupted extraction"):
        read_cache(out)
    # Resumed with another --batch-size: the chunks of the first run fix how rows are batched.
    result = extract(ExtractConfig(model="tiny-clip", cohort=cohort, out=out, batch_size=32, workers=2, progress=False))
    assert result.n_images == 48 and not part.exists()
    done, ref = read_cache(out), read_cache(baseline)
    np.testing.assert_array_equal(done.image_embeddings, ref.image_embeddings)
    assert done.table.equals(ref.table)
    for name in ref.text:
        np.testing.assert_array_equal(done.text[name].embeddings, ref.text[name].embeddings)


def _corrupt_one(cohort, tmp_path):
    images = copy_images(cohort, tmp_path / "imgs")
    row = load_cohort(cohort).table.iloc[5]
    (images / row["path"]).write_bytes(b"not a png at all")
    return images, row


def test_corrupt_image_is_named(cohort, tmp_path):
    images, row = _corrupt_one(cohort, tmp_path)
    with pytest.raises(CxrfairError, match=rf"unreadable image\(s\): .*{row['image_id']}.*--skip-bad"):
        extract(config(cohort, tmp_path / "bad.h5", images=images))
    assert not (tmp_path / "bad.h5").exists()


def test_skip_bad_records_and_drops_the_image(cohort, baseline, tmp_path):
    images, row = _corrupt_one(cohort, tmp_path)
    result = extract(config(cohort, tmp_path / "skip.h5", images=images, skip_bad=True))
    c, ref = read_cache(tmp_path / "skip.h5"), read_cache(baseline)
    assert result.n_images == 47 and len(c.table) == 47 and row["image_id"] not in set(c.table["image_id"])
    assert [s["image_id"] for s in c.attrs["skipped_images"]] == [row["image_id"]]
    keep = ref.table["image_id"] != row["image_id"]
    np.testing.assert_allclose(c.image_embeddings, ref.image_embeddings[keep.to_numpy()], atol=1e-6)


def test_bf16_autocast_runs_and_stays_close(cohort, baseline, tmp_path):
    extract(config(cohort, tmp_path / "bf.h5", precision="bf16"))
    c, ref = read_cache(tmp_path / "bf.h5"), read_cache(baseline)
    assert c.attrs["precision"] == "bf16" and c.image_embeddings.dtype == np.float32
    cos = np.sum(c.image_embeddings * ref.image_embeddings, 1) / (
        np.linalg.norm(c.image_embeddings, axis=1) * np.linalg.norm(ref.image_embeddings, axis=1))
    assert cos.min() > 0.99


def test_bad_config_values_are_refused(cohort, tmp_path):
    with pytest.raises(CxrfairError, match="--batch-size"):
        config(cohort, tmp_path / "x.h5", batch_size=0)
    with pytest.raises(CxrfairError, match="--precision"):
        config(cohort, tmp_path / "x.h5", precision="fp8")
    with pytest.raises(CxrfairError, match="unknown model; known models: .*tiny-clip"):
        extract(config(cohort, tmp_path / "x.h5", model="nope"))


# --- unwritable folders, full disks, damaged progress --------------------------------------------

def _refuse(err):
    def write(*args, **kwargs):
        raise OSError(err, os.strerror(err))
    return write


@pytest.mark.parametrize("how", ["chmod", "monkeypatch"])
def test_read_only_out_folder_is_one_line_and_writes_nothing(cohort, tmp_path, monkeypatch, how):
    import errno

    from cxrfair.extract import extractor

    folder = tmp_path / "ro"
    folder.mkdir()
    if how == "chmod":
        folder.chmod(0o555)
        if os.access(folder, os.W_OK):
            pytest.skip("running as root: chmod does not stop writes (the monkeypatch case covers it)")
    else:  # what a read-only folder does at the first write, even as root
        monkeypatch.setattr(extractor, "write_json_atomic", _refuse(errno.EACCES))
    with pytest.raises(CxrfairError, match=rf"--out {folder}.*(not writable|Permission denied)") as err:
        extract(config(cohort, folder / "x.h5"))
    assert "\n" not in str(err.value)
    folder.chmod(0o755)
    assert list(folder.iterdir()) == []


def test_full_disk_is_one_line_keeps_finished_chunks_and_resumes(cohort, baseline, tmp_path, monkeypatch):
    import errno

    from cxrfair.extract import extractor

    out = tmp_path / "full.h5"
    real, calls = extractor._save_npy, []

    def fill_up(path, array):  # the disk fills up during the third chunk
        calls.append(path)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(path, array)

    monkeypatch.setattr(extractor, "_save_npy", fill_up)
    with pytest.raises(CxrfairError, match=rf"--out {partial_dir(out)}: cannot write chunk 2 \(No space left on device\)"):
        extract(config(cohort, out))
    assert not out.exists() and sorted(p.name for p in partial_dir(out).glob("chunk-*")) == [
        "chunk-000000.npy", "chunk-000000.sha256.json", "chunk-000001.npy", "chunk-000001.sha256.json"]
    assert not list(partial_dir(out).glob(".*tmp"))  # no half-written chunk
    monkeypatch.setattr(extractor, "_save_npy", real)
    extract(config(cohort, out))
    np.testing.assert_array_equal(read_cache(out).image_embeddings, read_cache(baseline).image_embeddings)


def test_full_disk_at_the_cache_is_one_line_and_leaves_no_file(cohort, tmp_path, monkeypatch):
    import errno
    import shutil
    from collections import namedtuple

    from cxrfair.extract import extractor as extractor_module

    out = tmp_path / "c.h5"
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(CxrfairError, match=rf"--out {out}: the cache needs about [\d.]+ MB but only 0.0 MB are free"):
        extract(config(cohort, out))
    monkeypatch.undo()
    monkeypatch.setattr(extractor_module, "write_cache", _refuse(errno.ENOSPC))
    with pytest.raises(CxrfairError, match=rf"--out {out}: cannot write the cache \(No space left on device\)"):
        extract(config(cohort, out))
    assert not out.exists() and not list(tmp_path.glob(".*tmp")) and partial_dir(out).is_dir()


def test_truncated_chunk_is_dropped_and_redone(cohort, baseline, tmp_path, monkeypatch):
    from cxrfair.extract import extractor

    out = tmp_path / "t.h5"

    def stop(*args, **kwargs):
        raise KeyboardInterrupt  # interrupted after every chunk was written, before assembly

    monkeypatch.setattr(extractor, "assemble", stop)
    with pytest.raises(KeyboardInterrupt):
        extract(config(cohort, out))
    monkeypatch.undo()
    chunk = partial_dir(out) / "chunk-000001.npy"
    chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])
    (partial_dir(out) / "chunk-000004.npy").write_bytes(b"")
    result = extract(config(cohort, out))
    assert result.status == "written" and not partial_dir(out).exists()
    done, ref = read_cache(out), read_cache(baseline)
    np.testing.assert_array_equal(done.image_embeddings, ref.image_embeddings)
    assert done.table.equals(ref.table)


def _interrupted_before_assembly(cohort, out, monkeypatch):
    """Run an extraction to ``out`` that stops once every chunk is written."""
    from cxrfair.extract import extractor

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(extractor, "assemble", stop)
    with pytest.raises(KeyboardInterrupt):
        extract(config(cohort, out))
    monkeypatch.undo()


def test_a_chunk_replaced_by_a_right_shaped_wrong_array_is_redone_with_a_warning(cohort, baseline, tmp_path, monkeypatch):
    from cxrfair.errors import CxrfairWarning

    out = tmp_path / "w.h5"
    _interrupted_before_assembly(cohort, out, monkeypatch)
    chunk = partial_dir(out) / "chunk-000002.npy"
    sums = json.loads((partial_dir(out) / "chunk-000002.sha256.json").read_text())
    assert sums == {"chunk-000002.npy": sha256_file(chunk)}
    np.save(chunk, np.zeros_like(np.load(chunk)))  # same shape and dtype: only the checksum tells
    with pytest.warns(CxrfairWarning, match=rf"partial extraction {partial_dir(out)}: chunk 2 \(rows 16-23\) does "
                                            r"not match the checksums recorded .*; redoing it"):
        extract(config(cohort, out))
    np.testing.assert_array_equal(read_cache(out).image_embeddings, read_cache(baseline).image_embeddings)


def test_a_chunk_without_its_checksum_file_is_redone_silently(cohort, baseline, tmp_path, monkeypatch):
    """Its checksums are written last: without them the chunk never finished (or predates checksums)."""
    import warnings

    out = tmp_path / "s.h5"
    _interrupted_before_assembly(cohort, out, monkeypatch)
    (partial_dir(out) / "chunk-000001.sha256.json").unlink()
    np.save(partial_dir(out) / "chunk-000001.npy", np.ones_like(np.load(partial_dir(out) / "chunk-000001.npy")))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        extract(config(cohort, out))
    np.testing.assert_array_equal(read_cache(out).image_embeddings, read_cache(baseline).image_embeddings)


def test_multilabel_text_sets_are_pairs_of_mean_normalised_prompt_embeddings():
    from cxrfair.extract.extractor import text_embeddings_all
    from cxrfair.extract.prompts import MULTILABEL_SETS

    fm = load_model("tiny-clip")
    conditions = ["Pleural Effusion", "Pneumothorax"]
    text = text_embeddings_all(fm, conditions, torch.device("cpu"), "fp32", 0, "multilabel")
    assert list(text) == list(MULTILABEL_SETS)
    for name, te in text.items():
        assert te.embeddings.shape == (10, 2, 2, 64)
        for c in range(2):
            for side in (0, 1):
                plist = te.prompts[0][c][side]
                with torch.inference_mode():
                    ref = torch.nn.functional.normalize(fm.encode_text(fm.tokenize(plist)), dim=-1).mean(0).numpy()
                np.testing.assert_allclose(te.embeddings[4, c, side], ref, atol=1e-6)
    assert text["sourget"].prompts[0][1] == [["Chest No findings"], ["Chest Pneumothorax"]]


def test_a_cache_records_the_cohorts_task_and_attributes(baseline):
    c = read_cache(baseline)
    assert c.attrs["task"] == "multiclass" and c.task == "multiclass"
    assert c.attrs["attributes"] == {"sex": {"groups": ["M", "F"], "reference": "M"},
                                     "age_group": {"groups": ["young", "old"], "reference": "young"}}


def test_unprojected_features_are_the_encoders_features_before_the_projection(cohort, tmp_path):
    from cxrfair.extract.registry import get_spec

    out = tmp_path / "unproj.h5"
    extract(config(cohort, out, features="unprojected"))
    c, co, fm = read_cache(out), load_cohort(cohort), load_model("tiny-clip")
    assert c.attrs["features"] == "unprojected" and c.text == {} and c.prompt_scores is None
    assert c.image_embeddings.shape == (48, get_spec("tiny-clip").unprojected_dim)
    paths = co.image_paths()[:3]
    ref = []
    with torch.inference_mode():
        for p in paths:
            from PIL import Image

            with Image.open(p) as im:
                x = fm.preprocess.normalize(torch.from_numpy(fm.preprocess.prepare(im))[None])
            ref.append(fm.encode_image_unprojected(x).float().numpy()[0])
    np.testing.assert_allclose(c.image_embeddings[:3], np.stack(ref), atol=1e-5)
    # The same --out with projected features is another cache, refused without --force.
    with pytest.raises(CxrfairError, match="holds unprojected features, not projected"):
        extract(config(cohort, out))


def test_unprojected_features_need_a_model_that_has_them(cohort, tmp_path):
    with pytest.raises(CxrfairError, match="--features unprojected: model tiny-rad-dino has no features before a projection"):
        extract(config(cohort, tmp_path / "r.h5", model="tiny-rad-dino", features="unprojected"))
    assert not list(tmp_path.iterdir())
