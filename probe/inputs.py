"""Reading a cache into probe inputs, and the checks made before anything is written.

Everything that can make a probe command fail for a reason the user can fix is checked here,
before training, so a failing command leaves the runs folder as it was.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cxrfair.analysis.runs import safe_name  # noqa: F401  (re-exported; the run-id owner defines it)
from cxrfair.errors import CxrfairError

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class ProbeInputs:
    """One cache, split for probing.

    Attributes:
        x: split -> (N_split, D) float32 image embeddings (as the encoder output them).
        y: split -> (N_split,) int32 labels indexing ``classes``.
        rows: val and test cohort rows, in the order of ``predicted_probs``' rows.
        classes: class names (cohort order).
        model, cohort_hash, logit_scale, source: from the cache.
        text: prompt set -> (draws, C, D) float32 class text embeddings.
        prompts: prompt set -> [draw][class] prompt lists (what ``text`` was built from).
        prompt_scores: "val" / "test" -> ``PromptScores`` of those rows (GLoRIA caches), else None.
    """

    x: dict
    y: dict
    rows: pd.DataFrame
    classes: list
    model: str
    cohort_hash: str
    logit_scale: float
    source: str
    text: dict
    prompts: dict
    prompt_scores: dict | None = None


def load_inputs(cache_path: Path | str) -> ProbeInputs:
    """Read and check a cache; CxrfairError naming the file for anything unusable."""
    from cxrfair.extract.cache import read_cache  # h5py + pandas; kept out of `import cxrfair.probe`

    cache = read_cache(cache_path)
    where = f"cache {cache_path}"
    emb = np.asarray(cache.image_embeddings, dtype=np.float32)
    _check_finite(emb, cache.table, where)
    labels = cache.labels()
    if (labels < 0).any():
        raise CxrfairError(f"{where}: a cohort row has a label outside the classes {cache.classes}; rebuild the cohort and re-extract")
    x, y = {}, {}
    for split in SPLITS:
        mask = cache.split_mask(split)
        if not mask.any():
            raise CxrfairError(f"{where}: the cohort has no {split} rows; probes need train, val and test splits")
        x[split], y[split] = emb[mask], labels[mask].astype(np.int32)
    rows = pd.concat([cache.table[cache.split_mask(s)] for s in ("val", "test")], ignore_index=True)
    text = {name: np.asarray(te.embeddings, dtype=np.float32) for name, te in cache.text.items()}
    prompts = {name: te.prompts for name, te in cache.text.items()}
    return ProbeInputs(x, y, rows, list(cache.classes), str(cache.model), str(cache.cohort_hash),
                       float(cache.logit_scale), str(cache_path), text, prompts, _split_scores(cache, where))


def _split_scores(cache, where: str) -> dict | None:
    """The cache's prompt scores (if any) for the val and test rows; non-finite ones refused."""
    from cxrfair.extract.cache import PromptScores

    scores = cache.prompt_scores
    if scores is None:
        return None
    if not (np.isfinite(scores.global_sim).all() and np.isfinite(scores.local_sim).all()):
        raise CxrfairError(f"{where}: prompt scores are NaN or infinite; re-run `cxrfair extract --force` for this model")
    return {s: PromptScores(scores.prompts, scores.global_sim[cache.split_mask(s)], scores.local_sim[cache.split_mask(s)])
            for s in ("val", "test")}


def _check_finite(emb: np.ndarray, table: pd.DataFrame, where: str) -> None:
    bad = ~np.isfinite(emb).all(axis=1)
    if bad.any():
        first = table["image_id"].iloc[int(np.flatnonzero(bad)[0])]
        raise CxrfairError(f"{where}: {int(bad.sum())} image embedding(s) are NaN or infinite (first: {first}); "
                           "re-run `cxrfair extract --force` for this model")




def check_runs_dir(out: Path | str, cohort_hash: str, run_ids: list[str], force: bool) -> None:
    """Refuse a runs folder that holds another cohort's runs, or (without force) these run ids.

    Reads only run.json files, so a folder with unrelated content still fails clearly.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CxrfairError(f"--out {out}: exists and is not a folder; pass a runs folder")
    if not out.is_dir():
        return
    for meta_path in sorted(out.glob("*/run.json")):
        try:
            other = json.loads(meta_path.read_text(encoding="utf-8")).get("cohort_hash")
        except (OSError, ValueError, AttributeError):
            continue  # not ours to judge; `cxrfair analyze` reports broken runs
        if other is not None and other != cohort_hash:
            raise CxrfairError(
                f"--out {out}: run {meta_path.parent.name} was made on cohort {str(other)[:12]}…, this cache on "
                f"{cohort_hash[:12]}…; write runs of different cohorts to different folders")
    existing = [r for r in run_ids if (out / r).exists()]
    if existing and not force:
        raise CxrfairError(f"--out {out}: run {existing[0]} already exists ({len(existing)} of {len(run_ids)}); pass --force to replace")
