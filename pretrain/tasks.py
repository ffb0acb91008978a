"""Tasks: the thin layer between a model and the training loop (pretrain/engine.py).

`Task` is the protocol every objective follows; the pretraining tasks live here, the heads' tasks (linear probe,
finetuning and distillation, DETR) in finetune/tasks.py.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


class Task:
    """What the engine asks of an objective.

    - `task(model, batch) -> {"loss": tensor, <name>: scalar tensor, ...}`: the loss to minimise (backward runs on
      it) and any other scalars to log (`log.jsonl`, wandb), for one (micro-)batch.
    - `after_optimizer_step(model)`: after every applied update (skipped updates excluded), on the unwrapped model:
      e.g. CLIP clamps its temperature, finetuning updates its weight EMA.
    - `state_dict()` / `load_state_dict(state)`: what the task carries from step to step (tensors and plain values
      only), saved in each checkpoint's train_state.pt and restored on resume, so a resumed run is exact.
    """

    def __call__(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def after_optimizer_step(self, model: nn.Module) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class MAETask(Task):
    """Reconstruct the masked patches of `batch["image"]` ([B, 3, H, W])."""

    def __init__(self, mask_ratio: float):
        self.mask_ratio = mask_ratio

    def __call__(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        loss, _, _ = model(batch["image"], mask_ratio=self.mask_ratio)
        return {"loss": loss}


class CLIPTask(Task):
    """Symmetric InfoNCE between the image and text embeddings of `batch` ({"image": [B, 3, H, W], "text":
    [B, context]}) with open_clip's `ClipLoss`: the features of every process are gathered (with gradients), so
    the negatives are the whole global batch. Logs the temperature and the in-batch retrieval accuracies of this
    process's rows against the local batch."""

    def __init__(self, local_loss: bool = True, gather_with_grad: bool = True, rank: int = 0, world_size: int = 1):
        from open_clip import ClipLoss

        self.loss = ClipLoss(local_loss=local_loss, gather_with_grad=gather_with_grad, cache_labels=True,
                             rank=rank, world_size=world_size)

    def __call__(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        image_features, text_features, logit_scale = model(batch["image"], batch["text"])[:3]
        loss = self.loss(image_features, text_features, logit_scale)
        with torch.no_grad():
            similarity = image_features @ text_features.T
            targets = torch.arange(similarity.shape[0], device=similarity.device)
            image_to_text = (similarity.argmax(dim=1) == targets).float().mean()
            text_to_image = (similarity.argmax(dim=0) == targets).float().mean()
        return {"loss": loss, "logit_scale": logit_scale.detach(), "image_to_text_acc": image_to_text,
                "text_to_image_acc": text_to_image}

    def after_optimizer_step(self, model: nn.Module) -> None:
        """CLIP's temperature: the learnable log scale stays in [0, ln 100], so logits are at most 100x cosines."""
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
