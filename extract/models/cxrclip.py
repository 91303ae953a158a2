"""CXR-CLIP (Kakao Brain): ResNet-50 or Swin-T image towers + Bio_ClinicalBERT, 512-d joint space.

References:
    You et al., "CXR-CLIP: Toward Large Scale Chest X-ray Language-Image Pre-training", MICCAI 2023;
    github.com/kakaobrain/cxr-clip (``cxrclip/model/clip.py``, ``model/modules/*``,
    ``data/data_utils.py``, ``evaluator.py``, ``trainer.py``, ``configs/``).

Checkpoints (``r50_mcc.tar``, ``swint_mcc.tar``: MIMIC-CXR + CheXpert + ChestX-ray14) are
``torch.save`` dicts with ``"model"`` (the CXRClip state dict), ``"config"`` (the Hydra/OmegaConf
training config), optimizer and scheduler states. They are read with
``cxrfair.extract.safe_load.restricted_load``: the OmegaConf config is never unpickled into live
objects, so the architecture is read from the state dict's keys and shapes instead (ResNet-50 vs
Swin-T, linear vs MLP projection, projection size); the released configs'
``text_encoder.pooling`` is "eos" and ``base.text_max_length`` 256, used here.

Preprocessing is the authors' evaluation transform: resize the short side to 224 (bilinear),
centre crop 224, scale to [0, 1], then ImageNet mean/std for the ResNet-50 model (``trainer.run``
and ``Evaluator`` switch ``normalize`` to "imagenet" whenever the image encoder is "resnet") and
mean = std = 0.5 for Swin ("huggingface"). Sourget et al. used 0.5 for the ResNet model too.
"""

from __future__ import annotations

from pathlib import Path

from cxrfair.errors import CxrfairError
from cxrfair.extract.models.common import (
    BIO_CLINICALBERT_CONFIG,
    IMAGENET_MEAN,
    IMAGENET_STD,
    RESNET50_LAYERS,
    RESNET_LORA,
    TINY_RESNET_LAYERS,
    TINY_RESNET_WIDTH,
    TINY_WEIGHTS,
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
from cxrfair.extract.models.medclip import SWIN_LORA, SWIN_TINY_CONFIG, TINY_SWIN_CONFIG, tiny_bert_fields
from cxrfair.extract.preprocess import Preprocess
from cxrfair.extract.registry import FoundationModel, ModelSpec, register
from cxrfair.extract.weights import resolve_weights
from cxrfair.extract.safe_load import load_state_dict_file

URLS = {  # the cxr-clip README's "M,C,C14" checkpoints
    "resnet": "https://twg.kakaocdn.net/brainrepo/models/cxr-clip/de4b5e4ae2047c1fb7960ddcd8d861cb/r50_mcc.tar",
    "swin": "https://twg.kakaocdn.net/brainrepo/models/cxr-clip/a25ce760064591c899f67c97ed7790de/swint_mcc.tar",
}
RESNET_WIDTH = 64  # ResNet-50's bottleneck width (tests shrink it with RESNET50_LAYERS)
TEXT_MAX_LENGTH = 256  # configs/train.yaml base.text_max_length
TEMPERATURE = 0.07  # configs/model/clip_*_clinical.yaml: logit_scale init log(1 / 0.07)
PREPROCESS = {
    "resnet": Preprocess(size=224, resize=224, mode="shortest", interpolation="bilinear",
                         mean=IMAGENET_MEAN, std=IMAGENET_STD),
    "swin": Preprocess(size=224, resize=224, mode="shortest", interpolation="bilinear",
                       mean=(0.5,) * 3, std=(0.5,) * 3),
}
IMAGE_PREFIX = {"resnet": "image_encoder.resnet.", "swin": "image_encoder.image_encoder."}
TEXT_PREFIX = "text_encoder.text_encoder."
# fine-tuning adapts ImageTower (encoder + projection): its module names start "encoder."
LORA = {"resnet": RESNET_LORA, "swin": SWIN_LORA}


def read_checkpoint(path: Path) -> dict:
    """``ckpt["model"]`` of a CXR-CLIP ``.tar`` (read restrictedly) or a ``.safetensors`` copy of it."""
    return load_state_dict_file(path, key="model")


def image_kind(state: dict, source: str) -> str:
    """"resnet" or "swin", from which image encoder's keys the state dict holds."""
    kinds = [k for k, prefix in IMAGE_PREFIX.items() if any(key.startswith(prefix) for key in state)]
    if len(kinds) != 1:
        raise CxrfairError(f"{source}: not a CXR-CLIP checkpoint (no image_encoder.resnet.* or "
                           "image_encoder.image_encoder.* weights)")
    return kinds[0]


def _projection(state: dict, prefix: str):
    from cxrfair.extract.models import cxrclip_nn as nn_  # lazy: torch (registering stays torch-free)

    out_dim, in_dim = state[f"{prefix}.projection.weight"].shape
    mlp = f"{prefix}.fc.weight" in state  # the "mlp" head of configs' projection_head.name
    return (nn_.MLPProjectionHead if mlp else nn_.LinearProjectionHead)(in_dim, out_dim)


def cxrclip_from_state(state: dict, bert_fields: dict, swin_fields: dict, layers: tuple[int, ...], width: int,
                       source: str):
    """A CXRClip holding exactly ``state`` (original key names); the HF towers go through
    transformers' own key conversion (old BERT/Swin names, saved ``position_ids``)."""
    from transformers import BertModel, SwinModel

    from cxrfair.extract.models import cxrclip_nn as nn_  # lazy: torch (registering stays torch-free)

    kind = image_kind(state, source)
    text_part, rest = split_prefix(state, TEXT_PREFIX)
    bert = hf_from_state_dict(BertModel, bert_config(bert_fields), text_part, source, TEXT_PREFIX)
    loaded = (TEXT_PREFIX,)
    if kind == "swin":
        swin_part, rest = split_prefix(rest, IMAGE_PREFIX["swin"])
        swin = hf_from_state_dict(SwinModel, swin_config(swin_fields), swin_part, source, IMAGE_PREFIX["swin"])
        image, loaded = nn_.SwinEncoder(swin), loaded + (IMAGE_PREFIX["swin"],)
    else:
        image = nn_.ResNet50(build_resnet(layers, fc_out=None, width=width))
    try:
        heads = _projection(state, "image_projection"), _projection(state, "text_projection")
    except KeyError as e:
        raise CxrfairError(f"{source}: weights do not match CXR-CLIP (missing {e.args[0]})") from None
    model = nn_.CXRClip(image, nn_.TextEncoder(bert), *heads, TEMPERATURE)
    load_remaining_strict(model, rest, loaded, source)
    return model, kind


def build_cxrclip(kind: str, bert_fields: dict, swin_fields: dict, layers: tuple[int, ...] = RESNET50_LAYERS,
                  width: int = 64, proj_dim: int = 512):
    """A CXRClip with random weights (linear projections, as released)."""
    from transformers import BertModel, SwinModel

    from cxrfair.extract.models import cxrclip_nn as nn_  # lazy: torch (registering stays torch-free)

    bert = BertModel(bert_config(bert_fields))
    if kind == "swin":
        swin = SwinModel(swin_config(swin_fields))
        image, dim = nn_.SwinEncoder(swin), swin.num_features
    else:
        image, dim = nn_.ResNet50(build_resnet(layers, fc_out=None, width=width)), 2048
    return nn_.CXRClip(image, nn_.TextEncoder(bert), nn_.LinearProjectionHead(dim, proj_dim),
                       nn_.LinearProjectionHead(bert.config.hidden_size, proj_dim), TEMPERATURE)


def _bundle(spec: ModelSpec, model, tokenizer, preprocess: Preprocess, wid: str, device: str) -> FoundationModel:
    from cxrfair.extract.models.cxrclip_nn import ImageTower  # lazy: torch (registering stays torch-free)

    model = model.to(device).eval()

    # "longest" padding as the evaluator; eos pooling reads each text's own [SEP], so padding does not matter.
    tokenize = hf_text_tokenizer(spec.name, tokenizer, min(TEXT_MAX_LENGTH, text_positions(model.text_encoder)))

    return FoundationModel(
        name=spec.name, spec=spec, model=model, image_encoder=ImageTower(model.image_encoder, model.image_projection),
        preprocess=preprocess, tokenize=tokenize, encode_image=model.encode_image, encode_text=model.encode_text,
        logit_scale=float(model.logit_scale.detach().exp()), embed_dim=spec.embed_dim, weights_id=wid,
        encode_image_unprojected=model.encode_image_unprojected,
    )


def _checked(model, kind: str, want: str, source: str):
    if kind != want:
        raise CxrfairError(f"{source}: a CXR-CLIP {kind} checkpoint; this model expects {want} "
                           f"(use cxr-clip-{'r50' if kind == 'resnet' else 'swint'})")
    return model


def _loader(want: str):
    def load(spec: ModelSpec, weights: Path | None, device: str) -> FoundationModel:
        name = Path(URLS[want]).name
        candidates = [cache_dir(spec.name) / name, cache_dir(spec.name) / f"{Path(name).stem}.safetensors"]
        path = resolve_weights(spec.name, weights, spec.weights_env, candidates,
                               f"{URLS[want]} (the cxr-clip README; also needs {VOCAB_HINT})", name)
        vocab = find_bert_vocab(spec.name, path)
        model, kind = cxrclip_from_state(read_checkpoint(path), BIO_CLINICALBERT_CONFIG, SWIN_TINY_CONFIG,
                                         RESNET50_LAYERS, RESNET_WIDTH, str(path))
        return _bundle(spec, _checked(model, kind, want, str(path)), bert_tokenizer(vocab), PREPROCESS[want],
                       weights_id(path, ""), device)

    return load


TINY_SIZE = 64


def _tiny_loader(want: str):
    def load(spec: ModelSpec, weights: Path | None, device: str) -> FoundationModel:
        if weights is not None:
            model, kind = cxrclip_from_state(read_checkpoint(weights), tiny_bert_fields(), TINY_SWIN_CONFIG,
                                             TINY_RESNET_LAYERS, TINY_RESNET_WIDTH, str(weights))
            model = _checked(model, kind, want, str(weights))
        else:
            with seeded():
                model = build_cxrclip(want, tiny_bert_fields(), TINY_SWIN_CONFIG, TINY_RESNET_LAYERS,
                                      TINY_RESNET_WIDTH, proj_dim=32)
        base = PREPROCESS[want]
        pre = Preprocess(size=TINY_SIZE, resize=TINY_SIZE, mode=base.mode, interpolation=base.interpolation,
                         mean=base.mean, std=base.std)
        return _bundle(spec, model, bert_tokenizer(toy_vocab()), pre, weights_id(weights, random_init_id()), device)

    return load


_REAL = dict(text_encoder="Bio_ClinicalBERT (eos token) + linear projection", embed_dim=512,
             license="CC BY-NC 4.0", description="CXR-CLIP (MIMIC-CXR + CheXpert + ChestX-ray14); .tar read "
             "restrictedly + Bio_ClinicalBERT vocab.txt")
register(ModelSpec(name="cxr-clip-r50", image_encoder="ResNet-50 (torchvision) + linear projection",
                   weights_source=URLS["resnet"], loader=_loader("resnet"), lora_targets=LORA["resnet"],
                   weights_env="CXRFAIR_CXR_CLIP_R50_WEIGHTS", unprojected_dim=2048, **_REAL))
register(ModelSpec(name="cxr-clip-swint", image_encoder="Swin-T (first token of the last layer) + linear projection",
                   weights_source=URLS["swin"], loader=_loader("swin"), lora_targets=LORA["swin"],
                   weights_env="CXRFAIR_CXR_CLIP_SWINT_WEIGHTS", unprojected_dim=768, **_REAL))
_TINY = dict(text_encoder="BERT 2x32, toy vocab", embed_dim=32, weights_source=TINY_WEIGHTS, license="-", tiny=True)
register(ModelSpec(name="tiny-cxr-clip-r50", image_encoder="ResNet Bottleneck [1,1,1,1] width 16, 64 px",
                   loader=_tiny_loader("resnet"), lora_targets=LORA["resnet"], unprojected_dim=2048,
                   description="offline test/demo model: CXR-CLIP ResNet code path, random weights", **_TINY))
register(ModelSpec(name="tiny-cxr-clip-swint", image_encoder="Swin 2 stages, dim 16, 64 px",
                   loader=_tiny_loader("swin"), lora_targets=LORA["swin"], unprojected_dim=32,
                   description="offline test/demo model: CXR-CLIP Swin code path, random weights", **_TINY))
