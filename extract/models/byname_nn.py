"""Torch pieces of models named on the command line (imported lazily by ``byname``'s loaders).

``Projected`` and ``VisionEmbedding`` turn a Hugging Face image tower into a plain module
(pixels -> tensor) that fine-tuning can wrap; ``infer_lora_targets`` reads peft targets off the
image encoder's module tree.
"""

from __future__ import annotations

import re

import torch
from torch import nn


class Projected(nn.Module):
    """A dual encoder's image side: (B, 3, S, S) -> (B, D) = ``projection(tower(x).pooler_output)``.

    ``projection`` None: the pooled output is the joint space already (SigLIP's attention-pool
    head). Same numbers as ``CLIPModel.get_image_features`` / ``SiglipModel.get_image_features``.
    """

    def __init__(self, tower: nn.Module, projection: nn.Module | None) -> None:
        super().__init__()
        self.tower = tower
        self.projection = projection

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pooled = self.tower(pixel_values=pixel_values).pooler_output
        return pooled if self.projection is None else self.projection(pooled)


# What a vision-only model's embedding is (``ModelSpec.embedding``), by how it is read from the output.
CLS = "CLS (last_hidden_state[:, 0])"
POOLED = "pooler_output"


class VisionEmbedding(nn.Module):
    """A vision-only backbone: (B, 3, S, S) -> (B, D), its ``pooler_output`` (flattened: CNNs give
    (B, D, 1, 1)) or the CLS token of ``last_hidden_state`` (``use`` = ``POOLED`` or ``CLS``)."""

    def __init__(self, model: nn.Module, use: str) -> None:
        super().__init__()
        self.model = model
        self.use = use

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixel_values)
        if self.use == CLS:
            return out.last_hidden_state[:, 0]
        return out.pooler_output.flatten(1)


def vision_embedding_rule(model: nn.Module, pixels: torch.Tensor) -> str:
    """Which embedding a vision-only ``model`` gives: ``POOLED`` when it pools without a learned
    head (DINOv2's CLS after the final norm; ConvNeXt's / Swin's average pool), ``CLS`` when its
    pooler is a learned dense head (ViT's tanh pooler, a classification-pretraining head many
    checkpoints do not even ship) or it has no pooled output. ``pixels`` may be on the meta device.
    """
    pooler = getattr(model, "pooler", None)
    if isinstance(pooler, nn.Module) and any(True for _ in pooler.parameters()):
        return CLS
    with torch.no_grad():
        out = model(pixel_values=pixels)
    if getattr(out, "pooler_output", None) is not None:
        return POOLED
    if getattr(out, "last_hidden_state", None) is not None and out.last_hidden_state.ndim == 3:
        return CLS
    raise ValueError(f"{type(model).__name__} gives neither pooler_output nor a token sequence")


def unused_prefixes(model: nn.Module, use: str) -> tuple[str, ...]:
    """State-dict prefixes an embedding never reads (a skipped learned pooler): loading may lack them."""
    return ("pooler.",) if use == CLS and isinstance(getattr(model, "pooler", None), nn.Module) else ()


def infer_lora_targets(encoder: nn.Module) -> str | None:
    """peft ``target_modules`` (one regex) for ``encoder``'s repeated blocks, or None if it has none.

    Targets are the ``nn.Linear`` layers inside the innermost numbered blocks
    (``layers.3.self_attn.q_proj``, ``blocks.0.mlp.fc1``; Swin's ``layers.1.blocks.0...`` but not
    ``layers.1.downsample``); an ``nn.MultiheadAttention`` is targeted whole (peft wraps it; its
    ``out_proj`` alone breaks backward). Not the patch embedding, the pooling head or a
    projection, which sit outside the numbered blocks. Names are relative to ``encoder``, which
    fine-tuning wraps (``Classifier.encoder``), so the targets never reach a text tower.
    """
    names: list[str] = []
    attention = [n for n, m in encoder.named_modules() if isinstance(m, nn.MultiheadAttention)]
    for name, module in encoder.named_modules():
        parts = name.split(".")
        if not any(p.isdigit() for p in parts):
            continue
        if isinstance(module, nn.MultiheadAttention):
            names.append(name)
        elif isinstance(module, nn.Linear) and not any(name.startswith(a + ".") for a in attention):
            names.append(name)
    if not names:
        return None
    # Only the innermost repeated blocks (Swin: the blocks inside each stage, not the stage's
    # patch-merging ``downsample``): the names with the most numbered components.
    depth = lambda n: sum(p.isdigit() for p in n.split("."))  # noqa: E731
    deepest = max(map(depth, names))
    names = [n for n in names if depth(n) == deepest]
    groups: dict[str, set[str]] = {}
    for name in names:
        parts = name.split(".")
        last = max(i for i, p in enumerate(parts) if p.isdigit())
        prefix = r"\.".join(r"\d+" if p.isdigit() else re.escape(p) for p in parts[: last + 1])
        groups.setdefault(prefix, set()).add(r"\.".join(re.escape(p) for p in parts[last + 1:]))
    alternatives = [prefix + (f"\\.({'|'.join(sorted(e for e in ends if e))})" if any(ends) else "")
                    + ("?" if "" in ends and any(ends) else "") for prefix, ends in sorted(groups.items())]
    return r"(.*\.)?(" + "|".join(alternatives) + ")"
