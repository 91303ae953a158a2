"""Small torch wrappers around Hugging Face towers (imported lazily by the loaders)."""

from __future__ import annotations

import torch
from torch import nn


class Pooled(nn.Module):
    """An HF image tower as a plain module: (B, 3, S, S) -> its ``pooler_output`` (B, D).

    Fine-tuning needs a module that returns a tensor; HF models return output objects.
    """

    def __init__(self, tower: nn.Module) -> None:
        super().__init__()
        self.tower = tower

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.tower(pixel_values=pixel_values).pooler_output
