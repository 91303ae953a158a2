"""open_clip models: CLIP ViT-B/16, BiomedCLIP, and tiny offline models built from configs.

Module import is cheap; open_clip and torch are imported by the loaders.
"""

from __future__ import annotations

from pathlib import Path

from cxrfair.extract.preprocess import OPENAI_MEAN, OPENAI_STD, Preprocess
from cxrfair.extract.registry import FoundationModel, ModelSpec, register

# peft targets for open_clip's own ViT blocks: `attn` is nn.MultiheadAttention (peft wraps it
# whole; targeting only out_proj breaks backward), `c_fc`/`c_proj` are the MLP linears.
OPENCLIP_VIT_LORA = ("attn", "c_fc", "c_proj")

# A 2-layer, width-64 CLIP: real open_clip code path, random weights, fast on CPU.
TINY_CLIP_CONFIG = {
    "embed_dim": 64,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
TINY_SEED = 0


def _register_config(name: str, config: dict) -> None:
    import open_clip.factory

    # open_clip keeps architectures in a module-level dict; adding ours is its documented extension point.
    open_clip.factory._MODEL_CONFIGS.setdefault(name, config)


def _weights_id(weights: Path | None, fallback: str) -> str:
    from cxrfair.io import sha256_file

    if weights is None:
        return fallback
    if weights.is_file():
        return f"sha256:{sha256_file(weights)}"
    return f"dir:{weights.resolve()}"


def openclip_bundle(spec: ModelSpec, model, tokenizer, preprocess: Preprocess, weights_id: str) -> FoundationModel:
    """Wrap an open_clip CLIP model in the registry interface."""
    return FoundationModel(
        name=spec.name,
        spec=spec,
        model=model,
        image_encoder=model.visual,
        preprocess=preprocess,
        tokenize=tokenizer,
        encode_image=model.encode_image,
        encode_text=model.encode_text,
        logit_scale=float(model.logit_scale.exp().item()),
        embed_dim=spec.embed_dim,
        weights_id=weights_id,
    )


def _load_tiny_clip(spec: ModelSpec, weights: Path | None, device: str) -> FoundationModel:
    import open_clip
    import torch

    _register_config("cxrfair-tiny-clip", TINY_CLIP_CONFIG)
    with torch.random.fork_rng(devices=[]):
        # Random weights, but the same ones every time: caches and runs are reproducible.
        torch.manual_seed(TINY_SEED)
        model = open_clip.create_model("cxrfair-tiny-clip", pretrained=str(weights) if weights else None, device=device)
    tokenizer = open_clip.get_tokenizer("cxrfair-tiny-clip")
    size = TINY_CLIP_CONFIG["vision_cfg"]["image_size"]
    pre = Preprocess(size=size, resize=size, mode="shortest", interpolation="bicubic", mean=OPENAI_MEAN, std=OPENAI_STD)
    return openclip_bundle(spec, model, tokenizer, pre, _weights_id(weights, f"random-init(seed={TINY_SEED})"))


register(ModelSpec(
    name="tiny-clip",
    image_encoder="ViT 2x64, patch 8, 64 px",
    text_encoder="CLIP text transformer 2x64",
    embed_dim=TINY_CLIP_CONFIG["embed_dim"],
    weights_source="random init (seed 0) or --weights FILE",
    loader=_load_tiny_clip,
    zero_shot=True,
    lora_targets=OPENCLIP_VIT_LORA,
    tiny=True,
    description="offline test/demo model: open_clip code path, random weights",
))
