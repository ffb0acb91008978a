"""Pretraining models and a name -> factory registry; importing it registers the survey's backbones with timm
(backbones/: crossformer_*, dat_*, mswin_*, aa_resnet*).

    model = create_model("mae_vit_base_patch16", img_size=192)
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch.nn as nn

from .mae import MaskedAutoencoderViT, load_official_mae_checkpoint
from .pos_embed import sincos_pos_embed_1d, sincos_pos_embed_2d
from . import backbones  # noqa: F401  (registers CrossFormer, DAT, MSwin, AA-ResNet with timm)
from .simmim import SimMIMBackbone, SimMIMSwin
from .swin_mae import UniformMaskedAutoencoderSwin

# Architectures as data. base/large/huge are the official MAE configurations (decoder 512-d, 8 blocks, 16 heads).
_MAE_ARCHITECTURES: dict[str, dict] = {
    # CPU demo on 32x32 images (CIFAR-sized): 64 patches of 4x4, ~3 M parameters.
    "mae_vit_tiny_patch4": dict(
        img_size=32, patch_size=4, embed_dim=192, depth=6, num_heads=3,
        decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4,
    ),
    # the same at ViT-Tiny's full depth (12 blocks, as timm's vit_tiny_patch16_224): ~5.8 M parameters.
    "mae_vit_tiny_d12_patch4": dict(
        img_size=32, patch_size=4, embed_dim=192, depth=12, num_heads=3,
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

# MAE over Swin (pretrain/models/swin_mae.py, simmim.py). Swin-T / Swin-B are the encoders of timm's
# swin_{tiny,base}_patch4_window7_224; UM-MAE's decoder is the paper's (512-d, 2 blocks); SimMIM masks 60% of
# 32-px patches.
_SWIN_CPU = dict(img_size=32, patch_size=2, embed_dim=48, depths=(2, 2, 2), num_heads=(3, 6, 12), window_size=4)
_SWIN_T = dict(patch_size=4, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7)
_SWIN_B = dict(patch_size=4, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=7)
_UMMAE_DECODER = dict(decoder_embed_dim=512, decoder_depth=2, decoder_num_heads=16)
_SWIN_MAE_ARCHITECTURES: dict[str, tuple[type[nn.Module], dict]] = {
    # CPU demo on 32x32 images: 64 mask patches of 4x4 (2x2 Swin tokens each), 16 kept; ~2 M parameters.
    "ummae_swin_tiny_cpu": (UniformMaskedAutoencoderSwin, dict(
        _SWIN_CPU, mask_patch_size=4, decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4)),
    "ummae_swin_t_patch4": (UniformMaskedAutoencoderSwin, dict(_SWIN_T, mask_patch_size=16, **_UMMAE_DECODER)),
    "ummae_swin_b_patch4": (UniformMaskedAutoencoderSwin, dict(_SWIN_B, mask_patch_size=16, **_UMMAE_DECODER)),
    # CPU demo: 16 mask patches of 8x8 (the last stage's stride, as SimMIM's 32 px for Swin), 60% masked.
    "simmim_swin_tiny_cpu": (SimMIMSwin, dict(_SWIN_CPU, mask_patch_size=8)),
    "simmim_swin_t_patch4": (SimMIMSwin, dict(_SWIN_T, mask_patch_size=32)),
    "simmim_swin_b_patch4": (SimMIMSwin, dict(_SWIN_B, mask_patch_size=32)),
}  # fmt: skip

# SimMIM over the survey's backbones (pretrain/models/backbones), by their timm names: 60% of the mask patches, which
# are the last stage's stride at 224 (32 px) as SimMIM's Swin; 8 px on the 32-px CPU sizes (16 mask patches).
_SIMMIM_BACKBONES: dict[str, dict] = {
    "simmim_crossformer_cpu": dict(backbone="crossformer_cpu", img_size=32, mask_patch_size=8),
    "simmim_crossformer_tiny": dict(backbone="crossformer_tiny", mask_patch_size=32),
    "simmim_dat_cpu": dict(backbone="dat_cpu", img_size=32, mask_patch_size=8),
    "simmim_dat_tiny": dict(backbone="dat_tiny", mask_patch_size=32),
    "simmim_mswin_cpu": dict(backbone="mswin_cpu", img_size=32, mask_patch_size=8),
    "simmim_mswin_tiny": dict(backbone="mswin_tiny", mask_patch_size=32),
    "simmim_aa_resnet_cpu": dict(backbone="aa_resnet_cpu", img_size=32, mask_patch_size=8),
    "simmim_aa_resnet50": dict(backbone="aa_resnet50", mask_patch_size=32),
}

MODEL_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    name: partial(MaskedAutoencoderViT, **architecture) for name, architecture in _MAE_ARCHITECTURES.items()
}
MODEL_REGISTRY.update(
    {name: partial(model_class, **arch) for name, (model_class, arch) in _SWIN_MAE_ARCHITECTURES.items()}
)
MODEL_REGISTRY.update({name: partial(SimMIMBackbone, **arch) for name, arch in _SIMMIM_BACKBONES.items()})


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
    "SimMIMBackbone",
    "SimMIMSwin",
    "UniformMaskedAutoencoderSwin",
    "create_model",
    "list_models",
    "load_official_mae_checkpoint",
    "register_model",
    "sincos_pos_embed_1d",
    "sincos_pos_embed_2d",
]
