"""Linear probing, as in the MAE paper: a frozen encoder, BatchNorm without affine + Linear on its features,
LARS, no augmentation. The encoder is frozen and the images are not augmented, so the features are computed
once and the head trains on them through the shared engine."""
from __future__ import annotations

import json
import logging
from typing import Any, Iterator

import torch
from torch import nn

from data import eval_transform
from pretrain.engine import Trainer
from pretrain.metrics import TopKAccuracy, class_count
from pretrain.run import setup_run

from .config import LinearProbeConfig
from .features import extract_features, feature_encoder
from .tasks import ClassificationTask

log = logging.getLogger(__name__)


class LinearProbeHead(nn.Module):
    """features [B, D] -> logits [B, num_classes]. The BatchNorm (no affine) only rescales features: MAE features
    have very different scales per dimension, which a plain linear layer under LARS handles badly."""

    def __init__(self, feature_dim: int, num_classes: int):
        super().__init__()
        self.norm = nn.BatchNorm1d(feature_dim, affine=False, eps=1e-6)
        self.linear = nn.Linear(feature_dim, num_classes)
        nn.init.trunc_normal_(self.linear.weight, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(features))


def feature_batches(features: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int,
                    start_batch: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """Endless shuffled passes over in-memory features; full batches only, running across passes.
    `start_batch` skips the batches a resumed run already consumed (index arithmetic, nothing recomputed)."""
    n = len(features)
    position = start_batch * batch_size  # in the concatenation of all passes
    while True:
        pass_index, offset = divmod(position, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + pass_index))
        next_order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + pass_index + 1))
        indices = torch.cat([order, next_order])[offset: offset + batch_size]
        position += batch_size
        yield {"features": features[indices], "label": labels[indices]}


@torch.no_grad()
def evaluate(head: nn.Module, features: torch.Tensor, labels: torch.Tensor, accelerator, batch_size: int = 1024) -> dict[str, float]:
    """Top-1 / top-5 accuracy (percent) over every process's evaluation features, each sample counted once."""
    was_training = head.training
    head.eval()
    accuracy = None
    for start in range(0, len(features), batch_size):
        logits = head(features[start:start + batch_size].to(accelerator.device))
        accuracy = accuracy or TopKAccuracy(logits.shape[1])
        accuracy.update(logits, labels[start:start + batch_size])
    head.train(was_training)
    return accuracy.result(accelerator)


def run_linear_probe(cfg: LinearProbeConfig) -> dict[str, Any]:
    run = setup_run(cfg)
    accelerator = run.accelerator
    num_classes = class_count(cfg.num_classes, run.train_shards, run.val_shards)

    encoder, description = feature_encoder(cfg.encoder, cfg.data.image_size)
    encoder.to(accelerator.device)
    transform = eval_transform(cfg.data.image_size, crop_fraction=cfg.data.eval_crop_fraction, mean=cfg.data.mean, std=cfg.data.std)
    train_features, train_labels = extract_features(encoder, run.train_shards, transform, cfg.feature_batch_size,
                                                    cfg.data.num_workers, accelerator, "features (train)", cfg.data.max_skip_rate)
    val_features, val_labels = extract_features(encoder, run.val_shards, transform, cfg.feature_batch_size,
                                                cfg.data.num_workers, accelerator, "features (val)", cfg.data.max_skip_rate)
    del encoder
    local_count = torch.tensor(float(len(train_features)), device=accelerator.device)
    samples_per_epoch = int(accelerator.reduce(local_count, reduction="sum").item())
    log.info("probing %s: %d training and %d evaluation features of dimension %d, %d classes",
             description, samples_per_epoch, len(val_features), train_features.shape[1], num_classes)

    head = LinearProbeHead(train_features.shape[1], num_classes)
    trainer = Trainer.from_config(
        cfg, run, model=head, task=ClassificationTask(), samples_per_epoch=samples_per_epoch,
        make_loader=lambda start_batch, rank, world_size: feature_batches(
            train_features, train_labels, cfg.train.batch_size, cfg.train.seed * 1000 + rank, start_batch),
        model_metadata={"objective": "linear_probe", "feature_dim": str(train_features.shape[1]),
                        "num_classes": str(num_classes)},
    )
    summary = trainer.fit()
    metrics = evaluate(trainer.unwrapped_model, val_features, val_labels, accelerator)
    metrics.update(encoder=description, feature_dim=int(train_features.shape[1]), num_train=samples_per_epoch,
                   epochs=cfg.train.epochs, steps=summary["step"], final_train_loss=summary.get("loss"))
    if accelerator.is_main_process:
        (run.output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        log.info("linear probe (%s): top-1 %.2f%%, top-5 %.2f%% on %d images; metrics in %s", description,
                 metrics["top1"], metrics["top5"], metrics["num_samples"], run.output_dir / "metrics.json")
    return metrics
