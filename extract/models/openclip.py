"""open_clip models: CLIP ViT-B/16, BiomedCLIP, and tiny offline models built from configs.

Architectures are open_clip configs (built-in, or small dicts registered here); weights come
from ``--weights``, an environment variable or the Hugging Face hub cache, found by
``cxrfair.extract.weights.resolve_weights`` and never downloaded. Module import is cheap; open_clip
and torch are imported by the loaders.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import zlib
from pathlib import Path

from cxrfair.errors import CxrfairError
from cxrfair.extract.models.common import (
    TINY_BERT_FOLDER_CONFIG,
    TINY_SEED,
    TINY_WEIGHTS,
    cache_dir,
    file_in,
    hub_cached,
    random_init_id,
    seeded,
    tiny_bert_dir,
    weights_errors,
    weights_id,
)
from cxrfair.extract.preprocess import OPENAI_MEAN, OPENAI_STD, Preprocess
from cxrfair.extract.registry import FoundationModel, ModelSpec, TextTokenizer, register
from cxrfair.extract.weights import resolve_weights

# peft targets for open_clip's own ViT blocks: `attn` is nn.MultiheadAttention (peft wraps it
# whole; targeting only out_proj breaks backward), `c_fc`/`c_proj` are the MLP linears.
OPENCLIP_VIT_LORA = ("attn", "c_fc", "c_proj")
# timm towers (BiomedCLIP): a bare `proj` would also hit the patch embedding and the head.
TIMM_VIT_LORA = r".*trunk\.blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))"

# A 2-layer, width-64 CLIP: real open_clip code path, random weights, fast on CPU.
TINY_CLIP_CONFIG = {
    "embed_dim": 64,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
CLIP_PREPROCESS = Preprocess(size=224, resize=224, mode="shortest", interpolation="bicubic", mean=OPENAI_MEAN, std=OPENAI_STD)

# --- CLIP ViT-B/16 (OpenAI weights; QuickGELU is what they were trained with) -----------------
CLIP_ARCH = "ViT-B-16-quickgelu"
CLIP_HUB_ID = "timm/vit_base_patch16_clip_224.openai"  # where open_clip's `openai` tag resolves
CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")

# --- BiomedCLIP ---------------------------------------------------------------------------------
BIOMEDCLIP_HUB_ID = "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
BIOMEDCLIP_FILE = "open_clip_pytorch_model.bin"
BIOMEDBERT_HUB_ID = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"
BIOMEDBERT_FILES = ("config.json", "vocab.txt")  # the text tower's config and WordPiece vocab


def biomedclip_config(text_dir: str, *, timm_model: str = "vit_base_patch16_224", image_size: int = 224,
                      embed_dim: int = 512, context_length: int = 256) -> dict:
    """open_clip ``model_cfg`` of BiomedCLIP (its hub ``open_clip_config.json``), text tower at ``text_dir``.

    The released config names the BERT hub repo; HFTextEncoder calls
    ``AutoConfig.from_pretrained`` on it even without text weights, so offline we point it at a
    local folder holding that repo's ``config.json`` and ``vocab.txt``.
    """
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {"timm_model_name": timm_model, "timm_model_pretrained": False, "timm_pool": "",
                       "timm_proj": "linear", "image_size": image_size},
        "text_cfg": {"hf_model_name": text_dir, "hf_tokenizer_name": text_dir, "hf_proj_type": "mlp",
                     "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": context_length},
    }


# A BiomedCLIP-shaped model: timm `test_vit` (6x64) + a 2-layer width-32 BERT with a toy vocab.
TINY_BIOMEDCLIP = {"timm_model": "test_vit", "image_size": 64, "embed_dim": 64, "context_length": 64}
TINY_BERT_CONFIG = TINY_BERT_FOLDER_CONFIG


@contextlib.contextmanager
def quiet_random_init():
    """Hide open_clip's "No pretrained weights loaded" warning: random init is the point of tiny models."""
    class _Filter(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "No pretrained weights loaded" not in record.getMessage()

    root, f = logging.getLogger(), _Filter()
    root.addFilter(f)
    try:
        yield
    finally:
        root.removeFilter(f)


def register_openclip_config(name: str, config: dict) -> None:
    import open_clip.factory

    # open_clip keeps architectures in a module-level dict; adding ours is its documented extension point.
    open_clip.factory._MODEL_CONFIGS[name] = copy.deepcopy(config)


def openclip_unprojected(visual):
    """(B, 3, S, S) -> (B, D') of an open_clip image tower, before its projection to the joint space.

    open_clip's own ViT: the pooled (class) token after ``ln_post``, before ``@ proj``; a timm tower
    (BiomedCLIP): the trunk's pooled output, before the ``head`` (dropout + linear projection).
    """
    from open_clip.timm_model import TimmModel

    if isinstance(visual, TimmModel):
        return visual.trunk

    def unprojected(x):
        # The steps of VisionTransformer.forward without the final ``pooled @ self.proj``.
        return visual._pool(visual.transformer(visual._embeds(x)))[0]

    return unprojected


def openclip_text_tokenizer(name: str, tokenizer, context_length: int) -> TextTokenizer:
    """A TextTokenizer over an open_clip tokenizer (its own BPE, or ``HFTokenizer``), which pads
    to and cuts at ``context_length`` tokens (start and end tokens included)."""
    def count(prompts: list[str]) -> list[int]:
        if hasattr(tokenizer, "tokenizer"):  # open_clip's HFTokenizer (BiomedCLIP): [CLS] ... [SEP]
            texts = [tokenizer.clean_fn(p) for p in prompts]
            return [len(ids) for ids in tokenizer.tokenizer(texts, truncation=False, verbose=False)["input_ids"]]
        return [len(tokenizer.encode(p)) + 2 for p in prompts]  # <start> ... <end>

    return TextTokenizer(name, context_length, lambda prompts, length: tokenizer(prompts, context_length=length), count)


def openclip_bundle(spec: ModelSpec, model, tokenizer, preprocess: Preprocess, weights_id: str,
                    extras: dict | None = None) -> FoundationModel:
    """Wrap an open_clip CLIP model in the registry interface."""
    # The model's positions bound the tokenizer's context (they agree for every open_clip config).
    context = min(n for n in (tokenizer.context_length, getattr(model, "context_length", None)) if n)
    return FoundationModel(
        name=spec.name,
        spec=spec,
        model=model,
        image_encoder=model.visual,
        preprocess=preprocess,
        tokenize=openclip_text_tokenizer(spec.name, tokenizer, context),
        encode_image=model.encode_image,
        encode_text=model.encode_text,
        logit_scale=float(model.logit_scale.exp().item()),
        embed_dim=spec.embed_dim,
        weights_id=weights_id,
        extras=extras or {},
        encode_image_unprojected=openclip_unprojected(model.visual),
    )


def create_openclip(arch: str, checkpoint: Path | None, device: str, seed: int | None = None):
    """open_clip.create_model on a registered/built-in ``arch``; random init seeded when no checkpoint."""
    import open_clip

    # Random weights, but the same ones every time: caches and runs are reproducible.
    with seeded(TINY_SEED if seed is None else seed), quiet_random_init(), \
            weights_errors(checkpoint, f"an open_clip {arch} checkpoint (state dict saved with torch.save or .safetensors)"):
        # pretrained_text=False: an HF text tower must never fetch its own weights (offline; and a
        # full checkpoint, when given, overwrites it anyway).
        return open_clip.create_model(arch, pretrained=str(checkpoint) if checkpoint else None, device=device,
                                      pretrained_text=False)


# --- tiny-clip ---------------------------------------------------------------------------------

def _load_tiny_clip(spec: ModelSpec, weights: Path | None, device: str) -> FoundationModel:
    import open_clip

    register_openclip_config("cxrfair-tiny-clip", TINY_CLIP_CONFIG)
    ckpt = file_in(weights, CLIP_FILES, "--weights") if weights else None
    model = create_openclip("cxrfair-tiny-clip", ckpt, device)
    tokenizer = open_clip.get_tokenizer("cxrfair-tiny-clip")
    size = TINY_CLIP_CONFIG["vision_cfg"]["image_size"]
    pre = Preprocess(size=size, resize=size, mode="shortest", interpolation="bicubic", mean=OPENAI_MEAN, std=OPENAI_STD)
    return openclip_bundle(spec, model, tokenizer, pre, weights_id(ckpt, random_init_id()))


# --- clip-vit-b16 ------------------------------------------------------------------------------

def build_clip_vit_b16(checkpoint: Path | None = None, device: str = "cpu"):
    """The real ViT-B-16-quickgelu architecture; random init (seed 0) if ``checkpoint`` is None."""
    return create_openclip(CLIP_ARCH, checkpoint, device)


def find_clip_weights(spec: ModelSpec, weights: Path | None) -> Path:
    """OpenAI ViT-B/16 weights in open_clip layout: --weights, $env, hub cache or ~/.cache/cxrfair."""
    candidates = [cache_dir(spec.name) / CLIP_FILES[0]]
    hub = hub_cached(CLIP_HUB_ID, CLIP_FILES[0])
    candidates += [hub] if hub else []
    path = resolve_weights(spec.name, weights, spec.weights_env, candidates,
                           f"the Hugging Face hub repo {CLIP_HUB_ID}", CLIP_FILES[0])
    return file_in(path, CLIP_FILES, "--weights")


def _load_clip_vit_b16(spec: ModelSpec, weights: Path | None, device: str) -> FoundationModel:
    import open_clip

    ckpt = find_clip_weights(spec, weights)
    model = build_clip_vit_b16(ckpt, device)
    return openclip_bundle(spec, model, open_clip.get_tokenizer(CLIP_ARCH), CLIP_PREPROCESS, weights_id(ckpt, ""))


# --- biomedclip --------------------------------------------------------------------------------

def build_biomedclip(text_dir: Path, checkpoint: Path | None = None, device: str = "cpu", **arch):
    """A BiomedCLIP-layout model (timm ViT + HF BERT tower at ``text_dir``); ``arch`` overrides sizes."""
    name = f"cxrfair-biomedclip-{zlib.crc32(repr((str(text_dir), sorted(arch.items()))).encode()):08x}"
    register_openclip_config(name, biomedclip_config(str(text_dir), **arch))
    return create_openclip(name, checkpoint, device)


def biomedclip_tokenizer(text_dir: Path, context_length: int):
    """open_clip's HFTokenizer over the local BERT folder (lower-cased WordPiece, padded to context)."""
    from open_clip.tokenizer import HFTokenizer

    return HFTokenizer(str(text_dir), context_length=context_length)


def find_biomedclip_files(spec: ModelSpec, weights: Path | None) -> tuple[Path, Path]:
    """(checkpoint file, text folder) for BiomedCLIP, found offline or a CxrfairError naming both downloads.

    The text folder is looked for beside the weights (``text/`` or the same folder), in
    ``~/.cache/cxrfair/biomedclip/text`` and in the hub cache.
    """
    download = (f"the Hugging Face hub repo {BIOMEDCLIP_HUB_ID} (also {', '.join(BIOMEDBERT_FILES)} of "
                f"{BIOMEDBERT_HUB_ID}, into {cache_dir(spec.name) / 'text'})")
    hub = hub_cached(BIOMEDCLIP_HUB_ID, BIOMEDCLIP_FILE)
    candidates = [cache_dir(spec.name) / BIOMEDCLIP_FILE] + ([hub] if hub else [])
    path = resolve_weights(spec.name, weights, spec.weights_env, candidates, download, BIOMEDCLIP_FILE)
    ckpt = file_in(path, (BIOMEDCLIP_FILE, "open_clip_model.safetensors"), "--weights")
    return ckpt, find_biomedbert_dir(spec, ckpt)


def find_biomedbert_dir(spec: ModelSpec, ckpt: Path) -> Path:
    """A folder holding BiomedBERT's config.json + vocab.txt, or a CxrfairError saying where to put one."""
    places = [ckpt.parent / "text", ckpt.parent, cache_dir(spec.name) / "text"]
    hub = hub_cached(BIOMEDBERT_HUB_ID, "config.json")
    places += [hub.parent] if hub else []
    for place in places:
        if all((place / f).is_file() for f in BIOMEDBERT_FILES):
            return place
    raise CxrfairError(
        f"model {spec.name}: text tower files not found offline. Download {', '.join(BIOMEDBERT_FILES)} "
        f"(and tokenizer_config.json) from the Hugging Face hub repo {BIOMEDBERT_HUB_ID} and place them in "
        f"{ckpt.parent / 'text'} or {cache_dir(spec.name) / 'text'}")


def _load_biomedclip(spec: ModelSpec, weights: Path | None, device: str) -> FoundationModel:
    ckpt, text_dir = find_biomedclip_files(spec, weights)
    model = build_biomedclip(text_dir, ckpt, device)
    return openclip_bundle(spec, model, biomedclip_tokenizer(text_dir, 256), CLIP_PREPROCESS, weights_id(ckpt, ""))


# --- tiny-biomedclip ---------------------------------------------------------------------------

def _load_tiny_biomedclip(spec: ModelSpec, weights: Path | None, device: str) -> FoundationModel:
    text_dir = tiny_bert_dir()
    ckpt = file_in(weights, (BIOMEDCLIP_FILE, "open_clip_model.safetensors"), "--weights") if weights else None
    model = build_biomedclip(text_dir, ckpt, device, **TINY_BIOMEDCLIP)
    size = TINY_BIOMEDCLIP["image_size"]
    pre = Preprocess(size=size, resize=size, mode="shortest", interpolation="bicubic", mean=OPENAI_MEAN, std=OPENAI_STD)
    tok = biomedclip_tokenizer(text_dir, TINY_BIOMEDCLIP["context_length"])
    return openclip_bundle(spec, model, tok, pre, weights_id(ckpt, random_init_id()))


# --- registry entries --------------------------------------------------------------------------

register(ModelSpec(
    name="clip-vit-b16",
    image_encoder="ViT-B/16 (QuickGELU)",
    text_encoder="CLIP text transformer",
    embed_dim=512,
    weights_source=f"open_clip ViT-B-16-quickgelu 'openai' (hub {CLIP_HUB_ID})",
    loader=_load_clip_vit_b16,
    zero_shot=True,
    lora_targets=OPENCLIP_VIT_LORA,
    description="OpenAI CLIP ViT-B/16, 400M natural image-text pairs",
    weights_env="CXRFAIR_CLIP_VIT_B16_WEIGHTS",
    license="MIT (openai/CLIP)",
    unprojected_dim=768,
))

register(ModelSpec(
    name="biomedclip",
    image_encoder="ViT-B/16 (timm)",
    text_encoder="PubMedBERT (256 tokens)",
    embed_dim=512,
    weights_source=f"hub {BIOMEDCLIP_HUB_ID}",
    loader=_load_biomedclip,
    zero_shot=True,
    lora_targets=TIMM_VIT_LORA,
    description="BiomedCLIP, PMC-15M",
    weights_env="CXRFAIR_BIOMEDCLIP_WEIGHTS",
    license="MIT (model card)",
    unprojected_dim=768,
))

register(ModelSpec(
    name="tiny-clip",
    image_encoder="ViT 2x64, patch 8, 64 px",
    text_encoder="CLIP text transformer 2x64",
    embed_dim=TINY_CLIP_CONFIG["embed_dim"],
    weights_source=TINY_WEIGHTS,
    license="-",
    unprojected_dim=TINY_CLIP_CONFIG["vision_cfg"]["width"],
    loader=_load_tiny_clip,
    zero_shot=True,
    lora_targets=OPENCLIP_VIT_LORA,
    tiny=True,
    description="offline test/demo model: open_clip code path, random weights",
))

register(ModelSpec(
    name="tiny-biomedclip",
    image_encoder="timm test_vit 6x64, 64 px",
    text_encoder="HF BERT 2x32, toy WordPiece",
    embed_dim=TINY_BIOMEDCLIP["embed_dim"],
    weights_source=TINY_WEIGHTS,
    license="-",
    unprojected_dim=64,  # timm test_vit width
    loader=_load_tiny_biomedclip,
    zero_shot=True,
    lora_targets=TIMM_VIT_LORA,
    tiny=True,
    description="offline test/demo model: BiomedCLIP's timm + HF-text code path, random weights",
))
