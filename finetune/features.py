"""Which frozen features of an encoder the linear probe trains on, k-NN looks up and feature export writes (their
extraction over shards is pretrain/features.py's).

`feature_encoder(cfg, image_size, feature)` maps images [B, 3, H, W] to features [B, D]. The encoder comes from
`pretrain.encoders.build_encoder` (every checkpoint it accepts) or is the raw pixels (`encoder.source=pixels`);
`feature` (a `FeatureConfig`, finetune/config.py) says which of its outputs:

    pool  blocks   a ViT (ours, a CLIP tower, timm)                  a model without class token (Swin, CNN)
    null  -        its own pooled output (forward_head, pre_logits): the class token after the final norm for
                   encoder.global_pool=null (MAE's linear probe), as before this option existed
    cls   1        the class token after the final norm [D]           the average-pooled last stage [D] (no class token)
    avg   1        the average of the patch tokens after the norm [D] the average-pooled last stage [D]
    cls+avg 1      both, concatenated [2D]                            refused: cls already is the average
    cls   N        DINOv2's linear-eval input: the class tokens of the refused (no class token per block)
                   last N blocks, each after the final norm [N*D]
    cls+avg N      the same + the last block's average patch token [(N+1)*D]

Prefix tokens other than the class token (a distillation token, registers) are never averaged with the patches.
Each feature module carries `kind`, a short description for logs, metrics.json and exported feature files.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from pretrain.config import ConfigError, EncoderConfig
from pretrain.encoders import build_encoder
from pretrain.features import PooledFeatures, pool_type

from .config import FeatureConfig


class PixelFeatures(nn.Module):
    """The raw-pixel baseline: the normalised image, flattened. [B, C, H, W] -> [B, C*H*W]"""

    kind = "raw pixels"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.flatten(1)


class TokenFeatures(nn.Module):
    """A timm VisionTransformer's tokens, each block's output after the final norm (DINOv2's linear evaluation):
    the class tokens of the last `blocks` blocks, then (avg) the average patch token of the last block.
    [B, 3, H, W] -> [B, (blocks if cls) * D + (D if avg)]"""

    def __init__(self, model: nn.Module, cls: bool, avg: bool, blocks: int = 1):
        super().__init__()
        self.model, self.cls, self.avg, self.blocks = model, cls, avg, blocks
        parts = ([f"cls x{blocks} blocks" if blocks > 1 else "cls"] if cls else []) + (["avg"] if avg else [])
        self.kind = "+".join(parts) if blocks == 1 else " + ".join(parts)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # [(patch tokens [B, N, D], prefix tokens [B, P, D])] for each of the last `blocks` blocks, normed
        outputs = self.model.forward_intermediates(images, indices=self.blocks, norm=True, output_fmt="NLC",
                                                   intermediates_only=True, return_prefix_tokens=True)
        parts = [prefix[:, 0] for _, prefix in outputs] if self.cls else []
        if self.avg:
            parts.append(outputs[-1][0].mean(dim=1))
        return torch.cat(parts, dim=1)


def feature_module(model: nn.Module, feature: Optional[FeatureConfig] = None) -> nn.Module:
    """The feature `feature` asks for, of the timm model `model` (see the module docstring). Frozen, eval mode."""
    from timm.models.vision_transformer import VisionTransformer

    feature = feature or FeatureConfig()
    name = type(model).__name__
    if feature.pool is None:
        module = PooledFeatures(model)
    elif isinstance(model, VisionTransformer) and model.num_prefix_tokens > 0 and model.cls_token is not None:
        if isinstance(model.norm, nn.Identity):
            raise ConfigError(f"'feature.pool' {feature.pool} reads the {name}'s tokens after its final norm, which "
                              f"encoder.global_pool=avg replaced by a new fc_norm: set encoder.global_pool=null")
        module = TokenFeatures(model, cls="cls" in feature.pool, avg="avg" in feature.pool, blocks=feature.blocks)
    else:  # no class token: Swin, CNNs, a ViT built without one
        if feature.blocks > 1:
            raise ConfigError(f"'feature.blocks' {feature.blocks} concatenates the class tokens of the last blocks, "
                              f"but the {name} has no class token: use feature.blocks=1")
        if feature.pool == "cls+avg":
            raise ConfigError(f"'feature.pool' cls+avg: the {name} has no class token, its cls feature already is "
                              f"its average-pooled output; use feature.pool=avg")
        if pool_type(model) != "avg":
            raise ConfigError(f"'feature.pool' {feature.pool}: the {name} pools by {pool_type(model)!r}, not by "
                              f"average; use feature.pool=null for its own pooled output")
        kind = "avg" if feature.pool == "avg" else "avg (no class token)"
        module = PooledFeatures(model, kind)
    return module.eval().requires_grad_(False)


def feature_encoder(cfg: EncoderConfig, image_size: int, feature: Optional[FeatureConfig] = None
                    ) -> tuple[nn.Module, str]:
    """(frozen module mapping images [B, 3, H, W] to features [B, D] (its `kind` says which), a description of the
    encoder for metrics.json)"""
    feature = feature or FeatureConfig()
    if cfg.source == "pixels":
        if feature.pool is not None:
            raise ConfigError(f"'feature.pool' {feature.pool} has no meaning for encoder.source=pixels (the "
                              f"pixels are the features): leave it null")
        return PixelFeatures().eval(), "raw pixels"
    encoder = build_encoder(cfg, image_size)
    return feature_module(encoder.model, feature), encoder.description
