"""The measures every evaluation shares (heads in finetune/, monitoring during pretraining):

- `TopKAccuracy`: top-1 / top-5 accuracy and the confusion matrix, counted per class, summed over processes (the
  linear probes, k-NN, finetuning, distillation, zero-shot);
- `knn_accuracy`: DINO's weighted k-NN vote on frozen features (Caron et al. 2021, eval_knn.py);
- `gather_rows`: every process's rows of a tensor, in rank order.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

from data import read_matching_class_names

from .config import ConfigError


def class_count(num_classes: Optional[int], train_shards: str, val_shards: Optional[str]) -> int:
    """The number of classes a head predicts: `num_classes` if set, else the training shards' class list (which
    the evaluation shards' must equal); fewer than the shards' classes would leave labels without an output."""
    names = read_matching_class_names(train_shards, val_shards)
    if num_classes is not None and num_classes < len(names):
        raise ConfigError(f"'num_classes' is {num_classes} but the training shards {train_shards} have {len(names)} "
                          f"classes ({', '.join(names)})")
    return num_classes or len(names)


class TopKAccuracy:
    """Accumulate correct@1 / correct@5 per true class and the top-1 confusion matrix over batches of logits;
    `result(accelerator)` sums over processes (each sample counted once, by the process that read it) and gives
    percentages, `confusion_matrix(accelerator)` the summed counts."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.counts = torch.zeros(3, num_classes, dtype=torch.float64)  # correct@1, correct@5, samples per class
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.float64)  # [true, top-1 prediction]

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        logits, labels = logits.detach().float().cpu(), labels.cpu()
        if len(labels) and int(labels.max()) >= self.num_classes:
            raise ValueError(f"label {int(labels.max())} but only {self.num_classes} classes")
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        self.counts[0].index_add_(0, labels, (top5[:, 0] == labels).double())
        self.counts[1].index_add_(0, labels, (top5 == labels[:, None]).any(dim=1).double())
        self.counts[2].index_add_(0, labels, torch.ones(len(labels), dtype=torch.float64))
        self.confusion.view(-1).index_add_(0, labels * self.num_classes + top5[:, 0],
                                           torch.ones(len(labels), dtype=torch.float64))

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

    def confusion_matrix(self, accelerator) -> torch.Tensor:
        """[true class, predicted class] counts of top-1 predictions, summed over processes (int64, CPU)."""
        confusion = self.confusion
        if accelerator.num_processes > 1:
            confusion = accelerator.reduce(confusion.to(accelerator.device), reduction="sum").cpu()
        return confusion.long()


@torch.no_grad()
def knn_votes(features: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor, ks: Sequence[int],
              temperature: float, num_classes: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """features [n, D] and bank [N, D], both L2-normalised; bank_labels [N] -> for each k: (summed votes
    [n, num_classes], neighbours per class [n, num_classes]). The votes are exp(sim / T) scaled by the row's
    exp(-max sim / T), which changes no ranking and keeps small temperatures from overflowing."""
    similarity = features @ bank.T  # [n, N]: the one large matrix
    top_similarity, top_index = similarity.topk(max(ks), dim=1)  # [n, k_max], most similar first
    neighbour_labels = bank_labels[top_index]
    weights = ((top_similarity - top_similarity[:, :1]) / temperature).exp()
    votes = {}
    for k in ks:
        summed = torch.zeros(len(features), num_classes, dtype=weights.dtype, device=features.device)
        counts = torch.zeros_like(summed)
        summed.scatter_add_(1, neighbour_labels[:, :k], weights[:, :k])
        counts.scatter_add_(1, neighbour_labels[:, :k], torch.ones_like(weights[:, :k]))
        votes[k] = summed, counts
    return votes


def ranking_scores(votes: torch.Tensor, counts: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Scores [n, C] whose top-k (TopKAccuracy) are the k classes with the most votes among those with any:
    classes without a neighbour score -1, and the true class, when it has none, -2, so it never counts as found."""
    scores = votes.masked_fill(counts == 0, -1.0)
    rows = torch.arange(len(labels), device=scores.device)
    unvoted = counts[rows, labels] == 0
    scores[rows[unvoted], labels[unvoted]] = -2.0
    return scores


@torch.no_grad()
def knn_accuracy(features: torch.Tensor, labels: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor,
                 ks: Sequence[int], temperature: float, num_classes: int, chunk_size: int = 256,
                 device: Optional[torch.device] = None) -> dict[int, TopKAccuracy]:
    """Weighted k-NN of `features` [n, D] with `labels` [n] against `bank` [N, D] with `bank_labels` [N]
    (normalised here), `chunk_size` rows at a time; for each k its TopKAccuracy (counts of this process)."""
    if max(ks) > len(bank):
        raise ConfigError(f"'k' {max(ks)} exceeds the {len(bank)} training features: choose k <= {len(bank)}")
    device = device or bank.device
    bank = F.normalize(bank.to(device).float(), dim=1)
    bank_labels = bank_labels.to(device)
    accuracies = {k: TopKAccuracy(num_classes) for k in ks}
    for start in range(0, len(features), chunk_size):
        chunk = F.normalize(features[start:start + chunk_size].to(device).float(), dim=1)
        chunk_labels = labels[start:start + chunk_size].to(device)
        for k, (votes, counts) in knn_votes(chunk, bank, bank_labels, ks, temperature, num_classes).items():
            accuracies[k].update(ranking_scores(votes, counts, chunk_labels), chunk_labels)
    return accuracies


def gather_rows(tensor: torch.Tensor, accelerator) -> torch.Tensor:
    """Every process's rows of `tensor` [n_rank, ...] (n_rank may differ), concatenated in rank order, on the CPU."""
    if accelerator.num_processes == 1:
        return tensor
    sizes = accelerator.gather(torch.tensor([len(tensor)], device=accelerator.device)).cpu().tolist()
    padded = accelerator.pad_across_processes(tensor.to(accelerator.device), dim=0)
    gathered = accelerator.gather(padded).cpu()
    longest = max(sizes)
    return torch.cat([gathered[rank * longest: rank * longest + size] for rank, size in enumerate(sizes)])
