"""The uint8 image cache (memory and memmap) and the batch prefetcher."""

import numpy as np
import pytest
import torch
from PIL import Image

from cxrfair.errors import CxrfairError
from cxrfair.extract.cohort import load_cohort
from cxrfair.extract.preprocess import Preprocess
from cxrfair.finetune import data as fdata
from cxrfair.finetune import sampler

PRE = Preprocess(size=64, resize=64)


def test_cache_holds_exactly_what_prepare_gives(cohort):
    paths = load_cohort(cohort).image_paths()[:7]
    cache = fdata.image_cache(paths, PRE, workers=3)
    assert cache.shape == (7, 3, 64, 64) and cache.dtype == np.uint8
    for i, p in enumerate(paths):
        np.testing.assert_array_equal(cache[i], PRE.prepare(Image.open(p)))


def test_file_cache_equals_memory_and_is_reused(cohort, tmp_path):
    paths = load_cohort(cohort).image_paths()[:5]
    file = tmp_path / "c" / "images.u8"
    first = fdata.image_cache(paths, PRE, workers=2, file=file)
    assert isinstance(first, np.memmap)
    np.testing.assert_array_equal(first, fdata.image_cache(paths, PRE, workers=1))
    stamp = file.stat().st_mtime_ns
    fdata.image_cache(paths, PRE, workers=2, file=file)
    assert file.stat().st_mtime_ns == stamp  # matching sidecar: not rebuilt
    file.with_name(file.name + ".json").write_text("{}")
    np.testing.assert_array_equal(fdata.image_cache(paths, PRE, workers=2, file=file), first)
    assert sorted(p.name for p in file.parent.iterdir()) == ["images.u8", "images.u8.json"]  # no temp left


def test_missing_image_is_named_before_decoding(cohort, tmp_path):
    paths = load_cohort(cohort).image_paths()[:3] + [tmp_path / "gone.png"]
    with pytest.raises(CxrfairError, match="gone.png.*--images"):
        fdata.image_cache(paths, PRE)


def test_epoch_order_is_a_pure_permutation():
    a = sampler.epoch_order(50, seed=3, epoch=4)
    assert sorted(a) == list(range(50))
    np.testing.assert_array_equal(a, sampler.epoch_order(50, seed=3, epoch=4))
    assert not np.array_equal(a, sampler.epoch_order(50, seed=3, epoch=5))


def test_prefetcher_yields_the_requested_rows_in_order():
    pixels = np.random.default_rng(0).integers(0, 256, (20, 3, 4, 4), dtype=np.uint8)
    labels = np.arange(20) % 3
    order = sampler.epoch_order(20, 0, 0)
    batches = sampler.index_batches(order, 6)
    assert [len(b) for b in batches] == [6, 6, 6, 2]
    got = list(fdata.Prefetcher(pixels, labels, batches, torch.device("cpu")))
    np.testing.assert_array_equal(torch.cat([x for x, *_ in got]).numpy(), pixels[order])
    np.testing.assert_array_equal(torch.cat([y for _, y, *_ in got]).numpy(), labels[order])
    assert all(torch.equal(w, torch.ones(len(b))) for (_, _, w, _), b in zip(got, batches))


def test_prefetcher_passes_producer_errors_on():
    batches = [np.array([0, 99])]  # row 99 does not exist
    with pytest.raises(IndexError):
        list(fdata.Prefetcher(np.zeros((3, 3, 2, 2), np.uint8), np.zeros(3), batches, torch.device("cpu")))


def test_prefetcher_stops_cleanly_when_the_consumer_leaves():
    pixels = np.zeros((40, 3, 2, 2), np.uint8)
    it = iter(fdata.Prefetcher(pixels, np.zeros(40), sampler.index_batches(np.arange(40), 1), torch.device("cpu"), depth=1))
    next(it)
    it.close()  # joins the producer thread; would hang if it blocked on a full queue


def test_augment_is_seeded_light_and_identity_at_zero():
    x = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (4, 3, 32, 32), dtype=np.uint8))
    a = fdata.augment(x, torch.Generator().manual_seed(5))
    assert a.dtype == torch.uint8 and a.shape == x.shape
    assert torch.equal(a, fdata.augment(x, torch.Generator().manual_seed(5)))
    assert not torch.equal(a, x)
    assert torch.equal(fdata.augment(x, torch.Generator(), max_shift=0, brightness=0), x)


def test_augment_shift_moves_content_by_at_most_max_shift():
    x = torch.zeros(1, 3, 20, 20, dtype=torch.uint8)
    x[..., 10, 10] = 200
    places = set()
    for seed in range(6):
        out = fdata.augment(x, torch.Generator().manual_seed(seed), max_shift=0.1, brightness=0)
        [(y, x_)] = (out[0, 0] == 200).nonzero().tolist()
        assert abs(y - 10) <= 2 and abs(x_ - 10) <= 2 and out.sum() == x.sum()
        places.add((y, x_))
    assert len(places) > 1
