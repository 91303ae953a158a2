"""RAD-DINO: a transformers-4 Dinov2 checkpoint loads (keys converted), CLS embedding, no text tower."""

import json

import torch

from cxrfair.extract.models import raddino
from cxrfair.extract.registry import load_model

# transformers 5 -> transformers 4 names of DINOv2's attention (what the hub file was saved with).
TO_V4 = [("attention.q_proj", "attention.attention.query"), ("attention.k_proj", "attention.attention.key"),
         ("attention.v_proj", "attention.attention.value"), ("attention.o_proj", "attention.output.dense")]


def test_transformers4_checkpoint_loads_and_matches(tmp_path):
    from safetensors.torch import save_file

    fm = load_model("tiny-rad-dino")
    with torch.no_grad():
        for p in fm.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    state = {}
    for key, value in fm.model.state_dict().items():
        for new, old in TO_V4:
            key = key.replace(new, old)
        state[key] = value.clone().contiguous()
    assert "encoder.layer.0.attention.attention.query.weight" in state
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "dinov2", **raddino.TINY_CONFIG}))
    loaded = load_model("tiny-rad-dino", weights=tmp_path)
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(x), fm.encode_image(x))
        cls = fm.model(pixel_values=x).last_hidden_state[:, 0]
        torch.testing.assert_close(loaded.encode_image(x), cls)  # the model card's embedding: CLS after layernorm
    assert not loaded.spec.zero_shot and loaded.spec.text_encoder == ""


def test_real_config_key_names_and_shapes():
    from transformers import Dinov2Model

    with torch.device("meta"):
        model = Dinov2Model(raddino.dinov2_config(raddino.RAD_DINO_CONFIG))
    state = model.state_dict()
    assert state["embeddings.position_embeddings"].shape == (1, 1370, 768)  # (518 / 14) ** 2 + 1
    assert state["embeddings.patch_embeddings.projection.weight"].shape == (768, 3, 14, 14)
    assert "encoder.layer.11.layer_scale2.lambda1" in state
    pre = raddino.RAD_DINO_PREPROCESS
    assert (pre.size, pre.resize, pre.interpolation) == (518, 518, "bicubic")


def test_release_loader_reads_folder_and_its_preprocessor_config(tmp_path):
    fm = load_model("tiny-rad-dino")
    fm.model.save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "BitImageProcessor", "size": {"shortest_edge": 60}, "do_center_crop": True,
         "crop_size": {"height": 56, "width": 56}, "resample": 3, "image_mean": [0.5307] * 3,
         "image_std": [0.2583] * 3}))
    loaded = load_model("rad-dino", weights=tmp_path)
    assert (loaded.preprocess.size, loaded.preprocess.resize, loaded.preprocess.mode) == (56, 60, "shortest")
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(x), fm.encode_image(x))
