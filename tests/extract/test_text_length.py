"""No text encoder crashes on a long prompt: every registered tiny model encodes every prompt set of
``extract/prompts.py`` (and a prompt far longer than any text model takes), cutting each prompt at
its text encoder's limit (``registry.TextTokenizer``); what was cut is recorded in the cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cxrfair.errors import CxrfairError
from cxrfair.extract.cache import TextEmbeddings
from cxrfair.extract.cohort_presets import PRESETS
from cxrfair.extract.extractor import text_truncation
from cxrfair.extract.prompts import MULTILABEL_SETS, PROMPT_SETS, build_all_for
from cxrfair.extract.registry import TextTokenizer, list_specs, load_model, token_width

TEXT_MODELS = [s.name for s in list_specs() if s.tiny and s.zero_shot]
LONG = "small left apical pneumothorax with a chest tube in place " * 60  # ~600 words


def _strings(nested) -> list[str]:
    return [nested] if isinstance(nested, str) else [s for item in nested for s in _strings(item)]


def every_prompt() -> dict[str, list[str]]:
    """Every prompt set's distinct prompts, for the classes of every preset of its task."""
    sets: dict[str, set[str]] = {}
    for preset in PRESETS.values():
        for name, prompts in build_all_for(preset.task, list(preset.classes)).items():
            sets.setdefault(f"{preset.task}:{name}", set()).update(_strings(prompts))
    return {name: sorted(p) for name, p in sets.items()}


PROMPTS = every_prompt()


def test_the_prompt_sets_under_test_are_all_of_them():
    assert {k.split(":")[1] for k in PROMPTS if k.startswith("multiclass:")} == set(PROMPT_SETS)
    assert {k.split(":")[1] for k in PROMPTS if k.startswith("multilabel:")} == set(MULTILABEL_SETS)


@pytest.mark.parametrize("name", TEXT_MODELS)
def test_every_text_model_encodes_every_prompt_set(name):
    fm = load_model(name)
    assert isinstance(fm.tokenize, TextTokenizer) and fm.tokenize.max_length > 0
    with torch.inference_mode():
        for set_name, prompts in PROMPTS.items():
            for i in range(0, len(prompts), 256):
                tokens = fm.tokenize(prompts[i:i + 256])
                assert token_width(tokens) <= fm.tokenize.max_length, set_name
                emb = fm.encode_text(tokens)
                assert emb.shape == (len(prompts[i:i + 256]), fm.embed_dim) and torch.isfinite(emb).all(), set_name
        # A prompt longer than any text encoder takes is cut, not a crash.
        tokens = fm.tokenize([LONG, "edema"])
        assert token_width(tokens) <= fm.tokenize.max_length
        assert torch.isfinite(fm.encode_text(tokens)).all()
    cut = fm.tokenize.truncation([LONG, "edema"])
    assert cut["truncated"] == 1 and cut["of"] == 2 and cut["longest"] > cut["max_length"] == fm.tokenize.max_length
    assert cut["example"] == LONG


def test_the_cache_records_truncation_only_when_a_prompt_was_cut():
    fm = load_model("tiny-biovil")  # a 64-position text model: the nih-6x200 prompt sets do not fit
    sets = build_all_for("multiclass", list(PRESETS["nih-6x200"].classes))
    text = {name: TextEmbeddings(np.zeros((1, 1, 1), np.float32), p) for name, p in sets.items()}
    record = text_truncation(fm, text)["text_truncation"]
    assert record["max_length"] == 64 and record["truncated"] >= 1 and record["longest"] > 64
    short = {"clip": TextEmbeddings(np.zeros((1, 1, 1), np.float32), [[["edema"], ["effusion"]]])}
    assert text_truncation(fm, short) == {}
    assert text_truncation(load_model("tiny-rad-dino"), text) == {}  # image-only: no text tower


def test_a_tokenizer_that_ignores_the_limit_is_refused_clearly():
    wide = TextTokenizer("toy", 4, lambda prompts, length: torch.zeros(len(prompts), 9, dtype=torch.long),
                         lambda prompts: [9] * len(prompts))
    with pytest.raises(CxrfairError, match="model toy: its tokenizer gave 9 tokens per prompt, more than the 4"):
        wide(["a long prompt"])
