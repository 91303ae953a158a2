"""CXR-CLIP: the released .tar (model + OmegaConf config + optimizer) loads restrictedly and strictly."""

import pytest
import torch

from cxrfair.errors import CxrfairError
from cxrfair.extract.models import cxrclip
from cxrfair.extract.models.common import BIO_CLINICALBERT_CONFIG
from cxrfair.extract.models.medclip import SWIN_TINY_CONFIG
from cxrfair.extract.registry import load_model
from tests.extract.test_gloria import fake_omegaconf  # noqa: F401 - fixture
from tests.extract.test_medclip import SWIN_TO_424


def released_checkpoint(model, config):
    """What cxr-clip's trainer saved: transformers-4 names (BERT position_ids, old Swin names)."""
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("image_encoder.image_encoder.encoder."):
            for new, old in SWIN_TO_424:
                key = key.replace(new, old)
        state[key] = value.clone()
    bert = model.text_encoder.text_encoder
    state["text_encoder.text_encoder.embeddings.position_ids"] = torch.arange(bert.config.max_position_embeddings)[None]
    return {"model": state, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]}, "config": config, "epoch": 15}


@pytest.mark.parametrize("name", ["tiny-cxr-clip-r50", "tiny-cxr-clip-swint"])
def test_released_checkpoint_loads_and_matches(tmp_path, name, fake_omegaconf):  # noqa: F811
    fm = load_model(name)
    with torch.no_grad():
        for p in fm.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    file = tmp_path / "r50_mcc.tar"
    torch.save(released_checkpoint(fm.model, fake_omegaconf({"model": {"image_encoder": {"name": "x"}}})), file)
    loaded = load_model(name, weights=file)
    x = torch.randn(2, 3, 64, 64)
    tokens = loaded.tokenize(["no pleural effusion", "small left pneumothorax seen"])
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(x), fm.encode_image(x))
        assert torch.equal(loaded.encode_text(tokens), fm.encode_text(tokens))
        assert torch.equal(loaded.image_encoder(x), fm.encode_image(x))  # what fine-tuning adapts
    assert loaded.logit_scale == pytest.approx(float(fm.model.logit_scale.detach().exp()))


def test_eos_pooling_reads_each_texts_sep_token():
    fm = load_model("tiny-cxr-clip-r50")
    tokens = fm.tokenize(["edema", "small left pleural effusion"])
    assert tokens["attention_mask"].min() == 0
    with torch.no_grad():
        hidden = fm.model.text_encoder.text_encoder(**tokens).last_hidden_state
        last = tokens["attention_mask"].sum(1) - 1
        assert all(tokens["input_ids"][i, last[i]] == 3 for i in range(2))  # [SEP] in the toy vocab
        want = fm.model.text_projection(torch.stack([hidden[i, last[i]] for i in range(2)]))
        torch.testing.assert_close(fm.encode_text(tokens), want)


def test_wrong_architecture_and_foreign_files_are_refused(tmp_path, fake_omegaconf):  # noqa: F811
    fm = load_model("tiny-cxr-clip-swint")
    torch.save(released_checkpoint(fm.model, fake_omegaconf({})), tmp_path / "swint.tar")
    with pytest.raises(CxrfairError, match="a CXR-CLIP swin checkpoint.*cxr-clip-swint"):
        load_model("tiny-cxr-clip-r50", weights=tmp_path / "swint.tar")
    torch.save({"model": {"something.weight": torch.zeros(1)}}, tmp_path / "foreign.tar")
    with pytest.raises(CxrfairError, match="not a CXR-CLIP checkpoint"):
        load_model("tiny-cxr-clip-r50", weights=tmp_path / "foreign.tar")


@pytest.mark.parametrize("kind", ["resnet", "swin"])
def test_real_architecture_key_names(kind):
    with torch.device("meta"):
        model = cxrclip.build_cxrclip(kind, BIO_CLINICALBERT_CONFIG, SWIN_TINY_CONFIG)
    keys = set(model.state_dict())
    assert "text_encoder.text_encoder.pooler.dense.weight" in keys  # AutoModel's BertModel keeps its pooler
    assert model.text_projection.projection.weight.shape == (512, 768)
    if kind == "resnet":
        assert "image_encoder.resnet.layer4.2.conv3.weight" in keys
        assert not any(k.startswith("image_encoder.resnet.fc") for k in keys)  # cxr-clip deletes fc
        assert model.image_projection.projection.weight.shape == (512, 2048)
    else:
        assert "image_encoder.image_encoder.embeddings.patch_embeddings.projection.weight" in keys
        assert model.image_projection.projection.weight.shape == (512, 768)
    assert cxrclip.PREPROCESS["resnet"].mean == (0.485, 0.456, 0.406) and cxrclip.PREPROCESS["swin"].mean == (0.5,) * 3


def test_release_loader_reads_tar_and_vocab_from_cache(tmp_path, monkeypatch, fake_omegaconf):  # noqa: F811
    """The real ``cxr-clip-r50`` loader (ResNet-50 and BERT shrunk by swapping the shipped configs)."""
    from cxrfair.extract.models import common
    from cxrfair.extract.models.medclip import tiny_bert_fields
    from cxrfair.extract.models.common import TINY_RESNET_LAYERS, TINY_RESNET_WIDTH, toy_vocab, write_vocab

    monkeypatch.setattr(cxrclip, "BIO_CLINICALBERT_CONFIG", tiny_bert_fields())
    monkeypatch.setattr(cxrclip, "RESNET50_LAYERS", TINY_RESNET_LAYERS)
    monkeypatch.setattr(cxrclip, "RESNET_WIDTH", TINY_RESNET_WIDTH)
    monkeypatch.setattr(common, "hub_cached_vocab", lambda: None)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("CXRFAIR_CXR_CLIP_R50_WEIGHTS", raising=False)
    monkeypatch.delenv(common.VOCAB_ENV, raising=False)
    fm = load_model("tiny-cxr-clip-r50")
    folder = tmp_path / ".cache" / "cxrfair" / "cxr-clip-r50"
    folder.mkdir(parents=True)
    torch.save(released_checkpoint(fm.model, fake_omegaconf({})), folder / "r50_mcc.tar")
    with pytest.raises(CxrfairError, match="vocab.txt"):
        load_model("cxr-clip-r50")
    write_vocab(folder / "vocab.txt", toy_vocab())
    loaded = load_model("cxr-clip-r50")
    assert loaded.preprocess == cxrclip.PREPROCESS["resnet"]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(x), fm.encode_image(x))
