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
