"""The text side of contrastive fine-tuning: one sentence per cohort row (torch-free).

A row's text is the cohort's own ``text`` column where the cohort has one and the row's cell is
non-empty (a report or impression, as a reader stores it), else a sentence made from its labels
by one documented template, in the prompt vocabulary of ``extract.prompts`` (``class_phrase``:
``Effusion`` -> ``pleural effusion``):

- multi-class: ``TEMPLATE`` with the class phrase: "a chest x-ray showing pleural effusion."
  (the second template of the zero-shot ``clip`` set);
- multi-label: the observed positive conditions' phrases in class order, joined by ", " and a
  final " and " ("a chest x-ray showing cardiomegaly and pleural effusion."); ``NO_FINDING``
  when no condition is positive (masked conditions count as not positive).

Rows share a text whenever their labels agree, so the contrastive loss treats a batch's texts
as a set (``contrastive_objectives.contrastive_losses``: duplicates are one candidate).
"""

from __future__ import annotations

import numpy as np

from cxrfair.extract.prompts import class_phrase

TEXT_COLUMN = "text"  # the cohort column holding a report / impression, where a dataset has one
TEMPLATE = "a chest x-ray showing {}."  # the clip prompt set's second template
NO_FINDING = "no finding"


def join_phrases(phrases: list[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``; ``NO_FINDING`` for none."""
    if not phrases:
        return NO_FINDING
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def label_sentence(classes: list[str], positives: list[int]) -> str:
    """The template sentence of a row whose positive class indices are ``positives`` (class order)."""
    return TEMPLATE.format(join_phrases([class_phrase(classes[k]) for k in sorted(positives)]))


def label_texts(classes: list[str], targets: np.ndarray) -> list[str]:
    """One template sentence per row.

    Args:
        classes: C class / condition names (cohort order).
        targets: (N,) int64 class index (multi-class) or (N, C) float in {0, 1, NaN} (multi-label).
    """
    if targets.ndim == 1:
        sentences = [label_sentence(classes, [k]) for k in range(len(classes))]
        return [sentences[int(k)] for k in targets]
    positive = np.nan_to_num(targets, nan=0.0) > 0.5
    return [label_sentence(classes, list(np.flatnonzero(row))) for row in positive]


def row_texts(table, classes: list[str], targets: np.ndarray) -> tuple[list[str], dict]:
    """Each row's text and where the texts came from.

    Returns:
        texts: N strings (cohort order); source: ``{"column": "text" or None, "template": TEMPLATE,
        "no_finding": NO_FINDING, "from_column": rows, "from_labels": rows}``.
    """
    texts = label_texts(classes, targets)
    from_column = 0
    if TEXT_COLUMN in table.columns:
        cells = table[TEXT_COLUMN]
        own = cells.notna().to_numpy() & (cells.astype(str).str.strip() != "").to_numpy()
        texts = [str(c).strip() if o else t for c, o, t in zip(cells, own, texts)]
        from_column = int(own.sum())
    source = {"column": TEXT_COLUMN if TEXT_COLUMN in table.columns else None, "template": TEMPLATE,
              "no_finding": NO_FINDING, "from_column": from_column, "from_labels": len(texts) - from_column}
    return texts, source


def text_ids(texts: list[str]) -> tuple[list[str], np.ndarray]:
    """The distinct texts (sorted) and each row's index into them: (U,) strings, (N,) int64."""
    unique = sorted(set(texts))
    index = {t: i for i, t in enumerate(unique)}
    return unique, np.array([index[t] for t in texts], dtype=np.int64)
