"""MedCLIP: released-format state dicts load strictly and reproduce the model they came from."""

import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from cxrfair.errors import CxrfairError
from cxrfair.extract.models import common, medclip
from cxrfair.extract.registry import get_spec, load_model

# transformers 5 Swin names -> the transformers 4.24 names MedCLIP's pytorch_model.bin was saved with.
SWIN_TO_424 = [
    ("attention.q_proj", "attention.self.query"),
    ("attention.k_proj", "attention.self.key"),
    ("attention.v_proj", "attention.self.value"),
    ("attention.relative_position_bias.relative_position_bias_table", "attention.self.relative_position_bias_table"),
    ("attention.o_proj", "attention.output.dense"),
    ("mlp.fc1", "intermediate.dense"),
    ("mlp.fc2", "output.dense"),
]


def to_424_state_dict(model):
    """The state dict MedCLIP would have saved with transformers 4.24 (written independently of
    the loader): old Swin names, persistent ``relative_position_index`` and BERT ``position_ids``."""
    out = {}
    for key, value in model.state_dict().items():
        if key.startswith("vision_model.model.encoder."):
            for new, old in SWIN_TO_424:
                key = key.replace(new, old)
        out[key] = value.clone()
    for name, buf in model.named_buffers():
        if name.endswith("relative_position_bias.relative_position_index"):
            out[name.replace("relative_position_bias.relative_position_index", "self.relative_position_index")] = buf.clone()
    bert = model.text_model.model
    out["text_model.model.embeddings.position_ids"] = torch.arange(bert.config.max_position_embeddings)[None]
    return out


def _embed(fm, images, prompts):
    with torch.no_grad():
        return fm.encode_image(images), fm.encode_text(fm.tokenize(prompts))


PROMPTS = ["a photo of cardiomegaly", "small left pleural effusion", "no finding"]


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, medclip.TINY_IMAGE_SIZE, medclip.TINY_IMAGE_SIZE, generator=torch.Generator().manual_seed(1))


def _perturbed(name):
    """A tiny model whose weights differ from the seeded default, so a silent fallback to random
    init (instead of loading the file) cannot pass the comparison."""
    fm = load_model(name)
    with torch.no_grad():
        for p in fm.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
        fm.model.logit_scale.fill_(2.5)
    return fm


def _save(state, tmp_path, form):
    if form == "bin":
        path = tmp_path / "pytorch_model.bin"
        torch.save(state, path)
    elif form == "zip":  # as released: a zip holding <folder>/pytorch_model.bin
        torch.save(state, tmp_path / "pytorch_model.bin")
        path = tmp_path / "medclip-vit-pretrained.zip"
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("__MACOSX/medclip-vit-pretrained/._pytorch_model.bin", b"resource fork, not weights")
            zf.write(tmp_path / "pytorch_model.bin", "medclip-vit-pretrained/pytorch_model.bin")
        (tmp_path / "pytorch_model.bin").unlink()
    else:  # a folder holding the file
        path = tmp_path / "unzipped"
        path.mkdir()
        torch.save(state, path / "pytorch_model.bin")
    return path


@pytest.mark.parametrize(("name", "form"), [("tiny-medclip-vit", "zip"), ("tiny-medclip-vit", "folder"),
                                            ("tiny-medclip-rn50", "bin")])
def test_original_key_names_load_strictly_and_match(tmp_path, images, name, form):
    fm = _perturbed(name)
    state = to_424_state_dict(fm.model)
    if name.endswith("vit"):  # the file really carries the old names the issue describes
        assert "vision_model.model.encoder.layers.0.blocks.0.attention.self.query.weight" in state
        assert "vision_model.model.encoder.layers.0.blocks.0.attention.self.relative_position_index" in state
        assert not any("q_proj" in k or "mlp.fc" in k for k in state)
    loaded = load_model(name, weights=_save(state, tmp_path, form))
    want, got = _embed(fm, images, PROMPTS), _embed(loaded, images, PROMPTS)
    assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])
    assert got[0].shape == (2, 512) and got[1].shape == (3, 512)
    assert loaded.logit_scale == pytest.approx(np.exp(2.5))
    assert loaded.weights_id.startswith("sha256:" if form != "folder" else "dir:")


def test_plain_load_state_dict_fails_on_old_names():
    """Why the loader goes through transformers' conversion: the names really differ."""
    fm = load_model("tiny-medclip-vit")
    with pytest.raises(RuntimeError, match="Missing key"):
        fm.model.load_state_dict(to_424_state_dict(fm.model), strict=True)


@pytest.mark.parametrize("edit", ["extra", "missing", "bad_index"])
def test_foreign_or_incomplete_state_dict_is_refused(tmp_path, edit):
    fm = load_model("tiny-medclip-vit")
    state = to_424_state_dict(fm.model)
    if edit == "extra":
        state["vision_model.head.weight"] = torch.zeros(2)
    elif edit == "missing":
        del state["text_model.model.encoder.layer.0.output.dense.weight"]
    else:
        key = "vision_model.model.encoder.layers.0.blocks.0.attention.self.relative_position_index"
        state[key] = state[key].flip(0)
    with pytest.raises(CxrfairError, match="do(es)? not match"):
        load_model("tiny-medclip-vit", weights=_save(state, tmp_path, "bin"))


def test_text_pooling_matches_reference():
    """Layers 1, 2 and last, each averaged over all positions (padding included), then averaged."""
    fm = load_model("tiny-medclip-rn50")
    tokens = fm.tokenize(PROMPTS)
    assert tokens["attention_mask"].min() == 0  # the batch is padded, so the padding rule matters
    text = fm.model.text_model
    with torch.no_grad():
        hs = text.model(**tokens, output_hidden_states=True).hidden_states
        pooled = (hs[1].mean(1) + hs[2].mean(1) + hs[-1].mean(1)) / 3
        want = pooled @ text.projection_head.weight.T
        got = fm.encode_text(tokens)
    assert torch.allclose(got, want, atol=1e-6)


def test_logit_scale_init_and_clamp():
    fm = load_model("tiny-medclip-vit")
    assert fm.logit_scale == pytest.approx(1 / 0.07, rel=1e-6)
    with torch.no_grad():
        fm.model.logit_scale.fill_(7.0)
    assert fm.model.temperature() == pytest.approx(np.exp(4.6052))


def test_preprocess_constants_and_pixels():
    pre = medclip.MEDCLIP_PREPROCESS
    assert (pre.size, pre.resize, pre.mode, pre.interpolation) == (224, 224, "pad", "bicubic")
    assert pre.mean == (0.5862785803043838,) * 3 and pre.std == (0.27950088968644304,) * 3
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (300, 200), dtype=np.uint8), mode="L")
    # Reference: MedCLIP's pad_img (black 'L' canvas, int((size - x) / 2) offsets), then resize.
    canvas = Image.new("L", (300, 300), 0)
    canvas.paste(image, (int((300 - 200) / 2), 0))
    want = np.array(canvas.resize((224, 224), Image.BICUBIC))
    got = pre.prepare(image)
    assert got.shape == (3, 224, 224) and all(np.array_equal(got[c], want) for c in range(3))
    normed = pre.normalize(torch.from_numpy(got)[None])
    ref = (torch.from_numpy(want).float() / 255 - 0.5862785803043838) / 0.27950088968644304
    assert torch.allclose(normed[0, 0], ref, atol=1e-6)


@pytest.mark.parametrize("vision", ["swin", "resnet"])
def test_real_architecture_gives_512(vision):
    """The shipped configs build the released architecture (meta device: shapes only, no memory)."""
    with torch.device("meta"):
        model = medclip.build_medclip(vision, medclip.BIO_CLINICALBERT_CONFIG, medclip.SWIN_TINY_CONFIG)
        image = model.encode_image(torch.zeros(1, 3, 224, 224))
        text = model.text_model(torch.zeros(1, 7, dtype=torch.long))
    assert image.shape == (1, 512) and text.shape == (1, 512)
    assert model.text_model.model.embeddings.word_embeddings.weight.shape == (28996, 768)
    assert get_spec("medclip-vit").embed_dim == get_spec("medclip-rn50").embed_dim == 512


@pytest.mark.parametrize(("name", "expected"), [("tiny-medclip-vit", 2 * 6), ("tiny-medclip-rn50", 4 * 3)])
def test_lora_targets_hit_the_intended_modules(name, expected):
    from peft import LoraConfig, get_peft_model

    fm = load_model(name)
    targets = get_spec(name).lora_targets
    model = get_peft_model(fm.image_encoder, LoraConfig(r=2, target_modules=targets))
    wrapped = [n for n, m in model.named_modules() if hasattr(m, "lora_A") and not n.endswith(("lora_A", "lora_B"))]
    assert len(wrapped) == expected  # Swin: 2 blocks x q/k/v/o + fc1/fc2; ResNet: 4 blocks x conv1-3
    assert not any("patch_embeddings" in n or "downsample" in n or n.endswith("model.conv1") for n in wrapped)


def test_missing_weights_offline_names_url_and_location(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("CXRFAIR_MEDCLIP_VIT_WEIGHTS", raising=False)
    with pytest.raises(CxrfairError) as err:
        load_model("medclip-vit")
    message = str(err.value)
    assert "https://storage.googleapis.com/pytrial/medclip-vit-pretrained.zip" in message
    assert str(tmp_path / ".cache" / "cxrfair" / "medclip-vit") in message
    assert "CXRFAIR_MEDCLIP_VIT_WEIGHTS" in message
    assert medclip.BERT_VOCAB_URL in message


def _write_vocab(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(sorted(medclip.toy_vocab(), key=medclip.toy_vocab().get)) + "\n")


def test_release_loader_finds_zip_and_vocab_in_cache(tmp_path, monkeypatch, images):
    """The real ``medclip-vit`` loader (shrunk by swapping its shipped configs for tiny ones):
    zip and vocab.txt found under ~/.cache/cxrfair/medclip-vit/, embeddings reproduced."""
    monkeypatch.setattr(medclip, "BIO_CLINICALBERT_CONFIG", medclip.tiny_bert_fields())
    monkeypatch.setattr(medclip, "SWIN_TINY_CONFIG", medclip.TINY_SWIN_CONFIG)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("CXRFAIR_MEDCLIP_VIT_WEIGHTS", raising=False)
    monkeypatch.delenv(medclip.VOCAB_ENV, raising=False)
    monkeypatch.setattr(common, "hub_cached_vocab", lambda: None)  # this machine's hub cache is not under test
    fm = _perturbed("tiny-medclip-vit")
    folder = tmp_path / ".cache" / "cxrfair" / "medclip-vit"
    folder.mkdir(parents=True)
    (_save(to_424_state_dict(fm.model), folder, "zip"))
    with pytest.raises(CxrfairError, match="vocab.txt") as err:  # weights alone are not enough
        load_model("medclip-vit")
    assert medclip.BERT_VOCAB_URL in str(err.value)
    _write_vocab(folder / "vocab.txt")
    loaded = load_model("medclip-vit")
    assert loaded.preprocess == medclip.MEDCLIP_PREPROCESS
    want, got = _embed(fm, images, PROMPTS), _embed(loaded, images, PROMPTS)
    assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])


# --- end to end: extraction into the cache, then zero-shot from the cache -----------------------


@pytest.fixture(scope="module")
def tiny_cohort(tmp_path_factory):
    """A 16-image synthetic NIH-layout cohort (2 diseases x 4 groups x 2), 32-px images."""
    from cxrfair.extract.cohort import CohortConfig, build_cohort
    from cxrfair.extract.synth import SynthConfig, make_synth

    root = tmp_path_factory.mktemp("e2e")
    make_synth(SynthConfig(out=root / "nih", seed=0, size=32, per_cell=3))
    build_cohort(CohortConfig.from_preset(out=root / "cohort", metadata=root / "nih" / "Data_Entry_2017.csv",
                                          images=root / "nih", diseases="Edema, Effusion", per_group=2))
    return root / "cohort"


def extract_and_zeroshot(model, cohort, tmp_path, monkeypatch):
    """Run the real extractor and zero-shot probe; return the cache and the runs written."""
    from cxrfair.core.runs import read_runs
    from cxrfair.extract import extractor, prompts
    from cxrfair.extract.cache import read_cache
    from cxrfair.extract.extractor import ExtractConfig, extract
    from cxrfair.probe.zeroshot import zeroshot_cache

    # 2 draws of 3 prompts per set instead of 10 x 10: the prompt sampling is not under test here,
    # and every prompt is a BERT forward on 2 shared CPU cores.
    full = prompts.build_all
    monkeypatch.setattr(extractor, "build_all", lambda classes, seed=0: full(classes, draws=2, k=3, seed=seed))
    out = tmp_path / f"{model}.h5"
    extract(ExtractConfig(model=model, cohort=cohort, out=out, batch_size=8, workers=0, device="cpu", progress=False))
    zeroshot_cache(out, tmp_path / "runs")
    return read_cache(out), read_runs(tmp_path / "runs")


@pytest.mark.parametrize("name", ["tiny-medclip-vit", "tiny-medclip-rn50"])
def test_extract_and_zeroshot_end_to_end(tiny_cohort, tmp_path, monkeypatch, name):
    cache, runs = extract_and_zeroshot(name, tiny_cohort, tmp_path, monkeypatch)
    assert cache.image_embeddings.shape == (16, 512) and np.isfinite(cache.image_embeddings).all()
    assert cache.attrs["logit_scale"] == pytest.approx(1 / 0.07, rel=1e-6)
    assert cache.attrs["preprocessing"]["mean"] == [medclip.MEDCLIP_MEAN] * 3
    assert runs and all(r.meta["model"] == name and r.meta["method"] == "zeroshot" for r in runs)


def write_full_vocab(path, size=28996):
    """A vocab.txt the size of Bio_ClinicalBERT's: the toy tokens, then filler entries."""
    toy = sorted(medclip.toy_vocab(), key=medclip.toy_vocab().get)
    path.write_text("\n".join(toy + [f"[unused{i}]" for i in range(size - len(toy))]) + "\n")


@pytest.mark.slow
@pytest.mark.parametrize("vision", ["swin", "resnet"])
def test_full_size_release_format_round_trip(tmp_path, vision):
    """Full-size Swin-T / ResNet-50 + Bio_ClinicalBERT (random weights) through the release loader."""
    name = "medclip-vit" if vision == "swin" else "medclip-rn50"
    with torch.random.fork_rng():
        torch.manual_seed(0)
        source = medclip.build_medclip(vision, medclip.BIO_CLINICALBERT_CONFIG, medclip.SWIN_TINY_CONFIG).eval()
    torch.save(to_424_state_dict(source), tmp_path / "pytorch_model.bin")
    write_full_vocab(tmp_path / "vocab.txt")
    loaded = load_model(name, weights=tmp_path / "pytorch_model.bin")
    x = torch.randn(1, 3, 224, 224)
    tokens = loaded.tokenize(PROMPTS)
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(x), source.encode_image(x))
        assert torch.equal(loaded.encode_text(tokens), source.encode_text(tokens))
