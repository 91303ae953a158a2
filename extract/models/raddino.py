"""RAD-DINO (``microsoft/rad-dino``): a DINOv2 ViT-B/14 trained on chest X-rays; image only.

A plain transformers ``Dinov2Model`` checkpoint (``config.json``, ``model.safetensors``,
``preprocessor_config.json``), loaded with ``Dinov2Model.from_pretrained`` on a local folder, which
also renames the transformers-4 attention keys (``attention.attention.query`` ->
``attention.q_proj``, ...). The embedding is the model card's: the CLS token after the final
layer norm (``pooler_output``, 768). There is no projection, hence no pre-projection features.

No text tower: zero-shot is not available (``zero_shot=False``; ``encode_text`` raises); linear and
MLP probes and fine-tuning work as for any model.

Preprocessing: read from the folder's ``preprocessor_config.json`` when present; otherwise the
constant below, written from the hub repo's processor (BitImageProcessor: shortest edge 518
bicubic, centre crop 518, mean 0.5307, std 0.2583). 518 px is confirmed by the model card (a
37 x 37 patch grid at patch size 14); the mean/std are from memory of that file, not verified offline.
"""

from __future__ import annotations

from pathlib import Path

from cxrfair.errors import CxrfairError
from cxrfair.extract.models.common import (
    TINY_WEIGHTS,
    file_in,
    folder_with,
    hf_from_folder,
    hf_preprocess,
    random_init_id,
    seeded,
    weights_id,
)
from cxrfair.extract.preprocess import Preprocess
from cxrfair.extract.registry import FoundationModel, ModelSpec, register

HUB_ID = "microsoft/rad-dino"
FILES = ("config.json", "model.safetensors")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# dinov2-base shapes (RAD-DINO is fine-tuned from it) at RAD-DINO's 518 px.
RAD_DINO_CONFIG = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "mlp_ratio": 4,
                   "patch_size": 14, "image_size": 518, "layerscale_value": 1.0, "use_swiglu_ffn": False}
RAD_DINO_MEAN, RAD_DINO_STD = 0.5307, 0.2583  # microsoft/rad-dino preprocessor_config.json (from memory)
RAD_DINO_PREPROCESS = Preprocess(size=518, resize=518, mode="shortest", interpolation="bicubic",
                                 mean=(RAD_DINO_MEAN,) * 3, std=(RAD_DINO_STD,) * 3)
# transformers 5 names DINOv2's attention linears q/k/v/o_proj and its MLP mlp.fc1/fc2.
DINOV2_LORA = r".*encoder\.layer\.\d+\.(attention\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(fc1|fc2))"
TINY_CONFIG = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "mlp_ratio": 2,
               "patch_size": 14, "image_size": 56}
NO_TEXT = ("model {name} has no text tower: zero-shot is not available for it; use `cxrfair probe linear|mlp` "
           "or `cxrfair finetune`")


def dinov2_config(fields: dict):
    from transformers import Dinov2Config

    return Dinov2Config(**fields)


def _no_text(name: str):
    def refuse(*_args, **_kwargs):
        raise CxrfairError(NO_TEXT.format(name=name))

    return refuse


def _bundle(spec: ModelSpec, model, preprocess: Preprocess, wid: str, device: str) -> FoundationModel:
    from cxrfair.extract.models.hf_nn import Pooled  # lazy: torch (registering stays torch-free)

    model = model.to(device).eval()
    image = Pooled(model)
    return FoundationModel(
        name=spec.name, spec=spec, model=model, image_encoder=image, preprocess=preprocess,
        tokenize=_no_text(spec.name), encode_image=image, encode_text=_no_text(spec.name), logit_scale=1.0,
        embed_dim=spec.embed_dim, weights_id=wid,
    )


def _load_folder(spec: ModelSpec, folder: Path, device: str, fallback: Preprocess) -> FoundationModel:
    from transformers import Dinov2Model

    model = hf_from_folder(Dinov2Model, folder, str(folder))
    return _bundle(spec, model, hf_preprocess(folder, fallback), weights_id(file_in(folder, WEIGHT_FILES), ""), device)


def _load_rad_dino(spec: ModelSpec, weights: Path | None, device: str) -> FoundationModel:
    folder = folder_with(spec.name, weights, spec.weights_env, HUB_ID, FILES, ("preprocessor_config.json",))
    return _load_folder(spec, folder, device, RAD_DINO_PREPROCESS)


def _load_tiny_rad_dino(spec: ModelSpec, weights: Path | None, device: str) -> FoundationModel:
    from transformers import Dinov2Model

    size = TINY_CONFIG["image_size"]
    pre = Preprocess(size=size, resize=size, mode="shortest", interpolation="bicubic",
                     mean=(RAD_DINO_MEAN,) * 3, std=(RAD_DINO_STD,) * 3)
    if weights is not None:
        return _load_folder(spec, weights if weights.is_dir() else weights.parent, device, pre)
    with seeded():
        model = Dinov2Model(dinov2_config(TINY_CONFIG))
    return _bundle(spec, model, pre, random_init_id(), device)


register(ModelSpec(
    name="rad-dino", image_encoder="DINOv2 ViT-B/14, 518 px", text_encoder="", embed_dim=768,
    weights_source=f"hub {HUB_ID}", loader=_load_rad_dino, zero_shot=False, lora_targets=DINOV2_LORA,
    weights_env="CXRFAIR_RAD_DINO_WEIGHTS", license="MIT (model card; earlier revisions MSRLA)", embedding="CLS",
    description="RAD-DINO, image only (no zero-shot); folder = the hub repo's files",
))
register(ModelSpec(
    name="tiny-rad-dino", image_encoder="DINOv2 ViT 2x32, patch 14, 56 px", text_encoder="", embed_dim=32,
    weights_source=TINY_WEIGHTS, loader=_load_tiny_rad_dino, zero_shot=False, lora_targets=DINOV2_LORA,
    license="-", embedding="CLS", tiny=True,
    description="offline test/demo model: transformers Dinov2Model code path, random weights",
))
