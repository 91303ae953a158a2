"""GLoRIA (ResNet-50 + Bio_ClinicalBERT), re-implemented so its Lightning checkpoint loads safely.

References:
    Huang et al., "GLoRIA: A Multimodal Global-Local Representation Learning Framework for
    Label-efficient Medical Image Recognition", ICCV 2021. Layout and computations follow
    github.com/marshuang80/gloria (``gloria/models/vision_model.py``, ``text_model.py``,
    ``gloria_model.py``, ``loss/gloria_loss.py``, ``configs/chexpert_pretrain_config.yaml``).

Which similarity a run uses: the embedding cache holds the **global** embeddings (image: layer4
avg-pool -> ``global_embedder``, 768; text: sentence embedding, 768) and zero-shot from the cache
is the global cosine term only. GLoRIA's own zero-shot averages that with a **local** term (word
to image-region attention, ``local_similarity``); the pieces for it are in
``FoundationModel.extras`` (``encode_image_local``, ``encode_text_words``, ``local_similarity``,
``similarity``) and ``extras["zero_shot_term"]`` says "global".

The checkpoint (``chexpert_resnet50.ckpt``) is a Lightning file whose ``hyper_parameters`` is an
OmegaConf object: it is read with ``cxrfair.extract.safe_load.restricted_load``, which never
imports or calls what the pickle names.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cxrfair.errors import CxrfairError
from cxrfair.extract.models.common import (
    BIO_CLINICALBERT_CONFIG,
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
    text_positions,
    toy_vocab,
    weights_id,
)
from cxrfair.extract.preprocess import Preprocess
from cxrfair.extract.registry import FoundationModel, ModelSpec, register
from cxrfair.extract.weights import resolve_weights
from cxrfair.extract.safe_load import load_state_dict_file

if TYPE_CHECKING:
    import torch

EMBED_DIM = 768  # cfg.model.text.embedding_dim; no text projection, so = BERT hidden size
WORD_NUM = 97  # cfg.data.text.word_num: prompts are padded to this length
LAST_N_LAYERS = 4  # cfg.model.text.last_n_layers, aggregate_method "sum"
TEMP_ATTENTION = 4.0  # get_local_similarities: attention_fn(word, context, 4.0)
TEMP_WORD = 5.0  # get_local_similarities: row_sim.mul_(5.0).exp_()
WEIGHTS_NAME = "chexpert_resnet50.ckpt"
# The GLoRIA README's download link for the pretrained checkpoints (a Stanford Box folder).
GLORIA_URL = "https://stanfordmedicine.box.com/s/j5h7q99f3pfi7enc0dom73m4nsm6yzvh"

# cv2.imread(gray) -> resize long side to 256 (INTER_AREA) and zero-pad to 256x256 -> RGB ->
# CenterCrop 224 -> Normalize(0.5, 0.5). Here: pad first, then resize with a box filter (PIL's
# equivalent of INTER_AREA when shrinking); identical geometry for square images such as NIH's.
GLORIA_PREPROCESS = Preprocess(size=224, resize=256, mode="pad", interpolation="box",
                               mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))

TINY_BERT_CONFIG = {
    "model_type": "bert", "hidden_size": 64, "num_hidden_layers": LAST_N_LAYERS, "num_attention_heads": 2,
    "intermediate_size": 128, "max_position_embeddings": 128, "type_vocab_size": 2, "pad_token_id": 0,
}


# --- text: GLoRIA's prompt cleaning and word-piece aggregation -------------------------------


def clean_prompt(text: str) -> str:
    """GLoRIA's ``process_text`` cleaning: split sentences, keep ``\\w+`` tokens, lower-case, ASCII.

    One deviation: GLoRIA drops sentences of a single token (it was written for report
    sentences); we keep them, else a one-word prompt such as "edema" would become empty.
    """
    text = text.replace("\n", " ")
    sentences = [s for part in re.split(r"[0-9]+\.", text) for s in part.split(".")]
    kept = []
    for sentence in sentences:
        tokens = re.findall(r"\w+", sentence.replace("\ufffd\ufffd", " ").lower())
        tokens = [t.encode("ascii", "ignore").decode("ascii") for t in tokens]
        tokens = [t for t in tokens if t]
        if tokens:
            kept.append(" ".join(tokens))
    return " ".join(kept)


# --- the attention-based local similarity -----------------------------------------------------


def attention_context(words: "torch.Tensor", regions: "torch.Tensor", temp: float = TEMP_ATTENTION) -> "torch.Tensor":
    """Image context each word attends to (GLoRIA's ``attention_fn``).

    Args:
        words: (B, D, W) word embeddings (the same text repeated per image).
        regions: (B, D, H, Wd) local image features.
        temp: sharpening of the attention over regions.

    Returns:
        (B, D, W): for each word, the attention-weighted sum of region features.
    """
    import torch

    context = regions.flatten(2)  # (B, D, R)
    scores = torch.bmm(context.transpose(1, 2), words)  # (B, R, W)
    # Softmax over words first, then (sharpened) over regions, as in the original.
    attn = torch.softmax(torch.softmax(scores, dim=-1).transpose(1, 2) * temp, dim=-1)  # (B, W, R)
    return torch.bmm(context, attn.transpose(1, 2))


def local_similarity(regions: "torch.Tensor", words: "torch.Tensor", n_words: "list[int]",
                     temp_attention: float = TEMP_ATTENTION, temp_word: float = TEMP_WORD) -> "torch.Tensor":
    """GLoRIA's local image-text score (``get_local_similarities``).

    For each text, its words 1..n (after [CLS]) attend over the image regions; the score is
    log(max_w exp(temp_word * cos(word_w, context_w))) = temp_word * max cosine.

    Note: GLoRIA's released ``process_text`` passes each prompt's *character* count as the word
    count, so its slice also covers [SEP] and zero padding (cosine 0), flooring the score at 0.
    Pass ``n_words = [L - 1] * T`` to reproduce that; pass true word counts for the intended score.

    Args:
        regions: (B, D, H, W) local image embeddings (``encode_image_local``).
        words: (T, D, L) word embeddings (``encode_text_words``).
        n_words: T word counts, excluding [CLS] and [SEP].

    Returns:
        (B, T) scores.
    """
    import torch

    scores = []
    for t in range(words.shape[0]):
        n = max(n_words[t], 1)  # an empty prompt still has [SEP]: score that rather than nothing
        w = words[t, :, 1:n + 1].unsqueeze(0).expand(regions.shape[0], -1, -1)  # (B, D, W)
        context = attention_context(w, regions, temp_attention)
        # Written out (not F.cosine_similarity) to keep GLoRIA's eps rule: a zero word scores 0.
        cos = (w * context).sum(1) / (w.norm(dim=1) * context.norm(dim=1)).clamp(min=1e-8)  # (B, W)
        scores.append(torch.log(torch.exp(cos * temp_word).max(dim=1).values))
    return torch.stack(scores, dim=1)


def global_similarity(images: "torch.Tensor", texts: "torch.Tensor") -> "torch.Tensor":
    """Cosine similarity (B, D) x (T, D) -> (B, T): GLoRIA's global term."""
    import torch

    return torch.nn.functional.normalize(images, dim=-1) @ torch.nn.functional.normalize(texts, dim=-1).T


def image_text_similarity(model, pixel_values: "torch.Tensor", tokens: Any, term: str = "global") -> "torch.Tensor":
    """GLoRIA's image-text score for B images and T prompts: (B, T).

    ``term``: "global" (cosine of the global embeddings; what the cache-based zero-shot uses),
    "local" (``local_similarity`` with true word counts) or "both" (their mean, GLoRIA's
    ``get_similarities(similarity_type="both")``). GLoRIA's zero-shot then takes the max over a
    class's prompts and z-scores each class over the batch; that batch-dependent step is left to
    the caller.
    """
    if term not in ("global", "local", "both"):
        raise ValueError(f"term must be 'global', 'local' or 'both', not {term!r}")
    img_global, img_local = model.img_encoder.encode_local(pixel_values)
    words, sentences, counts = model._text(tokens)
    scores = {"global": lambda: global_similarity(img_global, sentences),
              "local": lambda: local_similarity(img_local, words, counts)}
    if term != "both":
        return scores[term]()
    return (scores["global"]() + scores["local"]()) / 2


def build_gloria(bert_fields: dict, resnet_layers: tuple[int, ...], id_to_token: dict[int, str],
                 resnet_width: int = 64):
    """A GLoRIA model with random weights; embedding dim = the BERT hidden size."""
    from transformers import BertModel

    from cxrfair.extract.models import gloria_nn as nn_  # lazy: torch (registering stays torch-free)

    bert = BertModel(bert_config(bert_fields))
    image = nn_.ImageEncoder(build_resnet(resnet_layers, fc_out=None, width=resnet_width), bert.config.hidden_size)
    return nn_.GLoRIA(image, nn_.BertEncoder(bert, id_to_token, LAST_N_LAYERS))


def read_gloria_state(path: Path) -> dict:
    """The ``gloria.*`` state dict of a Lightning ``.ckpt`` (read restrictedly) or a ``.safetensors`` copy."""
    if path.is_dir():
        found = sorted(path.glob("*.ckpt")) or sorted(path.glob("*.safetensors"))
        if not found:
            raise CxrfairError(f"--weights {path}: no .ckpt or .safetensors file in this folder")
        path = found[0]
    state = load_state_dict_file(path, key="state_dict")
    foreign = [k for k in state if not k.startswith("gloria.")]
    if foreign:
        raise CxrfairError(f"{path}: not a GLoRIA checkpoint (keys outside 'gloria.': {foreign[:3]})")
    return {k[len("gloria."):]: v for k, v in state.items()}


def gloria_from_state_dict(state: dict, bert_fields: dict, resnet_layers: tuple[int, ...],
                           id_to_token: dict[int, str], source: str, resnet_width: int = 64):
    """A GLoRIA model holding exactly the weights in ``state`` (keys without the ``gloria.`` prefix)."""
    from transformers import BertModel

    from cxrfair.extract.models import gloria_nn as nn_  # lazy: torch (registering stays torch-free)

    text_part, rest = split_prefix(state, "text_encoder.model.")
    bert = hf_from_state_dict(BertModel, bert_config(bert_fields), text_part, source, "gloria.text_encoder.model.")
    image = nn_.ImageEncoder(build_resnet(resnet_layers, fc_out=None, width=resnet_width), bert.config.hidden_size)
    model = nn_.GLoRIA(image, nn_.BertEncoder(bert, id_to_token, LAST_N_LAYERS))
    load_remaining_strict(model, rest, ("text_encoder.model.",), source)
    return model


def _tokenizer_call(name: str, tokenizer, model):
    # GLoRIA pads every prompt to 97 tokens; its sentence embedding averages over all 97.
    return hf_text_tokenizer(name, tokenizer, min(WORD_NUM, text_positions(model.text_encoder)), padding="max_length",
                             clean=clean_prompt)


def _bundle(spec: ModelSpec, model, tokenizer, preprocess: Preprocess, wid: str, device: str) -> FoundationModel:
    model = model.to(device).eval()
    extras = {
        "zero_shot_term": "global",  # what encode_image/encode_text (and so the cache) carry
        "encode_image_local": model.img_encoder.encode_local,  # x -> (global (B,768), local (B,768,19,19))
        "encode_text_words": model.encode_text_words,  # tokens -> (words (T,768,L), counts)
        "local_similarity": local_similarity,
        "global_similarity": global_similarity,
        "similarity": lambda pixels, tokens, term="global": image_text_similarity(model, pixels, tokens, term),
    }
    return FoundationModel(
        name=spec.name, spec=spec, model=model, image_encoder=model.img_encoder, preprocess=preprocess,
        tokenize=_tokenizer_call(spec.name, tokenizer, model), encode_image=model.encode_image, encode_text=model.encode_text,
        # GLoRIA has no learned temperature; its global loss scales cosines by temp3 = 10.
        logit_scale=10.0, embed_dim=spec.embed_dim, weights_id=wid, extras=extras,
        encode_image_unprojected=model.encode_image_unprojected,
    )


def _id_to_token(tokenizer) -> dict[int, str]:
    return {i: t for t, i in tokenizer.get_vocab().items()}


def _load_gloria(spec: ModelSpec, weights: Path | None, device: str) -> FoundationModel:
    candidates = [cache_dir(spec.name) / WEIGHTS_NAME, cache_dir(spec.name) / "chexpert_resnet50.safetensors"]
    download = f"{GLORIA_URL} (the GLoRIA README's link; also needs {VOCAB_HINT})"
    path = resolve_weights(spec.name, weights, spec.weights_env, candidates, download, WEIGHTS_NAME)
    tokenizer = bert_tokenizer(find_bert_vocab(spec.name, path))
    model = gloria_from_state_dict(read_gloria_state(path), BIO_CLINICALBERT_CONFIG, RESNET50_LAYERS,
                                   _id_to_token(tokenizer), str(path))
    return _bundle(spec, model, tokenizer, GLORIA_PREPROCESS, weights_id(path, ""), device)


def tiny_bert_fields() -> dict:
    """TINY_BERT_CONFIG with the toy vocabulary's size."""
    return {**TINY_BERT_CONFIG, "vocab_size": len(toy_vocab())}


def _load_tiny_gloria(spec: ModelSpec, weights: Path | None, device: str) -> FoundationModel:
    tokenizer = bert_tokenizer(toy_vocab())
    if weights is not None:
        model = gloria_from_state_dict(read_gloria_state(weights), tiny_bert_fields(), TINY_RESNET_LAYERS,
                                       _id_to_token(tokenizer), str(weights), TINY_RESNET_WIDTH)
    else:
        with seeded():
            model = build_gloria(tiny_bert_fields(), TINY_RESNET_LAYERS, _id_to_token(tokenizer), TINY_RESNET_WIDTH)
    pre = Preprocess(size=56, resize=64, mode="pad", interpolation="box", mean=(0.5,) * 3, std=(0.5,) * 3)
    return _bundle(spec, model, tokenizer, pre, weights_id(weights, random_init_id()), device)


register(ModelSpec(
    name="gloria-rn50", image_encoder="ResNet-50 (input upsampled to 299)", text_encoder="Bio_ClinicalBERT (GLoRIA)",
    embed_dim=EMBED_DIM, weights_source=f"{WEIGHTS_NAME} from {GLORIA_URL}", loader=_load_gloria,
    lora_targets=RESNET_LORA, weights_env="CXRFAIR_GLORIA_RN50_WEIGHTS",
    license="none stated (marshuang80/gloria has no licence file)", embedding="projected (global)",
    unprojected_dim=2048,
    description="GLoRIA (CheXpert); global embeddings cached, local attention term via extras",
))
register(ModelSpec(
    name="tiny-gloria", image_encoder="ResNet Bottleneck [1,1,1,1] width 16 (upsampled to 299)",
    text_encoder="BERT 4x64, toy vocab", embed_dim=TINY_BERT_CONFIG["hidden_size"],
    weights_source=TINY_WEIGHTS, loader=_load_tiny_gloria, license="-", embedding="projected (global)",
    unprojected_dim=2048, lora_targets=RESNET_LORA, tiny=True, description="offline test/demo model: GLoRIA code path, random weights",
))
