"""GLoRIA's torch modules under the original's names (``cxrfair.extract.models.gloria`` loads them).

Layout follows github.com/marshuang80/gloria (``gloria/models/vision_model.py``, ``text_model.py``,
``gloria_model.py``), so the Lightning checkpoint's ``gloria.*`` keys map one to one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

IMAGE_FORWARD_SIZE = 299  # ImageEncoder.resnet_forward upsamples every input to 299x299


def word_groups(tokens: list[str]) -> list[list[int]]:
    """Token positions forming each word, as GLoRIA's ``aggregate_tokens`` groups them.

    [CLS] is a word; ``##`` pieces join the preceding word; [SEP] ends the text as its own
    word; padding after it is ignored.

    Returns:
        list of position lists, one per word, in order.
    """
    groups: list[list[int]] = []
    for pos, token in enumerate(tokens):
        if token == "[SEP]":
            groups.append([pos])
            break
        if token.startswith("##") and groups:
            groups[-1].append(pos)
        else:
            groups.append([pos])
    return groups


def aggregate_words(hidden: torch.Tensor, groups: list[list[int]]) -> torch.Tensor:
    """Sum word pieces into words and zero-pad back to the token length.

    Args:
        hidden: (L, D) token embeddings of one text.
        groups: word_groups of that text.

    Returns:
        (L, D): one row per word (sum of its pieces), then zero rows.
    """
    words = torch.zeros_like(hidden)
    for i, positions in enumerate(groups):
        words[i] = hidden[positions].sum(dim=0)
    return words


class ImageEncoder(nn.Module):
    """ResNet trunk (fc = Identity) with GLoRIA's global and local embedders."""

    def __init__(self, resnet: nn.Module, embed_dim: int) -> None:
        super().__init__()
        self.model = resnet
        self.global_embedder = nn.Linear(2048, embed_dim)
        self.local_embedder = nn.Conv2d(1024, embed_dim, kernel_size=1, stride=1, padding=0, bias=False)
        self.pool = nn.AdaptiveAvgPool2d((1, 1))

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) -> (global (B, 2048), local (B, 1024, 19, 19)) after upsampling to 299."""
        x = nn.functional.interpolate(x, size=(IMAGE_FORWARD_SIZE,) * 2, mode="bilinear", align_corners=True)
        m = self.model
        x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
        local = m.layer3(m.layer2(m.layer1(x)))
        return self.pool(m.layer4(local)).flatten(1), local

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised -> (B, 768) global embedding."""
        return self.global_embedder(self.features(x)[0])

    def encode_local(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) -> (global (B, 768), local (B, 768, 19, 19))."""
        g, local = self.features(x)
        return self.global_embedder(g), self.local_embedder(local)

class BertEncoder(nn.Module):
    """Bio_ClinicalBERT with GLoRIA's pooling: sum of the last 4 layers, pieces summed into words."""

    def __init__(self, bert: nn.Module, id_to_token: dict[int, str], last_n_layers: int) -> None:
        super().__init__()
        self.model = bert
        self.id_to_token = id_to_token
        self.last_n_layers = last_n_layers  # cfg.model.text.last_n_layers (gloria.LAST_N_LAYERS)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """(T, L) ids -> (words (T, D, L), sentences (T, D), word counts excluding [CLS]/[SEP]).

        The sentence embedding is the mean over all L word slots, zero padding included,
        as in GLoRIA (``embeddings.mean(axis=2)``), so it depends on L (97 for real prompts).
        """
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         token_type_ids=token_type_ids, output_hidden_states=True)
        hidden = torch.stack(out.hidden_states[-self.last_n_layers:]).sum(dim=0)  # (T, L, D)
        words, counts = [], []
        for ids, h in zip(input_ids.tolist(), hidden):
            groups = word_groups([self.id_to_token[i] for i in ids])
            words.append(aggregate_words(h, groups))
            counts.append(max(len(groups) - 2, 0))
        words = torch.stack(words)  # (T, L, D)
        return words.transpose(1, 2), words.mean(dim=1), counts

class GLoRIA(nn.Module):
    """The two encoders under GLoRIA's names (``img_encoder``, ``text_encoder``)."""

    def __init__(self, img_encoder: nn.Module, text_encoder: nn.Module) -> None:
        super().__init__()
        self.img_encoder = img_encoder
        self.text_encoder = text_encoder

    def _text(self, tokens: Any):
        device = self.img_encoder.global_embedder.weight.device
        return self.text_encoder(*(tokens[k].to(device) for k in ("input_ids", "attention_mask", "token_type_ids")))

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, 768) global image embeddings."""
        return self.img_encoder(pixel_values)

    def encode_image_unprojected(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, 2048) average-pooled layer4, before ``global_embedder``."""
        return self.img_encoder.features(pixel_values)[0]

    def encode_text(self, tokens: Any) -> torch.Tensor:
        """Tokenizer output for T prompts -> (T, 768) sentence embeddings."""
        return self._text(tokens)[1]

    def encode_text_words(self, tokens: Any) -> tuple[torch.Tensor, list[int]]:
        """Tokenizer output for T prompts -> (words (T, 768, L), word counts)."""
        words, _, counts = self._text(tokens)
        return words, counts
