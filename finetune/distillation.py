"""Knowledge distillation as in DeiT (Touvron et al., "Training data-efficient image transformers & distillation
through attention", ICML 2021, Section 4).

Z_s and Z_t are the student's and the teacher's logits, psi the softmax, y the true label, tau the temperature.

    soft distillation (Eq. 2):   L = (1 - alpha) CE(psi(Z_s), y) + alpha tau^2 KL(psi(Z_t / tau) || psi(Z_s / tau))
    hard distillation (Eq. 3):   L = 1/2 CE(psi(Z_s), y) + 1/2 CE(psi(Z_s), y_t),   y_t = argmax_c Z_t(c)

Both are the mix (1 - alpha) label term + alpha distillation term; the hard equation is alpha = 1/2, and DeiT's code
mixes the hard term by alpha too. The label term is whatever the recipe trains with (cross-entropy, label smoothing,
or soft targets under Mixup / CutMix), and the teacher sees the same (mixed) images as the student.

The distillation token: a student with one (timm's VisionTransformerDistilled) has two heads; the class head takes
the label term and the distillation head the distillation term. At test time the two heads are averaged: timm's
model returns the mean of the two heads' logits in eval mode, as DeiT's released code does (the paper adds the
softmax outputs). A student without a distillation token (a Swin, a CNN) gives its class head both terms.

The teacher is frozen: eval mode for good (dropout off, BatchNorm statistics fixed), no parameter requires a
gradient, and it runs under torch.no_grad.
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

Logits = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]  # one head, or (class head, distillation head)


def soft_distillation(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """tau^2 KL(psi(Z_t / tau) || psi(Z_s / tau)), summed over classes and averaged over the batch. The tau^2 keeps
    the gradient's scale independent of the temperature (Hinton et al., 2015). (DeiT's code divides the summed KL by
    batch x classes instead of the batch: the same loss, 1/classes as large.)"""
    log_p_student = F.log_softmax(student_logits / tau, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits / tau, dim=-1)
    return tau**2 * F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)


def hard_distillation(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """CE(psi(Z_s), y_t): the teacher's decision y_t = argmax Z_t taken as the true label."""
    return F.cross_entropy(student_logits, teacher_logits.argmax(dim=-1))


class DistillationLoss:
    """The training loss of a (possibly distilled) student: {"loss", "label_loss"[, "distillation_loss"]}.

    kind "none": the label loss alone, on the class head. "soft" / "hard": (1 - alpha) label + alpha distillation,
    the distillation term on the distillation head when the student has one, else on the class head."""

    def __init__(self, label_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], kind: str = "none",
                 alpha: float = 0.5, tau: float = 1.0):
        if kind not in ("none", "soft", "hard"):
            raise ValueError(f"distillation kind must be none, soft or hard, got {kind!r}")
        self.label_loss, self.kind, self.alpha, self.tau = label_loss, kind, alpha, tau

    def __call__(self, outputs: Logits, targets: torch.Tensor,
                 teacher_logits: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        class_logits, distill_logits = outputs if isinstance(outputs, tuple) else (outputs, outputs)
        label_loss = self.label_loss(class_logits, targets)
        if self.kind == "none":
            return {"loss": label_loss, "label_loss": label_loss.detach()}
        if teacher_logits is None:
            raise ValueError(f"{self.kind} distillation needs the teacher's logits")
        teacher_logits = teacher_logits.float()
        if self.kind == "soft":
            distillation_loss = soft_distillation(distill_logits, teacher_logits, self.tau)
        else:
            distillation_loss = hard_distillation(distill_logits, teacher_logits)
        loss = (1 - self.alpha) * label_loss + self.alpha * distillation_loss
        return {"loss": loss, "label_loss": label_loss.detach(), "distillation_loss": distillation_loss.detach()}


class FrozenTeacher(nn.Module):
    """A teacher that cannot learn: eval mode whatever `.train()` is called with, no parameter requires a gradient,
    every forward under torch.no_grad. `image_size`: images are resized (bicubic) to the teacher's input size first."""

    def __init__(self, model: nn.Module, image_size: Optional[int] = None):
        super().__init__()
        self.model = model.requires_grad_(False)
        self.image_size = image_size
        self.train(False)

    def train(self, mode: bool = True) -> "FrozenTeacher":
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.image_size is not None and tuple(images.shape[-2:]) != (self.image_size, self.image_size):
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False)
        return self.model(images)
