"""Linear probing, as in the MAE paper: a frozen encoder, BatchNorm without affine + Linear on its features,
LARS, no augmentation. The encoder is frozen and the images are not augmented, so the features are computed
once and the head trains on them through the shared engine."""
from __future__ import annotations

import json
import logging
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from data import ShardStream, count_samples, eval_transform
from data import make_loader as make_data_loader
from pretrain.config import to_dict
from pretrain.datasets import read_class_names, resolve_shards
from pretrain.engine import Trainer, make_accelerator, prepare_output_dir

from .config import LinearProbeConfig
from .encoders import build_feature_encoder

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


class ClassificationTask:
    """Cross-entropy on `batch["features"]` -> `batch["label"]`, logging the batch accuracy."""

    def __call__(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        logits = model(batch["features"])
        loss = F.cross_entropy(logits, batch["label"])
        accuracy = (logits.argmax(dim=1) == batch["label"]).float().mean()
        return {"loss": loss, "accuracy": accuracy}


@torch.no_grad()
def extract_features(encoder: nn.Module, shards: str, transform, batch_size: int, num_workers: int,
                     accelerator, description: str, max_skip_rate: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """This process's share of the shards, every sample once -> (features [N, D], labels [N]) on the CPU."""
    from tqdm.auto import tqdm

    stream = ShardStream(shards, transform, batch_size, train=False, rank=accelerator.process_index,
                         world_size=accelerator.num_processes, max_skip_rate=max_skip_rate)
    total = -(-count_samples(shards) // (batch_size * accelerator.num_processes))
    features, labels = [], []
    for batch in tqdm(make_data_loader(stream, num_workers), total=total, desc=description, unit="batch",
                      disable=not accelerator.is_main_process, dynamic_ncols=True):
        with accelerator.autocast():
            features.append(encoder(batch["image"].to(accelerator.device)).float().cpu())
        labels.append(batch["label"])
    return torch.cat(features), torch.cat(labels)


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
    counts = torch.zeros(3, dtype=torch.float64)  # correct@1, correct@5, samples
    for start in range(0, len(features), batch_size):
        logits = head(features[start:start + batch_size].to(accelerator.device)).float().cpu()
        target = labels[start:start + batch_size]
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        counts[0] += (top5[:, 0] == target).sum()
        counts[1] += (top5 == target[:, None]).any(dim=1).sum()
        counts[2] += len(target)
    head.train(was_training)
    counts = accelerator.reduce(counts.to(accelerator.device), reduction="sum").cpu()
    return {"top1": 100.0 * float(counts[0] / counts[2]), "top5": 100.0 * float(counts[1] / counts[2]), "num_samples": int(counts[2])}


def run_linear_probe(cfg: LinearProbeConfig) -> dict[str, Any]:
    accelerator = make_accelerator(cfg.train)
    output_dir = prepare_output_dir(cfg.output_dir, cfg, cfg.train, accelerator)
    train_shards, val_shards = resolve_shards(cfg.data, output_dir, accelerator)
    num_classes = cfg.num_classes or len(read_class_names(train_shards))

    encoder, description = build_feature_encoder(cfg.encoder.kind, cfg.encoder.checkpoint, cfg.encoder.model_name,
                                                 cfg.data.image_size)
    encoder.eval().requires_grad_(False).to(accelerator.device)
    transform = eval_transform(cfg.data.image_size, crop_fraction=cfg.data.eval_crop_fraction, mean=cfg.data.mean, std=cfg.data.std)
    train_features, train_labels = extract_features(encoder, train_shards, transform, cfg.feature_batch_size,
                                                    cfg.data.num_workers, accelerator, "features (train)", cfg.data.max_skip_rate)
    val_features, val_labels = extract_features(encoder, val_shards, transform, cfg.feature_batch_size,
                                                cfg.data.num_workers, accelerator, "features (val)", cfg.data.max_skip_rate)
    del encoder
    local_count = torch.tensor(float(len(train_features)), device=accelerator.device)
    samples_per_epoch = int(accelerator.reduce(local_count, reduction="sum").item())
    log.info("probing %s: %d training and %d evaluation features of dimension %d, %d classes",
             description, samples_per_epoch, len(val_features), train_features.shape[1], num_classes)

    head = LinearProbeHead(train_features.shape[1], num_classes)
    trainer = Trainer(
        model=head,
        task=ClassificationTask(),
        make_loader=lambda start_batch, rank, world_size: feature_batches(
            train_features, train_labels, cfg.train.batch_size, cfg.train.seed * 1000 + rank, start_batch),
        samples_per_epoch=samples_per_epoch,
        train=cfg.train,
        optim=cfg.optim,
        logging_cfg=cfg.logging,
        output_dir=output_dir,
        run_config=to_dict(cfg),
        model_metadata={"objective": "linear_probe", "feature_dim": str(train_features.shape[1]), "num_classes": str(num_classes)},
        accelerator=accelerator,
    )
    summary = trainer.fit()
    metrics = evaluate(trainer.unwrapped_model, val_features, val_labels, accelerator)
    metrics.update(encoder=description, feature_dim=int(train_features.shape[1]), num_train=samples_per_epoch,
                   epochs=cfg.train.epochs, steps=summary["step"], final_train_loss=summary.get("loss"))
    if accelerator.is_main_process:
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        log.info("linear probe (%s): top-1 %.2f%%, top-5 %.2f%% on %d images; metrics in %s", description,
                 metrics["top1"], metrics["top5"], metrics["num_samples"], output_dir / "metrics.json")
    return metrics
