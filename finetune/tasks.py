"""The heads' tasks (the protocol is `pretrain.tasks.Task`): linear-probe classification of frozen features,
finetuning with optional DeiT distillation and weight EMA, and DETR's set prediction."""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.tasks import Task

from .detr_loss import SetCriterion
from .distillation import DistillationLoss, FrozenTeacher


class ClassificationTask(Task):
    """Cross-entropy on `batch["features"]` -> `batch["label"]`, logging the batch accuracy (the linear probe)."""

    def __call__(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        logits = model(batch["features"])
        loss = F.cross_entropy(logits, batch["label"])
        accuracy = (logits.argmax(dim=1) == batch["label"]).float().mean()
        return {"loss": loss, "accuracy": accuracy}


class FinetuneTask(Task):
    """Mix the batch, run the student (and the frozen teacher on the same images), return the (distillation) loss.

    ema: timm's ModelEmaV3 of the weights, made with the model (as timm's and DeiT's training scripts make it) and
    updated after every applied step; its weights are part of the task's state, so a resumed run continues the
    same average."""

    def __init__(self, criterion: DistillationLoss, mixup=None, teacher: Optional[FrozenTeacher] = None,
                 autocast=None, ema=None):
        self.criterion, self.mixup, self.teacher = criterion, mixup, teacher
        self.autocast = autocast  # the accelerator's autocast: the teacher is not wrapped by accelerate
        self.ema = ema
        self.updates = 0

    def __call__(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        images, labels = batch["image"], batch["label"]
        targets = labels
        if self.mixup is not None:
            images, targets = self.mixup(images, labels)
        outputs = model(images)
        teacher_logits = None
        if self.teacher is not None:
            if self.autocast is not None:
                with self.autocast():
                    teacher_logits = self.teacher(images)
            else:
                teacher_logits = self.teacher(images)
        losses = self.criterion(outputs, targets, teacher_logits)
        if self.mixup is None:  # with mixed images the hard label is not the answer
            class_logits = outputs[0] if isinstance(outputs, tuple) else outputs
            losses["accuracy"] = (class_logits.argmax(dim=1) == labels).float().mean()
        return losses

    @property
    def after_step_needs_applied_update(self) -> bool:
        return self.ema is not None  # the EMA and its decay warm-up count applied updates only

    def after_optimizer_step(self, model: nn.Module) -> None:
        self.updates += 1
        if self.ema is not None:
            self.ema.update(model, step=self.updates)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"updates": self.updates}
        if self.ema is not None:
            state["ema"] = self.ema.module.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates = int(state.get("updates", 0))
        if self.ema is not None and "ema" in state:
            self.ema.module.load_state_dict(state["ema"])


def targets_to(targets: list[dict[str, Any]], device: torch.device) -> list[dict[str, torch.Tensor]]:
    """The batch's target dicts (which the engine leaves on the CPU) with their boxes and labels on `device`."""
    return [{"boxes": t["boxes"].to(device), "labels": t["labels"].to(device)} for t in targets]


class DetrTask(Task):
    """DETR's outputs on the padded batch, the set loss against the batch's targets."""

    def __init__(self, criterion: SetCriterion):
        self.criterion = criterion

    def __call__(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        images = batch["image"]
        outputs = model(images, batch["mask"])
        return self.criterion(outputs, targets_to(batch["target"], images.device))
