"""XrayCLIP: an open_clip hub folder (config + weights) is the architecture, weights and preprocessing."""

import json

import open_clip
import pytest
import torch

from cxrfair.errors import CxrfairError
from cxrfair.extract.models import xrayclip
from cxrfair.extract.registry import load_model


def test_folder_round_trip_uses_its_config_and_preprocessing(tmp_path):
    fm = load_model("tiny-xrayclip")
    with torch.no_grad():
        for p in fm.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    config = json.loads((xrayclip.tiny_folder() / "open_clip_config.json").read_text())
    config["preprocess_cfg"].update(mean=[0.5] * 3, std=[0.25] * 3, interpolation="bilinear")
    (tmp_path / "open_clip_config.json").write_text(json.dumps(config))
    torch.save(fm.model.state_dict(), tmp_path / "open_clip_pytorch_model.bin")
    loaded = load_model("tiny-xrayclip", weights=tmp_path)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(x), fm.encode_image(x))
    assert (loaded.preprocess.mean, loaded.preprocess.std, loaded.preprocess.interpolation) == (
        (0.5,) * 3, (0.25,) * 3, "bilinear")
    assert not any(isinstance(m, open_clip.transformer.QuickGELU) for m in loaded.model.modules())


def test_real_default_config_is_open_clip_vit_b16():
    cfg = {"model_cfg": open_clip.get_model_config("ViT-B-16"), "preprocess_cfg": {}}
    pre = xrayclip.preprocess_from(cfg)
    assert (pre.size, pre.mode, pre.interpolation) == (224, "shortest", "bicubic")
    with torch.device("meta"):
        model = open_clip.CLIP(**cfg["model_cfg"])
    assert model.visual.proj.shape == (768, 512) and model.visual.conv1.weight.shape == (768, 3, 16, 16)


def test_folder_without_config_is_refused(tmp_path):
    (tmp_path / "open_clip_pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(CxrfairError, match="open_clip_config.json"):
        load_model("xrayclip", weights=tmp_path)


def test_release_loader_reads_the_hub_folder(tmp_path, monkeypatch):
    fm = load_model("tiny-xrayclip")
    (tmp_path / "open_clip_config.json").write_text((xrayclip.tiny_folder() / "open_clip_config.json").read_text())
    torch.save(fm.model.state_dict(), tmp_path / "open_clip_pytorch_model.bin")
    monkeypatch.setenv("CXRFAIR_XRAYCLIP_WEIGHTS", str(tmp_path))
    loaded = load_model("xrayclip")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(x), fm.encode_image(x))
    assert loaded.weights_id.startswith("sha256:")
