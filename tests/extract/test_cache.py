"""Cache round trip and refusal of partial / foreign files (torch-free reader)."""

import subprocess
import sys

import h5py
import numpy as np
import pandas as pd
import pytest

from cxrfair.errors import CxrfairError
from cxrfair.extract.cache import TextEmbeddings, read_cache, write_cache

CLASSES = ["A", "B", "C"]


def _table(n):
    rng = np.random.default_rng(0)
    return pd.DataFrame({
        "image_id": [f"{i:08d}_000.png" for i in range(n)],
        "path": [f"images_001/images/{i:08d}_000.png" for i in range(n)],
        "patient_id": np.arange(n),
        "label": rng.choice(CLASSES, n),
        "sex": rng.choice(["M", "F"], n),
        "age": rng.integers(20, 90, n),
        "age_group": "young",
        "split": rng.choice(["train", "val", "test"], n),
    })


def _write(path, n=10, d=4):
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(n, d)).astype(np.float32)
    text = {"clip": TextEmbeddings(rng.normal(size=(2, 3, d)).astype(np.float32), [[["a"], ["b"], ["c"]]] * 2)}
    write_cache(path, image_embeddings=emb, cohort_table=_table(n), classes=CLASSES, text=text,
                attrs={"model": "m", "weights_id": "w", "cohort_hash": "h", "logit_scale": 100.0, "versions": {"x": "1"}})
    return emb, text


def test_round_trip(tmp_path):
    path = tmp_path / "m.h5"
    emb, text = _write(path)
    cache = read_cache(path)
    np.testing.assert_array_equal(cache.image_embeddings, emb)
    np.testing.assert_array_equal(cache.text["clip"].embeddings, text["clip"].embeddings)
    assert cache.text["clip"].prompts == text["clip"].prompts
    pd.testing.assert_frame_equal(cache.table, _table(10))
    assert cache.classes == CLASSES and cache.model == "m" and cache.logit_scale == 100.0
    assert cache.attrs["versions"] == {"x": "1"} and cache.attrs["embed_dim"] == 4
    assert cache.labels().tolist() == [CLASSES.index(c) for c in _table(10)["label"]]
    assert cache.split_mask("train").sum() == (_table(10)["split"] == "train").sum()
    assert not list(tmp_path.glob(".*tmp"))


def test_incomplete_and_foreign_files_are_refused(tmp_path):
    path = tmp_path / "m.h5"
    _write(path)
    with h5py.File(path, "a") as f:
        f.attrs["complete"] = False
    with pytest.raises(CxrfairError, match="incomplete"):
        read_cache(path)
    foreign = tmp_path / "other.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(CxrfairError, match="not a cxrfair embedding cache"):
        read_cache(foreign)
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5 at all")
    with pytest.raises(CxrfairError, match="not a readable HDF5"):
        read_cache(junk)
    with pytest.raises(CxrfairError, match="no such file"):
        read_cache(tmp_path / "missing.h5")


def test_reader_does_not_import_torch():
    code = "import sys, cxrfair.extract.cache; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_prompt_scores_round_trip_and_version_1_files_still_read(tmp_path):
    from cxrfair.extract.cache import PromptScores

    rng = np.random.default_rng(2)
    scores = PromptScores(["p0", "p1", "p2"], rng.normal(size=(10, 3)).astype(np.float32),
                          rng.normal(size=(10, 3)).astype(np.float32))
    path = tmp_path / "s.h5"
    write_cache(path, image_embeddings=np.zeros((10, 4)), cohort_table=_table(10), classes=CLASSES, text={},
                attrs={"model": "m", "weights_id": "w", "cohort_hash": "h", "logit_scale": 1.0}, prompt_scores=scores)
    back = read_cache(path).prompt_scores
    assert back.prompts == scores.prompts and back.columns(["p2", "p0"]).tolist() == [2, 0]
    np.testing.assert_array_equal(back.global_sim, scores.global_sim)
    np.testing.assert_array_equal(back.local_sim, scores.local_sim)
    with pytest.raises(ValueError, match="prompt_scores"):
        write_cache(tmp_path / "bad.h5", image_embeddings=np.zeros((9, 4)), cohort_table=_table(9), classes=CLASSES,
                    text={}, attrs={"model": "m", "weights_id": "w", "cohort_hash": "h", "logit_scale": 1.0},
                    prompt_scores=scores)
    # A file as cxrfair wrote it before prompt scores (format version 1) reads, without them.
    old = tmp_path / "v1.h5"
    emb, _ = _write(old)
    with h5py.File(old, "a") as f:
        f.attrs["format_version"] = 1
    cache = read_cache(old)
    assert cache.prompt_scores is None and cache.attrs["format_version"] == 1
    np.testing.assert_array_equal(cache.image_embeddings, emb)
    with h5py.File(old, "a") as f:
        f.attrs["format_version"] = 3
    with pytest.raises(CxrfairError, match="format version 3 is not supported"):
        read_cache(old)
