"""BioViL / BioViL-T torch modules under hi-ml-multimodal's names (``biovil`` loads them).

Layout follows microsoft/hi-ml ``hi-ml-multimodal/src/health_multimodal`` (``image/model/model.py``
``ImageModel``, ``encoder.py`` ``ImageEncoder`` / ``MultiImageEncoder``, ``modules.py`` ``MLP``,
``text/model/modelling_cxrbert.py`` ``BertProjectionHead``), so the released state dicts map key
for key. Only the single-image path is implemented: BioViL-T's temporal ViT pooler only runs when
a previous image is given, so for one image its weights are never used.
"""

from __future__ import annotations

import torch
from torch import nn

from cxrfair.extract.models.common import resnet_trunk

JOINT_DIM = 128  # hi-ml JOINT_FEATURE_SIZE: projection (and hidden) size of both towers
TEMPORAL_DIM = 256  # MultiImageEncoder output_dim: backbone_to_vit channels and the missing-prior embedding


class ResNetTrunk(nn.Module):
    """hi-ml's ``ImageEncoder``: ``encoder`` is a torchvision ResNet returning its layer4 map."""

    def __init__(self, resnet: nn.Module) -> None:
        super().__init__()
        self.encoder = resnet

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 2048, H/32, W/32)."""
        return resnet_trunk(self.encoder, x)


class SingleImageTemporalTrunk(ResNetTrunk):
    """hi-ml's ``MultiImageEncoder`` without a previous image: ResNet -> 1x1 conv to 256 channels,
    concatenated with the learned "missing previous image" embedding -> (B, 512, h, w)."""

    def __init__(self, resnet: nn.Module, dim: int = TEMPORAL_DIM) -> None:
        super().__init__(resnet)
        self.backbone_to_vit = nn.Conv2d(2048, dim, kernel_size=1, stride=1, padding=0, bias=False)
        self.missing_previous_emb = nn.Parameter(torch.zeros(1, dim, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patch = self.backbone_to_vit(super().forward(x))
        b, _, h, w = patch.shape
        return torch.cat([patch, self.missing_previous_emb.repeat(b, 1, h, w)], dim=1)


class ConvProjector(nn.Module):
    """hi-ml's ``MLP(use_1x1_convs=True)``: conv1x1 (no bias) -> BatchNorm -> ReLU -> conv1x1."""

    def __init__(self, in_dim: int, out_dim: int = JOINT_DIM, hidden: int = JOINT_DIM) -> None:
        super().__init__()
        self.model = nn.Sequential(
            nn.Conv2d(in_dim, hidden, kernel_size=1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, out_dim, kernel_size=1, bias=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class ImageModel(nn.Module):
    """Trunk + patch-wise projector; the global embedding is the mean of the projected patches."""

    def __init__(self, encoder: ResNetTrunk, feature_dim: int, joint_dim: int = JOINT_DIM) -> None:
        super().__init__()
        self.encoder = encoder
        self.projector = ConvProjector(feature_dim, joint_dim, joint_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, 128) ``projected_global_embedding`` (not normalised)."""
        return self.projector(self.encoder(x)).mean(dim=(2, 3))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, 2048 BioViL | 512 BioViL-T) ``img_embedding``: the pooled trunk, before projection."""
        return self.encoder(x).mean(dim=(2, 3))


class ProjectionHead(nn.Module):
    """CXR-BERT's ``BertProjectionHead``: dense -> GELU -> LayerNorm -> dense (768 -> 128 -> 128)."""

    def __init__(self, hidden: int, projection: int = JOINT_DIM) -> None:
        super().__init__()
        self.dense_to_hidden = nn.Linear(hidden, projection)
        self.LayerNorm = nn.LayerNorm(projection, eps=1e-12)  # noqa: N815 - the checkpoint's name
        self.dense_to_output = nn.Linear(projection, projection)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_to_output(self.LayerNorm(nn.functional.gelu(self.dense_to_hidden(x))))


class CXRBert(nn.Module):
    """``CXRBertModel.get_projected_text_embeddings`` on a plain BertModel: [CLS] of the last layer
    -> projection head. (B, L) ids and mask -> (B, 128), not normalised (callers normalise)."""

    def __init__(self, bert: nn.Module, projection: int = JOINT_DIM) -> None:
        super().__init__()
        self.bert = bert
        self.cls_projection_head = ProjectionHead(bert.config.hidden_size, projection)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.cls_projection_head(hidden[:, 0, :])


class BioViL(nn.Module):
    """The two towers (``image_model``, ``text_model``)."""

    def __init__(self, image_model: ImageModel, text_model: CXRBert) -> None:
        super().__init__()
        self.image_model = image_model
        self.text_model = text_model

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return self.image_model(x)

    def encode_image_unprojected(self, x: torch.Tensor) -> torch.Tensor:
        return self.image_model.features(x)

    def encode_text(self, tokens) -> torch.Tensor:
        """Tokenizer output (``input_ids``, ``attention_mask``) -> (T, 128)."""
        device = self.image_model.projector.model[0].weight.device
        return self.text_model(tokens["input_ids"].to(device), tokens["attention_mask"].to(device))
