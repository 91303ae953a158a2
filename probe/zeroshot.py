"""Zero-shot classification from cached image and class-text embeddings (or prompt scores).

Two scorings (``term``; run.json ``zero_shot_term``):

- ``global`` (every model): probs = softmax(logit_scale · cos(image, class text)), the class text
  being the mean of its prompts' normalised embeddings, with the model's own logit scale (not
  one common scale for every model).
- ``both`` (GLoRIA's own zero-shot, ``gloria.zero_shot_classification``; needs a cache with prompt
  scores): per prompt, s = (global + local) / 2 (cosine of the global embeddings; the word to
  image-region attention score); a class scores the max over its prompts; each class's column is
  z-scored. GLoRIA z-scores over the images scored together; here the mean and sd (ddof 0) come
  from the **validation** images and are applied to val and test alike, so a test image's score
  never depends on which other test images are scored (what the bootstrap and the per-group
  metrics assume), and nothing is fitted on test. probs = softmax(scale · z), ``scale`` fitted on
  the validation labels by negative log-likelihood (a 1-D search, ``fit_scale``); it changes no
  prediction, only calibration.

Multi-label cohorts (``task`` multilabel): each condition is its own binary task with a
(negative, positive) pair of prompt lists (``cxrfair.extract.prompts.MULTILABEL_SETS``), and
p = softmax over the pair of logit_scale · cos(image, text) -- Sourget et al.'s rule, i.e.
sigmoid(logit_scale · (cos⁺ − cos⁻)); no softmax across conditions. GLoRIA's scoring (``both``)
is multi-class only.

The prompt set is chosen per model on the validation split by the mean over its draws of macro-F1
(ties: mean accuracy, then name) or, for multi-label cohorts, of the macro AUC over conditions
(each condition's masked labels left out; ties: name); runs are written for every draw of the
chosen set, and of the other sets on request.

References:
    Sourget et al., Fairness and Robustness of CLIP-Based Models for Chest X-rays, FAIMI 2025.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cxrfair.core.multilabel import auc_macro
from cxrfair.core.runs import RunKey, check_runs_folder, safe_name, write_run
from cxrfair.errors import CxrfairError
from cxrfair.probe.inputs import load_inputs

# jax is imported inside the three functions that compute on it: it costs about 2 s, and
# ``import cxrfair.probe`` (which re-exports ``zeroshot_probs``) and GLoRIA's scoring need none of it.

SELECTION = "mean validation macro-F1 over draws (ties: mean accuracy, then set name)"
SELECTION_MULTILABEL = ("mean validation macro AUC over draws (per condition, masked labels left out; "
                        "mean over conditions; ties: set name)")
TERMS = ("global", "both")
# The scale grid fit_scale searches: log-spaced, wide enough for z-scores of any spread.
SCALES = np.logspace(-2, 2, 401)


def zeroshot_probs(image_emb, text_emb, logit_scale: float):
    """Class probabilities for every draw.

    Args:
        image_emb: (N, D) image embeddings (any norm).
        text_emb: (draws, C, D) class text embeddings (any norm).
        logit_scale: the model's multiplier of cosine similarity (already exponentiated).

    Returns:
        (draws, N, C) float32 probabilities.
    """
    import jax  # see the note under the imports
    import jax.numpy as jnp

    img = _unit(jnp.asarray(image_emb, jnp.float32))
    txt = _unit(jnp.asarray(text_emb, jnp.float32))
    return np.asarray(jax.nn.softmax(logit_scale * jnp.einsum("nd,tcd->tnc", img, txt), axis=-1))


def pair_probs(image_emb, text_emb, logit_scale: float):
    """Per-condition probabilities of multi-label prompt pairs, for every draw.

    Args:
        image_emb: (N, D) image embeddings (any norm).
        text_emb: (draws, C, 2, D) text embeddings, index 0 the negative, 1 the positive (any norm).
        logit_scale: the model's multiplier of cosine similarity (already exponentiated).

    Returns:
        (draws, N, C) float32: softmax over the pair, positive column.
    """
    import jax  # see the note under the imports
    import jax.numpy as jnp

    img = _unit(jnp.asarray(image_emb, jnp.float32))
    txt = _unit(jnp.asarray(text_emb, jnp.float32))
    logits = logit_scale * jnp.einsum("nd,tckd->tnck", img, txt)
    return np.asarray(jax.nn.softmax(logits, axis=-1)[..., 1])


def _unit(a):
    import jax.numpy as jnp  # see the note under the imports

    return a / jnp.linalg.norm(a, axis=-1, keepdims=True)


# ---------------------------------------------------------------- GLoRIA's scoring (term "both")


def class_scores(sim: np.ndarray, columns: list) -> np.ndarray:
    """GLoRIA's class score: the max over the class's prompts.

    Args:
        sim: (N, P) per-prompt similarity.
        columns: C integer arrays, the prompt columns of each class.

    Returns:
        (N, C).
    """
    return np.stack([sim[:, cols].max(axis=1) for cols in columns], axis=1)


def zscore_stats(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-class mean and sd (ddof 0, as numpy's ``std``) of (N, C) scores; an sd of 0 becomes 1."""
    std = scores.std(axis=0)
    return scores.mean(axis=0), np.where(std > 0, std, 1.0)


def softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise softmax of (..., C) logits in float64."""
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def nll(z: np.ndarray, y: np.ndarray, scale: float) -> float:
    """Mean negative log-likelihood of int labels y (N,) under softmax(scale * z), z (N, C)."""
    logits = scale * np.asarray(z, np.float64)
    logits = logits - logits.max(-1, keepdims=True)
    return float(np.mean(np.log(np.exp(logits).sum(-1)) - logits[np.arange(len(y)), y]))


def fit_scale(z_val: np.ndarray, y_val: np.ndarray) -> float:
    """The multiplier of standardised scores with the lowest validation NLL (on ``SCALES``; first of ties)."""
    return float(SCALES[int(np.argmin([nll(z_val, y_val, s) for s in SCALES]))])


def gloria_draw(val, test, prompts: list, y_val: np.ndarray) -> tuple[np.ndarray, dict]:
    """GLoRIA's zero-shot for one draw of one prompt set.

    Args:
        val, test: ``PromptScores`` of the val and test images.
        prompts: [class] -> prompt strings of this draw.
        y_val: (Nv,) int labels (for the probability scale only).

    Returns:
        (Nv + Nt, C) probabilities, and what was fitted on validation (mean, std, scale).
    """
    columns = [val.columns(plist) for plist in prompts]
    s_val, s_test = (class_scores((p.global_sim + p.local_sim) / 2, columns) for p in (val, test))
    mean, std = zscore_stats(s_val)
    z_val, z_test = (s_val - mean) / std, (s_test - mean) / std
    scale = fit_scale(z_val, y_val)
    fitted = {"class_mean": mean.tolist(), "class_std": std.tolist(), "scale": scale}
    return softmax(scale * np.concatenate([z_val, z_test])).astype(np.float32), fitted


def gloria_probs(inputs, name: str) -> tuple[np.ndarray, list]:
    """(draws, Nv + Nt, C) probabilities of prompt set ``name`` by GLoRIA's scoring, and per draw what was fitted."""
    sc = inputs.prompt_scores
    try:
        out = [gloria_draw(sc["val"], sc["test"], draw, inputs.y["val"]) for draw in inputs.prompts[name]]
    except KeyError as e:
        raise CxrfairError(f"cache {inputs.source}: prompt {e} of set {name!r} has no stored scores (mixed "
                           "extraction?); re-run `cxrfair extract --force`") from None
    return np.stack([p for p, _ in out]), [f for _, f in out]


def resolve_term(term: str | None, inputs) -> str:
    """``term`` checked against the cache; None: "both" where the cache has prompt scores, else "global"."""
    term = term or ("both" if inputs.prompt_scores is not None else "global")
    if term not in TERMS:
        raise CxrfairError(f"--term {term!r}: choose one of {', '.join(TERMS)}")
    if term == "both" and inputs.multilabel:
        raise CxrfairError(f"--term both: cache {inputs.source} is of a multi-label cohort; GLoRIA's scoring is "
                           "multi-class only; use --term global (a softmax over each condition's prompt pair)")
    if term == "both" and inputs.prompt_scores is None:
        raise CxrfairError(f"--term both: cache {inputs.source} holds no prompt scores (only GLoRIA models have a "
                           "local term, stored by `cxrfair extract` since cache format 2); use --term global, "
                           "or re-extract with `cxrfair extract --force`")
    return term


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
    """Validation scores of one prompt set: per draw, and whether its draws are all the same.

    Attributes:
        name: the prompt set.
        scores: metric -> one value per draw; the first metric ranks the sets (higher is better),
            the second (if any) breaks ties, then the name.
        identical_draws: every draw's text embeddings are equal (written once).
    """

    name: str
    scores: dict
    identical_draws: bool

    @property
    def draws(self) -> int:
        return len(next(iter(self.scores.values())))

    @property
    def key(self) -> tuple:
        # Sort key: higher primary metric, then higher tie-breaker, then name (min() on negatives).
        return (*(-float(np.nanmean(v)) for v in self.scores.values()), self.name)

    def record(self) -> dict:
        """run.json ``selection.val_scores`` entry: per-draw values, their means, identical_draws."""
        return {**{m: list(map(float, v)) for m, v in self.scores.items()},
                **{f"mean_{m}": float(np.nanmean(v)) for m, v in self.scores.items()},
                "identical_draws": self.identical_draws}


def _identical(t: np.ndarray) -> bool:
    return bool(all(np.array_equal(t[0], d) for d in t))


def score_sets(probs: dict, y_val: np.ndarray, text: dict, n_classes: int) -> list[SetScores]:
    """Validation scores per prompt set, best first. ``probs[name]``: (draws, Nv, C)."""
    scores = []
    for name, p in probs.items():
        pred = p.argmax(-1)
        scores.append(SetScores(name, {"macro_f1": [macro_f1(y_val, d, n_classes) for d in pred],
                                       "accuracy": [float(np.mean(d == y_val)) for d in pred]}, _identical(text[name])))
    return sorted(scores, key=lambda s: s.key)


def score_pair_sets(probs: dict, y_val: np.ndarray, text: dict) -> list[SetScores]:
    """Multi-label validation scores per prompt set, best first.

    Args:
        probs: set -> (draws, Nv, C) per-condition probabilities.
        y_val: (Nv, C) targets in {1, 0, NaN} (NaN left out of that condition's AUC).
        text: set -> (draws, C, 2, D) text embeddings (to detect identical draws).
    """
    scores = [SetScores(name, {"auc_macro": [float(auc_macro(y_val, d)) for d in p]}, _identical(text[name]))
              for name, p in probs.items()]
    return sorted(scores, key=lambda s: s.key)


def zeroshot_cache(cache_path: Path | str, out: Path | str, all_sets: bool = False, force: bool = False,
                   term: str | None = None) -> list[Path]:
    """Write zero-shot runs of a cache: each draw of the validation-chosen prompt set.

    A set whose draws are identical (CLIP's fixed templates) is written once, as draw 0.
    ``term``: "global", "both" (GLoRIA's scoring) or None (both where the cache allows it).

    Returns:
        The run folders written.
    """
    t0 = time.perf_counter()
    inputs = load_inputs(cache_path)
    if not inputs.text:
        raise CxrfairError(f"cache {cache_path}: holds no class text embeddings (model without a text encoder?); zero-shot needs them")
    bad = [n for n, t in inputs.text.items() if not np.isfinite(t).all()]
    if bad:
        raise CxrfairError(f"cache {cache_path}: text embeddings of prompt set {bad[0]} are NaN or infinite; re-run `cxrfair extract --force`")
    term = resolve_term(term, inputs)
    probs, fitted = _all_probs(inputs, term)
    n_val = len(inputs.x["val"])
    val_probs = {n: p[:, :n_val] for n, p in probs.items()}
    scores = (score_pair_sets(val_probs, inputs.y["val"], inputs.text) if inputs.multilabel
              else score_sets(val_probs, inputs.y["val"], inputs.text, len(inputs.classes)))
    plan = [(s, d) for s in (scores if all_sets else scores[:1]) for d in range(1 if s.identical_draws else s.draws)]
    run_ids = [RunKey(safe_name(inputs.model), "zeroshot", f"{safe_name(s.name)}-d{d}", d).run_id for s, d in plan]
    check_runs_folder(out, inputs.cohort_hash, run_ids, force)
    elapsed = time.perf_counter() - t0
    return [_write(out, inputs, s, d, rid, probs[s.name][d], scores, elapsed, force, term, fitted[s.name][d])
            for (s, d), rid in zip(plan, run_ids)]


def _all_probs(inputs, term: str) -> tuple[dict, dict]:
    """Per prompt set: (draws, Nv + Nt, C) probabilities and, per draw, the scoring's hyperparameters."""
    if term == "both":
        out = {n: gloria_probs(inputs, n) for n in inputs.text}
        return {n: p for n, (p, _) in out.items()}, {n: [_both_hyper(f) for f in fs] for n, (_, fs) in out.items()}
    x_eval = np.concatenate([inputs.x["val"], inputs.x["test"]])
    score = pair_probs if inputs.multilabel else zeroshot_probs
    probs = {n: score(x_eval, t, inputs.logit_scale) for n, t in inputs.text.items()}
    hyper = {"logit_scale": inputs.logit_scale, "class_text": "mean of the normalised prompt embeddings"}
    if inputs.multilabel:
        hyper = {**hyper, "rule": "per condition, softmax over (negative, positive) of logit_scale * cosine; "
                                  "p = the positive column (Sourget et al.)"}
    return probs, {n: [hyper] * len(t) for n, t in inputs.text.items()}


def _both_hyper(fitted: dict) -> dict:
    return {"scoring": "gloria", "prompt_similarity": "(global cosine + local attention score) / 2",
            "class_score": "max over the class's prompts",
            "standardization": "per class, mean and sd (ddof 0) over the validation images; applied to val and test",
            "probability": "softmax(scale * z), scale fitted by validation NLL", **fitted}


def _write(out, inputs, s: SetScores, draw: int, run_id: str, probs: np.ndarray, scores: list, elapsed: float,
           force: bool, term: str, hyper: dict) -> Path:
    how = ("GLoRIA's scoring: (global + local) / 2 per prompt, max over a class's prompts, z-scored per class "
           "with validation statistics, softmax(scale * z) with scale fitted on validation NLL"
           if term == "both" else "cosine of the global embeddings x logit_scale, softmax")
    if inputs.multilabel:
        how = ("per condition, softmax over its (negative, positive) prompt pair of cosine x logit_scale "
               "(Sourget et al.); GLoRIA's own scoring is multi-class only")
    meta = {
        "run_id": run_id, "model": inputs.model, "method": "zeroshot", "seed": draw,
        "classes": inputs.classes, "cohort_hash": inputs.cohort_hash,
        "hyperparameters": hyper,
        "selected_epoch": None, "trainable_params": 0, "timings": {"total_s": elapsed},
        "prompt_set": s.name, "draw": draw, "zero_shot_term": term,
        "prompt_set_selected": s.name == scores[0].name,
        "selection": {"criterion": SELECTION_MULTILABEL if inputs.multilabel else SELECTION, "chosen": scores[0].name,
                      "val_scores": {o.name: o.record() for o in scores}},
        "source": inputs.source, **inputs.run_meta(),
        "notes": ("draws identical; written once" if s.identical_draws else f"draw {draw} of {s.draws}") + f"; {how}",
    }
    return write_run(out, meta, inputs.predictions(probs), force=force)
