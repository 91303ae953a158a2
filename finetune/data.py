"""The fine-tuning data path: decode every image once into a uint8 cache, then batch from it.

150 epochs over PNGs would spend most of the time in zlib and resizing. Instead each image is
decoded and ``Preprocess.prepare``d exactly once (in a thread pool, with a progress bar) into a
``(N, 3, S, S)`` uint8 array — in memory, or an ``np.memmap`` file for cohorts too big for RAM.
Epochs gather batches from that array in a background thread (pinned memory and non-blocking
copies on CUDA), so the device never waits on PNG decoding; ``normalize`` runs on the device.
Under torchrun the file is decoded by all processes together (``distributed.shared_image_cache``).
"""

from __future__ import annotations

import hashlib
import json
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np

from cxrfair.errors import CxrfairError
from cxrfair.io import atomic_path, write_json_atomic

if TYPE_CHECKING:
    import torch

    from cxrfair.extract.preprocess import Preprocess

CACHE_FORMAT = "cxrfair-image-cache"
CACHE_VERSION = 1


def check_images(paths: Sequence[Path], option: str = "--images") -> None:
    """CxrfairError naming the first missing image (before any decoding starts)."""
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise CxrfairError(
            f"image {missing[0]} not found ({len(missing)} of {len(paths)} missing); "
            f"pass the folder holding the cohort's images with {option}"
        )


def decode(path: Path, preprocess: "Preprocess") -> np.ndarray:
    """One image file -> (3, S, S) uint8, exactly as extraction sees it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return preprocess.prepare(im)
    except (OSError, UnidentifiedImageError) as e:
        raise CxrfairError(f"image {path}: cannot be decoded ({e}); replace or remove the file") from None


def cache_key(cohort_hash: str, preprocess: "Preprocess", images_root: str | None) -> str:
    """Short hex id of a cache's content: same cohort, pixels geometry and image files -> same key."""
    text = json.dumps({"cohort": cohort_hash, "pre": preprocess.describe(), "root": images_root}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def fill_cache(out: np.ndarray, paths: Sequence[Path], preprocess: "Preprocess", workers: int, desc: str = "decode",
               progress: bool = True) -> None:
    """Decode ``paths`` into ``out`` with ``workers`` threads (PIL releases the GIL).

    ``out``: (N, 3, S, S) uint8 array, or anything taking ``out[i] = row``.
    """
    from tqdm.auto import tqdm

    def one(i: int) -> int:
        out[i] = decode(paths[i], preprocess)
        return i

    quiet = {} if progress else {"disable": True}  # an explicit disable=False would override $TQDM_DISABLE
    with ThreadPoolExecutor(max_workers=workers) as pool, tqdm(total=len(paths), desc=desc, unit="img", **quiet) as bar:
        for _ in pool.map(one, range(len(paths))):
            bar.update(1)


def image_cache(
    paths: Sequence[Path], preprocess: "Preprocess", *, workers: int = 4, file: Path | None = None,
) -> np.ndarray:
    """All images of a cohort as one uint8 array, decoded once.

    Args:
        paths: N image files, in cohort order.
        preprocess: the model's preprocessing (its ``prepare`` fixes S).
        workers: decoding threads.
        file: None keeps the cache in memory; a path stores it as a raw uint8 memmap (reused on
            later calls when its sidecar ``<file>.json`` matches, written atomically otherwise).

    Returns:
        (N, 3, S, S) uint8 array (``np.memmap`` when ``file`` is given, opened read-only).
    """
    check_images(paths)
    shape = cache_shape(len(paths), preprocess)
    if file is None:
        out = np.empty(shape, dtype=np.uint8)
        fill_cache(out, paths, preprocess, workers)
        return out
    file = Path(file)
    if not cache_is_complete(file, shape):
        with atomic_path(file, option="image cache") as tmp:
            mm = np.memmap(tmp, dtype=np.uint8, mode="w+", shape=shape)
            fill_cache(mm, paths, preprocess, workers)
            mm.flush()
            del mm
        publish_sidecar(file, shape)
    return open_cache(file, shape)


def cache_shape(n: int, preprocess: "Preprocess") -> tuple[int, int, int, int]:
    return (n, 3, preprocess.size, preprocess.size)


def _sidecar(file: Path) -> Path:
    return file.with_name(file.name + ".json")


def _sidecar_content(shape: tuple) -> dict:
    return {"format": CACHE_FORMAT, "version": CACHE_VERSION, "shape": list(shape), "dtype": "uint8"}


def cache_is_complete(file: Path, shape: tuple) -> bool:
    """True when ``file`` and a sidecar describing ``shape`` are both there (the data is then whole)."""
    file = Path(file)
    return file.is_file() and _read_json(_sidecar(file)) == _sidecar_content(shape)


def publish_sidecar(file: Path, shape: tuple) -> None:
    """Mark a complete data file. Written after the data, so a matching sidecar means the data is
    whole (a crash in between only costs a rebuild)."""
    write_json_atomic(_sidecar(Path(file)), _sidecar_content(shape), option="image cache")


def open_cache(file: Path, shape: tuple) -> np.ndarray:
    """The cache file as a read-only (N, 3, S, S) uint8 memmap."""
    return np.memmap(file, dtype=np.uint8, mode="r", shape=shape)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def augment_params(generator: "torch.Generator", b: int, size: int, max_shift: float = 0.04,
                   brightness: float = 0.1) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Random shifts (b, 2) int and brightness scales (b,) float for ``b`` images of ``size`` px.

    Drawn for a whole global batch and indexed by each row's place in it, so every process of a
    distributed run augments its rows exactly as a single process would.
    """
    import torch

    m = int(round(max_shift * size))
    shifts = torch.randint(-m, m + 1, (b, 2), generator=generator)
    scale = 1 + (torch.rand(b, generator=generator) * 2 - 1) * brightness
    return shifts, scale


def apply_augment(x: "torch.Tensor", shifts: "torch.Tensor", scale: "torch.Tensor", max_shift: float = 0.04) -> "torch.Tensor":
    """Shift each image of (B, 3, S, S) uint8 ``x`` by ``shifts`` (zero fill) and scale its brightness."""
    import torch

    b, _, s, _ = x.shape
    m = int(round(max_shift * s))
    padded = torch.nn.functional.pad(x, (m, m, m, m))
    out = torch.stack([padded[i, :, m + dy:m + dy + s, m + dx:m + dx + s] for i, (dy, dx) in enumerate(shifts.tolist())])
    return (out.float() * scale.view(b, 1, 1, 1)).round_().clamp_(0, 255).to(torch.uint8)


def augment(x: "torch.Tensor", generator: "torch.Generator", max_shift: float = 0.04, brightness: float = 0.1) -> "torch.Tensor":
    """Light augmentation on uint8 pixels: a random shift (zero fill) and brightness scale per image.

    Args:
        x: (B, 3, S, S) uint8.
        generator: CPU generator; all randomness comes from it (reproducible, resumable).
        max_shift: largest shift as a fraction of S.
        brightness: scale drawn from [1 - brightness, 1 + brightness].

    Returns:
        (B, 3, S, S) uint8. No flips: left/right anatomy matters on chest X-rays.
    """
    shifts, scale = augment_params(generator, x.shape[0], x.shape[-1], max_shift, brightness)
    return apply_augment(x, shifts, scale, max_shift)


class Prefetcher:
    """Iterate steps as ``(x (b,3,S,S) uint8, y (b,) int64, w (b,) float32, step)`` on ``device``, prepared in a background thread.

    ``steps`` are ``sampler.Step``s (or plain index arrays, taken as unweighted batches). The
    thread gathers rows of the uint8 cache (numpy fancy indexing, cheap next to a training
    step), augments, pins and starts the host-to-device copy, while the main thread trains on the
    previous batch. ``wait_s`` accumulates the time the consumer spent blocked on data.
    """

    def __init__(self, pixels: np.ndarray, labels: np.ndarray, steps: list, device: "torch.device",
                 augment_seed: int | None = None, depth: int = 2):
        from cxrfair.finetune.sampler import Step, plain_steps

        self.steps = [s if isinstance(s, Step) else plain_steps(s, len(s))[0]
                      for s in steps if isinstance(s, Step) or len(s)]
        self.pixels, self.labels = pixels, labels
        self.device, self.augment_seed, self.depth = device, augment_seed, depth
        self.wait_s = 0.0

    def _batch(self, step, gen) -> tuple:
        import torch

        idx = step.rows
        # Sorted gather reads a memmap sequentially; the permutation inside the batch is restored.
        srt = np.argsort(idx, kind="stable")
        rows = np.empty((len(idx),) + self.pixels.shape[1:], dtype=np.uint8)
        rows[srt] = self.pixels[idx[srt]]
        x = torch.from_numpy(rows)
        if gen is not None:  # drawn for the whole global batch, so every process agrees with one
            shifts, scale = augment_params(gen, step.global_size, x.shape[-1])
            pos = torch.from_numpy(np.asarray(step.positions, np.int64))
            x = apply_augment(x, shifts[pos], scale[pos]) if len(idx) else x
        y = torch.from_numpy(self.labels[idx].astype(np.int64))
        w = torch.from_numpy(np.asarray(step.weights, np.float32))
        if self.device.type == "cuda":
            x, y, w = (t.pin_memory().to(self.device, non_blocking=True) for t in (x, y, w))
        return x, y, w, step

    def _produce(self, q: queue.Queue, stop: threading.Event) -> None:
        import torch

        def put(item) -> bool:
            # Give up when the consumer has gone (an exception or break in the training loop).
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        gen = torch.Generator().manual_seed(self.augment_seed) if self.augment_seed is not None else None
        try:
            for step in self.steps:
                if not put(self._batch(step, gen)):
                    return
        except BaseException as e:  # hand any failure to the consumer instead of dying silently
            put(e)
            return
        put(None)

    def __iter__(self) -> Iterator[tuple]:
        q: queue.Queue = queue.Queue(maxsize=self.depth)
        stop = threading.Event()
        thread = threading.Thread(target=self._produce, args=(q, stop), daemon=True)
        thread.start()
        try:
            while True:
                t0 = time.perf_counter()
                item = q.get()
                self.wait_s += time.perf_counter() - t0
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            thread.join()

    def __len__(self) -> int:
        return len(self.steps)


def cache_file_for(out: Path, key: str) -> Path:
    """Where a file-backed image cache lives: a hidden folder of RUNS, shared by runs of one cohort."""
    return Path(out) / ".image-cache" / f"images-{key}.u8"


def cache_bytes(n: int, size: int) -> int:
    return n * 3 * size * size

