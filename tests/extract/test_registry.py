"""Registry entries of the open_clip models: real architectures, preprocessing, offline weight errors."""

from __future__ import annotations

import json
import re

import numpy as np
import open_clip
import pytest
import torch
from open_clip.hf_model import HFTextEncoder
from open_clip.timm_model import TimmModel
from open_clip.transformer import QuickGELU
from PIL import Image

from cxrfair.errors import CxrfairError
from cxrfair.extract.models import openclip as oc
from cxrfair.extract.registry import get_spec, list_specs, load_model
from cxrfair.extract.weights import resolve_weights


@pytest.fixture(autouse=True)
def no_local_weights(tmp_path, monkeypatch):
    """A fresh HOME (no ~/.cache/cxrfair) and no weight env vars: every lookup starts empty."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for var in ("CXRFAIR_CLIP_VIT_B16_WEIGHTS", "CXRFAIR_BIOMEDCLIP_WEIGHTS"):
        monkeypatch.delenv(var, raising=False)


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(CxrfairError, match="unknown model; known models: clip-vit-b16, biomedclip, .*tiny-clip"):
        get_spec("clip-vit-b32")
    names = [s.name for s in list_specs()]
    assert {"clip-vit-b16", "biomedclip", "tiny-clip", "tiny-biomedclip"} <= set(names)
    assert names.index("biomedclip") < names.index("tiny-clip")  # paper models first


# --- clip-vit-b16 ------------------------------------------------------------------------------

def test_clip_vit_b16_config_is_quickgelu_vit_b16_with_openai_preprocessing():
    spec = get_spec("clip-vit-b16")
    cfg = open_clip.get_model_config(oc.CLIP_ARCH)
    assert cfg["quick_gelu"] is True and cfg["embed_dim"] == spec.embed_dim == 512
    assert cfg["vision_cfg"] == {"image_size": 224, "layers": 12, "width": 768, "patch_size": 16}
    tag = open_clip.get_pretrained_cfg(oc.CLIP_ARCH, "openai")
    assert tag["quick_gelu"] is True and tag["hf_hub"].startswith(oc.CLIP_HUB_ID)
    pre = oc.CLIP_PREPROCESS
    assert (pre.size, pre.resize, pre.mode, pre.interpolation) == (224, 224, "shortest", "bicubic")
    assert (pre.mean, pre.std) == (tag["mean"], tag["std"])


def test_clip_vit_b16_code_path_builds_quickgelu_blocks_fast():
    # The same config with one block per tower: the real code path and widths, built in a second.
    cfg = open_clip.get_model_config(oc.CLIP_ARCH)
    cfg["vision_cfg"]["layers"] = cfg["text_cfg"]["layers"] = 1
    model = open_clip.CLIP(**cfg).eval()
    assert any(isinstance(m, QuickGELU) for m in model.visual.modules())
    assert not any(isinstance(m, torch.nn.GELU) for m in model.modules())
    assert model.visual.conv1.weight.shape == (768, 3, 16, 16)
    with torch.inference_mode():
        assert model.encode_image(torch.zeros(1, 3, 224, 224)).shape == (1, 512)


def test_our_preprocessing_equals_open_clips_transform():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (300, 257), dtype=np.uint8), mode="L")
    tag = open_clip.get_pretrained_cfg(oc.CLIP_ARCH, "openai")
    ref = open_clip.image_transform(224, is_train=False, mean=tag["mean"], std=tag["std"],
                                    resize_mode=tag["resize_mode"], interpolation=tag["interpolation"])(image)
    ours = oc.CLIP_PREPROCESS.normalize(torch.from_numpy(oc.CLIP_PREPROCESS.prepare(image))[None])[0]
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)


def test_clip_vit_b16_offline_without_weights_says_what_to_download(tmp_path):
    with pytest.raises(CxrfairError) as e:
        load_model("clip-vit-b16")
    msg = str(e.value)
    for needle in ("weights not found offline", oc.CLIP_HUB_ID, "open_clip_model.safetensors", "--weights PATH",
                   "CXRFAIR_CLIP_VIT_B16_WEIGHTS=PATH", str(tmp_path / "home" / ".cache" / "cxrfair" / "clip-vit-b16")):
        assert needle in msg, (needle, msg)


@pytest.mark.slow
def test_clip_vit_b16_random_init_and_local_weights_file_round_trip(tmp_path):
    from safetensors.torch import save_file

    model = oc.build_clip_vit_b16()
    assert sum(isinstance(m, QuickGELU) for m in model.modules()) == 24  # one per block, 12 + 12
    file = tmp_path / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(file))  # the hub file's layout
    fm = load_model("clip-vit-b16", weights=file)
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        torch.testing.assert_close(fm.encode_image(x), model.encode_image(x))
        assert fm.encode_text(fm.tokenize(["a chest x-ray"])).shape == (1, 512)
    assert fm.embed_dim == 512 and fm.weights_id.startswith("sha256:") and fm.preprocess == oc.CLIP_PREPROCESS


# --- biomedclip --------------------------------------------------------------------------------

def test_biomedclip_offline_without_weights_names_both_downloads_and_where():
    with pytest.raises(CxrfairError) as e:
        load_model("biomedclip")
    msg = str(e.value)
    for needle in (oc.BIOMEDCLIP_HUB_ID, "open_clip_pytorch_model.bin", oc.BIOMEDBERT_HUB_ID, "config.json",
                   "vocab.txt", "CXRFAIR_BIOMEDCLIP_WEIGHTS", ".cache/cxrfair/biomedclip"):
        assert needle in msg, (needle, msg)


def test_biomedclip_weights_without_text_tower_files_say_so(tmp_path):
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "open_clip_pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(CxrfairError, match=rf"text tower files not found offline.*config.json, vocab.txt.*{oc.BIOMEDBERT_HUB_ID}.*w/text"):
        load_model("biomedclip", weights=tmp_path / "w")


def test_biomedclip_files_are_found_in_a_weights_folder(tmp_path):
    folder = tmp_path / "w"
    (folder / "text").mkdir(parents=True)
    (folder / "open_clip_pytorch_model.bin").write_bytes(b"x")
    for name in ("config.json", "vocab.txt"):
        (folder / "text" / name).write_text("{}")
    ckpt, text = oc.find_biomedclip_files(get_spec("biomedclip"), folder)
    assert ckpt == folder / "open_clip_pytorch_model.bin" and text == folder / "text"


def test_biomedclip_config_matches_the_released_one():
    cfg = oc.biomedclip_config("TEXT")
    assert cfg["embed_dim"] == 512 and cfg["text_cfg"]["context_length"] == 256
    assert cfg["vision_cfg"]["timm_model_name"] == "vit_base_patch16_224" and cfg["vision_cfg"]["timm_pool"] == ""
    assert cfg["text_cfg"]["hf_proj_type"] == "mlp"
    assert cfg["text_cfg"]["hf_pooler_type"] == "cls_last_hidden_state_pooler"


@pytest.mark.slow
def test_biomedclip_real_architecture_from_a_local_bert_config(tmp_path):
    from transformers import BertConfig

    BertConfig(vocab_size=30522).save_pretrained(tmp_path)  # BERT-base shapes; the released vocab size may differ
    model = oc.build_biomedclip(tmp_path)
    assert isinstance(model.visual, TimmModel) and isinstance(model.text, HFTextEncoder)
    with torch.inference_mode():
        assert model.encode_image(torch.zeros(1, 3, 224, 224)).shape == (1, 512)
        assert model.encode_text(torch.ones(1, 256, dtype=torch.long)).shape == (1, 512)


def test_tiny_biomedclip_exercises_the_timm_and_hf_text_code_path(tmp_path):
    fm = load_model("tiny-biomedclip")
    assert isinstance(fm.model.visual, TimmModel) and isinstance(fm.model.text, HFTextEncoder)
    tokens = fm.tokenize(["small left pneumothorax", "mild linear atelectasis"])
    assert tokens.shape == (2, 64) and tokens[0, 0].item() == 2  # [CLS] first: WordPiece pieces, not [UNK]
    vocab = (oc.tiny_bert_dir() / "vocab.txt").read_text().split()
    assert vocab.index("pneumothorax") in tokens[0].tolist()
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        img, txt = fm.encode_image(x), fm.encode_text(tokens)
    assert img.shape == txt.shape == (2, 64)
    # Weights in the released file's layout round-trip through --weights.
    file = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(fm.model.state_dict(), file)
    again = load_model("tiny-biomedclip", weights=file)
    with torch.inference_mode():
        torch.testing.assert_close(again.encode_image(x), img)
    assert again.weights_id.startswith("sha256:")


def test_tiny_models_are_deterministic_and_lora_targets_match_modules():
    for name in ("tiny-clip", "tiny-biomedclip"):
        a, b = load_model(name), load_model(name)
        x = torch.randn(1, 3, a.preprocess.size, a.preprocess.size)
        with torch.inference_mode():
            torch.testing.assert_close(a.encode_image(x), b.encode_image(x), rtol=0, atol=0)
        targets = a.spec.lora_targets
        names = [n for n, _ in a.image_encoder.named_modules()]
        if isinstance(targets, str):
            hits = [n for n in names if re.fullmatch(targets, n)]
            assert hits and not any("patch_embed" in n or n.endswith("head") for n in hits)
        else:
            assert all(any(n.split(".")[-1] == t for n in names) for t in targets)


def test_resolve_weights_order_and_message(tmp_path, monkeypatch):
    a, b, c = tmp_path / "a.bin", tmp_path / "b.bin", tmp_path / "c.bin"
    for p in (a, b, c):
        p.write_bytes(b"")
    monkeypatch.setenv("X_WEIGHTS", str(b))
    assert resolve_weights("m", a, "X_WEIGHTS", [c], "URL", "f.bin") == a
    assert resolve_weights("m", None, "X_WEIGHTS", [c], "URL", "f.bin") == b
    monkeypatch.delenv("X_WEIGHTS")
    assert resolve_weights("m", None, "X_WEIGHTS", [tmp_path / "none", c], "URL", "f.bin") == c
    with pytest.raises(CxrfairError, match="--weights .*nope: no such file"):
        resolve_weights("m", tmp_path / "nope", None, [c], "URL", "f.bin")
    monkeypatch.setenv("X_WEIGHTS", str(tmp_path / "nope"))
    with pytest.raises(CxrfairError, match=r"\$X_WEIGHTS=.*nope: no such file"):
        resolve_weights("m", None, "X_WEIGHTS", [c], "URL", "f.bin")
    monkeypatch.delenv("X_WEIGHTS")
    with pytest.raises(CxrfairError) as e:
        resolve_weights("m", None, "X_WEIGHTS", [tmp_path / "d" / "f.bin"], "https://x/f.bin", "f.bin")
    assert str(e.value) == (f"model m: weights not found offline. Download f.bin from https://x/f.bin and pass "
                            f"--weights PATH, or set X_WEIGHTS=PATH, or place it at {tmp_path / 'd' / 'f.bin'}")


def test_open_clip_random_init_warning_is_silenced_for_tiny_models(caplog):
    with caplog.at_level("WARNING"):
        load_model("tiny-clip")
    assert "No pretrained weights loaded" not in caplog.text
    json.dumps(get_spec("tiny-clip").lora_targets)  # plain data, shown by `models list`
