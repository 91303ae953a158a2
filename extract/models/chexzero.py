"""CheXzero: OpenAI CLIP ViT-B/32 fine-tuned on MIMIC-CXR, loaded into open_clip's CLIP.

References:
    Tiu et al., "Expert-level detection of pathologies from unannotated chest X-ray images via
    self-supervised learning", Nature Biomedical Engineering 2022; github.com/rajpurkarlab/CheXzero
    (``zero_shot.py``, ``train.py``, ``data_process.py``).

The released files (``best_64_5e-05_original_22000_0.864.pt`` and siblings) are ``torch.save`` of
the state dict of OpenAI's own ``clip/model.py`` CLIP (``clip.load("ViT-B/32", jit=False)``, then
trained): OpenAI key names, which are open_clip's CLIP names one for one, so they load strictly
into open_clip's ``ViT-B-32-quickgelu`` (OpenAI's weights use QuickGELU). Read with
``cxrfair.extract.safe_load`` (never a plain unpickler).

Preprocessing is the checkpoint's own, not OpenAI's: CheXzero resizes the long side to 320,
zero-pads to a square, then normalises with mean 101.48761 and std 83.43944 on the 0..255 scale
and resizes to 224 bicubic (``zero_shot.make`` / ``train.load_data``). Sourget et al. (FAIMI
2025) fed it OpenAI's mean/std instead; we follow the authors' code.
"""

from __future__ import annotations

from pathlib import Path

from cxrfair.extract.models.common import (
    TINY_WEIGHTS,
    cache_dir,
    load_strict,
    random_init_id,
    weights_id,
)
from cxrfair.extract.models.openclip import (
    OPENCLIP_VIT_LORA,
    TINY_CLIP_CONFIG,
    create_openclip,
    openclip_bundle,
    register_openclip_config,
)
from cxrfair.extract.preprocess import Preprocess
from cxrfair.extract.registry import FoundationModel, ModelSpec, register
from cxrfair.extract.weights import resolve_weights
from cxrfair.extract.safe_load import load_state_dict_file

ARCH = "ViT-B-32-quickgelu"  # open_clip's built-in config: OpenAI ViT-B/32, QuickGELU, context 77
WEIGHTS_NAME = "best_64_5e-05_original_22000_0.864.pt"  # the best of the released ensemble members
# The CheXzero README's link (a Google Drive folder holding the .pt files).
CHEXZERO_URL = "https://drive.google.com/drive/folders/19YH2EALQTbkKXdJmKm3iaK8yPi9s1xc-"
# zero_shot.make: Normalize((101.48761,) * 3, (83.43944,) * 3) on 0..255 pixels.
CHEXZERO_MEAN = 101.48761 / 255
CHEXZERO_STD = 83.43944 / 255
# Long side to 320 + black padding, then 224 bicubic: for square inputs the same as pad-to-square
# and one bicubic resize to 224 (resizes are linear, so the order of normalising does not matter).
CHEXZERO_PREPROCESS = Preprocess(size=224, resize=224, mode="pad", interpolation="bicubic",
                                 mean=(CHEXZERO_MEAN,) * 3, std=(CHEXZERO_STD,) * 3)
# Entries OpenAI's TorchScript archives carry besides weights (absent from CheXzero's files, but
# harmless if a user hands us a state dict exported from one).
_NON_WEIGHTS = ("input_resolution", "context_length", "vocab_size")
TINY_ARCH = "cxrfair-tiny-chexzero"


def read_openai_state(path: Path) -> dict:
    """An OpenAI-format CLIP state dict from ``.pt`` (read restrictedly) or ``.safetensors``.

    A ``module.`` prefix (a model saved from DataParallel) is removed.
    """
    state = load_state_dict_file(path)
    state = {k.removeprefix("module."): v for k, v in state.items() if k not in _NON_WEIGHTS}
    return state


def openai_clip_from_state(arch: str, state: dict, source: str, device: str):
    """open_clip CLIP ``arch`` (random init) holding exactly ``state`` (OpenAI key names); fp32."""
    model = create_openclip(arch, None, "cpu")
    load_strict(model, state, source)
    return model.float().to(device)


def find_weights(spec: ModelSpec, weights: Path | None) -> Path:
    candidates = [cache_dir(spec.name) / WEIGHTS_NAME, cache_dir(spec.name) / "chexzero.safetensors"]
    download = f"{CHEXZERO_URL} (the CheXzero README's checkpoint folder; any of its .pt files)"
    return resolve_weights(spec.name, weights, spec.weights_env, candidates, download, WEIGHTS_NAME)


def _load_chexzero(spec: ModelSpec, weights: Path | None, device: str) -> FoundationModel:
    import open_clip

    path = find_weights(spec, weights)
    if path.is_dir():
        path = next(iter(sorted(path.glob("*.pt")) + sorted(path.glob("*.safetensors"))), path / WEIGHTS_NAME)
    model = openai_clip_from_state(ARCH, read_openai_state(path), str(path), device)
    return openclip_bundle(spec, model, open_clip.get_tokenizer(ARCH), CHEXZERO_PREPROCESS, weights_id(path, ""))


def _load_tiny_chexzero(spec: ModelSpec, weights: Path | None, device: str) -> FoundationModel:
    import open_clip

    register_openclip_config(TINY_ARCH, TINY_CLIP_CONFIG)  # quick_gelu, context 77, like ViT-B-32-quickgelu
    if weights is not None:
        model = openai_clip_from_state(TINY_ARCH, read_openai_state(weights), str(weights), device)
    else:
        model = create_openclip(TINY_ARCH, None, device)
    size = TINY_CLIP_CONFIG["vision_cfg"]["image_size"]
    pre = Preprocess(size=size, resize=size, mode="pad", interpolation="bicubic",
                     mean=(CHEXZERO_MEAN,) * 3, std=(CHEXZERO_STD,) * 3)
    return openclip_bundle(spec, model, open_clip.get_tokenizer(TINY_ARCH), pre, weights_id(weights, random_init_id()))


register(ModelSpec(
    name="chexzero", image_encoder="ViT-B/32 (OpenAI CLIP, QuickGELU)", text_encoder="CLIP text transformer (77 tokens)",
    embed_dim=512, weights_source=f"{WEIGHTS_NAME} from {CHEXZERO_URL}", loader=_load_chexzero,
    lora_targets=OPENCLIP_VIT_LORA, weights_env="CXRFAIR_CHEXZERO_WEIGHTS", license="Apache-2.0 with Commons Clause",
    unprojected_dim=768, description="CheXzero (MIMIC-CXR image-report pairs), OpenAI-format state dict",
))
register(ModelSpec(
    name="tiny-chexzero", image_encoder="ViT 2x64, patch 8, 64 px", text_encoder="CLIP text transformer 2x64",
    embed_dim=TINY_CLIP_CONFIG["embed_dim"], weights_source=TINY_WEIGHTS, loader=_load_tiny_chexzero,
    lora_targets=OPENCLIP_VIT_LORA, license="-", unprojected_dim=TINY_CLIP_CONFIG["vision_cfg"]["width"], tiny=True,
    description="offline test/demo model: CheXzero's OpenAI-format loading path, random weights",
))
