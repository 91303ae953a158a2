"""Every registered model: listed with source and licence, LoRA hits the intended modules, the
pre-projection hook is what the projection consumes, and tiny variants extract end to end."""

from __future__ import annotations

import io

import re

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from cxrfair.errors import CxrfairError
from cxrfair.extract.registry import get_spec, list_specs, load_model
from tests.extract.test_medclip import extract_and_zeroshot, tiny_cohort  # noqa: F401 - shared fixture

NEW_REAL = ["chexzero", "biovil", "biovil-t", "cxr-clip-r50", "cxr-clip-swint", "medsiglip", "rad-dino", "xrayclip"]
NEW_TINY = ["tiny-chexzero", "tiny-biovil", "tiny-biovil-t", "tiny-cxr-clip-r50", "tiny-cxr-clip-swint",
            "tiny-medsiglip", "tiny-rad-dino", "tiny-xrayclip"]


@pytest.fixture(autouse=True)
def empty_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for spec in list_specs():
        if spec.weights_env:
            monkeypatch.delenv(spec.weights_env, raising=False)


def test_models_list_shows_every_model_with_source_licence_and_embedding():
    from cxrfair.extract.cli import models

    out = CliRunner().invoke(models, ["list"]).output  # the 100-column table: name, dim, weights, licence
    assert {"name", "dim", "weights", "licence"} <= set(out.splitlines()[0].split())
    # Every field whole: --format csv.
    table = pd.read_csv(io.StringIO(CliRunner().invoke(models, ["list", "--format", "csv"]).output),
                        keep_default_na=False).set_index("name")
    for column in ("cached_embedding", "pre_projection", "weights_source", "licence"):
        assert column in table.columns
    for name in NEW_REAL + NEW_TINY:
        assert any(line.split()[0] == name for line in out.splitlines()[1:] if line.strip())
        spec = get_spec(name)
        assert table.loc[name, "weights_source"] == spec.weights_source and int(table.loc[name, "dim"]) == spec.embed_dim
        assert spec.license and (spec.tiny or spec.license != "-")


@pytest.mark.parametrize("name", NEW_REAL)
def test_missing_weights_give_one_line_naming_the_file_and_where(name, tmp_path):
    with pytest.raises(CxrfairError) as err:
        load_model(name)
    message = str(err.value)
    assert "\n" not in message and "weights not found offline" in message
    assert str(tmp_path / "home" / ".cache" / "cxrfair" / name) in message and "--weights" in message
    spec = get_spec(name)
    assert spec.weights_env in message


def _wrapped(fm) -> list[str]:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(fm.image_encoder, LoraConfig(r=2, target_modules=fm.spec.lora_targets))
    # peft's MultiheadAttention wrapper adapts its out_proj inside itself ("attn.base_layer.out_proj"):
    # count the wrapper once.
    return [n.removeprefix("base_model.model.") for n, m in model.named_modules()
            if hasattr(m, "lora_A") and not n.endswith(("lora_A", "lora_B")) and ".base_layer." not in n]


# Tiny architectures: 2 transformer blocks, or 4 Bottleneck blocks (one per ResNet stage).
LORA_EXPECTED = {
    "tiny-chexzero": (2 * 3, r"transformer\.resblocks\.\d\.(attn|mlp\.c_fc|mlp\.c_proj)"),
    "tiny-xrayclip": (2 * 3, r"transformer\.resblocks\.\d\.(attn|mlp\.c_fc|mlp\.c_proj)"),
    "tiny-biovil": (4 * 3, r"encoder\.encoder\.layer[1-4]\.0\.conv[123]"),
    "tiny-biovil-t": (4 * 3, r"encoder\.encoder\.layer[1-4]\.0\.conv[123]"),
    "tiny-cxr-clip-r50": (4 * 3, r"encoder\.resnet\.layer[1-4]\.0\.conv[123]"),
    "tiny-cxr-clip-swint": (2 * 6, r"encoder\.image_encoder\.encoder\.layers\.\d\.blocks\.0\."
                                   r"(attention\.(q|k|v|o)_proj|mlp\.fc[12])"),
    "tiny-medsiglip": (2 * 6, r"tower\.encoder\.layers\.\d\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])"),
    "tiny-rad-dino": (2 * 6, r"tower\.encoder\.layer\.\d\.(attention\.(q|k|v|o)_proj|mlp\.fc[12])"),
}


@pytest.mark.parametrize("name", NEW_TINY)
def test_lora_wraps_exactly_the_blocks_of_the_architecture(name):
    wrapped = _wrapped(load_model(name))
    count, pattern = LORA_EXPECTED[name]
    assert len(wrapped) == count, wrapped
    assert all(re.fullmatch(pattern, n) for n in wrapped), wrapped


def _linear_projection(fm):
    """The (D', D) matrix and bias the model applies after its pre-projection features, where it is
    one affine map (written from each architecture, independently of the loaders)."""
    m = fm.model
    name = fm.name
    if name in ("tiny-clip", "tiny-chexzero", "tiny-xrayclip"):
        return m.visual.proj, None
    if name == "tiny-biomedclip":
        return m.visual.head.proj.weight.T, m.visual.head.proj.bias
    if name in ("tiny-medclip-vit",):
        return m.vision_model.projection_head.weight.T, None
    if name == "tiny-medclip-rn50":
        return m.vision_model.model.fc.weight.T, None
    if name == "tiny-gloria":
        return m.img_encoder.global_embedder.weight.T, m.img_encoder.global_embedder.bias
    if name.startswith("tiny-cxr-clip"):
        return m.image_projection.projection.weight.T, m.image_projection.projection.bias
    return None


@pytest.mark.parametrize("name", [s.name for s in list_specs() if s.tiny])
def test_unprojected_features_are_what_the_projection_consumes(name):
    fm = load_model(name)
    spec = fm.spec
    assert (fm.encode_image_unprojected is None) == (spec.unprojected_dim is None)
    if fm.encode_image_unprojected is None:
        return
    x = torch.randn(2, 3, fm.preprocess.size, fm.preprocess.size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        feats, emb = fm.encode_image_unprojected(x), fm.encode_image(x)
        proj = _linear_projection(fm)
        projected = None if proj is None else feats @ proj[0] + (0 if proj[1] is None else proj[1])
    assert feats.shape == (2, spec.unprojected_dim) and emb.shape == (2, spec.embed_dim)
    if projected is not None:
        torch.testing.assert_close(projected, emb, atol=1e-5, rtol=1e-4)


def test_biovil_pre_projection_is_the_pooled_trunk():
    # BioViL's projection is not one affine map (it projects patches, then averages): check the
    # features against the trunk directly.
    for name in ("tiny-biovil", "tiny-biovil-t"):
        fm = load_model(name)
        x = torch.randn(1, 3, 56, 56)
        with torch.inference_mode():
            patches = fm.model.image_model.encoder(x)
            torch.testing.assert_close(fm.encode_image_unprojected(x), patches.mean(dim=(2, 3)))
            torch.testing.assert_close(fm.encode_image(x), fm.model.image_model.projector(patches).mean(dim=(2, 3)))


@pytest.mark.parametrize("name", NEW_TINY)
def test_extract_end_to_end(tiny_cohort, tmp_path, monkeypatch, name):  # noqa: F811 - the fixture
    spec = get_spec(name)
    if not spec.zero_shot:
        from cxrfair.extract.cache import read_cache
        from cxrfair.extract.extractor import ExtractConfig, extract
        from cxrfair.probe.zeroshot import zeroshot_cache

        out = tmp_path / f"{name}.h5"
        extract(ExtractConfig(model=name, cohort=tiny_cohort, out=out, batch_size=8, workers=0, device="cpu",
                              progress=False))
        cache = read_cache(out)
        assert cache.image_embeddings.shape == (16, spec.embed_dim) and not cache.text
        with pytest.raises(CxrfairError, match="no class text embeddings"):
            zeroshot_cache(out, tmp_path / "runs")
        return
    cache, runs = extract_and_zeroshot(name, tiny_cohort, tmp_path, monkeypatch)
    assert cache.image_embeddings.shape == (16, spec.embed_dim) and np.isfinite(cache.image_embeddings).all()
    assert runs and all(r.meta["model"] == name for r in runs)


def test_image_only_model_refuses_text_clearly():
    fm = load_model("tiny-rad-dino")
    with pytest.raises(CxrfairError, match="has no text tower: zero-shot is not available"):
        fm.encode_text(fm.tokenize(["x"]))
