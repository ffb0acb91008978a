"""Top-k classification accuracy, counted per class and summed over processes: the one classification metric of
the linear probe, finetuning, distillation and zero-shot evaluation."""
from __future__ import annotations

from typing import Any, Optional

import torch

from data import read_matching_class_names
from pretrain.config import ConfigError


def class_count(num_classes: Optional[int], train_shards: str, val_shards: Optional[str]) -> int:
    """The number of classes a head predicts: `num_classes` if set, else the training shards' class list (which
    the evaluation shards' must equal); fewer than the shards' classes would leave labels without an output."""
    names = read_matching_class_names(train_shards, val_shards)
    if num_classes is not None and num_classes < len(names):
        raise ConfigError(f"'num_classes' is {num_classes} but the training shards {train_shards} have {len(names)} "
                          f"classes ({', '.join(names)})")
    return num_classes or len(names)


class TopKAccuracy:
    """Accumulate correct@1 / correct@5 per true class over batches of logits; `result(accelerator)` sums over
    processes (each sample counted once, by the process that read it) and gives percentages."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.counts = torch.zeros(3, num_classes, dtype=torch.float64)  # correct@1, correct@5, samples per class

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        logits, labels = logits.detach().float().cpu(), labels.cpu()
        if len(labels) and int(labels.max()) >= self.num_classes:
            raise ValueError(f"label {int(labels.max())} but only {self.num_classes} classes")
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        self.counts[0].index_add_(0, labels, (top5[:, 0] == labels).double())
        self.counts[1].index_add_(0, labels, (top5 == labels[:, None]).any(dim=1).double())
        self.counts[2].index_add_(0, labels, torch.ones(len(labels), dtype=torch.float64))

    def result(self, accelerator, per_class: bool = False) -> dict[str, Any]:
        """{"top1", "top5" (percent), "num_samples"}; per_class adds "per_class_top1" and "per_class_samples"."""
        counts = self.counts
        if accelerator.num_processes > 1:
            counts = accelerator.reduce(counts.to(accelerator.device), reduction="sum").cpu()
        correct1, correct5, seen = counts
        total = float(seen.sum())
        metrics: dict[str, Any] = {"top1": 100.0 * float(correct1.sum()) / max(total, 1.0),
                                   "top5": 100.0 * float(correct5.sum()) / max(total, 1.0), "num_samples": int(total)}
        if per_class:
            metrics["per_class_top1"] = (100.0 * correct1 / seen.clamp(min=1)).tolist()
            metrics["per_class_samples"] = seen.long().tolist()
        return metrics
