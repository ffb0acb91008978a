"""Tasks: the thin layer between a model and the training loop (pretrain/engine.py).

`Task` is the protocol every objective follows; the pretraining tasks live here, the heads' tasks (linear probe,
finetuning and distillation, DETR) in finetune/tasks.py.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable

import torch
from torch import nn

# the engine's backward for one micro-batch: `micro_step(forward)` runs `forward()` -> {"loss": ..., ...} and
# backpropagates loss / (micro-batches per step), inside accelerate's `accumulate` (under DDP only the step's last
# micro-batch reduces the gradients across processes); it returns forward's outputs
MicroStep = Callable[[Callable[[], dict[str, torch.Tensor]]], dict[str, torch.Tensor]]


class Task:
    """What the engine asks of an objective.

    - `task(model, batch) -> {"loss": tensor, <name>: scalar tensor, ...}`: the loss to minimise (backward runs on
      it) and any other scalars to log (`log.jsonl`, wandb), for one (micro-)batch. With `train.grad_accum_steps`
      micro-batches per step the engine runs them one after the other, logging the mean of their outputs.
    - `takes_whole_step = True` and `step_micro_batches(model, batches, micro_step)` instead: a task whose objective
      spans all the micro-batches of a step (CLIP's contrastive negatives) gets them together.
    - `after_optimizer_step(model)`: after every optimizer step, on the unwrapped model: e.g. CLIP clamps its
      temperature, finetuning updates its weight EMA. A step whose update was skipped (a non-finite loss or gradient)
      may run it too, the model unchanged, unless `after_step_needs_applied_update` is true (an EMA, which would move
      towards unchanged weights): then the engine decides each update on the host, waiting for the device each step.
    - `state_dict()` / `load_state_dict(state)`: what the task carries from step to step (tensors and plain values
      only), saved in each checkpoint's train_state.pt and restored on resume, so a resumed run is exact.
    """

    takes_whole_step = False
    after_step_needs_applied_update = False

    def __call__(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def step_micro_batches(self, model: nn.Module, batches: list[dict[str, Any]],
                           micro_step: MicroStep) -> dict[str, torch.Tensor]:
        """One optimizer step's micro-batches (a list of `train.grad_accum_steps` batches): call `micro_step` once
        per micro-batch, in which the gradients are computed, and return the values to log for the step."""
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
    process's rows against the local batch (all its micro-batches).

    Gradient accumulation keeps the large-batch objective (open_clip's `--accum-freq`; `step_micro_batches`)."""

    takes_whole_step = True

    def __init__(self, local_loss: bool = True, gather_with_grad: bool = True, rank: int = 0, world_size: int = 1):
        from open_clip import ClipLoss

        self.loss = ClipLoss(local_loss=local_loss, gather_with_grad=gather_with_grad, cache_labels=True,
                             rank=rank, world_size=world_size)

    def __call__(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        image_features, text_features, logit_scale = model(batch["image"], batch["text"])[:3]
        return self.objective(image_features, text_features, logit_scale)

    def objective(self, image_features: torch.Tensor, text_features: torch.Tensor,
                  logit_scale: torch.Tensor) -> dict[str, torch.Tensor]:
        """The loss and logged values of this process's features (image, text: [B, D], normalised; logit_scale:
        the temperature's inverse, a scalar)."""
        loss = self.loss(image_features, text_features, logit_scale)
        with torch.no_grad():
            similarity = image_features @ text_features.T
            targets = torch.arange(similarity.shape[0], device=similarity.device)
            image_to_text = (similarity.argmax(dim=1) == targets).float().mean()
            text_to_image = (similarity.argmax(dim=0) == targets).float().mean()
        return {"loss": loss, "logit_scale": logit_scale.detach(), "image_to_text_acc": image_to_text,
                "text_to_image_acc": text_to_image}

    def step_micro_batches(self, model: nn.Module, batches: list[dict[str, Any]],
                           micro_step: MicroStep) -> dict[str, torch.Tensor]:
        """K micro-batches scored as one batch of K x B (open_clip's accum_freq), at the memory of one micro-batch's
        graph. Pass 1 computes every micro-batch's features without a graph. Pass 2 recomputes micro-batch j with
        gradients and takes the loss of all K x B rows, the other micro-batches' features from pass 1: the part of
        the large-batch gradient that flows through micro-batch j. The K parts add up to the large-batch gradient.

        - Scaling: the engine backpropagates each pass's loss / K (as for any task's micro-batches), so the fresh
          features' gradient is scaled by K, and the temperature, which every pass sees, gets 1/K of its gradient
          K times (open_clip's accum_freq instead adds the temperature's gradient K times).
        - Random draws (dropout, patch dropout): pass 2 replays the random state each micro-batch had in pass 1, so
          the recomputed features are the cached ones and the cached negatives match (open_clip simply recomputes
          with new draws).
        - Logged values: the mean over the K passes, each the loss of the whole K x B batch.
        """
        if len(batches) == 1:  # nothing to cache: the plain step
            outputs = micro_step(partial(self, model, batches[0]))
            return {name: value.detach().float() for name, value in outputs.items()}
        states, cached = [], []
        with torch.no_grad():  # pass 1
            for batch in batches:
                states.append(_rng_state(batch["image"].device))
                cached.append(model(batch["image"], batch["text"])[:2])
        totals: dict[str, torch.Tensor] = {}
        for j, batch in enumerate(batches):  # pass 2
            outputs = micro_step(partial(self._recompute, model, batches, cached, j, states[j]))
            for name, value in outputs.items():
                totals[name] = totals.get(name, 0) + value.detach().float() / len(batches)
        return totals

    def _recompute(self, model: nn.Module, batches: list[dict[str, Any]], cached: list[tuple[torch.Tensor, ...]],
                   j: int, rng_state: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Pass 2 of `step_micro_batches` for micro-batch j: its features with gradients among the cached ones
        (`cached[i]`: micro-batch i's (image, text) features from pass 1, [B, D] each)."""
        _set_rng_state(batches[j]["image"].device, rng_state)
        image, text, logit_scale = model(batches[j]["image"], batches[j]["text"])[:3]
        features = []
        for fresh, kind in ((image, 0), (text, 1)):
            if fresh.requires_grad:  # micro_step divides this pass's loss by K; the fresh features carry all of theirs
                fresh.register_hook(lambda grad: grad * len(batches))
            others = [c[kind] for c in cached]
            features.append(torch.cat(others[:j] + [fresh] + others[j + 1:]))
        return self.objective(features[0], features[1], logit_scale)

    def after_optimizer_step(self, model: nn.Module) -> None:
        """CLIP's temperature: the learnable log scale stays in [0, ln 100], so logits are at most 100x cosines."""
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))


def _rng_state(device: torch.device) -> list[torch.Tensor]:
    """The CPU generator's state and, on an accelerator, that device's (where dropout draws happen)."""
    states = [torch.get_rng_state()]
    if device.type != "cpu":
        states.append(torch.get_device_module(device.type).get_rng_state(device))
    return states


def _set_rng_state(device: torch.device, states: list[torch.Tensor]) -> None:
    torch.set_rng_state(states[0])
    if device.type != "cpu":
        torch.get_device_module(device.type).set_rng_state(states[1], device)
