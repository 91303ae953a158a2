"""Prompt sets: all six classes, seeded draws, the published word lists kept faithfully."""

from __future__ import annotations

import pytest

from cxrfair.errors import CxrfairError
from cxrfair.extract import prompts as P
from tests.extract.extract_helpers import CLASSES6


@pytest.mark.parametrize("name", P.PROMPT_SETS)
def test_every_set_covers_the_six_classes_in_ten_draws(name):
    sets = P.build_prompts(name, CLASSES6)
    assert len(sets) == P.DRAWS == 10
    for draw in sets:
        assert len(draw) == 6 and all(plist and all(isinstance(p, str) and p for p in plist) for plist in draw)
        assert all(len(plist) <= P.K for plist in draw)


def test_sampled_sets_are_reproducible_by_seed_and_vary_across_draws_and_seeds():
    for name in ("gloria", "cxr-clip"):
        a, b = P.build_prompts(name, CLASSES6, seed=3), P.build_prompts(name, CLASSES6, seed=3)
        assert a == b
        assert a != P.build_prompts(name, CLASSES6, seed=4)
        assert a[0] != a[1]
    gloria = P.build_prompts("gloria", CLASSES6)
    assert all(len(plist) == 10 for draw in gloria for plist in draw)  # every class has >= 10 combinations


def test_a_class_prompts_do_not_depend_on_the_other_classes():
    full = P.build_prompts("gloria", CLASSES6, seed=1)
    alone = P.build_prompts("gloria", ["Edema"], seed=1)
    assert [d[3] for d in full] == [d[0] for d in alone]


def test_clip_set_is_deterministic_templates_with_nih_names_mapped():
    sets = P.build_prompts("clip", CLASSES6)
    assert all(d == sets[0] for d in sets)
    effusion = sets[0][CLASSES6.index("Effusion")]
    assert "a chest x-ray showing pleural effusion." in effusion
    assert P.class_phrase("Effusion") == "pleural effusion" and P.class_phrase("Atelectasis") == "atelectasis"


def test_gloria_prompts_follow_the_published_form_and_keep_sic_spellings():
    pool = {c: P._gloria_pool(c) for c in CLASSES6}
    assert "mild linear atelectasis at the left lung base" in pool["Atelectasis"]
    assert "apperance of patchy consolidation at the right uppper lobe" in pool["Consolidation"]  # (sic) x2
    assert "presistent pulmonary edema" in pool["Edema"]  # (sic)
    assert "small left bilateral pleural effusion" in pool["Effusion"]  # severity, location, subtype
    assert all("  " not in p and p == p.strip() for ps in pool.values() for p in ps)
    assert len(pool["Cardiomegaly"]) == 15


def test_pneumothorax_gloria_words_are_marked_ours_and_sources_are_named():
    assert P.is_ours("gloria", "Pneumothorax") and not P.is_ours("gloria", "Edema")
    assert P.describe("gloria")["ours"] == ["Pneumothorax"]
    data = P.prompt_data()
    for name in P.PROMPT_SETS:
        assert data[name]["source"]
    assert "(sic)" in data["gloria"]["faithful_copy"]


def test_cxr_clip_sentences():
    pool = P._cxr_clip_pool("Cardiomegaly")
    assert "the presence of enlarged cardiac silhouette is noted." in pool
    assert len(pool) == (2 + 3 * 5) * 7
    assert "findings suggestive of pulmonary edema." in P._cxr_clip_pool("Edema")


def test_unknown_set_or_class_is_a_clear_error():
    with pytest.raises(CxrfairError, match="unknown; choose one of clip, gloria, cxr-clip"):
        P.build_prompts("medclip", CLASSES6)
    with pytest.raises(CxrfairError, match="no words for class 'Hernia'"):
        P.build_prompts("gloria", ["Hernia"])
    assert P.build_prompts("clip", ["Hernia"])[0][0][0] == "a photo of hernia."


# ---------------------------------------------------------------- multi-label (binary) sets

SIX_CHEXPERT = ["Atelectasis", "Cardiomegaly", "Consolidation", "Pleural Effusion", "Pneumonia", "Pneumothorax"]


def test_sourget_and_chexzero_pairs_are_the_published_ones():
    sourget = P.build_binary_prompts("sourget", SIX_CHEXPERT)
    chexzero = P.build_binary_prompts("chexzero", SIX_CHEXPERT)
    assert len(sourget) == len(chexzero) == P.DRAWS and all(d == sourget[0] for d in sourget)
    assert sourget[0][3] == [["Chest No findings"], ["Chest Pleural Effusion"]]
    assert chexzero[0][4] == [["no Pneumonia"], ["Pneumonia"]]


def test_binary_clip_pairs_each_template_with_its_negation():
    clip = P.build_binary_prompts("clip", ["Effusion"])[0][0]
    positives = P.build_prompts("clip", ["Effusion"])[0][0]
    assert clip[1] == positives and len(clip[0]) == len(positives)
    assert clip[0][1] == "a chest x-ray showing no pleural effusion."


def test_multilabel_sets_by_task_and_no_multilabel_gloria():
    assert list(P.build_all_for("multilabel", ["Pneumothorax"])) == list(P.MULTILABEL_SETS)
    assert P.build_all_for("multiclass", CLASSES6) == P.build_all(CLASSES6)
    with pytest.raises(CxrfairError, match="'gloria': no multi-label version"):
        P.build_binary_prompts("gloria", ["Pneumothorax"])
    assert "multi-label" not in " ".join(P.vocabulary_words())  # the toy vocabulary ignores the pairs
    assert "sourget" not in P.vocabulary_words() and "theosourget" not in P.vocabulary_words()
