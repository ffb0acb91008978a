"""Tasks: the thin layer between a model and the training loop. Each returns {"loss": ..., <scalars to log>}."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn


class MAETask:
    """Reconstruct the masked patches of `batch["image"]` ([B, 3, H, W])."""

    def __init__(self, mask_ratio: float):
        self.mask_ratio = mask_ratio

    def __call__(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        loss, _, _ = model(batch["image"], mask_ratio=self.mask_ratio)
        return {"loss": loss}
