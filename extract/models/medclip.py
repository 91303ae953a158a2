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
import math
import os
import re
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cxrfair.errors import CxrfairError
from cxrfair.extract.preprocess import Preprocess
from cxrfair.extract.registry import FoundationModel, ModelSpec, register

if TYPE_CHECKING:
    import torch

MEDCLIP_MEAN = 0.5862785803043838  # medclip/constants.py IMG_MEAN (one channel)
MEDCLIP_STD = 0.27950088968644304  # medclip/constants.py IMG_STD
EMBED_DIM = 512  # both projection heads: Linear(768, 512, bias=False)
MAX_TEXT_LENGTH = 77  # MedCLIPProcessor sets tokenizer.model_max_length = 77
LOGIT_SCALE_INIT = math.log(1 / 0.07)
LOGIT_SCALE_MAX = 4.6052  # compute_logits clamps logit_scale.data to [0, 4.6052] (exp -> 100)
TINY_SEED = 0

# Grayscale, pad to square with black, resize 224 bicubic, center crop 224, one-channel
# normalisation; a grayscale image converted to RGB has three equal channels, so the same
# mean/std on each is the original's single channel repeated to 3.
MEDCLIP_PREPROCESS = Preprocess(
    size=224, resize=224, mode="pad", interpolation="bicubic",
    mean=(MEDCLIP_MEAN,) * 3, std=(MEDCLIP_STD,) * 3,
)

BIO_CLINICALBERT = "emilyalsentzer/Bio_ClinicalBERT"
SWIN_TINY = "microsoft/swin-tiny-patch4-window7-224"
HUB_URL = "https://huggingface.co/{repo}/resolve/main/{file}"
BERT_VOCAB_URL = HUB_URL.format(repo=BIO_CLINICALBERT, file="vocab.txt")
MEDCLIP_URLS = {
    "swin": "https://storage.googleapis.com/pytrial/medclip-vit-pretrained.zip",
    "resnet": "https://storage.googleapis.com/pytrial/medclip-pretrained.zip",
}
WEIGHTS_NAME = "pytorch_model.bin"  # medclip/constants.py WEIGHTS_NAME, inside each zip
VOCAB_ENV = "CXRFAIR_BIO_CLINICALBERT_VOCAB"  # may point at Bio_ClinicalBERT's vocab.txt
VOCAB_HINT = (f"Bio_ClinicalBERT's vocab.txt from {BERT_VOCAB_URL}, placed beside the weights or in "
              f"~/.cache/cxrfair/bio-clinicalbert/ (or ${VOCAB_ENV})")

# Architecture fields of https://huggingface.co/emilyalsentzer/Bio_ClinicalBERT/blob/main/config.json
# (shipped here so only weights and vocab.txt need fetching).
BIO_CLINICALBERT_CONFIG = {
    "model_type": "bert", "vocab_size": 28996, "hidden_size": 768, "num_hidden_layers": 12,
    "num_attention_heads": 12, "intermediate_size": 3072, "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1, "max_position_embeddings": 512,
    "type_vocab_size": 2, "initializer_range": 0.02, "layer_norm_eps": 1e-12, "pad_token_id": 0,
}
# Architecture fields of https://huggingface.co/microsoft/swin-tiny-patch4-window7-224/blob/main/config.json
# (the ImageNet label maps are left out: SwinModel has no classifier).
SWIN_TINY_CONFIG = {
    "model_type": "swin", "image_size": 224, "patch_size": 4, "num_channels": 3, "embed_dim": 96,
    "depths": [2, 2, 6, 2], "num_heads": [3, 6, 12, 24], "window_size": 7, "mlp_ratio": 4.0,
    "qkv_bias": True, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
    "drop_path_rate": 0.1, "hidden_act": "gelu", "use_absolute_embeddings": False,
    "path_norm": True, "layer_norm_eps": 1e-05, "initializer_range": 0.02, "encoder_stride": 32,
}
RESNET50_LAYERS = (3, 4, 6, 3)

# Tiny offline variants: same classes, toy sizes.
TINY_BERT_CONFIG = {
    "model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
    "intermediate_size": 64, "max_position_embeddings": 128, "type_vocab_size": 2, "pad_token_id": 0,
}
TINY_SWIN_CONFIG = {
    "model_type": "swin", "image_size": 64, "patch_size": 4, "embed_dim": 16, "depths": [1, 1],
    "num_heads": [1, 2], "window_size": 4, "drop_path_rate": 0.0,
}
TINY_RESNET_LAYERS = (1, 1, 1, 1)  # Bottleneck blocks as in ResNet-50, one per stage
TINY_RESNET_WIDTH = 16  # bottleneck inner width (ResNet-50: 64); keeps GLoRIA's 299-px forward cheap
TINY_IMAGE_SIZE = 64

# A toy WordPiece vocabulary: specials, a few whole words, and every letter and digit both as a
# word start and as a ``##`` continuation, so any lowercase ASCII text tokenizes without [UNK]
# and unlisted words split into several pieces (which GLoRIA's word aggregation must undo).
TOY_WORDS = (
    "a an the of with and no or in on at is are photo chest x ray xray image finding findings "
    "there left right lung lungs heart pleural mild small large bilateral base bases lower upper "
    "atelectasis cardio megaly effusion pneumo thorax edema consolidation normal disease"
).split()


def toy_vocab() -> dict[str, int]:
    """The tiny models' WordPiece vocabulary, token -> id (always the same)."""
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "-"]
    tokens += list(dict.fromkeys(TOY_WORDS + chars)) + ["##" + c for c in chars]
    return {t: i for i, t in enumerate(tokens)}


# --- torch modules --------------------------------------------------------------------------


def _torch_modules():
    """Module classes, defined on first use so importing this file stays torch-free."""
    global _MODULES
    if _MODULES is None:
        _MODULES = _define_modules()
    return _MODULES


_MODULES = None


def _define_modules():
    import torch
    from torch import nn

    class MedCLIPTextModel(nn.Module):
        """BERT + MedCLIP's pooling and bias-free projection: tokens -> (T, 512)."""

        def __init__(self, bert: nn.Module, proj_dim: int = EMBED_DIM) -> None:
            super().__init__()
            self.model = bert
            self.projection_head = nn.Linear(bert.config.hidden_size, proj_dim, bias=False)

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
            """(T, L) ids and mask -> (T, 512).

            Hidden states 1, 2 and the last are each averaged over all L positions (padding is
            not masked out, as in the original) and then averaged together.
            """
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
            hs = out.hidden_states
            pooled = torch.stack([hs[1], hs[2], hs[-1]]).mean(dim=2).mean(dim=0)  # (T, hidden)
            return self.projection_head(pooled)

    class MedCLIPVisionModelViT(nn.Module):
        """Swin ``pooler_output`` -> bias-free projection: (B, C, S, S) -> (B, 512)."""

        def __init__(self, swin: nn.Module, proj_dim: int = EMBED_DIM) -> None:
            super().__init__()
            self.model = swin
            self.projection_head = nn.Linear(swin.num_features, proj_dim, bias=False)

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            if pixel_values.shape[1] == 1:  # the original accepts one-channel input too
                pixel_values = pixel_values.repeat(1, 3, 1, 1)
            return self.projection_head(self.model(pixel_values).pooler_output)

    class MedCLIPVisionModel(nn.Module):
        """torchvision ResNet whose ``fc`` is the projection: (B, C, S, S) -> (B, 512)."""

        def __init__(self, resnet: nn.Module) -> None:
            super().__init__()
            self.model = resnet

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            if pixel_values.shape[1] == 1:
                pixel_values = pixel_values.repeat(1, 3, 1, 1)
            return self.model(pixel_values)

    class MedCLIPModel(nn.Module):
        """Image and text towers plus the learned temperature ``logit_scale``."""

        def __init__(self, vision_model: nn.Module, text_model: nn.Module) -> None:
            super().__init__()
            self.vision_model = vision_model
            self.text_model = text_model
            self.logit_scale = nn.Parameter(torch.tensor(LOGIT_SCALE_INIT))

        def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
            """(B, 3, S, S) normalised -> (B, 512), not normalised."""
            return self.vision_model(pixel_values)

        def encode_text(self, tokens: Any) -> torch.Tensor:
            """Tokenizer output (``input_ids``, ``attention_mask``, each (T, L)) -> (T, 512)."""
            device = self.logit_scale.device
            mask = tokens.get("attention_mask")
            return self.text_model(tokens["input_ids"].to(device), None if mask is None else mask.to(device))

        def temperature(self) -> float:
            """exp(logit_scale) after MedCLIP's clamp to [0, 4.6052]."""
            return float(self.logit_scale.detach().clamp(0, LOGIT_SCALE_MAX).exp())

    return {
        "MedCLIPTextModel": MedCLIPTextModel,
        "MedCLIPVisionModelViT": MedCLIPVisionModelViT,
        "MedCLIPVisionModel": MedCLIPVisionModel,
        "MedCLIPModel": MedCLIPModel,
    }


def build_resnet(layers: tuple[int, ...] = RESNET50_LAYERS, fc_out: int | None = EMBED_DIM, width: int = 64):
    """torchvision ResNet with Bottleneck blocks; ``fc`` = Linear(2048, fc_out, bias=False), or Identity.

    ``width`` is torchvision's ``width_per_group`` (64 for ResNet-50): the inner width of each
    bottleneck; stage outputs stay 256/512/1024/2048 whatever it is.
    """
    from torch import nn
    from torchvision.models.resnet import Bottleneck, ResNet

    resnet = ResNet(Bottleneck, list(layers), width_per_group=width)
    resnet.fc = nn.Identity() if fc_out is None else nn.Linear(resnet.fc.in_features, fc_out, bias=False)
    return resnet


def bert_config(fields: dict):
    from transformers import BertConfig

    return BertConfig(**{k: v for k, v in fields.items() if k != "model_type"})


def swin_config(fields: dict):
    from transformers import SwinConfig

    return SwinConfig(**{k: v for k, v in fields.items() if k != "model_type"})


def build_medclip(vision: str, bert_fields: dict, swin_fields: dict | None = None,
                  resnet_layers: tuple[int, ...] = RESNET50_LAYERS, resnet_width: int = 64):
    """A MedCLIPModel with random weights. ``vision``: "swin" or "resnet"."""
    from transformers import BertModel, SwinModel

    m = _torch_modules()
    text = m["MedCLIPTextModel"](BertModel(bert_config(bert_fields)))
    if vision == "swin":
        image = m["MedCLIPVisionModelViT"](SwinModel(swin_config(swin_fields)))
    else:
        image = m["MedCLIPVisionModel"](build_resnet(resnet_layers, width=resnet_width))
    return m["MedCLIPModel"](image, text)


# --- loading released state dicts -----------------------------------------------------------

# Buffers that old transformers saved and transformers 5 recomputes instead of loading.
_DERIVED_BUFFER = re.compile(r"(^|\.)(position_ids|token_type_ids|relative_position_index)$")


def split_prefix(state: dict, prefix: str) -> tuple[dict, dict]:
    """(entries under ``prefix`` with it removed, all other entries)."""
    inside = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    outside = {k: v for k, v in state.items() if not k.startswith(prefix)}
    return inside, outside


def _check_derived(derived: dict, module, source: str, prefix: str) -> None:
    """Saved derived buffers must equal the ones the module computed (else the file is foreign)."""
    import torch

    buffers = dict(module.named_buffers())
    for key, value in derived.items():
        # transformers 5 moved Swin's index under relative_position_bias; the value is unchanged.
        ours = buffers.get(key, buffers.get(key.replace(
            "attention.self.relative_position_index", "attention.relative_position_bias.relative_position_index")))
        if ours is None or ours.shape != value.shape or not torch.equal(ours.cpu(), value.to(ours.dtype)):
            raise CxrfairError(f"{source}: {prefix}{key} does not match the {type(module).__name__} architecture")


def hf_from_state_dict(model_cls, config, state: dict, source: str, prefix: str):
    """Build ``model_cls`` from a (possibly transformers-4.x) state dict, strictly.

    transformers' ``from_pretrained`` applies its own key conversion for the architecture
    (e.g. Swin ``attention.self.query`` -> ``attention.q_proj``); any missing, unexpected or
    mis-shaped key is an error naming ``prefix`` + key.
    """
    derived = {k: v for k, v in state.items() if _DERIVED_BUFFER.search(k)}
    weights = {k: v for k, v in state.items() if k not in derived}
    model, info = model_cls.from_pretrained(None, config=config, state_dict=weights, output_loading_info=True)
    problems = [f"{kind.replace('_keys', '')}: {', '.join(prefix + k for k in sorted(map(str, info[kind]))[:5])}"
                for kind in ("missing_keys", "unexpected_keys", "mismatched_keys") if info[kind]]
    if problems or info.get("error_msgs"):
        raise CxrfairError(f"{source}: weights do not match {model_cls.__name__} ({'; '.join(problems)})")
    _check_derived(derived, model, source, prefix)
    return model.float()


def load_remaining_strict(model, state: dict, loaded_prefixes: tuple[str, ...], source: str) -> None:
    """``load_state_dict`` the entries outside the HF towers; every other key must match exactly."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(loaded_prefixes)]
    if missing or unexpected:
        raise CxrfairError(f"{source}: weights do not match the model "
                           f"(missing: {missing[:5]}, unexpected: {unexpected[:5]})")


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

    m = _torch_modules()
    text_part, rest = split_prefix(state, "text_model.model.")
    bert = hf_from_state_dict(BertModel, bert_config(bert_fields), text_part, source, "text_model.model.")
    loaded = ("text_model.model.",)
    if vision == "swin":
        swin_part, rest = split_prefix(rest, "vision_model.model.")
        swin = hf_from_state_dict(SwinModel, swin_config(swin_fields), swin_part, source, "vision_model.model.")
        image = m["MedCLIPVisionModelViT"](swin)
        loaded += ("vision_model.model.",)
    else:
        image = m["MedCLIPVisionModel"](build_resnet(resnet_layers, width=resnet_width))
    model = m["MedCLIPModel"](image, m["MedCLIPTextModel"](bert))
    load_remaining_strict(model, rest, loaded, source)
    return model


# --- tokenizer, weights lookup, bundle ------------------------------------------------------


def bert_tokenizer(vocab: Path | dict[str, int]):
    """Bio_ClinicalBERT's tokenizer: WordPiece over ``vocab``, lower-cased.

    The hub repo has no tokenizer_config.json, so ``AutoTokenizer`` (what MedCLIP and GLoRIA
    call) falls back to BertTokenizer defaults, i.e. ``do_lower_case=True``. transformers 5
    ignores ``vocab_file=``; ``vocab=`` takes the path or a dict.
    """
    from transformers import BertTokenizer

    return BertTokenizer(vocab=str(vocab) if isinstance(vocab, Path) else vocab, do_lower_case=True)


def cache_dir(model: str) -> Path:
    """``~/.cache/cxrfair/<model>``: where a downloaded file is looked for by default."""
    return Path.home() / ".cache" / "cxrfair" / model


def find_bert_vocab(model: str, weights: Path) -> Path:
    """Bio_ClinicalBERT's ``vocab.txt``: ``$CXRFAIR_BIO_CLINICALBERT_VOCAB``, beside the weights, in
    ``~/.cache/cxrfair/<model>/`` or ``~/.cache/cxrfair/bio-clinicalbert/``, or in the HF hub cache.

    Raises:
        CxrfairError: none found; the message names the URL and where to put the file.
    """
    env = os.environ.get(VOCAB_ENV)
    if env:
        if not Path(env).expanduser().is_file():
            raise CxrfairError(f"model {model}: ${VOCAB_ENV}={env}: no such file; fix or unset {VOCAB_ENV}")
        return Path(env).expanduser()
    near = weights if weights.is_dir() else weights.parent
    candidates = [near / "vocab.txt", cache_dir(model) / "vocab.txt", cache_dir("bio-clinicalbert") / "vocab.txt"]
    found = next((c for c in candidates if c.is_file()), None) or _hub_cached_vocab()
    if found is None:
        raise CxrfairError(
            f"model {model}: the tokenizer's vocab.txt was not found offline. Download it from {BERT_VOCAB_URL} "
            f"and place it at {candidates[0]} or {candidates[2]}, or set {VOCAB_ENV}=PATH")
    return found


def _hub_cached_vocab() -> Path | None:
    """vocab.txt of emilyalsentzer/Bio_ClinicalBERT if the Hugging Face hub cache holds it."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    hit = try_to_load_from_cache(BIO_CLINICALBERT, "vocab.txt")
    return Path(hit) if isinstance(hit, str) else None


def weights_id(path: Path | None, fallback: str) -> str:
    """``sha256:<hex>`` of a weights file, ``dir:<path>`` for a folder, or ``fallback``."""
    from cxrfair.io import sha256_file

    if path is None:
        return fallback
    return f"sha256:{sha256_file(path)}" if path.is_file() else f"dir:{path.resolve()}"


def _bundle(spec: ModelSpec, model, tokenizer, preprocess: Preprocess, wid: str, device: str) -> FoundationModel:
    model = model.to(device).eval()

    def tokenize(prompts: list[str]):
        # Padded to the longest prompt of the call, as MedCLIP's process_class_prompts does; the
        # pooling averages over padding too, so a prompt's embedding depends on that length.
        return tokenizer(list(prompts), truncation=True, max_length=MAX_TEXT_LENGTH, padding=True, return_tensors="pt")

    return FoundationModel(
        name=spec.name, spec=spec, model=model, image_encoder=model.vision_model, preprocess=preprocess,
        tokenize=tokenize, encode_image=model.encode_image, encode_text=model.encode_text,
        logit_scale=model.temperature(), embed_dim=spec.embed_dim, weights_id=wid,
    )


def _load_medclip(spec: ModelSpec, weights: Path | None, device: str, *, vision: str) -> FoundationModel:
    from cxrfair.extract.weights import resolve_weights

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
    import torch

    if weights is not None:
        state = read_medclip_state(weights)
        model = medclip_from_state_dict(state, vision, tiny_bert_fields(), TINY_SWIN_CONFIG, TINY_RESNET_LAYERS,
                                        str(weights), TINY_RESNET_WIDTH)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(TINY_SEED)  # random but reproducible: caches and runs can be compared
            model = build_medclip(vision, tiny_bert_fields(), TINY_SWIN_CONFIG, TINY_RESNET_LAYERS, TINY_RESNET_WIDTH)
    pre = Preprocess(size=TINY_IMAGE_SIZE, resize=TINY_IMAGE_SIZE, mode="pad", interpolation="bicubic",
                     mean=(MEDCLIP_MEAN,) * 3, std=(MEDCLIP_STD,) * 3)
    wid = weights_id(weights, f"random-init(seed={TINY_SEED})")
    return _bundle(spec, model, bert_tokenizer(toy_vocab()), pre, wid, device)


def tiny_bert_fields() -> dict:
    """TINY_BERT_CONFIG with the toy vocabulary's size."""
    return {**TINY_BERT_CONFIG, "vocab_size": len(toy_vocab())}


# peft targets (``re.fullmatch`` on module names; leading ``.*`` so they also work on the whole
# model). transformers 5 names Swin's attention linears q/k/v/o_proj and its MLP mlp.fc1/fc2;
# BERT's layers are ``encoder.layer.N`` (singular), so the Swin pattern never touches the text tower.
SWIN_LORA = r".*encoder\.layers\.\d+\.blocks\.\d+\.(attention\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(fc1|fc2))"
# The three convolutions of every Bottleneck block (peft wraps Conv2d); not the stem or downsamples.
RESNET_LORA = r".*layer[1-4]\.\d+\.conv[123]"


def _loader(fn, vision: str):
    def load(spec: ModelSpec, weights: Path | None, device: str) -> FoundationModel:
        return fn(spec, weights, device, vision=vision)

    return load


register(ModelSpec(
    name="medclip-vit", image_encoder="Swin-T (microsoft/swin-tiny-patch4-window7-224)",
    text_encoder="Bio_ClinicalBERT", embed_dim=EMBED_DIM, weights_source=MEDCLIP_URLS["swin"],
    loader=_loader(_load_medclip, "swin"), lora_targets=SWIN_LORA, weights_env="CXRFAIR_MEDCLIP_VIT_WEIGHTS",
    description="MedCLIP-ViT (MIMIC-CXR + CheXpert); zip or pytorch_model.bin + Bio_ClinicalBERT vocab.txt",
))
register(ModelSpec(
    name="medclip-rn50", image_encoder="ResNet-50 (torchvision)", text_encoder="Bio_ClinicalBERT",
    embed_dim=EMBED_DIM, weights_source=MEDCLIP_URLS["resnet"], loader=_loader(_load_medclip, "resnet"),
    lora_targets=RESNET_LORA, weights_env="CXRFAIR_MEDCLIP_RN50_WEIGHTS",
    description="MedCLIP-ResNet (MIMIC-CXR + CheXpert); zip or pytorch_model.bin + Bio_ClinicalBERT vocab.txt",
))
register(ModelSpec(
    name="tiny-medclip-vit", image_encoder="Swin 2 stages, dim 16, 64 px", text_encoder="BERT 2x32, toy vocab",
    embed_dim=EMBED_DIM, weights_source=f"random init (seed {TINY_SEED}) or --weights FILE",
    loader=_loader(_load_tiny_medclip, "swin"), lora_targets=SWIN_LORA, tiny=True,
    description="offline test/demo model: MedCLIP-ViT code path, random weights",
))
register(ModelSpec(
    name="tiny-medclip-rn50", image_encoder="ResNet Bottleneck [1,1,1,1] width 16, 64 px",
    text_encoder="BERT 2x32, toy vocab",
    embed_dim=EMBED_DIM, weights_source=f"random init (seed {TINY_SEED}) or --weights FILE",
    loader=_loader(_load_tiny_medclip, "resnet"), lora_targets=RESNET_LORA, tiny=True,
    description="offline test/demo model: MedCLIP-ResNet code path, random weights",
))
