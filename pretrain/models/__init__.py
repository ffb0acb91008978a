"""Pretraining models and a name -> factory registry.

    model = create_model("mae_vit_base_patch16", img_size=192)
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch.nn as nn

from .mae import MaskedAutoencoderViT, load_official_mae_checkpoint
from .pos_embed import sincos_pos_embed_1d, sincos_pos_embed_2d

# Architectures as data. base/large/huge are the official MAE configurations (decoder 512-d, 8 blocks, 16 heads).
_MAE_ARCHITECTURES: dict[str, dict] = {
    # CPU demo on 32x32 images (CIFAR-sized): 64 patches of 4x4, ~3 M parameters.
    "mae_vit_tiny_patch4": dict(
        img_size=32, patch_size=4, embed_dim=192, depth=6, num_heads=3,
        decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4,
    ),
    "mae_vit_small_patch16": dict(
        patch_size=16, embed_dim=384, depth=12, num_heads=6,
        decoder_embed_dim=256, decoder_depth=4, decoder_num_heads=8,
    ),
    "mae_vit_base_patch16": dict(
        patch_size=16, embed_dim=768, depth=12, num_heads=12,
        decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16,
    ),
    "mae_vit_large_patch16": dict(
        patch_size=16, embed_dim=1024, depth=24, num_heads=16,
        decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16,
    ),
    "mae_vit_huge_patch14": dict(
        patch_size=14, embed_dim=1280, depth=32, num_heads=16,
        decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16,
    ),
}  # fmt: skip

MODEL_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    name: partial(MaskedAutoencoderViT, **architecture) for name, architecture in _MAE_ARCHITECTURES.items()
}


def register_model(name: str, factory: Callable[..., nn.Module]) -> None:
    """Add a factory under ``name``; ``create_model(name, **overrides)`` then calls ``factory(**overrides)``."""
    if name in MODEL_REGISTRY:
        raise ValueError(f"model {name!r} is already registered")
    MODEL_REGISTRY[name] = factory


def create_model(name: str, **overrides) -> nn.Module:
    """Build a registered model; ``overrides`` replace constructor arguments (e.g. img_size, mask_ratio)."""
    if name not in MODEL_REGISTRY:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    return MODEL_REGISTRY[name](**overrides)


def list_models() -> list[str]:
    return sorted(MODEL_REGISTRY)


__all__ = [
    "MODEL_REGISTRY",
    "MaskedAutoencoderViT",
    "create_model",
    "list_models",
    "load_official_mae_checkpoint",
    "register_model",
    "sincos_pos_embed_1d",
    "sincos_pos_embed_2d",
]
