"""MedCLIP's torch modules under the original's names (``cxrfair.extract.models.medclip`` loads them).

Module names follow github.com/RyanWangZf/MedCLIP ``medclip/modeling_medclip.py`` so the released
``pytorch_model.bin`` maps key for key.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from cxrfair.extract.models.common import resnet_pooled

EMBED_DIM = 512  # both projection heads: Linear(768, 512, bias=False)
LOGIT_SCALE_INIT = math.log(1 / 0.07)
LOGIT_SCALE_MAX = 4.6052  # compute_logits clamps logit_scale.data to [0, 4.6052] (exp -> 100)


def _three_channels(pixel_values: torch.Tensor) -> torch.Tensor:
    # The original accepts one-channel input too and repeats it.
    return pixel_values.repeat(1, 3, 1, 1) if pixel_values.shape[1] == 1 else pixel_values


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

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) -> (B, 768) Swin pooled output, before the projection."""
        return self.model(_three_channels(pixel_values)).pooler_output

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.projection_head(self.features(pixel_values))


class MedCLIPVisionModel(nn.Module):
    """torchvision ResNet whose ``fc`` is the projection: (B, C, S, S) -> (B, 512)."""

    def __init__(self, resnet: nn.Module) -> None:
        super().__init__()
        self.model = resnet

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) -> (B, 2048) average-pooled layer4, before ``fc``."""
        return resnet_pooled(self.model, _three_channels(pixel_values))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(_three_channels(pixel_values))


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

    def encode_image_unprojected(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised -> (B, 768 Swin | 2048 ResNet) features before the projection."""
        return self.vision_model.features(pixel_values)

    def encode_text(self, tokens: Any) -> torch.Tensor:
        """Tokenizer output (``input_ids``, ``attention_mask``, each (T, L)) -> (T, 512)."""
        device = self.logit_scale.device
        mask = tokens.get("attention_mask")
        return self.text_model(tokens["input_ids"].to(device), None if mask is None else mask.to(device))

    def temperature(self) -> float:
        """exp(logit_scale) after MedCLIP's clamp to [0, 4.6052]."""
        return float(self.logit_scale.detach().clamp(0, LOGIT_SCALE_MAX).exp())
