"""Frozen features of an encoder: what the linear probe (and k-NN, feature export) trains or looks up on.

`feature_encoder(cfg, image_size)` maps images [B, 3, H, W] to features [B, D]: the pooled output of the encoder
`pretrain.encoders.build_encoder` builds (a ViT's class token after its final norm, MAE's linear-probe feature; a
Swin's average-pooled last stage), or the raw pixels (`encoder.source=pixels`, a baseline).
"""
from __future__ import annotations

import torch
from torch import nn

from data import ShardStream, count_samples
from data import make_loader as make_data_loader
from pretrain.config import EncoderConfig
from pretrain.encoders import build_encoder


class PixelFeatures(nn.Module):
    """The raw-pixel baseline: the normalised image, flattened. [B, C, H, W] -> [B, C*H*W]"""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.flatten(1)


class PooledFeatures(nn.Module):
    """A timm model's pooled features before any head (`forward_head(..., pre_logits=True)`). [B, 3, H, W] -> [B, D]"""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(images), pre_logits=True)


def feature_encoder(cfg: EncoderConfig, image_size: int) -> tuple[nn.Module, str]:
    """(frozen module mapping images [B, 3, H, W] to features [B, D], a description for metrics.json)"""
    if cfg.source == "pixels":
        return PixelFeatures().eval(), "raw pixels"
    encoder = build_encoder(cfg, image_size)
    return PooledFeatures(encoder.model).eval().requires_grad_(False), encoder.description


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
