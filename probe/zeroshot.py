"""Zero-shot classification from cached image and class-text embeddings.

probs = softmax(logit_scale · cos(image, class text)) with the model's own logit scale (see
``shared/PROMPTS.md``: one scale for every model). The prompt set is chosen per model on the
validation split by the mean macro-F1 over its draws (ties: mean accuracy, then name); runs are
written for every draw of the chosen set, and of the other sets on request.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SELECTION = "mean validation macro-F1 over draws (ties: mean accuracy, then set name)"


def zeroshot_probs(image_emb, text_emb, logit_scale: float):
    """Class probabilities for every draw.

    Args:
        image_emb: (N, D) image embeddings (any norm).
        text_emb: (draws, C, D) class text embeddings (any norm).
        logit_scale: the model's multiplier of cosine similarity (already exponentiated).

    Returns:
        (draws, N, C) float32 probabilities.
    """
    import jax
    import jax.numpy as jnp

    img = _unit(jnp.asarray(image_emb, jnp.float32))
    txt = _unit(jnp.asarray(text_emb, jnp.float32))
    return np.asarray(jax.nn.softmax(logit_scale * jnp.einsum("nd,tcd->tnc", img, txt), axis=-1))


def _unit(a):
    import jax.numpy as jnp

    return a / jnp.linalg.norm(a, axis=-1, keepdims=True)


def macro_f1(y: np.ndarray, pred: np.ndarray, n_classes: int) -> float:
    """Mean over classes of one-vs-rest F1 (a class never predicted nor present counts 0)."""
    f1 = []
    for c in range(n_classes):
        tp = np.sum((pred == c) & (y == c))
        denom = np.sum(pred == c) + np.sum(y == c)
        f1.append(2 * tp / denom if denom else 0.0)
    return float(np.mean(f1))


@dataclass
class SetScores:
    """Validation scores of one prompt set: per draw, and whether its draws are all the same."""

    name: str
    macro_f1: list
    accuracy: list
    identical_draws: bool

    @property
    def key(self) -> tuple:
        # Sort key: higher F1, then higher accuracy, then name (min() on negatives).
        return (-float(np.mean(self.macro_f1)), -float(np.mean(self.accuracy)), self.name)


def score_sets(probs: dict, y_val: np.ndarray, text: dict, n_classes: int) -> list[SetScores]:
    """Validation scores per prompt set, best first. ``probs[name]``: (draws, Nv, C)."""
    scores = []
    for name, p in probs.items():
        pred = p.argmax(-1)
        scores.append(SetScores(name, [macro_f1(y_val, d, n_classes) for d in pred],
                                [float(np.mean(d == y_val)) for d in pred],
                                bool(all(np.array_equal(text[name][0], t) for t in text[name]))))
    return sorted(scores, key=lambda s: s.key)


def zeroshot_cache(cache_path: Path | str, out: Path | str, all_sets: bool = False, force: bool = False) -> list[Path]:
    """Write zero-shot runs of a cache: each draw of the validation-chosen prompt set.

    A set whose draws are identical (CLIP's fixed templates) is written once, as draw 0.

    Returns:
        The run folders written.
    """
    from cxrfair.errors import CxrfairError
    from cxrfair.analysis.runs import RunKey, safe_name
    from cxrfair.probe.inputs import check_runs_dir, load_inputs

    t0 = time.perf_counter()
    inputs = load_inputs(cache_path)
    if not inputs.text:
        raise CxrfairError(f"cache {cache_path}: holds no class text embeddings (model without a text encoder?); zero-shot needs them")
    bad = [n for n, t in inputs.text.items() if not np.isfinite(t).all()]
    if bad:
        raise CxrfairError(f"cache {cache_path}: text embeddings of prompt set {bad[0]} are NaN or infinite; re-run `cxrfair extract --force`")
    x_eval = np.concatenate([inputs.x["val"], inputs.x["test"]])
    probs = {n: zeroshot_probs(x_eval, t, inputs.logit_scale) for n, t in inputs.text.items()}
    n_val = len(inputs.x["val"])
    scores = score_sets({n: p[:, :n_val] for n, p in probs.items()}, inputs.y["val"], inputs.text, len(inputs.classes))
    plan = [(s, d) for s in (scores if all_sets else scores[:1]) for d in range(1 if s.identical_draws else len(s.macro_f1))]
    run_ids = [RunKey(safe_name(inputs.model), "zeroshot", f"{safe_name(s.name)}-d{d}", d).run_id for s, d in plan]
    check_runs_dir(out, inputs.cohort_hash, run_ids, force)
    elapsed = time.perf_counter() - t0
    return [_write(out, inputs, s, d, rid, probs[s.name][d], scores, elapsed, force) for (s, d), rid in zip(plan, run_ids)]


def _write(out, inputs, s: SetScores, draw: int, run_id: str, probs: np.ndarray, scores: list, elapsed: float, force: bool) -> Path:
    from cxrfair.analysis.runs import make_predictions, write_run

    meta = {
        "run_id": run_id, "model": inputs.model, "method": "zeroshot", "seed": draw,
        "classes": inputs.classes, "cohort_hash": inputs.cohort_hash,
        "hyperparameters": {"logit_scale": inputs.logit_scale},
        "selected_epoch": None, "trainable_params": 0, "timings": {"total_s": elapsed},
        "prompt_set": s.name, "draw": draw, "zero_shot_term": inputs.zero_shot_term,
        "prompt_set_selected": s.name == scores[0].name,
        "selection": {"criterion": SELECTION, "chosen": scores[0].name,
                      "val_scores": {o.name: {"macro_f1": o.macro_f1, "accuracy": o.accuracy,
                                              "mean_macro_f1": float(np.mean(o.macro_f1)),
                                              "mean_accuracy": float(np.mean(o.accuracy)),
                                              "identical_draws": o.identical_draws} for o in scores}},
        "source": inputs.source,
        "notes": "draws identical; written once" if s.identical_draws else f"draw {draw} of {len(s.macro_f1)}",
    }
    return write_run(out, meta, make_predictions(inputs.rows, probs, inputs.classes), force=force)
