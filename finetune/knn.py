"""Weighted k-NN classification on frozen features (task `knn`), as DINO's eval_knn.py (Caron et al. 2021).

The training features are the bank: L2-normalised, gathered from every process, so each process holds all of
them. Each process classifies its own share of the evaluation features (every image once across processes),
chunk by chunk: a chunk's cosine similarities with the bank [chunk, N_train] are the only large matrix. An image's
k nearest neighbours each vote for their class with weight exp(similarity / T) (T = 0.07); classes are ranked by
their summed votes. A class nobody voted for is never a prediction (DINO's sort would rank such classes in an
arbitrary order after the voted ones). Top-1 / top-5 counts are summed over processes, so one process and many
give the same metrics.

    python -m finetune --config configs/knn_mae_tiny_demo.yaml      # -> runs/knn_demo/metrics.json

`train_features` / `val_features` read folders written by the `features` task instead of running the encoder.
"""
from __future__ import annotations

import json
import logging
from dataclasses import replace
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

from data import eval_transform, read_class_names
from pretrain.config import ConfigError
from pretrain.run import setup_run

from .config import KNNConfig
from .feature_export import read_feature_files, read_feature_index
from .features import extract_features, feature_encoder
from .metrics import TopKAccuracy, class_count

log = logging.getLogger(__name__)


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


class _Side:
    """One side of a k-NN run (the training bank or the evaluation set): its features and where they came from."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, encoder: str, kind: str, source: str,
                 from_files: bool = False, classes: Optional[list[str]] = None):
        self.features, self.labels, self.encoder, self.kind = features, labels, encoder, kind
        self.source, self.from_files, self.classes = source, from_files, classes


def _read_side(directory: str, what: str) -> _Side:
    index = read_feature_index(directory)
    if not index.get("labels"):
        raise ConfigError(f"'{what}' {directory} holds no labels (exported from {index.get('kind')} shards): "
                          f"k-NN needs features of labelled shards")
    features, labels, _ = read_feature_files(directory)
    return _Side(features, labels, index["encoder"], index["feature"], str(directory), from_files=True,
                 classes=index.get("classes"))


def run_knn(cfg: KNNConfig) -> dict[str, Any]:
    # shards read only where no feature files stand in for them (config.yaml then says so: data.val null)
    run_cfg = replace(cfg, data=replace(cfg.data, val=None)) if cfg.val_features else cfg
    run = setup_run(run_cfg, train_data=cfg.train_features is None)
    accelerator = run.accelerator
    rank, world = accelerator.process_index, accelerator.num_processes

    num_classes = None
    if cfg.train_features is None and cfg.val_features is None:  # fail on a class mismatch before extracting
        num_classes = class_count(cfg.num_classes, run.train_shards, run.val_shards)
    encoder = description = None
    if cfg.train_features is None or cfg.val_features is None:
        encoder, description = feature_encoder(cfg.encoder, cfg.data.image_size, cfg.feature)
        encoder.to(accelerator.device)
    transform = eval_transform(cfg.data.image_size, crop_fraction=cfg.data.eval_crop_fraction, mean=cfg.data.mean,
                               std=cfg.data.std)

    def extract(shards: str, what: str) -> _Side:
        features, labels = extract_features(encoder, shards, transform, cfg.train.batch_size, cfg.data.num_workers,
                                            accelerator, f"features ({what})", cfg.data.max_skip_rate,
                                            progress=cfg.logging.progress_bar)
        return _Side(features, labels, description, encoder.kind, shards)

    if cfg.train_features:
        train = _read_side(cfg.train_features, "train_features")  # every process: the whole bank
    else:
        train = extract(run.train_shards, "train")
        train.features, train.labels = gather_rows(train.features, accelerator), gather_rows(train.labels, accelerator)
    if cfg.val_features:
        val = _read_side(cfg.val_features, "val_features")
        val.features, val.labels = val.features[rank::world], val.labels[rank::world]  # this process's share
    else:
        val = extract(run.val_shards, "val")
    for attribute, name in (("encoder", "encoder"), ("kind", "feature")):
        if getattr(train, attribute) != getattr(val, attribute):
            raise ConfigError(f"the training and evaluation features differ in {name}: {getattr(train, attribute)!r} "
                              f"({train.source}) against {getattr(val, attribute)!r} ({val.source})")
    if train.features.shape[1] != val.features.shape[1]:
        raise ConfigError(f"the training features have dimension {train.features.shape[1]}, the evaluation "
                          f"features {val.features.shape[1]}")
    num_classes = num_classes or _num_classes(cfg.num_classes, train, val)

    accuracies = knn_accuracy(val.features, val.labels, train.features, train.labels, cfg.k, cfg.temperature,
                              num_classes, cfg.chunk_size, accelerator.device)
    results = {k: accuracies[k].result(accelerator) for k in cfg.k}
    metrics: dict[str, Any] = {
        "k": {str(k): {"top1": r["top1"], "top5": r["top5"]} for k, r in results.items()},
        "temperature": cfg.temperature, "num_train": len(train.features), "num_test": results[cfg.k[0]]["num_samples"],
        "num_classes": num_classes, "feature_dim": int(train.features.shape[1]), "encoder": train.encoder,
        "feature": train.kind,
    }
    if accelerator.is_main_process:
        (run.output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        summary = ", ".join(f"k={k} {r['top1']:.2f}% / {r['top5']:.2f}%" for k, r in results.items())
        log.info("k-NN on features %s of %s, top-1 / top-5 of %d images against %d: %s; metrics in %s", train.kind,
                 train.encoder, metrics["num_test"], metrics["num_train"], summary, run.output_dir / "metrics.json")
    return metrics


def _num_classes(num_classes: Optional[int], train: _Side, val: _Side) -> int:
    """class_count's rule (num_classes, else the class list train and val must share), with feature files giving
    the class names their index recorded."""
    if not train.from_files and not val.from_files:
        return class_count(num_classes, train.source, val.source)
    names = [side.classes if side.from_files else read_class_names(side.source) for side in (train, val)]
    if None in names:
        if num_classes is None:
            raise ConfigError(f"the feature files {train.source if names[0] is None else val.source} record no "
                              f"class names (their shards had no stats.json): set num_classes")
        return num_classes
    if names[0] != names[1]:
        raise ConfigError(f"the training features ({train.source}) and evaluation features ({val.source}) have "
                          f"different class lists: {names[0]} against {names[1]}")
    if num_classes is not None and num_classes < len(names[0]):
        raise ConfigError(f"'num_classes' is {num_classes} but {train.source} has {len(names[0])} classes")
    return num_classes or len(names[0])
