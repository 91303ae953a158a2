"""MedSigLIP (``google/medsiglip-448``) through transformers' own SigLIP classes.

The hub repo (gated: accept the Health AI Developer Foundations terms, then download) is a plain
transformers checkpoint: ``config.json``, ``model.safetensors``, tokenizer files and
``preprocessor_config.json``. ``SiglipModel.from_pretrained`` on that folder loads it (strictly:
any missing or unexpected key is an error) and the preprocessing is read from the folder's
``preprocessor_config.json`` when present, else the constant below.

Zero-shot: SigLIP is trained with a sigmoid loss, p(match) = sigmoid(exp(logit_scale) * cos +
logit_bias). ``FoundationModel.logit_scale`` carries exp(logit_scale) and ``extras["logit_bias"]``
the bias. A softmax over classes is unchanged by the bias (it is the same for every class), so the
cache-based zero-shot's softmax(scale * cos) is exactly SigLIP's class logits; per-class sigmoid
probabilities need the bias.

The image embedding is the vision tower's attention-pooling head output (``pooler_output``, 1152),
which is the joint space itself: SigLIP has no separate image projection, so no pre-projection
features are offered (``encode_image_unprojected`` is None).

Not verified offline (no download possible here): the exact config values, written below from the
public ``config.json`` of the SigLIP-400M family at 448 px, and the preprocessing constant (SigLIP's
image processor: resize to 448x448 bilinear, mean = std = 0.5).
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
    hf_text_tokenizer,
    random_init_id,
    seeded,
    tiny_bert_dir,
    weights_id,
)
from cxrfair.extract.preprocess import Preprocess
from cxrfair.extract.registry import FoundationModel, ModelSpec, register

HUB_ID = "google/medsiglip-448"
FILES = ("config.json", "model.safetensors")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
OPTIONAL = ("preprocessor_config.json", "tokenizer.json", "tokenizer_config.json", "spiece.model")
# SigLIP-400M (so400m/14) towers at 448 px, as in google/medsiglip-448's config.json (not verified offline).
_TOWER = {"hidden_size": 1152, "intermediate_size": 4304, "num_attention_heads": 16, "num_hidden_layers": 27,
          "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6}
MEDSIGLIP_CONFIG = {
    "vision_config": {**_TOWER, "image_size": 448, "patch_size": 14, "num_channels": 3},
    "text_config": {**_TOWER, "vocab_size": 32000, "max_position_embeddings": 64},
}
# SiglipImageProcessor: resize to 448x448 (aspect ignored), bilinear, rescale 1/255, mean = std = 0.5.
MEDSIGLIP_PREPROCESS = Preprocess(size=448, resize=448, mode="squash", interpolation="bilinear",
                                  mean=(0.5,) * 3, std=(0.5,) * 3)
# peft targets inside the vision tower: attention and MLP linears of every encoder layer; not the
# patch embedding and not the attention-pooling head (``head.*``).
SIGLIP_LORA = r".*encoder\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))"

_TINY_TOWER = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 2}
TINY_SIZE = 56


def siglip_config(fields: dict):
    from transformers import SiglipConfig

    return SiglipConfig(text_config=dict(fields["text_config"]), vision_config=dict(fields["vision_config"]))


def tiny_config(vocab_size: int) -> dict:
    return {"vision_config": {**_TINY_TOWER, "image_size": TINY_SIZE, "patch_size": 14},
            "text_config": {**_TINY_TOWER, "vocab_size": vocab_size, "max_position_embeddings": 16,
                            "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3}}


def load_tokenizer(folder: Path, model: str):
    """The repo's own tokenizer (``AutoTokenizer`` on the folder; no remote code)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, ImportError) as e:
        raise CxrfairError(f"model {model}: could not load the tokenizer in {folder} ({str(e).splitlines()[0]}); "
                           "download the repo's tokenizer files too (a SentencePiece tokenizer may need "
                           "`pip install sentencepiece`)") from None


def _bundle(spec: ModelSpec, model, tokenizer, preprocess: Preprocess, wid: str, device: str) -> FoundationModel:
    import torch

    from cxrfair.extract.models.hf_nn import Pooled  # lazy: torch (registering stays torch-free)

    model = model.to(device).eval()
    # SigLIP was trained on text padded to the full length (the model card pads to max_length).
    tokenize = hf_text_tokenizer(spec.name, tokenizer, model.config.text_config.max_position_embeddings,
                                 padding="max_length", ids_only=True)

    def encode_text(tokens: torch.Tensor) -> torch.Tensor:
        return model.text_model(input_ids=tokens.to(model.logit_scale.device)).pooler_output

    image = Pooled(model.vision_model)
    return FoundationModel(
        name=spec.name, spec=spec, model=model, image_encoder=image, preprocess=preprocess, tokenize=tokenize,
        encode_image=image, encode_text=encode_text, logit_scale=float(model.logit_scale.detach().exp()),
        embed_dim=spec.embed_dim, weights_id=wid,
        extras={"logit_bias": float(model.logit_bias.detach()), "zero_shot_rule": "sigmoid"},
    )


def _load_folder(spec: ModelSpec, folder: Path, device: str, fallback: Preprocess) -> FoundationModel:
    from transformers import SiglipModel

    model = hf_from_folder(SiglipModel, folder, str(folder))
    return _bundle(spec, model, load_tokenizer(folder, spec.name), hf_preprocess(folder, fallback),
                   weights_id(file_in(folder, WEIGHT_FILES), ""), device)


def _load_medsiglip(spec: ModelSpec, weights: Path | None, device: str) -> FoundationModel:
    folder = folder_with(spec.name, weights, spec.weights_env, HUB_ID, FILES, OPTIONAL)
    return _load_folder(spec, folder, device, MEDSIGLIP_PREPROCESS)


def _tiny_preprocess() -> Preprocess:
    return Preprocess(size=TINY_SIZE, resize=TINY_SIZE, mode="squash", interpolation="bilinear",
                      mean=(0.5,) * 3, std=(0.5,) * 3)


def _load_tiny_medsiglip(spec: ModelSpec, weights: Path | None, device: str) -> FoundationModel:
    from transformers import AutoTokenizer, SiglipModel

    if weights is not None:
        return _load_folder(spec, weights if weights.is_dir() else weights.parent, device, _tiny_preprocess())
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_bert_dir()))  # a folder tokenizer, like the real one
    with seeded():
        model = SiglipModel(siglip_config(tiny_config(tokenizer.vocab_size)))
    return _bundle(spec, model, tokenizer, _tiny_preprocess(), random_init_id(), device)


register(ModelSpec(
    name="medsiglip", image_encoder="SigLIP-400M/14 ViT, 448 px", text_encoder="SigLIP text transformer (64 tokens)",
    embed_dim=1152, weights_source=f"hub {HUB_ID} (gated)", loader=_load_medsiglip, lora_targets=SIGLIP_LORA,
    weights_env="CXRFAIR_MEDSIGLIP_WEIGHTS", license="Health AI Developer Foundations terms of use",
    embedding="projected (attention-pool head)",
    description="MedSigLIP; sigmoid loss: logit_bias in extras; folder = the hub repo's files",
))
register(ModelSpec(
    name="tiny-medsiglip", image_encoder="SigLIP ViT 2x32, patch 14, 56 px", text_encoder="SigLIP text 2x32, toy vocab",
    embed_dim=_TINY_TOWER["hidden_size"], weights_source=TINY_WEIGHTS, loader=_load_tiny_medsiglip,
    lora_targets=SIGLIP_LORA, license="-", embedding="projected (attention-pool head)", tiny=True,
    description="offline test/demo model: transformers SiglipModel code path, random weights",
))
