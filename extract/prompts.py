"""Zero-shot prompt sets built from the published word lists in ``data/prompts.json``.

Three formats, as in the paper: ``clip`` (plain templates, deterministic), ``gloria`` (random
severity x subtype x location combinations) and ``cxr-clip`` (CXR-CLIP's positive sentences).
Every builder returns ``[draw][class] -> list[str]``; the sampled sets draw ``k`` prompts per class
per draw from a generator seeded by (seed, draw, class name), so a class's prompts do not depend
on which other classes the cohort has.

Multi-label cohorts (each condition its own binary task) use ``MULTILABEL_SETS`` instead, built
by ``build_binary_prompts``: per condition a (negative, positive) pair of prompt lists, scored by a
softmax over the pair. ``sourget`` ("Chest {condition}" vs "Chest No findings"), ``chexzero``
("{condition}" vs "no {condition}") and ``clip`` (the CLIP templates with the condition's phrase vs
"no {phrase}"). They are deterministic (every draw identical). GLoRIA's and CXR-CLIP's published
lists have positive sentences only, so they have no multi-label version.

References:
    Radford et al., CLIP, ICML 2021. Huang et al., GLoRIA, ICCV 2021 (gloria/constants.py).
    You et al., CXR-CLIP, MICCAI 2023 (datasets/train_prompts_all.json).
    Sourget et al., FAIMI 2025 (clip_cxr_fairness). Tiu et al., CheXzero, Nat. Biomed. Eng. 2022.
"""

from __future__ import annotations

import itertools
import json
import re
import zlib
from functools import lru_cache
from importlib import resources

import numpy as np

from cxrfair.errors import CxrfairError

PROMPT_SETS = ("clip", "gloria", "cxr-clip")
MULTILABEL_SETS = ("sourget", "chexzero", "clip")  # binary (negative, positive) pairs per condition
DRAWS = 10
K = 10

Prompts = list  # [draw][class] -> list[str]


@lru_cache(maxsize=1)
def prompt_data() -> dict:
    """The word lists (``data/prompts.json``), with their sources."""
    return json.loads(resources.files("cxrfair.extract").joinpath("data/prompts.json").read_text(encoding="utf-8"))


def class_phrase(name: str) -> str:
    """NIH label -> prompt vocabulary (``Effusion`` -> ``pleural effusion``); else lower case."""
    return prompt_data()["class_names"].get(name, name.lower())


def build_prompts(prompt_set: str, classes: list[str], *, draws: int = DRAWS, k: int = K, seed: int = 0) -> Prompts:
    """Prompts of one set for ``classes``.

    Args:
        prompt_set: one of PROMPT_SETS.
        classes: C NIH class names (cohort order).
        draws: number of draws (the ``clip`` set repeats its one deterministic draw).
        k: prompts sampled per class per draw (``gloria``, ``cxr-clip``); all if a class has fewer.
        seed: base seed.

    Returns:
        ``[draws][C]`` lists of prompt strings.
    """
    pools = {"clip": _clip_pool, "gloria": _gloria_pool, "cxr-clip": _cxr_clip_pool}
    if prompt_set not in pools:
        raise CxrfairError(f"prompt set {prompt_set!r}: unknown; choose one of {', '.join(PROMPT_SETS)}")
    pool = [pools[prompt_set](c) for c in classes]
    if prompt_set == "clip":
        return [[list(p) for p in pool] for _ in range(draws)]
    return [[_sample(p, k, seed, d, c) for p, c in zip(pool, classes)] for d in range(draws)]


def build_all(classes: list[str], *, draws: int = DRAWS, k: int = K, seed: int = 0) -> dict[str, Prompts]:
    """Every prompt set for ``classes``: name -> ``[draws][C]`` prompt lists."""
    return {name: build_prompts(name, classes, draws=draws, k=k, seed=seed) for name in PROMPT_SETS}


def build_binary_prompts(prompt_set: str, classes: list[str], *, draws: int = DRAWS) -> Prompts:
    """Per-condition (negative, positive) prompt lists of one multi-label set.

    Args:
        prompt_set: one of MULTILABEL_SETS.
        classes: C condition names (cohort order, the cohort's spelling).
        draws: number of (identical) draws, the same count as the sampled multi-class sets.

    Returns:
        ``[draws][C][2]`` lists of prompt strings, index 0 the negative, 1 the positive.
    """
    if prompt_set not in MULTILABEL_SETS:
        raise CxrfairError(f"prompt set {prompt_set!r}: no multi-label version; choose one of {', '.join(MULTILABEL_SETS)}")
    pairs = [_binary_pair(prompt_set, c) for c in classes]
    return [[[list(neg), list(pos)] for neg, pos in pairs] for _ in range(draws)]


def _binary_pair(prompt_set: str, name: str) -> tuple[list[str], list[str]]:
    spec = prompt_data()["multilabel"][prompt_set]
    if prompt_set == "clip":
        phrase = class_phrase(name)
        return [t.format(f"no {phrase}") for t in prompt_data()["clip"]["templates"]], _clip_pool(name)
    fill = lambda t: t.format(name=name, phrase=class_phrase(name))  # noqa: E731
    return [fill(t) for t in spec["negative"]], [fill(t) for t in spec["positive"]]


def build_all_for(task: str, classes: list[str], *, draws: int = DRAWS, k: int = K, seed: int = 0) -> dict[str, Prompts]:
    """Every prompt set of a cohort's ``task``: multi-class ``build_all``; multi-label the binary sets."""
    if task == "multilabel":
        return {name: build_binary_prompts(name, classes, draws=draws) for name in MULTILABEL_SETS}
    return build_all(classes, draws=draws, k=k, seed=seed)


def _sample(pool: list[str], k: int, seed: int, draw: int, name: str) -> list[str]:
    # Seeded by the class *name*: adding or reordering classes leaves each class's prompts alone.
    rng = np.random.default_rng([seed, draw, zlib.crc32(name.encode())])
    idx = rng.choice(len(pool), size=min(k, len(pool)), replace=False)
    return [pool[i] for i in idx]


def _clip_pool(name: str) -> list[str]:
    return [t.format(class_phrase(name)) for t in prompt_data()["clip"]["templates"]]


def _words(section: str, name: str) -> dict:
    classes = prompt_data()[section]["classes"]
    if name not in classes:
        raise CxrfairError(f"prompt set {section!r}: no words for class {name!r}; it has {', '.join(classes)}")
    return classes[name]


def _gloria_pool(name: str) -> list[str]:
    """All severity/subtype/location combinations (duplicates kept, as in GLoRIA's lists)."""
    words = _words("gloria", name)
    order = words.get("order", ["severity", "subtype", "location"])
    combos = itertools.product(*(words[part] for part in order))
    return [" ".join(" ".join(c).split()) for c in combos]


def _cxr_clip_pool(name: str) -> list[str]:
    spec = prompt_data()["cxr-clip"]
    words = _words("cxr-clip", name)
    phrases = list(words["phrases"])
    phrases += [f"{m} {o}" for m in words.get("modifiers", []) for o in words.get("objects", [])]
    return [f.format(p) for p in phrases for f in spec["frames"]] + list(words.get("extra", []))


def is_ours(prompt_set: str, name: str) -> bool:
    """True where the words are cxrfair's own addition (GLoRIA has no Pneumothorax)."""
    return bool(prompt_data().get(prompt_set, {}).get("classes", {}).get(name, {}).get("ours", False))


def vocabulary_words() -> list[str]:
    """Every lower-case word of every prompt in the data file (the toy tokenizer's vocabulary)."""
    # The multi-label pairs are left out: adding them would change the tiny models' vocabulary, and
    # with it their random weights and every tiny cache (their words tokenise into pieces anyway).
    text = json.dumps({k: v for k, v in prompt_data().items() if k != "multilabel"}).lower()
    return sorted(set(re.findall(r"[a-z]+", text)))


def describe(prompt_set: str, task: str = "multiclass") -> dict:
    """Provenance for the cache: the set's source and, for sampled sets, what is ours."""
    if task == "multilabel":
        return {"source": prompt_data()["multilabel"][prompt_set]["source"], "ours": [], "pair": "negative, positive"}
    spec = prompt_data()[prompt_set]
    ours = [c for c in spec.get("classes", {}) if is_ours(prompt_set, c)]
    return {"source": spec["source"], "ours": ours}


__all__ = ["DRAWS", "K", "MULTILABEL_SETS", "PROMPT_SETS", "build_all", "build_all_for", "build_binary_prompts", "build_prompts", "class_phrase", "describe", "is_ours",
           "prompt_data", "vocabulary_words"]
