"""XrayCLIP: CheXagent's CLIP image-text encoder (ViT-B/16 from LAION-2B, tuned on chest X-rays).

Released in open_clip's hub format: ``open_clip_config.json`` (``model_cfg`` + ``preprocess_cfg``)
beside ``open_clip_pytorch_model.bin`` or ``open_clip_model.safetensors``, in the Hugging Face repo
``StanfordAIMI/XrayCLIP__vit-b-16__laion2b-s34b-b88k`` (what ``open_clip.create_model("hf-hub:...")``
reads). We read the same two files from a local folder (``--weights``, ``~/.cache/cxrfair/xrayclip``
or the hub cache), so the architecture and preprocessing come from the release itself; open_clip
loads the weights with ``torch.load(weights_only=True)``.

Not verified offline: the repo's exact ``model_cfg`` (its name says open_clip ``ViT-B-16`` with
``laion2b_s34b_b88k``, i.e. GELU, 224 px, OpenAI mean/std); nothing here assumes it.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

from cxrfair.errors import CxrfairError
from cxrfair.extract.models.common import (
    TINY_WEIGHTS,
    file_in,
    folder_with,
    random_init_id,
    weights_id,
)
from cxrfair.extract.models.openclip import (
    OPENCLIP_VIT_LORA, TINY_CLIP_CONFIG, create_openclip, openclip_bundle, register_openclip_config,
)
from cxrfair.extract.preprocess import OPENAI_MEAN, OPENAI_STD, Preprocess
from cxrfair.extract.registry import FoundationModel, ModelSpec, register
from cxrfair.io import write_json_atomic

HUB_ID = "StanfordAIMI/XrayCLIP__vit-b-16__laion2b-s34b-b88k"
CONFIG_NAME = "open_clip_config.json"
WEIGHT_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
# open_clip's own transform names -> ours ("squash" is open_clip's resize_mode that ignores aspect).
_RESIZE_MODES = {"shortest": "shortest", "squash": "squash"}


def read_config(folder: Path) -> dict:
    """``open_clip_config.json`` of a folder: ``{"model_cfg": ..., "preprocess_cfg": ...}``."""
    try:
        config = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CxrfairError(f"{folder / CONFIG_NAME}: not a readable open_clip config ({e})") from None
    if "model_cfg" not in config:
        raise CxrfairError(f"{folder / CONFIG_NAME}: has no 'model_cfg'; is it an open_clip hub config?")
    return config


def preprocess_from(config: dict) -> Preprocess:
    """Our Preprocess from an open_clip config: image size from ``model_cfg``, the rest from
    ``preprocess_cfg`` (open_clip's defaults where a field is missing: OpenAI mean/std, bicubic,
    shortest-side resize + centre crop)."""
    pre = config.get("preprocess_cfg", {})
    size = config["model_cfg"]["vision_cfg"].get("image_size", 224)
    size = size[0] if isinstance(size, (list, tuple)) else size
    mode = pre.get("resize_mode", "shortest")
    if mode not in _RESIZE_MODES:
        raise CxrfairError(f"{CONFIG_NAME}: preprocess_cfg resize_mode {mode!r} is not supported")
    return Preprocess(size=size, resize=size, mode=_RESIZE_MODES[mode],
                      interpolation=pre.get("interpolation", "bicubic"),
                      mean=tuple(pre.get("mean", OPENAI_MEAN)), std=tuple(pre.get("std", OPENAI_STD)))


def load_openclip_folder(spec: ModelSpec, folder: Path, device: str, weights_file: Path | None) -> FoundationModel:
    """Build the folder's ``model_cfg`` and load ``weights_file`` (random init if None)."""
    import open_clip

    config = read_config(folder)
    name = f"cxrfair-{spec.name}-{zlib.crc32(json.dumps(config['model_cfg'], sort_keys=True).encode()):08x}"
    register_openclip_config(name, config["model_cfg"])
    model = create_openclip(name, weights_file, device)
    return openclip_bundle(spec, model, open_clip.get_tokenizer(name), preprocess_from(config),
                           weights_id(weights_file, random_init_id()))


def _load_xrayclip(spec: ModelSpec, weights: Path | None, device: str) -> FoundationModel:
    if weights is not None and weights.is_file():
        weights = weights.parent  # the config lives beside the weights file
    folder = folder_with(spec.name, weights, spec.weights_env, HUB_ID, (CONFIG_NAME,), WEIGHT_NAMES[1:])
    return load_openclip_folder(spec, folder, device, file_in(folder, WEIGHT_NAMES))


def tiny_folder() -> Path:
    """A folder holding a tiny ``open_clip_config.json`` in the hub layout (no weights: random init)."""
    import tempfile

    config = {"model_cfg": {k: v for k, v in TINY_CLIP_CONFIG.items() if k != "quick_gelu"},  # LAION-style GELU
              "preprocess_cfg": {"mean": list(OPENAI_MEAN), "std": list(OPENAI_STD), "interpolation": "bicubic",
                                 "resize_mode": "shortest"}}
    folder = Path(tempfile.gettempdir()) / f"cxrfair-tiny-xrayclip-{zlib.crc32(json.dumps(config).encode()):08x}"
    if not (folder / CONFIG_NAME).is_file():
        folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(folder / CONFIG_NAME, config)
    return folder


def _load_tiny_xrayclip(spec: ModelSpec, weights: Path | None, device: str) -> FoundationModel:
    if weights is None:
        return load_openclip_folder(spec, tiny_folder(), device, None)
    folder = weights.parent if weights.is_file() else weights
    return load_openclip_folder(spec, folder, device, file_in(weights, WEIGHT_NAMES))


register(ModelSpec(
    name="xrayclip", image_encoder="ViT-B/16 (open_clip, from its open_clip_config.json)",
    text_encoder="CLIP text transformer", embed_dim=512, weights_source=f"hub {HUB_ID}", loader=_load_xrayclip,
    lora_targets=OPENCLIP_VIT_LORA, weights_env="CXRFAIR_XRAYCLIP_WEIGHTS",
    license="see the model card (CheXagent release; not verified offline)", unprojected_dim=768,
    description="CheXagent's XrayCLIP; folder with open_clip_config.json + open_clip weights",
))
register(ModelSpec(
    name="tiny-xrayclip", image_encoder="ViT 2x64, patch 8, 64 px (GELU)", text_encoder="CLIP text transformer 2x64",
    embed_dim=TINY_CLIP_CONFIG["embed_dim"], weights_source=TINY_WEIGHTS, loader=_load_tiny_xrayclip,
    lora_targets=OPENCLIP_VIT_LORA, license="-", unprojected_dim=TINY_CLIP_CONFIG["vision_cfg"]["width"], tiny=True,
    description="offline test/demo model: XrayCLIP's open_clip-folder loading path, random weights",
))
