"""CXR-CLIP's torch modules under the original's names (``cxrfair.extract.models.cxrclip`` loads them).

Layout follows kakaobrain/cxr-clip ``cxrclip/model/clip.py`` (``CXRClip``) and
``cxrclip/model/modules/{image_encoder,text_encoder,projection}.py``, so ``ckpt["model"]`` maps
key for key.
"""

from __future__ import annotations

import torch
from torch import nn

from cxrfair.extract.models.common import resnet_pooled


class ResNet50(nn.Module):
    """``image_encoder.resnet``: torchvision ResNet-50 without ``fc``; average-pooled layer4 (2048)."""

    def __init__(self, resnet: nn.Module) -> None:
        super().__init__()
        self.resnet = resnet

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return resnet_pooled(self.resnet, x)


class SwinEncoder(nn.Module):
    """``image_encoder.image_encoder``: HF SwinModel; CXR-CLIP takes ``last_hidden_state[:, 0]`` (768)."""

    def __init__(self, swin: nn.Module) -> None:
        super().__init__()
        self.image_encoder = swin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # CXR-CLIP's encode_image for non-ResNet towers: the first token of the last hidden state
        # (for Swin a patch token after the final layer norm, not a class token).
        return self.image_encoder(pixel_values=x).last_hidden_state[:, 0]


class TextEncoder(nn.Module):
    """``text_encoder.text_encoder``: HF BertModel (with pooler, as AutoModel built it)."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.text_encoder = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(T, L) -> (T, 768): the hidden state at each text's last real token ([SEP]; "eos" pooling)."""
        hidden = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        eos = attention_mask.sum(dim=-1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), eos]


class LinearProjectionHead(nn.Module):
    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.projection = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(x)


class MLPProjectionHead(nn.Module):
    """projection -> GELU -> fc -> dropout, plus the projection (residual), then LayerNorm."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.projection = nn.Linear(in_dim, out_dim)
        self.gelu = nn.GELU()
        self.fc = nn.Linear(out_dim, out_dim)
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        projected = self.projection(x)
        return self.layer_norm(self.dropout(self.fc(self.gelu(projected))) + projected)


class ImageTower(nn.Module):
    """Encoder + projection as one module (B, 3, S, S) -> (B, 512): what fine-tuning adapts.

    It holds the model's own submodules (shared, not copied), so adapting it adapts the model.
    """

    def __init__(self, encoder: nn.Module, projection: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.projection = projection

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(self.encoder(x))


class CXRClip(nn.Module):
    def __init__(self, image_encoder: nn.Module, text_encoder: TextEncoder, image_projection: nn.Module,
                 text_projection: nn.Module, temperature: float = 0.07) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.image_projection = image_projection
        self.text_projection = text_projection
        self.logit_scale = nn.Parameter(torch.log(torch.tensor(1 / temperature)))

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, 512) projected, not normalised."""
        return self.image_projection(self.image_encoder(x))

    def encode_image_unprojected(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, 2048 ResNet | 768 Swin) before ``image_projection``."""
        return self.image_encoder(x)

    def encode_text(self, tokens) -> torch.Tensor:
        """Tokenizer output (``input_ids``, ``attention_mask``) -> (T, 512) projected."""
        device = self.logit_scale.device
        return self.text_projection(self.text_encoder(tokens["input_ids"].to(device),
                                                      tokens["attention_mask"].to(device)))
