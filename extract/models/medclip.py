"""MedCLIP (Swin-T or ResNet-50 + Bio_ClinicalBERT), re-implemented thinly so its weights load.

References:
    Wang et al., "MedCLIP: Contrastive Learning from Unpaired Medical Images and Text", EMNLP 2022.
    Module layout, pooling, heads and constants follow github.com/RyanWangZf/MedCLIP
    (``medclip/modeling_medclip.py``, ``constants.py``, ``dataset.py``); the ``medclip`` package
    itself does not import with transformers 5, so nothing of it is used.

The module names are the original's (``vision_model.model``, ``vision_model.projection_head``,
``text_model.model``, ``text_model.projection_head``, ``logit_scale``), so the released
``pytorch_model.bin`` (saved with transformers 4.24 key names) loads strictly: the Swin and BERT
parts go through transformers' own 4.x -> 5 key conversion (``from_pretrained(state_dict=...)``),
the rest through ``load_state_dict``. Helpers for Bio_ClinicalBERT (configs, tokenizer, toy
vocabulary, state-dict loading) are shared with ``cxrfair.extract.models.gloria``.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

from cxrfair.errors import CxrfairError
from cxrfair.extract.models.common import (  # noqa: F401 - re-exported names other loaders and tests use
    BERT_VOCAB_URL,
    BIO_CLINICALBERT,
    BIO_CLINICALBERT_CONFIG,
    RESNET50_LAYERS,
    RESNET_LORA,
    TINY_RESNET_LAYERS,
    TINY_RESNET_WIDTH,
    TINY_SEED,
    TINY_WEIGHTS,
    VOCAB_ENV,
    VOCAB_HINT,
    bert_config,
    bert_tokenizer,
    build_resnet,
    cache_dir,
    find_bert_vocab,
    hf_from_state_dict,
    hf_text_tokenizer,
    load_remaining_strict,
    random_init_id,
    seeded,
    split_prefix,
    swin_config,
    text_positions,
    toy_vocab,
    weights_id,
)
from cxrfair.extract.preprocess import Preprocess
from cxrfair.extract.registry import FoundationModel, ModelSpec, register
from cxrfair.extract.weights import resolve_weights

MEDCLIP_MEAN = 0.5862785803043838  # medclip/constants.py IMG_MEAN (one channel)
MEDCLIP_STD = 0.27950088968644304  # medclip/constants.py IMG_STD
EMBED_DIM = 512  # both projection heads: Linear(768, 512, bias=False)
MAX_TEXT_LENGTH = 77  # MedCLIPProcessor sets tokenizer.model_max_length = 77

# Grayscale, pad to square with black, resize 224 bicubic, center crop 224, one-channel
# normalisation; a grayscale image converted to RGB has three equal channels, so the same
# mean/std on each is the original's single channel repeated to 3.
MEDCLIP_PREPROCESS = Preprocess(
    size=224, resize=224, mode="pad", interpolation="bicubic",
    mean=(MEDCLIP_MEAN,) * 3, std=(MEDCLIP_STD,) * 3,
)

SWIN_TINY = "microsoft/swin-tiny-patch4-window7-224"
MEDCLIP_URLS = {
    "swin": "https://storage.googleapis.com/pytrial/medclip-vit-pretrained.zip",
    "resnet": "https://storage.googleapis.com/pytrial/medclip-pretrained.zip",
}
WEIGHTS_NAME = "pytorch_model.bin"  # medclip/constants.py WEIGHTS_NAME, inside each zip

# Architecture fields of https://huggingface.co/microsoft/swin-tiny-patch4-window7-224/blob/main/config.json
# (the ImageNet label maps are left out: SwinModel has no classifier).
SWIN_TINY_CONFIG = {
    "model_type": "swin", "image_size": 224, "patch_size": 4, "num_channels": 3, "embed_dim": 96,
    "depths": [2, 2, 6, 2], "num_heads": [3, 6, 12, 24], "window_size": 7, "mlp_ratio": 4.0,
    "qkv_bias": True, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
    "drop_path_rate": 0.1, "hidden_act": "gelu", "use_absolute_embeddings": False,
    "path_norm": True, "layer_norm_eps": 1e-05, "initializer_range": 0.02, "encoder_stride": 32,
}

# Tiny offline variants: same classes, toy sizes.
TINY_BERT_CONFIG = {
    "model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
    "intermediate_size": 64, "max_position_embeddings": 128, "type_vocab_size": 2, "pad_token_id": 0,
}
TINY_SWIN_CONFIG = {
    "model_type": "swin", "image_size": 64, "patch_size": 4, "embed_dim": 16, "depths": [1, 1],
    "num_heads": [1, 2], "window_size": 4, "drop_path_rate": 0.0,
}
TINY_IMAGE_SIZE = 64
TINY_SWIN_FEATURES = 32  # embed_dim 16 doubled once per later stage


def build_medclip(vision: str, bert_fields: dict, swin_fields: dict | None = None,
                  resnet_layers: tuple[int, ...] = RESNET50_LAYERS, resnet_width: int = 64):
    """A MedCLIPModel with random weights. ``vision``: "swin" or "resnet"."""
    from transformers import BertModel, SwinModel

    from cxrfair.extract.models import medclip_nn as nn_  # lazy: torch (registering stays torch-free)

    text = nn_.MedCLIPTextModel(BertModel(bert_config(bert_fields)))
    if vision == "swin":
        image = nn_.MedCLIPVisionModelViT(SwinModel(swin_config(swin_fields)))
    else:
        image = nn_.MedCLIPVisionModel(build_resnet(resnet_layers, width=resnet_width))
    return nn_.MedCLIPModel(image, text)


# --- loading released state dicts -----------------------------------------------------------

def read_medclip_state(path: Path) -> dict:
    """The MedCLIP state dict from a zip, a folder, ``pytorch_model.bin`` or ``.safetensors``."""
    import torch

    if path.is_dir():
        found = sorted(path.rglob(WEIGHTS_NAME)) or sorted(path.rglob("*.safetensors"))
        if not found:
            raise CxrfairError(f"--weights {path}: no {WEIGHTS_NAME} or .safetensors file in this folder")
        path = found[0]
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if path.suffix == ".zip":
        with zipfile.ZipFile(path) as zf:
            # Exact file name, outside macOS resource-fork folders (__MACOSX/._pytorch_model.bin).
            names = [n for n in zf.namelist() if n.rsplit("/", 1)[-1] == WEIGHTS_NAME and "__MACOSX" not in n]
            if not names:
                raise CxrfairError(f"--weights {path}: the zip holds no {WEIGHTS_NAME}")
            data = io.BytesIO(zf.read(names[0]))
        # MedCLIP's file is a plain state dict: torch's own tensors-only unpickler suffices.
        return torch.load(data, map_location="cpu", weights_only=True)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises several types for a foreign file
        raise CxrfairError(f"--weights {path}: not a tensors-only state dict ({str(e).splitlines()[0]})") from e


def medclip_from_state_dict(state: dict, vision: str, bert_fields: dict, swin_fields: dict | None,
                            resnet_layers: tuple[int, ...], source: str, resnet_width: int = 64):
    """A MedCLIPModel holding exactly the weights in ``state`` (original key names)."""
    from transformers import BertModel, SwinModel

    from cxrfair.extract.models import medclip_nn as nn_  # lazy: torch (registering stays torch-free)

    text_part, rest = split_prefix(state, "text_model.model.")
    bert = hf_from_state_dict(BertModel, bert_config(bert_fields), text_part, source, "text_model.model.")
    loaded = ("text_model.model.",)
    if vision == "swin":
        swin_part, rest = split_prefix(rest, "vision_model.model.")
        swin = hf_from_state_dict(SwinModel, swin_config(swin_fields), swin_part, source, "vision_model.model.")
        image = nn_.MedCLIPVisionModelViT(swin)
        loaded += ("vision_model.model.",)
    else:
        image = nn_.MedCLIPVisionModel(build_resnet(resnet_layers, width=resnet_width))
    model = nn_.MedCLIPModel(image, nn_.MedCLIPTextModel(bert))
    load_remaining_strict(model, rest, loaded, source)
    return model


# --- tokenizer, weights lookup, bundle ------------------------------------------------------


def _bundle(spec: ModelSpec, model, tokenizer, preprocess: Preprocess, wid: str, device: str) -> FoundationModel:
    model = model.to(device).eval()

    # Padded to the longest prompt of the call, as MedCLIP's process_class_prompts does; the
    # pooling averages over padding too, so a prompt's embedding depends on that length.
    tokenize = hf_text_tokenizer(spec.name, tokenizer, min(MAX_TEXT_LENGTH, text_positions(model.text_model)))

    return FoundationModel(
        name=spec.name, spec=spec, model=model, image_encoder=model.vision_model, preprocess=preprocess,
        tokenize=tokenize, encode_image=model.encode_image, encode_text=model.encode_text,
        logit_scale=model.temperature(), embed_dim=spec.embed_dim, weights_id=wid,
        encode_image_unprojected=model.encode_image_unprojected,
    )


def _load_medclip(spec: ModelSpec, weights: Path | None, device: str, *, vision: str) -> FoundationModel:
    url = MEDCLIP_URLS[vision]
    # The zip as downloaded comes first: it is what the error message tells the user to place.
    candidates = [cache_dir(spec.name) / Path(url).name, cache_dir(spec.name) / WEIGHTS_NAME,
                  cache_dir(spec.name) / "model.safetensors"]
    download = f"{url} (a zip holding {WEIGHTS_NAME}; also needs {VOCAB_HINT})"
    path = resolve_weights(spec.name, weights, spec.weights_env, candidates, download, Path(url).name)
    vocab = find_bert_vocab(spec.name, path)
    state = read_medclip_state(path)
    model = medclip_from_state_dict(state, vision, BIO_CLINICALBERT_CONFIG, SWIN_TINY_CONFIG, RESNET50_LAYERS,
                                    str(path))
    return _bundle(spec, model, bert_tokenizer(vocab), MEDCLIP_PREPROCESS, weights_id(path, ""), device)


def _load_tiny_medclip(spec: ModelSpec, weights: Path | None, device: str, *, vision: str) -> FoundationModel:
    if weights is not None:
        state = read_medclip_state(weights)
        model = medclip_from_state_dict(state, vision, tiny_bert_fields(), TINY_SWIN_CONFIG, TINY_RESNET_LAYERS,
                                        str(weights), TINY_RESNET_WIDTH)
    else:
        with seeded():  # random but reproducible: caches and runs can be compared
            model = build_medclip(vision, tiny_bert_fields(), TINY_SWIN_CONFIG, TINY_RESNET_LAYERS, TINY_RESNET_WIDTH)
    pre = Preprocess(size=TINY_IMAGE_SIZE, resize=TINY_IMAGE_SIZE, mode="pad", interpolation="bicubic",
                     mean=(MEDCLIP_MEAN,) * 3, std=(MEDCLIP_STD,) * 3)
    wid = weights_id(weights, random_init_id())
    return _bundle(spec, model, bert_tokenizer(toy_vocab()), pre, wid, device)


def tiny_bert_fields() -> dict:
    """TINY_BERT_CONFIG with the toy vocabulary's size."""
    return {**TINY_BERT_CONFIG, "vocab_size": len(toy_vocab())}


# peft targets (``re.fullmatch`` on module names; leading ``.*`` so they also work on the whole
# model). transformers 5 names Swin's attention linears q/k/v/o_proj and its MLP mlp.fc1/fc2;
# BERT's layers are ``encoder.layer.N`` (singular), so the Swin pattern never touches the text tower.
SWIN_LORA = r".*encoder\.layers\.\d+\.blocks\.\d+\.(attention\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(fc1|fc2))"


def _loader(fn, vision: str):
    def load(spec: ModelSpec, weights: Path | None, device: str) -> FoundationModel:
        return fn(spec, weights, device, vision=vision)

    return load


register(ModelSpec(
    name="medclip-vit", image_encoder="Swin-T (microsoft/swin-tiny-patch4-window7-224)",
    text_encoder="Bio_ClinicalBERT", embed_dim=EMBED_DIM, weights_source=MEDCLIP_URLS["swin"],
    loader=_loader(_load_medclip, "swin"), lora_targets=SWIN_LORA, weights_env="CXRFAIR_MEDCLIP_VIT_WEIGHTS",
    license="MIT (RyanWangZf/MedCLIP)", unprojected_dim=768,
    description="MedCLIP-ViT (MIMIC-CXR + CheXpert); zip or pytorch_model.bin + Bio_ClinicalBERT vocab.txt",
))
register(ModelSpec(
    name="medclip-rn50", image_encoder="ResNet-50 (torchvision)", text_encoder="Bio_ClinicalBERT",
    embed_dim=EMBED_DIM, weights_source=MEDCLIP_URLS["resnet"], loader=_loader(_load_medclip, "resnet"),
    lora_targets=RESNET_LORA, weights_env="CXRFAIR_MEDCLIP_RN50_WEIGHTS",
    license="MIT (RyanWangZf/MedCLIP)", unprojected_dim=2048,
    description="MedCLIP-ResNet (MIMIC-CXR + CheXpert); zip or pytorch_model.bin + Bio_ClinicalBERT vocab.txt",
))
register(ModelSpec(
    name="tiny-medclip-vit", image_encoder="Swin 2 stages, dim 16, 64 px", text_encoder="BERT 2x32, toy vocab",
    embed_dim=EMBED_DIM, weights_source=TINY_WEIGHTS, license="-", unprojected_dim=TINY_SWIN_FEATURES,
    loader=_loader(_load_tiny_medclip, "swin"), lora_targets=SWIN_LORA, tiny=True,
    description="offline test/demo model: MedCLIP-ViT code path, random weights",
))
register(ModelSpec(
    name="tiny-medclip-rn50", image_encoder="ResNet Bottleneck [1,1,1,1] width 16, 64 px",
    text_encoder="BERT 2x32, toy vocab",
    embed_dim=EMBED_DIM, weights_source=TINY_WEIGHTS, license="-", unprojected_dim=2048,
    loader=_loader(_load_tiny_medclip, "resnet"), lora_targets=RESNET_LORA, tiny=True,
    description="offline test/demo model: MedCLIP-ResNet code path, random weights",
))
