"""BioViL / BioViL-T: hi-ml's released layouts load by key (no remote code) and compute what hi-ml computes."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cxrfair.errors import CxrfairError
from cxrfair.extract.models import biovil
from cxrfair.extract.models.common import TINY_RESNET_LAYERS, TINY_RESNET_WIDTH, toy_vocab, write_vocab
from cxrfair.extract.registry import load_model


def himl_image_state(temporal: bool, layers=TINY_RESNET_LAYERS, width=TINY_RESNET_WIDTH, joint=16, seed=0):
    """What hi-ml's ImageModel.state_dict() holds, built independently: a torchvision ResNet *with*
    its ImageNet fc (ResNetHIML subclasses ResNet), the 1x1-conv MLP projector, and for BioViL-T the
    temporal encoder's conv, missing-prior embedding and ViT pooler."""
    from torchvision.models.resnet import Bottleneck, ResNet

    g = torch.Generator().manual_seed(seed)
    resnet = ResNet(Bottleneck, list(layers), width_per_group=width)
    state = {f"encoder.encoder.{k}": v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
             for k, v in resnet.state_dict().items()}
    feat = 512 if temporal else 2048
    if temporal:
        state["encoder.backbone_to_vit.weight"] = torch.randn(256, 2048, 1, 1, generator=g) * 0.02
        state["encoder.missing_previous_emb"] = torch.randn(1, 256, 1, 1, generator=g)
        state["encoder.vit_pooler.type_embed"] = torch.randn(2, 1, 256, generator=g)
        state["encoder.vit_pooler.blocks.0.attn.proj_q.weight"] = torch.randn(256, 256, generator=g)
        state["encoder.vit_pooler.norm_post.weight"] = torch.ones(256)
    state["projector.model.0.weight"] = torch.randn(joint, feat, 1, 1, generator=g) * 0.05
    state["projector.model.1.weight"] = torch.rand(joint, generator=g) + 0.5
    state["projector.model.1.bias"] = torch.randn(joint, generator=g)
    state["projector.model.1.running_mean"] = torch.randn(joint, generator=g)
    state["projector.model.1.running_var"] = torch.rand(joint, generator=g) + 0.5
    state["projector.model.1.num_batches_tracked"] = torch.tensor(7)
    state["projector.model.3.weight"] = torch.randn(joint, joint, 1, 1, generator=g) * 0.1
    state["projector.model.3.bias"] = torch.randn(joint, generator=g)
    return state, resnet


def reference_image(state, resnet, x, temporal):
    """hi-ml's single-image forward written out with functional ops."""
    import torch.nn.functional as F

    resnet.load_state_dict({k.removeprefix("encoder.encoder."): v for k, v in state.items()
                            if k.startswith("encoder.encoder.")})
    resnet.eval()
    r = resnet
    f = r.layer4(r.layer3(r.layer2(r.layer1(r.maxpool(r.relu(r.bn1(r.conv1(x))))))))
    if temporal:
        f = F.conv2d(f, state["encoder.backbone_to_vit.weight"])
        f = torch.cat([f, state["encoder.missing_previous_emb"].repeat(f.shape[0], 1, *f.shape[2:])], dim=1)
    h = F.conv2d(f, state["projector.model.0.weight"])
    h = F.batch_norm(h, state["projector.model.1.running_mean"], state["projector.model.1.running_var"],
                     state["projector.model.1.weight"], state["projector.model.1.bias"], False, 0.0, 1e-5)
    h = F.conv2d(F.relu(h), state["projector.model.3.weight"], state["projector.model.3.bias"])
    return h.mean(dim=(2, 3)), f.mean(dim=(2, 3))


def cxr_bert_folder(folder, fields, seed=0):
    """A hub-like CXR-BERT folder: config.json as the repo ships it (custom model_type, auto_map),
    vocab.txt, and pytorch_model.bin as CXRBertModel (BertForMaskedLM + projection head) saved it
    with transformers 4 (``bert.embeddings.position_ids`` included)."""
    from transformers import BertConfig, BertForMaskedLM

    bert_fields = {k: v for k, v in fields.items() if k not in ("model_type", "projection_size")}
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        mlm = BertForMaskedLM(BertConfig(**bert_fields)).eval()
        head = {"cls_projection_head.dense_to_hidden.weight": torch.randn(fields["projection_size"], fields["hidden_size"]),
                "cls_projection_head.dense_to_hidden.bias": torch.randn(fields["projection_size"]),
                "cls_projection_head.LayerNorm.weight": torch.rand(fields["projection_size"]) + 0.5,
                "cls_projection_head.LayerNorm.bias": torch.randn(fields["projection_size"]),
                "cls_projection_head.dense_to_output.weight": torch.randn(fields["projection_size"], fields["projection_size"]),
                "cls_projection_head.dense_to_output.bias": torch.randn(fields["projection_size"])}
    state = {**{k: v.clone() for k, v in mlm.state_dict().items()}, **head,
             "bert.embeddings.position_ids": torch.arange(fields["max_position_embeddings"])[None]}
    torch.save(state, folder / "pytorch_model.bin")
    config = {**fields, "model_type": "cxr-bert", "architectures": ["CXRBertModel"],
              "auto_map": {"AutoModel": "modeling_cxrbert.CXRBertModel"}}
    (folder / "config.json").write_text(json.dumps(config))
    write_vocab(folder / "vocab.txt", toy_vocab())
    return mlm, head


def reference_text(mlm, head, tokens):
    """``CXRBertModel.get_projected_text_embeddings`` before normalisation, written out."""
    import torch.nn.functional as F

    cls = mlm.bert(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).last_hidden_state[:, 0]
    h = F.gelu(cls @ head["cls_projection_head.dense_to_hidden.weight"].T + head["cls_projection_head.dense_to_hidden.bias"])
    h = F.layer_norm(h, h.shape[-1:], head["cls_projection_head.LayerNorm.weight"], head["cls_projection_head.LayerNorm.bias"], 1e-12)
    return h @ head["cls_projection_head.dense_to_output.weight"].T + head["cls_projection_head.dense_to_output.bias"]


@pytest.mark.parametrize(("name", "temporal"), [("tiny-biovil", False), ("tiny-biovil-t", True)])
def test_released_layout_loads_by_key_and_matches_reference(tmp_path, name, temporal):
    variant = biovil.VARIANTS[name.removeprefix("tiny-")]
    state, resnet = himl_image_state(temporal)
    torch.save(state, tmp_path / variant.image_file)
    mlm, head = cxr_bert_folder(tmp_path, biovil.tiny_text_fields())
    fm = load_model(name, weights=tmp_path)
    x = torch.rand(2, 3, 56, 56)
    tokens = fm.tokenize(["small left pleural effusion", "no finding"])
    with torch.no_grad():
        want_img, want_feat = reference_image(state, resnet, x, temporal)
        torch.testing.assert_close(fm.encode_image(x), want_img, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(fm.encode_image_unprojected(x), want_feat, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(fm.encode_text(tokens), reference_text(mlm, head, tokens), atol=1e-5, rtol=1e-4)
    assert fm.weights_id.count("sha256:") == 2


def test_unexpected_image_key_is_refused(tmp_path):
    state, _ = himl_image_state(False)
    state["projector.extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / biovil.VARIANTS["biovil"].image_file)
    cxr_bert_folder(tmp_path, biovil.tiny_text_fields())
    with pytest.raises(CxrfairError, match="do(es)? not match.*projector.extra"):
        load_model("tiny-biovil", weights=tmp_path)


def test_real_text_architecture_key_names():
    """CXR-BERT's real config: BertForMaskedLM's ``bert.*`` keys (no pooler) are exactly our text tower's."""
    from transformers import BertConfig, BertForMaskedLM

    fields = biovil.CXR_BERT_CONFIG
    with torch.device("meta"):
        mlm = BertForMaskedLM(BertConfig(**{k: v for k, v in fields.items() if k not in ("model_type", "projection_size")}))
        ours = biovil.build_text_model(fields)
    released = {k for k in mlm.state_dict() if k.startswith("bert.")}
    assert released == {k for k in ours.state_dict() if k.startswith("bert.")}
    assert ours.cls_projection_head.dense_to_hidden.weight.shape == (128, 768)


@pytest.mark.parametrize("temporal", [False, True])
def test_real_image_architecture_key_names(temporal):
    with torch.device("meta"):
        model = biovil.build_image_model(temporal)
    keys = set(model.state_dict())
    assert "encoder.encoder.layer4.2.conv3.weight" in keys and "projector.model.3.bias" in keys
    assert model.projector.model[0].weight.shape == (128, 512 if temporal else 2048, 1, 1)
    assert ("encoder.missing_previous_emb" in keys) == temporal


def test_preprocessing_is_himl_inference_transform():
    assert biovil.preprocess_for(480) == biovil.preprocess_for(480)
    pre = load_model("tiny-biovil").preprocess
    assert pre.minmax and pre.mean == (0.0,) * 3 and pre.std == (1.0,) * 3 and pre.interpolation == "bilinear"
    assert (biovil.VARIANTS["biovil"].crop, biovil.VARIANTS["biovil-t"].crop) == (480, 448)
    # hi-ml: remap_to_uint8 (min-max stretch) -> Resize(512) -> CenterCrop -> ToTensor (no mean/std).
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(40, 200, (90, 70), dtype=np.uint8), mode="L")
    arr = np.asarray(image, dtype=float)
    stretched = ((arr - arr.min()) / (arr.max() - arr.min()) * 255).astype(np.uint8)
    want = Image.fromarray(stretched).resize((64, int(64 * 90 / 70)), Image.BILINEAR)
    top = int(round((want.size[1] - 56) / 2.0))
    left = int(round((64 - 56) / 2.0))
    want = np.asarray(want.crop((left, top, left + 56, top + 56)))
    got = pre.prepare(image)
    assert np.array_equal(got[0], want)


@pytest.mark.parametrize("name", ["biovil", "biovil-t"])
def test_release_loader_reads_a_hub_style_folder(tmp_path, monkeypatch, name):
    """The real loaders (ResNet-50 shrunk by swapping its layer counts) on a folder named by $env."""
    variant = biovil.VARIANTS[name]
    monkeypatch.setattr(biovil, "RESNET50_LAYERS", TINY_RESNET_LAYERS)
    monkeypatch.setattr(biovil, "RESNET_WIDTH", TINY_RESNET_WIDTH)
    folder = tmp_path / "snapshot"
    folder.mkdir()
    state, resnet = himl_image_state(variant.temporal, joint=128)
    torch.save(state, folder / variant.image_file)
    cxr_bert_folder(folder, {**biovil.tiny_text_fields(), "projection_size": 128})
    monkeypatch.setenv(get_spec_env(name), str(folder))
    fm = load_model(name)
    assert fm.preprocess == biovil.preprocess_for(variant.crop)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fm.encode_image(x), reference_image(state, resnet, x, variant.temporal)[0],
                                   atol=1e-4, rtol=1e-4)
    (folder / "vocab.txt").unlink()
    with pytest.raises(CxrfairError, match="lacks vocab.txt"):
        load_model(name)


def get_spec_env(name):
    from cxrfair.extract.registry import get_spec

    return get_spec(name).weights_env


@pytest.mark.slow
def test_full_size_biovil_folder_round_trip(tmp_path):
    """ResNet-50 + BERT-base CXR-BERT (random weights) through the biovil loader."""
    state, resnet = himl_image_state(False, layers=(3, 4, 6, 3), width=64, joint=128)
    torch.save(state, tmp_path / biovil.VARIANTS["biovil"].image_file)
    fields = {**biovil.CXR_BERT_CONFIG, "vocab_size": len(toy_vocab())}
    mlm, head = cxr_bert_folder(tmp_path, fields)
    fm = load_model("biovil", weights=tmp_path)
    x = torch.rand(1, 3, 480, 480)
    tokens = fm.tokenize(["small left pleural effusion"])
    with torch.no_grad():
        torch.testing.assert_close(fm.encode_image(x), reference_image(state, resnet, x, False)[0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(fm.encode_text(tokens), reference_text(mlm, head, tokens), atol=1e-4, rtol=1e-4)
