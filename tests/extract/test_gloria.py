"""GLoRIA: the Lightning checkpoint loads safely and strictly; pooling and local score match references."""

import sys
import types
from collections import OrderedDict

import numpy as np
import pytest
import torch
from PIL import Image

from cxrfair.errors import CxrfairError
from cxrfair.extract.models import gloria, gloria_nn
from cxrfair.extract.registry import get_spec, load_model
from cxrfair.extract.safe_load import convert_to_safetensors, restricted_load

PROMPTS = ["a photo of cardiomegaly", "Small left pleural effusion.", "edema"]


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-gloria")


@pytest.fixture(scope="module")
def images():
    # One image keeps the 299-px forward cheap; local_similarity is per image anyway.
    return torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(2))


@pytest.fixture()
def fake_omegaconf(monkeypatch):
    """A class pickled as ``omegaconf.dictconfig.DictConfig``, like the checkpoint's hyper_parameters."""
    module = types.ModuleType("omegaconf.dictconfig")

    class DictConfig:
        def __init__(self, content):
            self.__dict__["_content"] = content

    DictConfig.__module__, DictConfig.__qualname__ = "omegaconf.dictconfig", "DictConfig"
    module.DictConfig = DictConfig
    monkeypatch.setitem(sys.modules, "omegaconf", types.ModuleType("omegaconf"))
    monkeypatch.setitem(sys.modules, "omegaconf.dictconfig", module)
    return DictConfig


def lightning_checkpoint(model, hyper_parameters):
    """What GLoRIA's Lightning run saved: ``gloria.*`` keys (BERT with ``position_ids``, as
    transformers 4.2 saved it) under ``state_dict``, beside non-tensor entries."""
    state = OrderedDict((f"gloria.{k}", v.clone()) for k, v in model.state_dict().items())
    bert = model.text_encoder.model
    state["gloria.text_encoder.model.embeddings.position_ids"] = torch.arange(bert.config.max_position_embeddings)[None]
    return {"epoch": 12, "global_step": 3456, "pytorch-lightning_version": "1.1.4", "state_dict": state,
            "hyper_parameters": hyper_parameters}


def _perturbed():
    fm = load_model("tiny-gloria")
    with torch.no_grad():
        for p in fm.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return fm


def _outputs(fm, images):
    tokens = fm.tokenize(PROMPTS)
    with torch.no_grad():
        g, local = fm.extras["encode_image_local"](images)
        words, counts = fm.extras["encode_text_words"](tokens)
        return [fm.encode_text(tokens), g, local, words], counts


def test_lightning_checkpoint_loads_strictly_and_matches(tmp_path, images, fake_omegaconf):
    fm = _perturbed()
    ckpt = tmp_path / "chexpert_resnet50.ckpt"
    torch.save(lightning_checkpoint(fm.model, fake_omegaconf({"model": {"text": {"embedding_dim": 768}}})), ckpt)
    assert "omegaconf.dictconfig.DictConfig" in restricted_load(ckpt).stubbed
    with pytest.raises(Exception):  # what the restricted reader is for: torch's own refuses the file
        torch.load(ckpt, weights_only=True)
    loaded = load_model("tiny-gloria", weights=ckpt)
    (want, want_counts), (got, got_counts) = _outputs(fm, images), _outputs(loaded, images)
    assert want_counts == got_counts
    assert all(torch.equal(a, b) for a, b in zip(want, got))
    assert got[1].shape == (1, 64) and got[2].shape == (1, 64, 19, 19) and got[3].shape == (3, 64, 97)
    with torch.no_grad():  # the cache's encode_image is the global part of the same forward
        assert torch.equal(loaded.encode_image(images), got[1])

    st = convert_to_safetensors(ckpt, tmp_path / "chexpert_resnet50.safetensors")
    from_st = _outputs(load_model("tiny-gloria", weights=st), images)[0]
    assert all(torch.equal(a, b) for a, b in zip(want, from_st))


def test_malicious_checkpoint_never_runs(tmp_path, tiny):
    import os

    marker = tmp_path / "MARKER"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    ckpt = tmp_path / "evil.ckpt"
    torch.save(lightning_checkpoint(tiny.model, Evil()), ckpt)
    with pytest.raises(CxrfairError, match="refusing"):
        load_model("tiny-gloria", weights=ckpt)
    assert not marker.exists()


def test_unexpected_key_is_refused(tmp_path, tiny, fake_omegaconf):
    ckpt = lightning_checkpoint(tiny.model, fake_omegaconf({}))
    ckpt["state_dict"]["gloria.img_encoder.extra.weight"] = torch.zeros(1)
    torch.save(ckpt, tmp_path / "x.ckpt")
    with pytest.raises(CxrfairError, match="do not match"):
        load_model("tiny-gloria", weights=tmp_path / "x.ckpt")


def reference_text(bert, id_to_token, ids, mask, types_):
    """GLoRIA's BertEncoder.forward + aggregate_tokens, transcribed loop for loop."""
    out = bert(ids, mask, types_, output_hidden_states=True)
    emb = torch.stack(out.hidden_states[-4:]).permute(1, 0, 2, 3)  # (B, layers, L, D)
    batch, layers, length, dim = emb.shape
    emb = emb.permute(0, 2, 1, 3)
    agg_batch = []
    for embs, caption in zip(emb, ids):
        agg, bank = [], []
        for word_emb, word_id in zip(embs, caption):
            word = id_to_token[word_id.item()]
            if word == "[SEP]":
                agg.append(torch.stack(bank).sum(0))
                agg.append(word_emb)
                break
            if not word.startswith("##"):
                if bank:
                    agg.append(torch.stack(bank).sum(0))
                bank = [word_emb]
            else:
                bank.append(word_emb)
        agg = torch.stack(agg)
        agg_batch.append(torch.cat([agg, torch.zeros(length - len(agg), layers, dim)]))
    emb = torch.stack(agg_batch).permute(0, 2, 1, 3)  # (B, layers, L, D)
    return emb.sum(1).permute(0, 2, 1), emb.mean(2).sum(1)  # words (B, D, L), sentences (B, D)


def test_text_pooling_matches_reference(tiny):
    tokens = tiny.tokenize(PROMPTS)
    enc = tiny.model.text_encoder
    tokens_0 = [enc.id_to_token[i] for i in tokens["input_ids"][0].tolist()]
    assert any(t.startswith("##") for t in tokens_0)  # the aggregation is really exercised
    with torch.no_grad():
        want_words, want_sent = reference_text(enc.model, enc.id_to_token, tokens["input_ids"],
                                               tokens["attention_mask"], tokens["token_type_ids"])
        words, counts = tiny.extras["encode_text_words"](tokens)
        sent = tiny.encode_text(tokens)
    assert torch.allclose(words, want_words, atol=1e-5) and torch.allclose(sent, want_sent, atol=1e-5)
    assert counts == [4, 4, 1] and tokens["input_ids"].shape == (3, 97)


def reference_local(img_emb_l, text_emb_l, cap_lens):
    """GLoRIA's get_local_similarities with attention_fn, transcribed."""
    batch_size = img_emb_l.shape[0]
    sims = []
    for i in range(len(text_emb_l)):
        n = cap_lens[i]
        word = text_emb_l[i, :, 1:n + 1].unsqueeze(0).contiguous().repeat(batch_size, 1, 1)
        context = img_emb_l
        b, q = word.size(0), word.size(2)
        ih, iw = context.size(2), context.size(3)
        context = context.view(b, -1, ih * iw)
        attn = torch.bmm(torch.transpose(context, 1, 2).contiguous(), word).view(b * ih * iw, q)
        attn = torch.softmax(attn, dim=-1).view(b, ih * iw, q)
        attn = torch.transpose(attn, 1, 2).contiguous().view(b * q, ih * iw) * 4.0
        attn = torch.softmax(attn, dim=-1).view(b, q, ih * iw)
        wei = torch.bmm(context, torch.transpose(attn, 1, 2).contiguous())
        w, c = word.transpose(1, 2).reshape(b * q, -1), wei.transpose(1, 2).reshape(b * q, -1)
        row = (torch.sum(w * c, 1) / (torch.norm(w, 2, 1) * torch.norm(c, 2, 1)).clamp(min=1e-8)).view(b, q)
        row = row.mul(5.0).exp().max(dim=1, keepdim=True).values
        sims.append(torch.log(row))
    return torch.cat(sims, 1)


def test_local_similarity_matches_reference(tiny, images):
    tokens = tiny.tokenize(PROMPTS)
    with torch.no_grad():
        glob, local = tiny.extras["encode_image_local"](images)
        words, counts = tiny.extras["encode_text_words"](tokens)
        got = tiny.extras["local_similarity"](local, words, counts)
        quirk = tiny.extras["local_similarity"](local, words, [96] * 3)  # the original's padded slice
        both = tiny.extras["similarity"](images, tokens, term="both")
        sentences = tiny.encode_text(tokens)
    assert got.shape == (1, 3)
    assert torch.allclose(got, reference_local(local, words, counts), atol=1e-5)
    assert torch.allclose(quirk, reference_local(local, words, [96] * 3), atol=1e-5)
    assert (quirk >= 0).all()  # zero-padded slots score cosine 0, flooring the original's score
    cosine = torch.nn.functional.cosine_similarity(glob[:, None], sentences[None], dim=-1)
    assert torch.allclose(both, (cosine + got) / 2, atol=1e-5)  # GLoRIA's similarity_type="both"
    with pytest.raises(ValueError, match="term"):
        tiny.extras["similarity"](images, tokens, term="mean")


def test_clean_prompt():
    assert gloria.clean_prompt("Small left\npleural effusion. 2. Mild edema") == "small left pleural effusion mild edema"
    assert gloria.clean_prompt("Édema") == "dema"  # GLoRIA drops non-ASCII characters
    assert gloria.clean_prompt("edema") == "edema"  # kept (GLoRIA would drop one-word sentences)


def test_word_groups():
    tokens = ["[CLS]", "card", "##io", "##megaly", "is", "[SEP]", "[PAD]"]
    assert gloria_nn.word_groups(tokens) == [[0], [1, 2, 3], [4], [5]]


def test_preprocess_constants():
    pre = gloria.GLORIA_PREPROCESS
    assert (pre.size, pre.resize, pre.mode, pre.mean, pre.std) == (224, 256, "pad", (0.5,) * 3, (0.5,) * 3)
    from PIL import Image

    image = Image.fromarray(np.full((512, 256), 200, np.uint8), mode="L")
    got = gloria.GLORIA_PREPROCESS.prepare(image)
    # long side 512 -> 256, width 256 -> 128 padded by 64 black columns each side; crop 16 off each side
    assert got.shape == (3, 224, 224) and (got[:, :, :48] == 0).all() and (got[:, :, 50:174] == 200).all()


def test_real_architecture_gives_768():
    """The shipped Bio_ClinicalBERT config and ResNet-50 give 768-d global and 768x19x19 local features."""
    with torch.device("meta"):
        model = gloria.build_gloria(gloria.BIO_CLINICALBERT_CONFIG, gloria.RESNET50_LAYERS, {})
        g, local = model.img_encoder.encode_local(torch.zeros(1, 3, 224, 224))
        hidden = model.text_encoder.model(torch.zeros(1, 7, dtype=torch.long)).last_hidden_state
    assert g.shape == (1, 768) and local.shape == (1, 768, 19, 19) and hidden.shape == (1, 7, 768)
    assert get_spec("gloria-rn50").embed_dim == 768


def test_lora_targets_hit_bottleneck_convs(tiny):
    from peft import LoraConfig, get_peft_model

    fm = load_model("tiny-gloria")
    model = get_peft_model(fm.image_encoder, LoraConfig(r=2, target_modules=get_spec("tiny-gloria").lora_targets))
    wrapped = [n for n, m in model.named_modules() if hasattr(m, "lora_A") and not n.endswith(("lora_A", "lora_B"))]
    assert len(wrapped) == 4 * 3 and all(n.rsplit(".", 1)[-1] in ("conv1", "conv2", "conv3") for n in wrapped)


def test_missing_weights_offline_names_url_and_location(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("CXRFAIR_GLORIA_RN50_WEIGHTS", raising=False)
    with pytest.raises(CxrfairError) as err:
        load_model("gloria-rn50")
    message = str(err.value)
    assert gloria.GLORIA_URL in message and "chexpert_resnet50.ckpt" in message
    assert str(tmp_path / ".cache" / "cxrfair" / "gloria-rn50") in message


def test_release_loader_reads_env_var_checkpoint(tmp_path, monkeypatch, fake_omegaconf):
    """The real ``gloria-rn50`` loader (ResNet-50 blocks and BERT shrunk by swapping the shipped
    configs): checkpoint from $CXRFAIR_GLORIA_RN50_WEIGHTS, vocab from ~/.cache/cxrfair/bio-clinicalbert/."""
    from cxrfair.extract.models.medclip import tiny_bert_fields, toy_vocab

    monkeypatch.setattr(gloria, "BIO_CLINICALBERT_CONFIG", tiny_bert_fields() | {"num_hidden_layers": 4})
    monkeypatch.setattr(gloria, "RESNET50_LAYERS", (1, 1, 1, 1))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("CXRFAIR_BIO_CLINICALBERT_VOCAB", raising=False)
    vocab = toy_vocab()
    with torch.random.fork_rng():
        torch.manual_seed(5)
        source = gloria.build_gloria(tiny_bert_fields() | {"num_hidden_layers": 4}, (1, 1, 1, 1),
                                     {i: t for t, i in vocab.items()}).eval()
    ckpt = tmp_path / "somewhere" / "chexpert_resnet50.ckpt"
    ckpt.parent.mkdir()
    torch.save(lightning_checkpoint(source, fake_omegaconf({})), ckpt)
    monkeypatch.setenv("CXRFAIR_GLORIA_RN50_WEIGHTS", str(ckpt))
    vocab_file = tmp_path / ".cache" / "cxrfair" / "bio-clinicalbert" / "vocab.txt"
    vocab_file.parent.mkdir(parents=True)
    vocab_file.write_text("\n".join(sorted(vocab, key=vocab.get)) + "\n")
    loaded = load_model("gloria-rn50")
    assert loaded.preprocess == gloria.GLORIA_PREPROCESS and loaded.extras["zero_shot_term"] == "global"
    want = source.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in loaded.model.state_dict().items())
    tokens = loaded.tokenize(PROMPTS)
    with torch.no_grad():
        assert torch.equal(loaded.encode_text(tokens), source.encode_text(tokens))


from tests.extract.test_medclip import extract_and_zeroshot, tiny_cohort  # noqa: E402,F401 - shared fixture


def test_extract_and_zeroshot_end_to_end(tiny_cohort, tmp_path, monkeypatch):  # noqa: F811 - the fixture above
    """The cache carries the global embeddings and every image's global and local similarity to
    every prompt (what GLoRIA's own zero-shot needs), and zero-shot from it uses that scoring."""
    from cxrfair.extract.cohort import load_cohort
    from tests.extract.extract_helpers import reference_image_embeddings

    cache, runs = extract_and_zeroshot("tiny-gloria", tiny_cohort, tmp_path, monkeypatch)
    assert cache.image_embeddings.shape == (16, 64) and np.isfinite(cache.image_embeddings).all()
    assert cache.attrs["logit_scale"] == 10.0
    assert runs and all(r.meta["model"] == "tiny-gloria" for r in runs)
    assert cache.attrs["zero_shot_term"] == "both" and all(r.meta["zero_shot_term"] == "both" for r in runs)
    scores = cache.prompt_scores
    every = {p for te in cache.text.values() for draw in te.prompts for plist in draw for p in plist}
    assert set(scores.prompts) == every and scores.global_sim.shape == scores.local_sim.shape == (16, len(every))
    # Stored scores = the model's own similarity for those pixels; embeddings = encode_image's.
    fm = load_model("tiny-gloria")
    paths = load_cohort(tiny_cohort).image_paths()[:2]
    x = torch.stack([fm.preprocess.normalize(torch.from_numpy(fm.preprocess.prepare(Image.open(p)))[None])[0]
                     for p in paths])
    prompts = [scores.prompts[0], scores.prompts[len(every) // 2], scores.prompts[-1]]
    cols = scores.columns(prompts)
    with torch.no_grad():
        want_global = fm.extras["similarity"](x, fm.tokenize(prompts), term="global").numpy()
        want_local = fm.extras["similarity"](x, fm.tokenize(prompts), term="local").numpy()
    np.testing.assert_allclose(scores.global_sim[:2][:, cols], want_global, atol=1e-5)
    np.testing.assert_allclose(scores.local_sim[:2][:, cols], want_local, atol=1e-4)
    np.testing.assert_allclose(cache.image_embeddings[:2], reference_image_embeddings(fm, paths), atol=1e-5)


@pytest.mark.slow
def test_full_size_checkpoint_round_trip(tmp_path, fake_omegaconf):
    """Full-size ResNet-50 + Bio_ClinicalBERT (random weights) through the gloria-rn50 loader."""
    from tests.extract.test_medclip import write_full_vocab

    with torch.random.fork_rng():
        torch.manual_seed(0)
        source = gloria.build_gloria(gloria.BIO_CLINICALBERT_CONFIG, gloria.RESNET50_LAYERS, {}).eval()
    torch.save(lightning_checkpoint(source, fake_omegaconf({})), tmp_path / "chexpert_resnet50.ckpt")
    write_full_vocab(tmp_path / "vocab.txt")
    loaded = load_model("gloria-rn50", weights=tmp_path / "chexpert_resnet50.ckpt")
    source.text_encoder.id_to_token = loaded.model.text_encoder.id_to_token
    x = torch.randn(1, 3, 224, 224)
    tokens = loaded.tokenize(PROMPTS)
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(x), source.encode_image(x))
        assert torch.equal(loaded.encode_text(tokens), source.encode_text(tokens))
        assert loaded.encode_image(x).shape == (1, 768)
