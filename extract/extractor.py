"""Streaming, resumable extraction of one model's embeddings over a cohort into an HDF5 cache.

Pipeline: DataLoader workers decode (``Image.open``) and ``Preprocess.prepare`` each image into a
uint8 (3, S, S) array; uint8 batches travel to the device (4x less traffic than float), where
``normalize`` and ``encode_image`` run under ``torch.inference_mode`` (and autocast for bf16/fp16).

Resumability: progress lives in ``FILE.h5.partial/``: a ``manifest.json`` pinning what the rows
mean (model, weights, cohort, precision, rows, chunk size, prompts scored) and one
``chunk-XXXXXX.npy`` per chunk of rows (with ``chunk-XXXXXX.scores.npy`` for models that score
prompts), each written atomically, then ``chunk-XXXXXX.sha256.json`` with the SHA-256 of each of
the chunk's files, which marks the chunk done. A chunk is one loader batch, aligned to fixed row
ranges, so a resumed run batches every row exactly as an uninterrupted one and yields identical
arrays. A resumed run redoes a chunk without its checksum file (interrupted while being written,
or written by a cxrfair before checksums) and, with a warning, one whose files no longer match
their checksums (truncated, corrupt, replaced). (One small file per chunk, not a manifest entry,
so that writing a chunk costs the same for the millionth image as for the first.) When every
chunk is there the cache is assembled with ``write_cache`` and the partial folder removed.

Prompt scores: a model whose zero-shot needs more than pooled embeddings (GLoRIA: the word to
image-region attention term) exposes ``encode_image_local``, ``encode_text_words``,
``global_similarity`` and ``local_similarity`` in ``FoundationModel.extras``; for such a model
every image is scored against every distinct prompt of every prompt set while its batch is on
the device, and the cache stores the (N, P) global and local similarities (``PromptScores``).

Writing: a folder that cannot be written or a disk that fills up stops with one line naming the
path (``CxrfairError``); the cache itself only ever appears whole, and the chunks already written
stay for the rerun.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cxrfair.errors import CxrfairError, CxrfairWarning
from cxrfair.extract.cache import PromptScores, TextEmbeddings, write_cache
from cxrfair.extract.cohort import load_cohort
from cxrfair.extract.prompts import MULTILABEL_SETS, PROMPT_SETS, build_all, build_all_for, describe
from cxrfair.extract.registry import FoundationModel, TextTokenizer, get_spec, load_model
from cxrfair.io import atomic_path, ensure_writable_dir, sha256_file, write_json_atomic

if TYPE_CHECKING:  # torch is imported where a function runs the model, so importing this module stays light
    import torch

PARTIAL_FORMAT = "cxrfair-extract-partial"
PRECISIONS = ("fp32", "bf16", "fp16")
# Fields of the manifest that must agree before chunks from an earlier run may be reused.
PINNED = ("model", "weights_id", "cohort_hash", "precision", "rows", "chunk_rows", "prompt_scores", "features")
FEATURES = ("projected", "unprojected")
# What a model's extras must offer for prompt scores to be stored (see the module docstring).
SCORING_EXTRAS = ("encode_image_local", "encode_text_words", "global_similarity", "local_similarity")
# Test hook: SIGKILL ourselves after this many chunks are written (proves kill -9 resumability).
KILL_AFTER_ENV = "CXRFAIR_EXTRACT_KILL_AFTER_CHUNKS"


@dataclass(frozen=True)
class ExtractConfig:
    """One ``cxrfair extract`` invocation."""

    model: str  # registry name
    cohort: Path  # cohort folder (cohort.csv + cohort.json)
    out: Path  # the .h5 cache to write
    batch_size: int = 64  # images per forward pass (= rows per resumable chunk)
    workers: int = 2  # DataLoader decode workers (0: decode in this process)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; stored embeddings are float32)
    weights: Path | None = None  # overrides the env var / hub cache
    images: Path | None = None  # images root, overriding the one in cohort.json
    force: bool = False  # discard any partial progress or existing cache at ``out``
    skip_bad: bool = False  # drop unreadable images (recorded in attrs) instead of failing
    prompt_seed: int = 0  # seed of the sampled prompt sets
    progress: bool = True  # tqdm bar with images/s
    rows: tuple[int, int] | None = None  # (start, stop) shard of cohort rows; None = all
    extra_attrs: dict = field(default_factory=dict)  # merged into the cache's attributes
    prompt_scores: bool = True  # store per-image prompt similarities where the model needs them (GLoRIA)
    features: str = "projected"  # projected (encode_image: the joint image-text space) | unprojected (before it; no text)

    def __post_init__(self) -> None:
        if self.features not in FEATURES:
            raise CxrfairError(f"--features {self.features}: choose one of {', '.join(FEATURES)}")
        if self.batch_size < 1:
            raise CxrfairError(f"--batch-size {self.batch_size}: must be >= 1")
        if self.workers < 0:
            raise CxrfairError(f"--workers {self.workers}: must be >= 0")
        if self.precision not in PRECISIONS:
            raise CxrfairError(f"--precision {self.precision}: choose one of {', '.join(PRECISIONS)}")


@dataclass
class ExtractResult:
    """What an extraction did: ``status`` is "written" or "exists" (complete cache left alone)."""

    path: Path
    status: str
    n_images: int
    skipped: list[dict]
    seconds: float
    images_per_s: float


# --- the public entry point --------------------------------------------------------------------

def extract(config: ExtractConfig) -> ExtractResult:
    """Embed the cohort's images (and every prompt set's class texts) into ``config.out``."""
    t0 = time.perf_counter()
    cohort = load_cohort(config.cohort)
    check_features(get_spec(config.model), config.features)  # unknown model / no such features: fail before any file
    existing = check_existing_cache(config.out, config.model, cohort.hash, config.force, config.features)
    if existing is not None:
        # A partial folder beside a complete cache is left over from a run killed after the rename.
        shutil.rmtree(partial_dir(config.out), ignore_errors=True)
        return ExtractResult(config.out, "exists", existing, [], time.perf_counter() - t0, 0.0)
    # A folder that cannot be written fails here, before the model is loaded.
    ensure_writable_dir(Path(config.out).parent, "--out")
    start, stop = config.rows or (0, len(cohort.table))
    paths = [str(p) for p in cohort.image_paths(config.images)[start:stop]]
    device = resolve_device(config.device)
    fm = load_on(config.model, config.weights, device)
    # GLoRIA's own scoring (max over a class's prompts, z-scored per class) is multi-class only.
    scored = config.prompt_scores and cohort.task != "multilabel" and config.features == "projected"
    scorer = prompt_scorer(fm, cohort.classes, device, config) if scored else None
    partial, config = start_partial(config, fm, cohort.hash, (start, stop), scorer)
    t1 = time.perf_counter()
    n_new = embed_missing(fm, paths, partial, config.batch_size, config, device, scorer)
    rate = n_new / max(time.perf_counter() - t1, 1e-9)
    n, skipped = assemble(partial, fm, cohort, paths, config, device, scorer)
    return ExtractResult(config.out, "written", n, skipped, time.perf_counter() - t0, rate)


def start_partial(config: ExtractConfig, fm: "FoundationModel", cohort_hash: str, rows: tuple[int, int],
                  scorer: "PromptScorer | None" = None):
    """Open (or resume) the partial folder; returns it and the config with the chunk size in force.

    A resumed run keeps the first run's chunk size whatever ``--batch-size`` says, so every row is
    batched as in an uninterrupted run.
    """
    folder = partial_dir(config.out)
    chunk_rows = resumed_chunk_rows(folder, config.force) or config.batch_size
    ident = {"model": config.model, "weights_id": fm.weights_id, "cohort_hash": cohort_hash,
             "precision": config.precision, "rows": list(rows), "chunk_rows": chunk_rows,
             "prompt_scores": scorer.digest if scorer else None,
             # Absent for projected features, so partial folders of earlier versions still resume.
             **({"features": config.features} if config.features != "projected" else {})}
    return open_partial(folder, ident, config.force), replace(config, batch_size=chunk_rows)


def assemble(folder: Path, fm: "FoundationModel", cohort, paths: list[str], config: ExtractConfig,
             device: "torch.device", scorer: "PromptScorer | None" = None) -> tuple[int, list[dict]]:
    """Chunks + text embeddings + provenance -> the cache (atomically); then drop the partial folder.

    Returns (rows written, skipped images).
    """
    start, stop = config.rows or (0, len(cohort.table))
    emb, scores, bad = load_chunks(folder, len(paths), config.batch_size, scored=scorer is not None)
    rows = cohort.table.iloc[start:stop].reset_index(drop=True)
    skipped = describe_bad(bad, rows, paths)
    keep = np.setdiff1d(np.arange(len(paths)), np.fromiter(bad, int, len(bad)))
    # Unprojected features are not in the text's space: no text sets, so no zero-shot from them.
    text = (text_embeddings_all(fm, cohort.classes, device, config.precision, config.prompt_seed, cohort.task)
            if config.features == "projected" else {})
    attrs = provenance(fm, cohort, config, device, skipped, scorer) | text_truncation(fm, text) | dict(config.extra_attrs)
    prompt_scores = None if scorer is None else PromptScores(scorer.prompts, scores[keep, 0], scores[keep, 1])
    check_free_space(config.out, emb[keep].nbytes + (0 if scores is None else scores[keep].nbytes))
    with writing(config.out, "the cache"):
        write_cache(config.out, image_embeddings=emb[keep], cohort_table=rows.iloc[keep].reset_index(drop=True),
                    classes=cohort.classes, text=text, attrs=attrs, prompt_scores=prompt_scores)
    shutil.rmtree(folder, ignore_errors=True)
    return len(keep), skipped


@contextlib.contextmanager
def writing(path: Path, what: str):
    """Turn an OSError while writing ``what`` at ``path`` (read-only folder, full disk) into one line."""
    try:
        yield
    except OSError as e:
        reason = e.strerror or str(e)
        raise CxrfairError(f"--out {path}: cannot write {what} ({reason}); free disk space or choose a writable "
                           "location, then rerun (chunks already written are kept and reused)") from None


def check_features(spec, features: str) -> None:
    """Unprojected features need a model with ``encode_image_unprojected`` (``ModelSpec.unprojected_dim``)."""
    if features == "unprojected" and spec.unprojected_dim is None:
        raise CxrfairError(f"--features unprojected: model {spec.name} has no features before a projection "
                           f"({spec.embedding} embedding); use --features projected")


def check_free_space(out: Path, payload_bytes: int) -> None:
    """Refuse to start writing the cache where it cannot fit (HDF5 may crash on a full disk).

    ``payload_bytes`` is the arrays' size; text, the cohort table and HDF5 overhead get a margin.
    """
    need = int(payload_bytes * 1.1) + (8 << 20)
    free = shutil.disk_usage(Path(out).parent).free
    if free < need:
        raise CxrfairError(f"--out {out}: the cache needs about {need / 2**20:.1f} MB but only {free / 2**20:.1f} MB "
                           "are free there; free disk space or choose another location, then rerun "
                           "(chunks already written are kept and reused)")


# --- what is already there ---------------------------------------------------------------------

def partial_dir(out: Path) -> Path:
    """Where progress towards ``out`` is kept: ``FILE.h5.partial/``."""
    return Path(out).with_name(Path(out).name + ".partial")


def cache_identity(path: Path) -> dict | None:
    """The (model, cohort_hash, weights_id, complete) attributes of an existing HDF5 file, torch-free."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()
                    if k in ("model", "cohort_hash", "weights_id", "complete", "format", "n_images", "features")}
    except OSError:
        return None


def check_existing_cache(out: Path, model: str, cohort_hash: str, force: bool, features: str = "projected") -> int | None:
    """None if extraction should go on; the row count of a complete cache for the same model+cohort.

    Raises CxrfairError if ``out`` holds something else (another model or cohort, not a cache).
    """
    out = Path(out)
    if force or not out.exists():
        return None
    ident = cache_identity(out)
    if ident is None or ident.get("format") != "cxrfair-embeddings":
        raise CxrfairError(f"--out {out}: exists and is not a cxrfair embedding cache; choose another path or pass --force")
    if ident.get("model") != model or ident.get("cohort_hash") != cohort_hash:
        raise CxrfairError(
            f"--out {out}: holds model {ident.get('model')!r} for cohort {str(ident.get('cohort_hash'))[:12]}, "
            f"not model {model!r} for cohort {cohort_hash[:12]}; one file per (model, cohort): "
            "choose another --out or pass --force to replace it")
    if ident.get("features", "projected") != features:
        raise CxrfairError(f"--out {out}: holds {ident.get('features', 'projected')} features, not {features}; "
                           "choose another --out or pass --force to replace it")
    return int(ident.get("n_images", 0))


def resumed_chunk_rows(folder: Path, force: bool) -> int | None:
    """The chunk size of an unfinished run in ``folder`` (a resumed run keeps it, whatever --batch-size says)."""
    manifest = folder / "manifest.json"
    if force or not manifest.is_file():
        return None
    return int(read_manifest(manifest).get("chunk_rows", 0)) or None


def read_manifest(manifest: Path) -> dict:
    """The partial folder's manifest; CxrfairError if it does not read back (written atomically, so rare)."""
    try:
        old = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        old = None
    if not isinstance(old, dict):
        raise CxrfairError(f"partial extraction {manifest.parent}: {manifest.name} is unreadable; "
                           "pass --force to start over")
    return old


def open_partial(folder: Path, ident: dict, force: bool) -> Path:
    """Create or reuse ``folder`` for progress of ``ident``; refuse to mix runs that differ."""
    manifest = folder / "manifest.json"
    with writing(folder, "extraction progress"):
        if force and folder.exists():
            shutil.rmtree(folder)
        if manifest.is_file():
            old = read_manifest(manifest)
            diff = [f"{k}: {old.get(k)!r} there, {ident.get(k)!r} now" for k in PINNED if old.get(k) != ident.get(k)]
            if diff:
                raise CxrfairError(f"partial extraction {folder} was started with different settings ({'; '.join(diff)}); "
                                   "rerun with the same settings to finish it, or pass --force to start over")
            return folder
        created = not folder.exists()
        try:
            folder.mkdir(parents=True, exist_ok=True)
            write_json_atomic(manifest, {"format": PARTIAL_FORMAT, **ident})
        except OSError:
            if created:  # leave nothing behind when not even the manifest could be written
                shutil.rmtree(folder, ignore_errors=True)
            raise
    return folder


def _chunk_file(folder: Path, index: int) -> Path:
    return folder / f"chunk-{index:06d}.npy"


def _bad_file(folder: Path, index: int) -> Path:
    return folder / f"chunk-{index:06d}.bad.json"


def _scores_file(folder: Path, index: int) -> Path:
    return folder / f"chunk-{index:06d}.scores.npy"


def _sums_file(folder: Path, index: int) -> Path:
    return folder / f"chunk-{index:06d}.sha256.json"


def _chunk_files(folder: Path, index: int) -> list[Path]:
    """Every file of one chunk, its checksum file last."""
    return [_chunk_file(folder, index), _scores_file(folder, index), _bad_file(folder, index), _sums_file(folder, index)]


def chunk_ranges(n: int, chunk_rows: int) -> list[range]:
    """Fixed row ranges [i*chunk_rows, (i+1)*chunk_rows) covering ``n`` rows (last one shorter)."""
    return [range(s, min(s + chunk_rows, n)) for s in range(0, n, chunk_rows)]


def pending_chunks(folder: Path, n: int, chunk_rows: int, scored: bool = False) -> list[int]:
    """Indices of the chunks still to embed: not finished (no checksum file), or not matching
    the checksums recorded when written (a CxrfairWarning says which).

    A chunk whose files are truncated, corrupt or replaced (a crash of the disk, a copy cut
    short, a stray write) is deleted here so that it is redone rather than used or failing every rerun.
    """
    pending = []
    for i, rows in enumerate(chunk_ranges(n, chunk_rows)):
        if not _chunk_file(folder, i).is_file() or not _sums_file(folder, i).is_file():
            pending.append(i)  # never finished (its checksums are written last)
        elif not chunk_is_sound(folder, i, len(rows), scored):
            warnings.warn(f"partial extraction {folder}: chunk {i} (rows {rows.start}-{rows.stop - 1}) does not match "
                          "the checksums recorded when it was written (truncated, corrupt or replaced); redoing it",
                          CxrfairWarning, stacklevel=2)
            pending.append(i)
        else:
            continue
        for f in _chunk_files(folder, i):
            f.unlink(missing_ok=True)
    return pending


def chunk_is_sound(folder: Path, index: int, rows: int, scored: bool) -> bool:
    """True if the chunk's files match the SHA-256 recorded when it was written and its arrays have ``rows`` rows."""
    try:
        sums = json.loads(_sums_file(folder, index).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    files = [_chunk_file(folder, index)] + ([_scores_file(folder, index)] if scored else [])
    present = [f for f in _chunk_files(folder, index)[:3] if f.is_file()]
    if not isinstance(sums, dict) or sorted(sums) != sorted(f.name for f in present):
        return False
    for f in present:
        try:
            if sha256_file(f) != sums[f.name]:
                return False
        except OSError:
            return False
    for f in files:
        try:
            if np.load(f, mmap_mode="r").shape[0] != rows:  # reads the header, checks the size
                return False
        except (OSError, ValueError, EOFError, IndexError):
            return False
    return True


def write_chunk(folder: Path, index: int, emb: np.ndarray, bad: dict[int, str], scores: np.ndarray | None = None) -> None:
    """Save one chunk atomically: its bad rows, prompt scores and (n, D) embeddings, then the
    SHA-256 of each, which marks it done (``pending_chunks`` checks them on resume)."""
    with writing(folder, f"chunk {index}"):
        written = []
        if bad:
            write_json_atomic(_bad_file(folder, index), {str(k): v for k, v in bad.items()})
            written.append(_bad_file(folder, index))
        if scores is not None:
            _save_npy(_scores_file(folder, index), scores)
            written.append(_scores_file(folder, index))
        _save_npy(_chunk_file(folder, index), emb)
        written.append(_chunk_file(folder, index))
        write_json_atomic(_sums_file(folder, index), {f.name: sha256_file(f) for f in written})


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, np.asarray(array, dtype=np.float32))


def load_chunks(folder: Path, n: int, chunk_rows: int, scored: bool = False
                ) -> tuple[np.ndarray, np.ndarray | None, dict[int, str]]:
    """All chunks joined: (n, D) float32 embeddings, (n, 2, P) prompt scores (or None) and
    {row: error} of the unreadable rows."""
    parts, scores, bad = [], [], {}
    for i, _ in enumerate(chunk_ranges(n, chunk_rows)):
        parts.append(np.load(_chunk_file(folder, i)))
        if scored:
            scores.append(np.load(_scores_file(folder, i)))
        if _bad_file(folder, i).is_file():
            bad.update({int(k): v for k, v in json.loads(_bad_file(folder, i).read_text()).items()})
    return np.concatenate(parts), (np.concatenate(scores) if scored else None), bad


# --- the image stream --------------------------------------------------------------------------

class ImageRows:
    """Dataset of cohort rows: index -> (row, uint8 (3, S, S) pixels, error or "")."""

    def __init__(self, paths: list[str], rows: list[int], preprocess) -> None:
        self.paths, self.rows, self.preprocess = paths, rows, preprocess

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        from PIL import Image, UnidentifiedImageError

        row = self.rows[i]
        try:
            with Image.open(self.paths[row]) as im:
                return row, self.preprocess.prepare(im), ""
        except (OSError, ValueError, SyntaxError, UnidentifiedImageError) as e:
            # Recorded, not raised: the main process decides (error naming the files, or --skip-bad).
            s = self.preprocess.size
            return row, np.zeros((3, s, s), np.uint8), f"{type(e).__name__}: {e}"


def collate_rows(items):
    """[(row, (3,S,S) uint8, err)] -> (rows list, (B,3,S,S) uint8 tensor, errors list)."""
    import torch

    rows, pixels, errors = zip(*items)
    return list(rows), torch.from_numpy(np.stack(pixels)), list(errors)


def make_loader(paths: list[str], rows: list[int], preprocess, batch_size: int, workers: int, pin: bool):
    """A sequential DataLoader over ``rows``; batches align with chunks because rows come chunk by chunk."""
    import sys

    from torch.utils.data import DataLoader

    # Forking a process that has started JAX's thread pool can deadlock the child; in that case
    # (e.g. extraction called from Python after probes ran) start workers with spawn instead.
    context = "spawn" if workers and "jax" in sys.modules else None
    return DataLoader(ImageRows(paths, rows, preprocess), batch_size=batch_size, shuffle=False,
                      num_workers=workers, collate_fn=collate_rows, pin_memory=pin,
                      persistent_workers=False, prefetch_factor=4 if workers else None,
                      multiprocessing_context=context)


def embed_missing(fm: "FoundationModel", paths: list[str], folder: Path, chunk_rows: int,
                  config: ExtractConfig, device: "torch.device", scorer: "PromptScorer | None" = None) -> int:
    """Embed (and score, with a scorer) every chunk not yet on disk; returns the number of images embedded now."""
    pending = pending_chunks(folder, len(paths), chunk_rows, scored=scorer is not None)
    ranges = chunk_ranges(len(paths), chunk_rows)
    rows = [r for i in pending for r in ranges[i]]
    if not rows:
        return 0
    loader = make_loader(paths, rows, fm.preprocess, chunk_rows, config.workers, device.type == "cuda")
    bar = progress_bar(len(paths), len(paths) - len(rows), config.progress, config.model)
    kill_after = int(os.environ.get(KILL_AFTER_ENV, "0") or 0)
    for n_done, (index, (batch_rows, pixels, errors)) in enumerate(zip(pending, loader), start=1):
        bad = {r: e for r, e in zip(batch_rows, errors) if e}
        if bad and not config.skip_bad:
            raise CxrfairError(bad_images_message(bad, paths))
        if scorer is None:
            write_chunk(folder, index, encode_batch(fm, pixels, device, config.precision, config.features), bad)
        else:
            emb, scores = scorer.encode(pixels, device, config.precision)
            write_chunk(folder, index, emb, bad, scores)
        bar.update(len(batch_rows))
        if kill_after and n_done >= kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
    bar.close()
    return len(rows)


def bad_images_message(bad: dict[int, str], paths: list[str]) -> str:
    """One line naming the unreadable files (first five) and the way out."""
    named = "; ".join(f"{paths[r]} ({e})" for r, e in list(bad.items())[:5])
    more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
    return (f"unreadable image(s): {named}{more}; fix or replace them, or pass --skip-bad to leave them out "
            "(recorded in the cache)")


def encode_batch(fm: "FoundationModel", pixels: "torch.Tensor", device: "torch.device", precision: str,
                 features: str = "projected") -> np.ndarray:
    """(B, 3, S, S) uint8 -> (B, D) float32 embeddings (normalised on the device, not L2-normalised);
    ``features="unprojected"``: (B, D') from ``encode_image_unprojected``."""
    import torch

    encode = fm.encode_image_unprojected if features == "unprojected" else fm.encode_image
    with torch.inference_mode(), autocast(device, precision):
        x = fm.preprocess.normalize(pixels.to(device, non_blocking=True))
        return encode(x).float().cpu().numpy()


def autocast(device: "torch.device", precision: str):
    """Autocast context for bf16/fp16; a no-op for fp32."""
    import contextlib

    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def progress_bar(total: int, initial: int, enabled: bool, model: str):
    """tqdm bar in images (its rate reads images/s); resumed runs start at the rows already done."""
    from tqdm.auto import tqdm

    # `disable` only when asked: otherwise tqdm's own defaults (TQDM_DISABLE, non-TTY) apply.
    return tqdm(total=total, initial=initial, unit="img", desc=f"extract {model}", smoothing=0.1,
                **({} if enabled else {"disable": True}))


# --- text side ---------------------------------------------------------------------------------

def class_text_embeddings(fm: "FoundationModel", prompts: list, device: "torch.device", precision: str) -> np.ndarray:
    """[draw][class] prompt lists -> (draws, C, D) float32: mean of each class's L2-normalised prompt embeddings."""
    unique = sorted({p for draw in prompts for plist in draw for p in plist})
    if _fixed_length_tokens(fm, unique[:2]):
        # Tokens padded to a fixed context: a prompt's embedding does not depend on its call, so
        # every distinct prompt is encoded once, in large batches.
        table = dict(zip(unique, _encode_prompts(fm, unique, device, precision)))
        per_list = lambda plist: np.stack([table[p] for p in plist])  # noqa: E731
    else:
        # Tokenizers that pad to the longest prompt of the call (MedCLIP, GLoRIA): encode each
        # class's list in one call, as the original zero-shot code does.
        per_list = lambda plist: _encode_prompts(fm, list(plist), device, precision)  # noqa: E731
    memo: dict[tuple, np.ndarray] = {}
    for plist in (tuple(pl) for draw in prompts for pl in draw):
        if plist not in memo:
            memo[plist] = per_list(plist).mean(0)
    return np.stack([np.stack([memo[tuple(pl)] for pl in draw]) for draw in prompts]).astype(np.float32)


def _fixed_length_tokens(fm: "FoundationModel", sample: list[str]) -> bool:
    """True if ``tokenize`` returns a plain tensor whose width does not depend on the prompts."""
    import torch

    a, b = fm.tokenize(sample[:1]), fm.tokenize(sample)
    return isinstance(a, torch.Tensor) and a.shape[-1] == b.shape[-1] == fm.tokenize(["x"]).shape[-1]


def _encode_prompts(fm: "FoundationModel", prompts: list[str], device: "torch.device", precision: str,
                    batch: int = 256) -> np.ndarray:
    """(T,) prompts -> (T, D) L2-normalised text embeddings, ``batch`` prompts per call."""
    import torch

    out = []
    for i in range(0, len(prompts), batch):
        with torch.inference_mode(), autocast(device, precision):
            tokens = fm.tokenize(prompts[i:i + batch])
            tokens = tokens.to(device) if hasattr(tokens, "to") else tokens
            t = fm.encode_text(tokens).float()
        out.append(torch.nn.functional.normalize(t, dim=-1).cpu().numpy())
    return np.concatenate(out)


def text_embeddings_all(fm: "FoundationModel", classes: list[str], device: "torch.device", precision: str, seed: int,
                        task: str = "multiclass") -> dict:
    """Every prompt set of ``task`` for ``classes`` -> TextEmbeddings; models without a text tower get none.

    Multi-class sets are (draws, C, D); multi-label sets (draws, C, 2, D): per condition the mean
    of the negative prompts' and of the positive prompts' normalised embeddings.
    """
    if not fm.spec.zero_shot:
        return {}
    if task != "multilabel":  # the same call prompt_scorer makes, so scores and text share their prompts
        sets = build_all(classes, seed=seed)
        return {name: TextEmbeddings(class_text_embeddings(fm, p, device, precision), p) for name, p in sets.items()}
    sets = build_all_for(task, classes, seed=seed)
    return {name: TextEmbeddings(pair_text_embeddings(fm, p, device, precision), p) for name, p in sets.items()}


def text_truncation(fm: "FoundationModel", text: dict) -> dict:
    """``{"text_truncation": {...}}`` when the text encoder cut a prompt of ``text`` (the prompt
    sets' TextEmbeddings) at its limit (``registry.TextTokenizer.truncation``), else ``{}``."""
    if not text or not isinstance(fm.tokenize, TextTokenizer):
        return {}
    cut = fm.tokenize.truncation(sorted({p for te in text.values() for p in _strings(te.prompts)}))
    return {"text_truncation": cut} if cut else {}


def _strings(nested) -> list[str]:
    """The strings of nested prompt lists ([draw][class][k], multi-label [draw][class][2][k])."""
    return [nested] if isinstance(nested, str) else [s for item in nested for s in _strings(item)]


def pair_text_embeddings(fm: "FoundationModel", prompts: list, device: "torch.device", precision: str) -> np.ndarray:
    """[draw][condition][2] prompt lists -> (draws, C, 2, D): the pair's lists embedded as classes."""
    flat = [[plist for pair in draw for plist in pair] for draw in prompts]  # [draw][2C], (neg, pos) per condition
    emb = class_text_embeddings(fm, flat, device, precision)
    return emb.reshape(emb.shape[0], -1, 2, emb.shape[-1])


@dataclass
class PromptScorer:
    """Scores image batches against every distinct prompt, for models with ``SCORING_EXTRAS``.

    Attributes:
        fm: the model (its extras compute the similarities).
        prompts: the P distinct prompts of every prompt set, sorted (the scores' column order).
        text_global: (P, D) float32 sentence embeddings on the device.
        words: (P, D, L) float32 word embeddings, cut after the longest prompt's last word.
        counts: P word counts (what ``local_similarity`` takes).
        digest: SHA-256 of the prompt list; pins a partial folder to these prompts.
    """

    fm: "FoundationModel"
    prompts: list
    text_global: "torch.Tensor"
    words: "torch.Tensor"
    counts: list
    digest: str

    def encode(self, pixels: "torch.Tensor", device: "torch.device", precision: str) -> tuple[np.ndarray, np.ndarray]:
        """(B, 3, S, S) uint8 -> (B, D) embeddings (``encode_image``'s) and (B, 2, P) scores
        (index 0 global, 1 local), in float32 whatever the encoder's precision."""
        import torch

        extras = self.fm.extras
        with torch.inference_mode():
            with autocast(device, precision):
                x = self.fm.preprocess.normalize(pixels.to(device, non_blocking=True))
                emb, local = extras["encode_image_local"](x)
            emb, local = emb.float(), local.float()
            scores = torch.stack([extras["global_similarity"](emb, self.text_global),
                                  extras["local_similarity"](local, self.words, self.counts)], dim=1)
        return emb.cpu().numpy(), scores.float().cpu().numpy()


def prompt_scorer(fm: "FoundationModel", classes: list[str], device: "torch.device", config: ExtractConfig,
                  batch: int = 64) -> PromptScorer | None:
    """A PromptScorer for every prompt of every set, or None if the model needs none."""
    import hashlib

    import torch

    if not fm.spec.zero_shot or not all(k in fm.extras for k in SCORING_EXTRAS):
        return None

    sets = build_all(classes, seed=config.prompt_seed)
    prompts = sorted({p for draws in sets.values() for draw in draws for plist in draw for p in plist})
    sentences, words, counts = [], [], []
    for i in range(0, len(prompts), batch):
        with torch.inference_mode(), autocast(device, config.precision):
            tokens = fm.tokenize(prompts[i:i + batch])
            tokens = tokens.to(device) if hasattr(tokens, "to") else tokens
            sentences.append(fm.encode_text(tokens).float())
            w, c = fm.extras["encode_text_words"](tokens)
        words.append(w.float())
        counts += [int(n) for n in c]
    width = max(counts) + 2  # [CLS], the words, [SEP]: local_similarity reads positions 1..n
    words = torch.cat([torch.nn.functional.pad(w[:, :, :width], (0, max(0, width - w.shape[2]))) for w in words])
    digest = hashlib.sha256(json.dumps(prompts).encode()).hexdigest()
    return PromptScorer(fm, prompts, torch.cat(sentences), words, counts, digest)


# --- model, device, provenance -----------------------------------------------------------------

def resolve_device(name: str) -> "torch.device":
    """``auto`` -> cuda if available else cpu; ``cuda`` without a GPU is a CxrfairError."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CxrfairError(f"--device {name}: no CUDA device is available; use --device cpu or auto")
    try:
        return torch.device(name)
    except RuntimeError:
        raise CxrfairError(f"--device {name}: not a device; use auto, cpu or cuda") from None


def load_on(model: str, weights: Path | None, device: "torch.device") -> "FoundationModel":
    """Load ``model`` in eval mode on ``device``."""
    fm = load_model(model, weights=weights, device="cpu")
    fm.model.to(device).eval()
    return fm


def versions() -> dict[str, str]:
    """Versions of the packages that shape the numbers."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "open_clip_torch", "transformers", "timm", "cxrfair"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def provenance(fm: "FoundationModel", cohort, config: ExtractConfig, device: "torch.device", skipped: list[dict],
               scorer: PromptScorer | None = None) -> dict[str, Any]:
    """The cache's attributes: what made these numbers."""
    sets = MULTILABEL_SETS if cohort.task == "multilabel" else PROMPT_SETS
    return {
        "model": fm.name, "weights_id": fm.weights_id, "cohort_hash": cohort.hash, "logit_scale": fm.logit_scale,
        # Where the weights came from (tag, hub id @ revision, absolute folder) and what the embedding is.
        "weights_source": fm.source or fm.spec.weights_source,
        "embedding": fm.spec.embedding if config.features == "projected" else "before the projection",
        "task": cohort.task, "attributes": cohort.attributes,
        # "projected": encode_image (the joint image-text space); "unprojected": the features before it.
        "features": config.features,
        "preprocessing": fm.preprocess.describe(), "versions": versions(), "device": str(device),
        "precision": config.precision, "batch_size": config.batch_size,
        "prompt_sets": ({name: describe(name, cohort.task) for name in sets}
                        if fm.spec.zero_shot and config.features == "projected" else {}),
        "prompt_seed": config.prompt_seed, "skipped_images": skipped,
        "cohort_folder": str(Path(config.cohort).resolve()),
        # What zero-shot from this cache uses by default: "both" (global + local, GLoRIA's own
        # scoring) where prompt scores are stored, else the cosine of the pooled embeddings.
        "zero_shot_term": "both" if scorer else fm.extras.get("zero_shot_term", "global"),
        **({"prompt_scores": {"prompts": len(scorer.prompts), "global": "cosine(image global, sentence embedding)",
                              "local": "the model's local_similarity (word to image-region attention)"}}
           if scorer else {}),
        # A contrastively fine-tuned model (extract.adapted): which run, mitigation and base weights made it.
        **({"adapted": fm.extras["adapted"]} if "adapted" in fm.extras else {}),
    }


def describe_bad(bad: dict[int, str], table, paths: list[str]) -> list[dict]:
    """[{image_id, path, error}] for the skipped rows (row indices relative to ``table``)."""
    return [{"image_id": str(table.iloc[r]["image_id"]), "path": paths[r], "error": e} for r, e in sorted(bad.items())]


__all__ = ["ExtractConfig", "ExtractResult", "extract", "partial_dir", "class_text_embeddings", "encode_batch",
           "chunk_ranges", "resolve_device"]
