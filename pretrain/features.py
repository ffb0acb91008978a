"""An encoder's frozen features over shards, every sample once across processes: what pretraining's k-NN monitor,
the probes, k-NN and feature export (finetune/) all read. `encoder` is any module mapping images [B, 3, H, W] to
features [B, D]; `PooledFeatures` makes one of a timm model (its own pooled output, before any head).
"""
from __future__ import annotations

from typing import Iterator, Optional

import torch
from torch import nn

from data import ShardStream, count_samples, make_loader


class PooledFeatures(nn.Module):
    """A timm model's pooled features before any head (`forward_head(..., pre_logits=True)`). [B, 3, H, W] -> [B, D]"""

    def __init__(self, model: nn.Module, kind: Optional[str] = None):
        super().__init__()
        self.model = model
        self.kind = kind or f"pooled ({pool_type(model) or type(model).__name__})"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(images), pre_logits=True)


def pool_type(model: nn.Module) -> Optional[str]:
    """How a timm model pools for its head: "token", "avg", "max", "" ... (ViT, Swin: a string; CNNs: a module)."""
    pool = getattr(model, "global_pool", None)
    return pool if isinstance(pool, str) or pool is None else getattr(pool, "pool_type", None)


@torch.no_grad()
def iter_features(encoder: nn.Module, shards: str, transform, batch_size: int, num_workers: int, accelerator,
                  description: str, max_skip_rate: float = 0.5, kind: str = "labelled", progress: bool = True,
                  max_samples: Optional[int] = None) -> Iterator[dict]:
    """This process's share of the shards, every sample once across processes, as batches: the stream's batch
    (kind "labelled": "label", "key"; "image-text": "caption", "key"; ...) with "image" replaced by
    "features" [B, D] float32 on the CPU. A progress bar on the main process.

    max_samples: only the first ceil(max_samples / processes) samples of each process's share, so that repeated
    calls (a monitor's evaluations) see the same samples."""
    from tqdm.auto import tqdm

    stream = ShardStream(shards, transform, batch_size, train=False, kind=kind, rank=accelerator.process_index,
                         world_size=accelerator.num_processes, max_skip_rate=max_skip_rate)
    limit = None if max_samples is None else -(-max_samples // accelerator.num_processes)
    total = -(-min(count_samples(shards), max_samples or float("inf")) // (batch_size * accelerator.num_processes))
    seen = 0
    batches = iter(make_loader(stream, num_workers))
    try:
        for batch in tqdm(batches, total=total, desc=description, unit="batch",
                          disable=not (progress and accelerator.is_main_process), dynamic_ncols=True):
            if limit is not None:
                batch = {name: value[:limit - seen] if isinstance(value, (torch.Tensor, list)) else value
                         for name, value in batch.items()}
            images = batch.pop("image")
            with accelerator.autocast():
                batch["features"] = encoder(images.to(accelerator.device)).float().cpu()
            seen += len(images)
            yield batch
            if limit is not None and seen >= limit:
                break
    finally:
        batches.close()  # stops the workers of a stream left unfinished (max_samples)


def extract_features(encoder: nn.Module, shards: str, transform, batch_size: int, num_workers: int,
                     accelerator, description: str, max_skip_rate: float = 0.5, progress: bool = True,
                     max_samples: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """This process's share of labelled shards, every sample once (max_samples: as iter_features) ->
    (features [N, D], labels [N]) on the CPU and the N sample keys."""
    features, labels, keys = [], [], []
    for batch in iter_features(encoder, shards, transform, batch_size, num_workers, accelerator, description,
                               max_skip_rate, progress=progress, max_samples=max_samples):
        features.append(batch["features"])
        labels.append(batch["label"])
        keys.extend(batch["key"])
    if not features:  # an empty share (more processes than samples): still [0, D] for gather_rows
        width = getattr(encoder, "num_features", None) or getattr(getattr(encoder, "model", None), "num_features", 0)
        return torch.zeros(0, width), torch.zeros(0, dtype=torch.long), []
    return torch.cat(features), torch.cat(labels), keys
