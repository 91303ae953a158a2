"""BioViL and BioViL-T (Microsoft hi-ml): ResNet-50 image towers and CXR-BERT text towers, 128-d joint space.

References:
    Boecking et al., "Making the Most of Text Semantics to Improve Biomedical Vision-Language
    Processing", ECCV 2022 (BioViL); Bannur et al., "Learning to Exploit Temporal Structure for
    Biomedical Vision-Language Processing", CVPR 2023 (BioViL-T). Layout and preprocessing follow
    microsoft/hi-ml ``hi-ml-multimodal`` (``image/model/pretrained.py``, ``image/utils.py``,
    ``image/data/io.py``, ``image/data/transforms.py``, ``text/model/modelling_cxrbert.py``).

Why re-implemented: the ``hi-ml-multimodal`` package pins old torch/transformers and its text
model is custom HF code (``trust_remote_code``). Here the image modules are small plain modules
(``biovil_nn``) and CXR-BERT is transformers' own BertModel plus its projection head, loaded by
key from the hub repo's files — no remote code runs.

Files (one folder per model, e.g. a hub snapshot): the image weights
(``biovil_image_resnet50_proj_size_128.pt`` in ``microsoft/BiomedVLP-CXR-BERT-specialized``,
``biovil_t_image_model_proj_size_128.pt`` in ``microsoft/BiomedVLP-BioViL-T``), and that repo's
``config.json``, ``vocab.txt`` and ``pytorch_model.bin`` (CXR-BERT). Pickled files are read with
``cxrfair.extract.safe_load``. Weights a single-image model never uses are dropped on load: the
ResNet's ImageNet ``fc`` head, BioViL-T's temporal ViT pooler (it only runs with a prior image)
and CXR-BERT's masked-language-model head; every other key must match exactly.

Embeddings: image = ``projected_global_embedding`` (mean of the 1x1-conv-projected patch
features, 128); text = projected [CLS] (128). The cache stores them unnormalised; every
similarity normalises both (Sourget et al. left BioViL's text unnormalised: we do not).
Pre-projection image features (``img_embedding``): 2048 (BioViL), 512 (BioViL-T: 256 from the
image + 256 from the learned "no prior image" embedding, constant for single images).
No learned temperature is released: ``logit_scale`` is 1 (hi-ml's zero-shot uses raw cosines).

Preprocessing (hi-ml ``get_image_inference``): grey levels stretched to 0..255 per image, resize
the short side to 512 (bilinear), centre crop 480 (BioViL) or 448 (BioViL-T), scale to [0, 1],
no mean/std. (Sourget et al. cropped 512 for BioViL; hi-ml's own value is 480.)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from cxrfair.errors import CxrfairError
from cxrfair.extract.models.common import (
    RESNET50_LAYERS,
    RESNET_LORA,
    TINY_RESNET_LAYERS,
    TINY_RESNET_WIDTH,
    TINY_WEIGHTS,
    bert_config,
    bert_tokenizer,
    build_resnet,
    drop_prefixes,
    file_in,
    folder_with,
    hf_from_state_dict,
    hf_text_tokenizer,
    load_strict,
    random_init_id,
    seeded,
    split_prefix,
    text_positions,
    toy_vocab,
    weights_id,
)
from cxrfair.extract.preprocess import Preprocess
from cxrfair.extract.registry import FoundationModel, ModelSpec, register
from cxrfair.extract.safe_load import load_state_dict_file

TEXT_FILES = ("model.safetensors", "pytorch_model.bin")
# Weights of modules a single-image model never runs (see the module docstring).
UNUSED_IMAGE = ("encoder.encoder.fc.", "encoder.vit_pooler.")
UNUSED_TEXT = ("cls.predictions.",)
# config.json keys that are not BertConfig fields of the architecture.
_NOT_BERT = ("model_type", "auto_map", "architectures", "projection_size", "transformers_version", "torch_dtype")
RESNET_WIDTH = 64  # ResNet-50's bottleneck width (tests shrink it with RESNET50_LAYERS)
MAX_TEXT_LENGTH = 512  # CXR-BERT's max_position_embeddings (hi-ml refuses longer input)

# CXR-BERT-specialized's architecture (BERT-base with its own 30,522-token vocabulary); used to
# check key names offline. The loader reads the repo's config.json instead.
CXR_BERT_CONFIG = {"model_type": "bert", "vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12,
                   "num_attention_heads": 12, "intermediate_size": 3072, "max_position_embeddings": 512,
                   "type_vocab_size": 2, "pad_token_id": 0, "projection_size": 128}
TINY_BERT = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
             "intermediate_size": 64, "max_position_embeddings": 64, "type_vocab_size": 2, "pad_token_id": 0,
             "projection_size": 16}


@dataclass(frozen=True)
class Variant:
    """What differs between BioViL and BioViL-T."""

    hub_id: str  # Hugging Face repo holding both towers' files
    image_file: str  # the image model's state dict in that repo
    crop: int  # centre crop after resizing the short side to 512
    temporal: bool  # BioViL-T's single-image path of the multi-image encoder


VARIANTS = {
    "biovil": Variant("microsoft/BiomedVLP-CXR-BERT-specialized", "biovil_image_resnet50_proj_size_128.pt", 480, False),
    "biovil-t": Variant("microsoft/BiomedVLP-BioViL-T", "biovil_t_image_model_proj_size_128.pt", 448, True),
}


def preprocess_for(crop: int, resize: int = 512) -> Preprocess:
    return Preprocess(size=crop, resize=resize, mode="shortest", interpolation="bilinear",
                      mean=(0.0,) * 3, std=(1.0,) * 3, minmax=True)


def build_image_model(temporal: bool, layers: tuple[int, ...] = RESNET50_LAYERS, width: int = 64, joint: int = 128):
    """hi-ml's ImageModel (single-image path) with random weights."""
    from cxrfair.extract.models import biovil_nn as nn_  # lazy: torch (registering stays torch-free)

    resnet = build_resnet(layers, fc_out=None, width=width)
    trunk = nn_.SingleImageTemporalTrunk(resnet) if temporal else nn_.ResNetTrunk(resnet)
    return nn_.ImageModel(trunk, 2 * nn_.TEMPORAL_DIM if temporal else 2048, joint)


def build_text_model(fields: dict):
    """CXR-BERT (BertModel without pooler + projection head) with random weights."""
    from transformers import BertModel

    from cxrfair.extract.models import biovil_nn as nn_  # lazy: torch (registering stays torch-free)

    bert = BertModel(bert_config({k: v for k, v in fields.items() if k not in _NOT_BERT}), add_pooling_layer=False)
    return nn_.CXRBert(bert, fields.get("projection_size", 128))


def build_biovil(temporal: bool, text_fields: dict, layers: tuple[int, ...] = RESNET50_LAYERS, width: int = 64):
    from cxrfair.extract.models import biovil_nn as nn_  # lazy: torch (registering stays torch-free)

    joint = text_fields.get("projection_size", 128)
    return nn_.BioViL(build_image_model(temporal, layers, width, joint), build_text_model(text_fields))


def image_from_state(state: dict, temporal: bool, layers: tuple[int, ...], width: int, source: str):
    """The image model holding exactly ``state`` (hi-ml key names; unused modules dropped)."""
    state = drop_prefixes(state, UNUSED_IMAGE)
    joint = state["projector.model.3.weight"].shape[0] if "projector.model.3.weight" in state else 128
    model = build_image_model(temporal, layers, width, joint)
    load_strict(model, state, source)
    return model


def text_from_state(state: dict, fields: dict, source: str):
    """CXR-BERT holding exactly ``state`` (``bert.*`` + ``cls_projection_head.*``; MLM head dropped)."""
    from transformers import BertModel

    from cxrfair.extract.models import biovil_nn as nn_  # lazy: torch (registering stays torch-free)

    bert_part, rest = split_prefix(drop_prefixes(state, UNUSED_TEXT), "bert.")
    config = bert_config({k: v for k, v in fields.items() if k not in _NOT_BERT})
    bert = hf_from_state_dict(BertModel, config, bert_part, source, "bert.", add_pooling_layer=False)
    model = nn_.CXRBert(bert, fields.get("projection_size", 128))
    load_strict(model, {**{f"bert.{k}": v for k, v in bert.state_dict().items()}, **rest}, source)
    return model


def read_text_config(folder: Path) -> dict:
    try:
        return json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CxrfairError(f"{folder / 'config.json'}: not a readable CXR-BERT config ({e})") from None


def tokenizer_for(folder: Path):
    """CXR-BERT's WordPiece tokenizer from the folder's vocab.txt (lower-casing unless its
    tokenizer_config.json says otherwise)."""
    from transformers import BertTokenizer

    lower = True
    if (folder / "tokenizer_config.json").is_file():
        lower = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")).get("do_lower_case", True)
    return BertTokenizer(vocab=str(folder / "vocab.txt"), do_lower_case=lower)


def load_folder(folder: Path, variant: Variant, source: str, layers: tuple[int, ...] = RESNET50_LAYERS,
                width: int = 64):
    """(BioViL model, tokenizer, weights id) from a folder holding both towers' files."""
    from cxrfair.extract.models import biovil_nn as nn_  # lazy: torch (registering stays torch-free)
    image_file, text_file = folder / variant.image_file, file_in(folder, TEXT_FILES)
    image = image_from_state(load_state_dict_file(image_file), variant.temporal, layers, width, str(image_file))
    text = text_from_state(load_state_dict_file(text_file), read_text_config(folder), str(text_file))
    wid = f"{weights_id(image_file, '')}+{weights_id(text_file, '')}"
    return nn_.BioViL(image, text), tokenizer_for(folder), wid


def _bundle(spec: ModelSpec, model, tokenizer, preprocess: Preprocess, wid: str, device: str) -> FoundationModel:
    model = model.to(device).eval()

    # hi-ml's TextInput: padding to the longest prompt; [CLS] pooling ignores the padding.
    tokenize = hf_text_tokenizer(spec.name, tokenizer, min(MAX_TEXT_LENGTH, text_positions(model.text_model)))

    return FoundationModel(
        name=spec.name, spec=spec, model=model, image_encoder=model.image_model, preprocess=preprocess,
        tokenize=tokenize, encode_image=model.encode_image, encode_text=model.encode_text, logit_scale=1.0,
        embed_dim=spec.embed_dim, weights_id=wid, encode_image_unprojected=model.encode_image_unprojected,
    )


def _loader(name: str):
    variant = VARIANTS[name]

    def load(spec: ModelSpec, weights: Path | None, device: str) -> FoundationModel:
        if weights is not None and weights.is_file():
            weights = weights.parent
        folder = folder_with(spec.name, weights, spec.weights_env, variant.hub_id,
                             (variant.image_file, "config.json", "vocab.txt"), TEXT_FILES[1:])
        model, tokenizer, wid = load_folder(folder, variant, str(folder), RESNET50_LAYERS, RESNET_WIDTH)
        return _bundle(spec, model, tokenizer, preprocess_for(variant.crop), wid, device)

    return load


TINY_SIZE, TINY_RESIZE = 56, 64


def _tiny_loader(name: str):
    variant = VARIANTS[name]

    def load(spec: ModelSpec, weights: Path | None, device: str) -> FoundationModel:
        pre = preprocess_for(TINY_SIZE, TINY_RESIZE)
        if weights is not None:
            folder = weights if weights.is_dir() else weights.parent
            model, tokenizer, wid = load_folder(folder, variant, str(folder), TINY_RESNET_LAYERS, TINY_RESNET_WIDTH)
            return _bundle(spec, model, tokenizer, pre, wid, device)
        with seeded():
            model = build_biovil(variant.temporal, tiny_text_fields(), TINY_RESNET_LAYERS, TINY_RESNET_WIDTH)
        return _bundle(spec, model, bert_tokenizer(toy_vocab()), pre, random_init_id(), device)

    return load


def tiny_text_fields() -> dict:
    """TINY_BERT with the toy vocabulary's size (what a tiny folder's config.json holds)."""
    return {**TINY_BERT, "vocab_size": len(toy_vocab())}


_COMMON = dict(text_encoder="CXR-BERT (BertModel + projection head)", embed_dim=128, lora_targets=RESNET_LORA,
               license="MIT (hi-ml; model cards)")
register(ModelSpec(
    name="biovil", image_encoder="ResNet-50 + 1x1-conv projector, 480 px", loader=_loader("biovil"),
    weights_source=f"hub {VARIANTS['biovil'].hub_id} ({VARIANTS['biovil'].image_file} + CXR-BERT files)",
    weights_env="CXRFAIR_BIOVIL_WEIGHTS", unprojected_dim=2048,
    description="BioViL (MIMIC-CXR); folder with the image .pt, config.json, vocab.txt, pytorch_model.bin", **_COMMON,
))
register(ModelSpec(
    name="biovil-t", image_encoder="ResNet-50 + temporal encoder (single image), 448 px", loader=_loader("biovil-t"),
    weights_source=f"hub {VARIANTS['biovil-t'].hub_id} ({VARIANTS['biovil-t'].image_file} + CXR-BERT files)",
    weights_env="CXRFAIR_BIOVIL_T_WEIGHTS", unprojected_dim=512,
    description="BioViL-T (MIMIC-CXR, temporal); single-image path; same folder layout as biovil", **_COMMON,
))
_TINY = dict(text_encoder="BERT 2x32 + projection, toy vocab", embed_dim=TINY_BERT["projection_size"],
             weights_source=TINY_WEIGHTS, lora_targets=RESNET_LORA, license="-", tiny=True)
register(ModelSpec(
    name="tiny-biovil", image_encoder="ResNet Bottleneck [1,1,1,1] width 16, 56 px", loader=_tiny_loader("biovil"),
    unprojected_dim=2048, description="offline test/demo model: BioViL code path, random weights", **_TINY,
))
register(ModelSpec(
    name="tiny-biovil-t", image_encoder="ResNet [1,1,1,1] width 16 + temporal trunk, 56 px",
    loader=_tiny_loader("biovil-t"), unprojected_dim=512,
    description="offline test/demo model: BioViL-T single-image code path, random weights", **_TINY,
))
