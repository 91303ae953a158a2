"""CheXzero: OpenAI-format state dicts load strictly into open_clip and reproduce the model."""

import pytest
import torch

from cxrfair.errors import CxrfairError
from cxrfair.extract.models import chexzero
from cxrfair.extract.registry import load_model

# OpenAI clip/model.py's CLIP, as CheXzero saved it: per residual block, then the towers' own keys.
BLOCK = ["attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias", "ln_1.weight",
         "ln_1.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias", "ln_2.weight",
         "ln_2.bias"]
VISUAL = ["class_embedding", "positional_embedding", "proj", "conv1.weight", "ln_pre.weight", "ln_pre.bias",
          "ln_post.weight", "ln_post.bias"]
TOP = ["positional_embedding", "text_projection", "logit_scale", "token_embedding.weight", "ln_final.weight",
       "ln_final.bias"]


def openai_keys(layers: int = 12) -> set[str]:
    keys = {f"visual.{k}" for k in VISUAL} | set(TOP)
    for i in range(layers):
        keys |= {f"visual.transformer.resblocks.{i}.{k}" for k in BLOCK}
        keys |= {f"transformer.resblocks.{i}.{k}" for k in BLOCK}
    return keys


def test_real_architecture_has_openai_vit_b32_key_names_and_shapes():
    import open_clip

    with torch.device("meta"):
        model = open_clip.CLIP(**open_clip.get_model_config(chexzero.ARCH))
    state = model.state_dict()
    assert set(state) == openai_keys(12)
    shapes = {"visual.conv1.weight": (768, 3, 32, 32), "visual.positional_embedding": (50, 768),
              "visual.proj": (768, 512), "positional_embedding": (77, 512), "token_embedding.weight": (49408, 512),
              "text_projection": (512, 512), "visual.transformer.resblocks.11.attn.in_proj_weight": (2304, 768),
              "transformer.resblocks.11.mlp.c_fc.weight": (2048, 512)}
    assert {k: tuple(state[k].shape) for k in shapes} == shapes


def _perturbed_state():
    fm = load_model("tiny-chexzero")
    with torch.no_grad():
        for p in fm.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return fm, {k: v.clone() for k, v in fm.model.state_dict().items()}


def test_openai_format_file_loads_strictly_and_matches(tmp_path):
    import open_clip

    fm, state = _perturbed_state()
    assert set(state) == openai_keys(2)  # the tiny model saves exactly OpenAI's key names
    file = tmp_path / "best_64_5e-05_original_22000_0.864.pt"
    torch.save(state, file)  # CheXzero saved model.state_dict() with torch.save
    loaded = load_model("tiny-chexzero", weights=file)
    x = torch.randn(2, 3, 64, 64)
    tokens = loaded.tokenize(["no pleural effusion", "small left pneumothorax"])
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(x), fm.encode_image(x))
        assert torch.equal(loaded.encode_text(tokens), fm.encode_text(tokens))
    assert loaded.weights_id.startswith("sha256:") and tokens.shape == (2, 77)
    # open_clip's own OpenAI-format parser reads the same file as the same architecture.
    ref = open_clip.model.build_model_from_openai_state_dict(dict(state), cast_dtype=torch.float32)
    assert ref.visual.conv1.weight.shape == loaded.model.visual.conv1.weight.shape
    assert len(ref.visual.transformer.resblocks) == 2


def test_foreign_or_hostile_file_is_refused(tmp_path):
    _, state = _perturbed_state()
    del state["visual.proj"]
    torch.save(state, tmp_path / "missing.pt")
    with pytest.raises(CxrfairError, match="do(es)? not match.*visual.proj"):
        load_model("tiny-chexzero", weights=tmp_path / "missing.pt")
    marker = tmp_path / "MARKER"

    class Evil:
        def __reduce__(self):
            import os
            return (os.system, (f"touch {marker}",))

    torch.save({"visual.proj": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CxrfairError, match="refusing to load"):
        load_model("tiny-chexzero", weights=tmp_path / "evil.pt")
    assert not marker.exists()


def test_preprocessing_is_the_authors_not_openais():
    pre = chexzero.CHEXZERO_PREPROCESS
    assert (pre.size, pre.resize, pre.mode, pre.interpolation) == (224, 224, "pad", "bicubic")
    assert pre.mean == (101.48761 / 255,) * 3 and pre.std == (83.43944 / 255,) * 3


def test_release_loader_finds_the_file_in_the_cache_folder(tmp_path, monkeypatch):
    """The real ``chexzero`` loader, its ViT-B/32 swapped for the tiny architecture."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("CXRFAIR_CHEXZERO_WEIGHTS", raising=False)
    load_model("tiny-chexzero")  # registers the tiny architecture with open_clip
    monkeypatch.setattr(chexzero, "ARCH", chexzero.TINY_ARCH)
    fm, state = _perturbed_state()
    file = tmp_path / ".cache" / "cxrfair" / "chexzero" / chexzero.WEIGHTS_NAME
    file.parent.mkdir(parents=True)
    torch.save(state, file)
    loaded = load_model("chexzero")
    assert loaded.preprocess == chexzero.CHEXZERO_PREPROCESS
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(x), fm.encode_image(x))


@pytest.mark.slow
def test_full_size_release_file_round_trip(tmp_path):
    """Full ViT-B/32 (random weights) saved in OpenAI format through the chexzero loader."""
    import open_clip

    with torch.random.fork_rng():
        torch.manual_seed(0)
        source = open_clip.CLIP(**open_clip.get_model_config(chexzero.ARCH)).eval()
    torch.save(source.state_dict(), tmp_path / chexzero.WEIGHTS_NAME)
    loaded = load_model("chexzero", weights=tmp_path / chexzero.WEIGHTS_NAME)
    x = torch.randn(1, 3, 224, 224)
    tokens = loaded.tokenize(["no pneumothorax"])
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(x), source.encode_image(x))
        assert torch.equal(loaded.encode_text(tokens), source.encode_text(tokens))
