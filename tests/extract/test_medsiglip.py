"""MedSigLIP: transformers' SigLIP from a hub-layout folder; sigmoid bias recorded; HF preprocessing read."""

import pytest
import torch

from cxrfair.errors import CxrfairError
from cxrfair.extract.models import medsiglip
from cxrfair.extract.models.common import preprocess_from_hf
from cxrfair.extract.registry import load_model


def test_hub_folder_round_trip(tmp_path):
    fm = load_model("tiny-medsiglip")
    with torch.no_grad():
        for p in fm.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
        fm.model.logit_bias.fill_(-10.0)
    fm.model.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    from cxrfair.extract.models.common import tiny_bert_dir
    AutoTokenizer.from_pretrained(str(tiny_bert_dir())).save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(
        '{"image_processor_type": "SiglipImageProcessor", "do_resize": true, "size": {"height": 56, "width": 56},'
        ' "resample": 2, "do_rescale": true, "do_normalize": true, "image_mean": [0.5, 0.5, 0.5],'
        ' "image_std": [0.5, 0.5, 0.5]}')
    loaded = load_model("tiny-medsiglip", weights=tmp_path)
    x = torch.randn(2, 3, 56, 56)
    tokens = loaded.tokenize(["no pleural effusion", "edema"])
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(x), fm.encode_image(x))
        assert torch.equal(loaded.encode_text(tokens), fm.encode_text(tokens))
    assert tokens.shape == (2, 16)  # padded to max_position_embeddings, as SigLIP was trained
    assert loaded.extras["logit_bias"] == -10.0 and loaded.extras["zero_shot_rule"] == "sigmoid"
    assert loaded.preprocess == medsiglip._tiny_preprocess()
    assert loaded.weights_id.startswith("sha256:")


def test_real_config_key_names_and_shapes():
    with torch.device("meta"):
        from transformers import SiglipModel

        model = SiglipModel(medsiglip.siglip_config(medsiglip.MEDSIGLIP_CONFIG))
    state = model.state_dict()
    assert state["vision_model.embeddings.patch_embedding.weight"].shape == (1152, 3, 14, 14)
    assert state["vision_model.embeddings.position_embedding.weight"].shape == (1024, 1152)  # (448 / 14) ** 2
    assert state["text_model.embeddings.token_embedding.weight"].shape == (32000, 1152)
    assert "logit_bias" in state and "vision_model.head.probe" in state


def test_hf_processor_configs_map_to_our_preprocess():
    siglip = {"size": {"height": 448, "width": 448}, "resample": 2, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    assert preprocess_from_hf(siglip, "x") == medsiglip.MEDSIGLIP_PREPROCESS
    bit = {"size": {"shortest_edge": 518}, "do_center_crop": True, "crop_size": {"height": 518, "width": 518},
           "resample": 3, "image_mean": [0.53] * 3, "image_std": [0.26] * 3}
    pre = preprocess_from_hf(bit, "x")
    assert (pre.size, pre.resize, pre.mode, pre.interpolation, pre.mean) == (518, 518, "shortest", "bicubic", (0.53,) * 3)
    with pytest.raises(CxrfairError, match="size"):
        preprocess_from_hf({"size": {"height": 10, "width": 20}}, "x")


def test_release_loader_reads_the_folder_config(tmp_path, monkeypatch):
    """The real ``medsiglip`` loader: architecture, tokenizer and preprocessing all come from the folder."""
    fm = load_model("tiny-medsiglip")
    fm.model.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    from cxrfair.extract.models.common import tiny_bert_dir
    AutoTokenizer.from_pretrained(str(tiny_bert_dir())).save_pretrained(tmp_path)
    monkeypatch.setenv("CXRFAIR_MEDSIGLIP_WEIGHTS", str(tmp_path))
    loaded = load_model("medsiglip")
    assert loaded.preprocess == medsiglip.MEDSIGLIP_PREPROCESS  # no preprocessor_config.json: the constant
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(x), fm.encode_image(x))


def test_squash_resizes_both_sides_ignoring_aspect_like_siglips_processor():
    import numpy as np
    from PIL import Image

    from cxrfair.extract.preprocess import Preprocess

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 60), dtype=np.uint8), mode="L")
    pre = Preprocess(size=40, resize=40, mode="squash", interpolation="bilinear", mean=(0.5,) * 3, std=(0.5,) * 3)
    want = np.asarray(image.resize((40, 40), Image.BILINEAR))
    got = pre.prepare(image)
    assert got.shape == (3, 40, 40) and all(np.array_equal(got[c], want) for c in range(3))
    assert "minmax" not in pre.describe()  # off: descriptions (and cache keys) made before it still match
    assert Preprocess(minmax=True).describe()["minmax"] is True
