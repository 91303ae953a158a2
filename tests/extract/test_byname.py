"""Any model by name: ``hf:PATH`` folders (tiny CLIP, SigLIP, ViT, DINOv2 written by save_pretrained)
and ``open_clip:ARCH`` + ``--weights``, end to end through ``cxrfair extract``, checked against direct
transformers / open_clip forward passes written here; preprocessing from the model's own config;
LoRA targets read off the module tree; one-line errors offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from cxrfair.cli import main
from cxrfair.core.runs import safe_name
from cxrfair.errors import CxrfairError
from cxrfair.extract.cache import read_cache
from cxrfair.extract.cohort import load_cohort
from cxrfair.extract.models import byname
from cxrfair.extract.models.common import preprocess_from_hf, tiny_bert_dir
from cxrfair.extract.registry import get_spec, list_specs, load_model
from cxrfair.io import sha256_file
from tests.extract.extract_helpers import make_cohort

TOWER = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 2}


def run(*args):
    return CliRunner().invoke(main, [*map(str, args)])


def one_line_error(result, *needles):
    lines = [ln for ln in result.output.strip().splitlines() if ln.strip()]
    assert result.exit_code != 0 and "Traceback" not in result.output, result.output
    assert lines and lines[-1].startswith("Error: "), result.output
    for needle in needles:
        assert needle in lines[-1], (needle, lines[-1])


# --- tiny models written to disk ------------------------------------------------------------------

def clip_tokenizer():
    """A CLIP BPE tokenizer over single characters (no merges): every lowercase prompt tokenises."""
    from transformers import CLIPTokenizer

    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789.,-'")
    vocab = {t: i for i, t in enumerate(["<|startoftext|>", "<|endoftext|>", *chars, *(c + "</w>" for c in chars)])}
    return CLIPTokenizer(vocab=vocab, merges=[])


def save_clip(folder: Path) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    tok = clip_tokenizer()
    config = CLIPConfig(
        text_config={**TOWER, "vocab_size": len(tok), "max_position_embeddings": 77, "bos_token_id": tok.bos_token_id,
                     "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id},
        vision_config={**TOWER, "image_size": 32, "patch_size": 8}, projection_dim=24)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def save_siglip(folder: Path) -> Path:
    from transformers import AutoTokenizer, SiglipConfig, SiglipImageProcessor, SiglipModel

    tok = AutoTokenizer.from_pretrained(str(tiny_bert_dir()))
    config = SiglipConfig(text_config={**TOWER, "vocab_size": tok.vocab_size, "max_position_embeddings": 16},
                          vision_config={**TOWER, "image_size": 28, "patch_size": 14})
    torch.manual_seed(1)
    model = SiglipModel(config)
    with torch.no_grad():
        model.logit_bias.fill_(-7.0)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    SiglipImageProcessor(size={"height": 28, "width": 28}, resample=2).save_pretrained(folder)
    return folder


def save_vit(folder: Path) -> Path:
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(2)
    ViTModel(ViTConfig(**TOWER, image_size=32, patch_size=8)).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def save_dinov2(folder: Path) -> Path:
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(3)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, patch_size=14,
                             image_size=28)).save_pretrained(folder)
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 28, "width": 28}, do_center_crop=True,
                      image_mean=[0.53] * 3, image_std=[0.26] * 3).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("byname")
    return {kind: save(root / kind) for kind, save in
            (("clip", save_clip), ("siglip", save_siglip), ("vit", save_vit), ("dinov2", save_dinov2))}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return make_cohort(tmp_path_factory.mktemp("byname-cohort"))


def cohort_pixels(cohort: Path, pre) -> torch.Tensor:
    """(N, 3, S, S) normalised pixels of every cohort image, one at a time through ``pre``."""
    c = load_cohort(cohort)
    out = []
    for path in c.image_paths(None):
        with Image.open(path) as im:
            out.append(pre.normalize(torch.from_numpy(pre.prepare(im))[None]))
    return torch.cat(out)


def direct_image_features(kind: str, folder: Path, pixels: torch.Tensor) -> np.ndarray:
    """The reference: transformers' own classes and methods on the same pixels."""
    import transformers

    cls = {"clip": "CLIPModel", "siglip": "SiglipModel", "vit": "ViTModel", "dinov2": "Dinov2Model"}[kind]
    model = getattr(transformers, cls).from_pretrained(str(folder)).eval()
    with torch.no_grad():
        if kind in ("clip", "siglip"):
            out = model.get_image_features(pixel_values=pixels)
            out = out if isinstance(out, torch.Tensor) else out.pooler_output
        elif kind == "vit":
            out = model(pixel_values=pixels).last_hidden_state[:, 0]  # CLS; not the learned tanh pooler
        else:
            out = model(pixel_values=pixels).pooler_output  # DINOv2: CLS after the final layer norm
    return out.numpy()


def direct_text_features(kind: str, folder: Path, prompts: list[str]) -> np.ndarray:
    """(T, D) L2-normalised text features, each prompt tokenised alone as the family pads."""
    import transformers
    from transformers import AutoTokenizer

    model = getattr(transformers, {"clip": "CLIPModel", "siglip": "SiglipModel"}[kind]).from_pretrained(str(folder)).eval()
    tok = AutoTokenizer.from_pretrained(str(folder))
    rows = []
    with torch.no_grad():
        for p in prompts:
            if kind == "siglip":
                t = tok([p], padding="max_length", max_length=16, truncation=True, return_tensors="pt")
                out = model.get_text_features(input_ids=t["input_ids"])
            else:
                t = tok([p], truncation=True, max_length=77, return_tensors="pt")
                out = model.get_text_features(**t)
            out = out if isinstance(out, torch.Tensor) else out.pooler_output
            rows.append(torch.nn.functional.normalize(out, dim=-1)[0].numpy())
    return np.stack(rows)


# --- specs: what the name resolves to ---------------------------------------------------------------

def test_specs_built_from_the_folders_config(folders):
    clip, siglip = get_spec(f"hf:{folders['clip']}"), get_spec(f"hf:{folders['siglip']}")
    vit, dino = get_spec(f"hf:{folders['vit']}"), get_spec(f"hf:{folders['dinov2']}")
    assert (clip.zero_shot, clip.embed_dim, clip.embedding, clip.unprojected_dim) == (True, 24, "projected", 32)
    assert (siglip.zero_shot, siglip.embed_dim, siglip.unprojected_dim) == (True, 32, None)
    assert (vit.zero_shot, vit.embed_dim, vit.embedding) == (False, 32, "CLS (last_hidden_state[:, 0])")
    assert (dino.zero_shot, dino.embed_dim, dino.embedding) == (False, 32, "pooler_output")
    assert clip.weights_source == f"folder {folders['clip'].resolve()}"
    assert "CLIPConfig" in clip.description and "vision only" in vit.description
    # Built on the fly, never listed; the same spec object for the same name.
    assert f"hf:{folders['clip']}" not in {s.name for s in list_specs()}
    assert get_spec(f"hf:{folders['clip']}") is clip


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_dual_encoders_by_name_equal_transformers_own_features(kind, folders):
    import transformers

    fm = load_model(f"hf:{folders[kind]}")
    side = fm.preprocess.size
    x = torch.randn(3, 3, side, side, generator=torch.Generator().manual_seed(0))
    prompts = ["no pleural effusion", "a chest x-ray showing cardiomegaly with mild edema"]
    with torch.no_grad():
        model = getattr(transformers, {"clip": "CLIPModel", "siglip": "SiglipModel"}[kind]).from_pretrained(str(folders[kind]))
        want = model.get_image_features(pixel_values=x)
        want = want if isinstance(want, torch.Tensor) else want.pooler_output
        got_text = torch.nn.functional.normalize(fm.encode_text(fm.tokenize(prompts)), dim=-1).numpy()
        assert torch.allclose(fm.encode_image(x), want, atol=1e-5)
    np.testing.assert_allclose(got_text, direct_text_features(kind, folders[kind], prompts), atol=1e-5)
    assert fm.logit_scale == pytest.approx(float(model.logit_scale.detach().exp()))


def test_clip_offers_its_features_before_the_projection(folders):
    from transformers import CLIPModel

    fm = load_model(f"hf:{folders['clip']}")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = CLIPModel.from_pretrained(str(folders["clip"])).vision_model(pixel_values=x).pooler_output
        got = fm.encode_image_unprojected(x)
    assert got.shape == (2, fm.spec.unprojected_dim) and torch.allclose(got, want, atol=1e-6)
    assert load_model(f"hf:{folders['siglip']}").encode_image_unprojected is None


def test_unknown_name_lists_the_by_name_forms():
    with pytest.raises(CxrfairError, match="hf:ORG/NAME or hf:PATH"):
        get_spec("not-a-model")
    with pytest.raises(CxrfairError, match="neither a folder nor a hub id"):
        get_spec("hf:./no/such/folder")
    with pytest.raises(CxrfairError, match="not an open_clip architecture"):
        get_spec("open_clip:No-Such-Arch/openai")
    with pytest.raises(CxrfairError, match="no pretrained tag 'nope'.*openai"):
        get_spec("open_clip:ViT-B-16/nope")
    from dataclasses import replace

    from cxrfair.extract.registry import register

    with pytest.raises(ValueError, match="are models by name"):
        register(replace(get_spec("tiny-clip"), name="hf:tiny-clip"))


# --- extraction end to end ----------------------------------------------------------------------------

# Dual encoders also embed every prompt set (~10 s each on a shared 2-core machine): slow; the fast
# test below checks their image and text sides directly.
@pytest.mark.parametrize("kind", [pytest.param("clip", marks=pytest.mark.slow), pytest.param("siglip", marks=pytest.mark.slow),
                                  "vit", "dinov2"])
def test_extract_by_name_equals_a_direct_transformers_forward(kind, folders, cohort, tmp_path):
    name = f"hf:{folders[kind]}"
    result = run("extract", "--model", name, "--cohort", cohort, "--out", tmp_path, "--batch-size", 16, "--workers", 0)
    assert result.exit_code == 0, result.output
    files = list(tmp_path.glob("*.h5"))
    assert [f.name for f in files] == [f"{safe_name(name)}.h5"] and ":" not in files[0].name  # one file, no subfolders
    cache = read_cache(files[0])
    fm = load_model(name)
    # The cache records exactly what ran.
    assert cache.attrs["model"] == name
    assert cache.attrs["weights_id"] == f"sha256:{sha256_file(folders[kind] / 'model.safetensors')}"
    assert cache.attrs["weights_source"] == f"folder {folders[kind].resolve()}"
    assert cache.attrs["embedding"] == fm.spec.embedding
    assert cache.attrs["preprocessing"] == json.loads(json.dumps(fm.preprocess.describe()))
    want = direct_image_features(kind, folders[kind], cohort_pixels(cohort, fm.preprocess))
    np.testing.assert_allclose(cache.image_embeddings, want, rtol=1e-4, atol=1e-5)
    if kind in ("clip", "siglip"):
        assert cache.logit_scale == pytest.approx(float(fm.model.logit_scale.detach().exp()))
        te = next(iter(cache.text.values()))
        prompts = te.prompts[0][0]  # draw 0, class 0
        np.testing.assert_allclose(te.embeddings[0, 0], direct_text_features(kind, folders[kind], prompts).mean(0),
                                   rtol=1e-4, atol=1e-5)
    else:
        assert cache.text == {}
        one_line_error(run("probe", "zeroshot", "--cache", files[0], "--out", tmp_path / "runs"))
        with pytest.raises(CxrfairError, match="no text tower: zero-shot is not available"):
            fm.tokenize(["edema"])
    if kind == "siglip":
        assert fm.extras == {"logit_bias": -7.0, "zero_shot_rule": "sigmoid"}


def test_folders_that_cannot_work_are_refused_in_one_line(folders, tmp_path):
    import shutil

    from transformers import BertConfig, BertModel

    no_processor = tmp_path / "vit-no-processor"
    shutil.copytree(folders["vit"], no_processor)
    (no_processor / "preprocessor_config.json").unlink()
    with pytest.raises(CxrfairError, match=r"could not read the image processor .* expected a folder written by save_pretrained"):
        load_model(f"hf:{no_processor}")
    no_tokenizer = tmp_path / "clip-no-tokenizer"
    shutil.copytree(folders["clip"], no_tokenizer, ignore=shutil.ignore_patterns("tokenizer*", "vocab*", "merges*",
                                                                                "special_tokens*"))
    with pytest.raises(CxrfairError, match="could not read the tokenizer"):
        load_model(f"hf:{no_tokenizer}")
    BertModel(BertConfig(**TOWER, vocab_size=50)).save_pretrained(tmp_path / "bert")
    with pytest.raises(CxrfairError, match="BertModel does not take images"):
        get_spec(f"hf:{tmp_path / 'bert'}")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_zero_shot_probe_runs_on_a_by_name_cache(kind, folders, cohort, tmp_path):
    from cxrfair.core.runs import read_run

    name = f"hf:{folders[kind]}"
    assert run("extract", "--model", name, "--cohort", cohort, "--out", tmp_path, "--workers", 0).exit_code == 0
    result = run("probe", "zeroshot", "--cache", tmp_path / f"{safe_name(name)}.h5", "--out", tmp_path / "runs")
    assert result.exit_code == 0, result.output
    runs = [read_run(p) for p in (tmp_path / "runs").iterdir() if not p.name.startswith(".") and p.is_dir()]
    assert runs and all(r.method == "zeroshot" and len(r.predictions) > 0 for r in runs)


def test_weights_option_is_refused_for_hf_names(folders, cohort, tmp_path):
    one_line_error(run("extract", "--model", f"hf:{folders['vit']}", "--cohort", cohort, "--out", tmp_path,
                       "--weights", folders["vit"], "--workers", 0), "--weights does not apply", "hf:/path/to/folder")


# --- preprocessing from the model's own config ----------------------------------------------------------

def _images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode="L") for shape in ((90, 60), (48, 80))]


@pytest.mark.parametrize("kind", ["clip", "siglip", "vit", "dinov2"])
def test_preprocessing_matches_the_models_own_image_processor(kind, folders):
    """Our prepare + normalize gives the pixels of the folder's image processor (its PIL backend)."""
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(str(folders[kind]), backend="pil")
    pre = preprocess_from_hf(processor.to_dict(), kind)
    for image in _images():
        want = processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"]
        got = pre.normalize(torch.from_numpy(pre.prepare(image))[None])
        assert got.shape == want.shape
        # Same PIL resize, rounded to uint8 as we do: equal up to float noise (measured: 0.0). transformers 5's
        # default torchvision backend resizes differently (measured: up to 2 grey levels, 0.015 here).
        assert (got - want).abs().max() < 1e-5, (kind, (got - want).abs().max())


def test_processor_configs_map_field_by_field():
    from transformers import BitImageProcessor, CLIPImageProcessor, ConvNextImageProcessor, ViTImageProcessor

    clip = preprocess_from_hf(CLIPImageProcessor().to_dict(), "clip")
    assert (clip.size, clip.resize, clip.mode, clip.interpolation) == (224, 224, "shortest", "bicubic")
    assert clip.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    vit = preprocess_from_hf(ViTImageProcessor().to_dict(), "vit")
    assert (vit.size, vit.resize, vit.mode, vit.interpolation, vit.mean) == (224, 224, "squash", "bilinear", (0.5,) * 3)
    bit = preprocess_from_hf(BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}).to_dict(), "bit")
    assert (bit.size, bit.resize, bit.mode) == (224, 256, "shortest")
    convnext = preprocess_from_hf(ConvNextImageProcessor(size={"shortest_edge": 224}).to_dict(), "convnext")
    assert (convnext.size, convnext.resize, convnext.mode) == (224, 256, "shortest")  # crop_pct 0.875
    assert preprocess_from_hf(ConvNextImageProcessor().to_dict(), "convnext").mode == "squash"  # 384: no crop
    with pytest.raises(CxrfairError, match="rescaled by 1/255"):
        preprocess_from_hf({**CLIPImageProcessor().to_dict(), "do_rescale": False}, "x")


def test_openclip_preprocess_cfg_maps():
    cfg = {"size": (64, 64), "mean": (0.1, 0.2, 0.3), "std": (0.4, 0.5, 0.6), "interpolation": "bilinear",
           "resize_mode": "squash"}
    pre = byname.preprocess_from_openclip(cfg, "x")
    assert (pre.size, pre.resize, pre.mode, pre.interpolation, pre.mean, pre.std) == (
        64, 64, "squash", "bilinear", (0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    with pytest.raises(CxrfairError, match="resize_mode 'longest'"):
        byname.preprocess_from_openclip({**cfg, "resize_mode": "longest"}, "x")
    with pytest.raises(CxrfairError, match="not square"):
        byname.preprocess_from_openclip({**cfg, "size": (64, 32)}, "x")


# --- LoRA targets from the module tree ---------------------------------------------------------------------

def _lora_modules(encoder, targets) -> set[str]:
    """Module names of ``Classifier(encoder)`` that peft would wrap for ``targets`` (its own matcher)."""
    from peft.tuners.tuners_utils import check_target_module_exists
    from peft import LoraConfig

    from cxrfair.finetune.model import Classifier

    model = Classifier(encoder, 4, 2)
    config = LoraConfig(target_modules=targets if isinstance(targets, str) else list(targets))
    return {n for n, _ in model.named_modules() if n and check_target_module_exists(config, n)}


@pytest.mark.parametrize("model", ["tiny-medsiglip", "tiny-rad-dino", "tiny-clip", "tiny-biomedclip", "tiny-medclip-vit"])
def test_inferred_lora_targets_select_what_the_hand_written_lists_select(model):
    from cxrfair.extract.models.byname_nn import infer_lora_targets

    fm = load_model(model)
    inferred = infer_lora_targets(fm.image_encoder)
    want = _lora_modules(fm.image_encoder, fm.spec.lora_targets)
    assert want and _lora_modules(fm.image_encoder, inferred) == want


def test_lora_targets_of_hf_names_stay_in_the_image_encoder(folders):
    spec = get_spec(f"hf:{folders['clip']}")
    fm = load_model(spec.name)
    chosen = _lora_modules(fm.image_encoder, spec.lora_targets)
    assert {n.rsplit(".", 1)[-1] for n in chosen} == {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}
    assert len(chosen) == 2 * 6 and all(n.startswith("encoder.tower.encoder.layers.") for n in chosen)
    # ViT: transformers 5 names its linears q/k/v/o_proj (4.x: query/key/value/dense); read off the tree either
    # way, and never the learned pooler head outside the numbered blocks.
    vit = get_spec(f"hf:{folders['vit']}")
    chosen = _lora_modules(load_model(vit.name).image_encoder, vit.lora_targets)
    assert {n.rsplit(".", 1)[-1] for n in chosen} == {"q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"}
    assert len(chosen) == 2 * 6 and not any("pooler" in n for n in chosen)


def test_finetune_lora_builds_a_peft_model_on_an_hf_name_and_trains(folders, tmp_path):
    from tests.finetune.helpers import make_cohort as make_ft_cohort

    cohort = make_ft_cohort(tmp_path / "cohort", tmp_path / "images", per_split={"train": 2, "val": 1, "test": 1},
                            size=40)
    name = f"hf:{folders['vit']}"
    result = run("finetune", "lora", "--model", name, "--cohort", cohort, "--out", tmp_path / "runs", "--epochs", 1,
                 "--batch-size", 6, "--lr", "1e-2", "--workers", 1, "--device", "cpu")
    assert result.exit_code == 0, result.output
    runs = [p for p in (tmp_path / "runs").iterdir() if not p.name.startswith(".")]
    assert len(runs) == 1 and runs[0].name.startswith("hf-") and "__lora__" in runs[0].name
    adapter = json.loads((runs[0] / "adapter" / "adapter_config.json").read_text())
    assert adapter["target_modules"] == get_spec(name).lora_targets
    from safetensors.torch import load_file

    weights = load_file(str(runs[0] / "adapter" / "adapter_model.safetensors"))
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: a step was taken


# --- open_clip by name --------------------------------------------------------------------------------------

TINY_OPENCLIP = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8,
                                                 "head_width": 16},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}


@pytest.fixture(scope="module")
def openclip_checkpoint(tmp_path_factory):
    import open_clip

    root = tmp_path_factory.mktemp("openclip")
    (root / "cxrfair-byname-test.json").write_text(json.dumps(TINY_OPENCLIP))
    open_clip.add_model_config(root / "cxrfair-byname-test.json")  # open_clip's own way to add an architecture
    torch.manual_seed(4)
    model = open_clip.create_model("cxrfair-byname-test")
    torch.save(model.state_dict(), root / "tiny.pt")
    return root / "tiny.pt"


@pytest.mark.slow
def test_openclip_arch_with_weights_equals_open_clips_own_forward(openclip_checkpoint, cohort, tmp_path):
    import open_clip

    name = "open_clip:cxrfair-byname-test"
    spec = get_spec(name)
    assert (spec.embed_dim, spec.zero_shot, spec.unprojected_dim) == (16, True, 32)
    assert _lora_modules(load_model(name, weights=openclip_checkpoint).image_encoder, spec.lora_targets) == \
        _lora_modules(load_model(name, weights=openclip_checkpoint).image_encoder, ("attn", "c_fc", "c_proj"))
    one_line_error(run("extract", "--model", name, "--cohort", cohort, "--out", tmp_path, "--workers", 0),
                   "names an architecture only", "--weights FILE")
    foreign = tmp_path / "foreign.pt"
    torch.save({"visual.proj": torch.zeros(3, 3)}, foreign)
    one_line_error(run("extract", "--model", name, "--weights", foreign, "--cohort", cohort, "--out", tmp_path,
                       "--workers", 0), str(foreign), "expected an open_clip cxrfair-byname-test checkpoint")
    result = run("extract", "--model", name, "--weights", openclip_checkpoint, "--cohort", cohort, "--out", tmp_path,
                 "--batch-size", 16, "--workers", 0)
    assert result.exit_code == 0, result.output
    cache = read_cache(tmp_path / "open_clip-cxrfair-byname-test.h5")
    assert cache.attrs["weights_id"] == f"sha256:{sha256_file(openclip_checkpoint)}"
    assert str(openclip_checkpoint.resolve()) in cache.attrs["weights_source"]
    model, _, transform = open_clip.create_model_and_transforms("cxrfair-byname-test", pretrained=str(openclip_checkpoint))
    pre = byname.preprocess_from_openclip(model.visual.preprocess_cfg, "x")
    assert cache.attrs["preprocessing"] == json.loads(json.dumps(pre.describe()))
    with torch.no_grad():
        want = model.eval().encode_image(cohort_pixels(cohort, pre)).numpy()
    np.testing.assert_allclose(cache.image_embeddings, want, rtol=1e-4, atol=1e-5)
    # And our pixels are open_clip's own transform's (to float noise), square cohort images and non-square ones.
    with Image.open(load_cohort(cohort).image_paths(None)[0]) as first:
        images = [first.copy(), *_images()]
    for im in images:
        np.testing.assert_allclose(pre.normalize(torch.from_numpy(pre.prepare(im))[None])[0], transform(im), atol=1e-5)


def test_openclip_with_a_learned_bias_zero_shots_with_the_sigmoid_rule(tmp_path):
    import open_clip

    (tmp_path / "cxrfair-byname-sig.json").write_text(json.dumps({**TINY_OPENCLIP, "init_logit_bias": -5.0}))
    open_clip.add_model_config(tmp_path / "cxrfair-byname-sig.json")
    torch.save(open_clip.create_model("cxrfair-byname-sig").state_dict(), tmp_path / "sig.pt")
    fm = load_model("open_clip:cxrfair-byname-sig", weights=tmp_path / "sig.pt")
    assert fm.extras == {"logit_bias": -5.0, "zero_shot_rule": "sigmoid"}


# --- offline, nothing cached ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_offline_and_not_cached_says_what_to_download(tmp_path):
    """A fresh process with an empty Hugging Face cache and HF_HUB_OFFLINE=1: one line each."""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    code = ("from cxrfair.extract.registry import load_model\n"
            "from cxrfair.errors import CxrfairError\n"
            "for m in ('hf:someorg/somemodel', 'open_clip:ViT-B-32/laion2b_s34b_b79k'):\n"
            "    try:\n        load_model(m)\n    except CxrfairError as e:\n        print(1, 'Error:', e)\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                         cwd=tmp_path).stdout.splitlines()
    assert len(out) == 2, out
    assert out[0].startswith("1 Error: --model hf:someorg/somemodel: someorg/somemodel") and \
        "`huggingface-cli download someorg/somemodel`" in out[0] and "--model hf:/path/to/folder" in out[0], out[0]
    assert out[1].startswith("1 Error: --model open_clip:ViT-B-32/laion2b_s34b_b79k") and \
        "huggingface-cli download laion/CLIP-ViT-B-32-laion2B-s34B-b79K" in out[1] and "HF_HUB_OFFLINE=1" in out[1], out[1]


HUB_SCRIPT = """
import json, sys
from pathlib import Path
import open_clip
from open_clip.pretrained import _PRETRAINED, _pcfg
from cxrfair.extract.registry import get_spec, load_model
from cxrfair.io import sha256_file

config_file, revision = Path(sys.argv[1]), sys.argv[2]
open_clip.add_model_config(config_file)
# A pretrained tag for the tiny architecture, published (here: cached) in a hub repo, with its own statistics.
_PRETRAINED["cxrfair-byname-test"] = {"faketag": _pcfg(hf_hub="cxrfair-test/tiny-openclip/", mean=(0.5,) * 3,
                                                      std=(0.25,) * 3, interpolation="bilinear")}
out = {}
for name in ("hf:cxrfair-test/tiny-vit", "open_clip:cxrfair-byname-test/faketag"):
    fm = load_model(name)
    out[name] = {"weights_id": fm.weights_id, "source": fm.source, "pre": fm.preprocess.describe(),
                 "spec_source": get_spec(name).weights_source}
print(json.dumps(out))
"""


def fake_hub_repo(cache: Path, repo: str, files: dict[str, Path], revision: str) -> Path:
    """A Hugging Face hub cache entry for ``repo`` at ``revision`` (refs/main + a snapshot folder)."""
    import shutil

    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(revision)
    snapshot = root / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for name, src in files.items():
        shutil.copy(src, snapshot / name)
    return snapshot


@pytest.mark.slow
def test_hub_names_load_from_the_hub_cache_and_record_the_revision(folders, openclip_checkpoint, tmp_path):
    """``hf:ORG/NAME`` and ``open_clip:ARCH/TAG`` offline, from a (fake) hub cache: a fresh process whose
    HF_HUB_CACHE is set before huggingface_hub loads."""
    from safetensors.torch import save_file

    revision = "0123456789abcdef0123456789abcdef01234567"
    cache = tmp_path / "hub"
    vit = fake_hub_repo(cache, "cxrfair-test/tiny-vit", {f.name: f for f in folders["vit"].iterdir()}, revision)
    state = torch.load(openclip_checkpoint, weights_only=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "open_clip_model.safetensors"))
    oc = fake_hub_repo(cache, "cxrfair-test/tiny-openclip",
                       {"open_clip_model.safetensors": tmp_path / "open_clip_model.safetensors"}, revision)
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", HUB_SCRIPT, str(openclip_checkpoint.parent / "cxrfair-byname-test.json"),
                           revision], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    hf = got["hf:cxrfair-test/tiny-vit"]
    assert hf["weights_id"] == f"sha256:{sha256_file(vit / 'model.safetensors')}"
    assert hf["source"] == f"hub cxrfair-test/tiny-vit@{revision}" and hf["spec_source"] == "hub cxrfair-test/tiny-vit"
    tag = got["open_clip:cxrfair-byname-test/faketag"]
    assert tag["weights_id"] == f"sha256:{sha256_file(oc / 'open_clip_model.safetensors')}"
    assert "tag faketag" in tag["source"] and str(oc) in tag["source"] and "cxrfair-test/tiny-openclip" in tag["spec_source"]
    # The tag's own statistics and interpolation, not the architecture's defaults.
    assert (tag["pre"]["mean"], tag["pre"]["std"], tag["pre"]["interpolation"]) == ([0.5] * 3, [0.25] * 3, "bilinear")


def test_pipeline_model_lists_take_names_through_the_same_registry(folders):
    from types import SimpleNamespace

    from cxrfair.pipeline import check_models
    from cxrfair.step_base import cache_path

    vit, clip = f"hf:{folders['vit']}", f"hf:{folders['clip']}"
    check_models(SimpleNamespace(models=(clip, vit), methods=("linear", "lora")))
    check_models(SimpleNamespace(models=(clip,), methods=("zeroshot",)))
    with pytest.raises(CxrfairError, match="has no text encoder, so it cannot run zeroshot"):
        check_models(SimpleNamespace(models=(vit,), methods=("zeroshot",)))
    assert cache_path({"cache": Path("c")}, vit) == Path("c") / f"{safe_name(vit)}.h5"


def test_help_names_the_forms():
    for command in (["extract", "--help"], ["finetune", "lora", "--help"]):
        text = " ".join(run(*command).output.split())
        assert "open_clip:ARCH/TAG" in text and "hf:ORG/NAME" in text and "hf:PATH" in text, command
