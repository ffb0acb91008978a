"""Pretrained encoders for the heads: our MAE checkpoints loaded into timm's VisionTransformer."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from pretrain.checkpoint import CheckpointError, MODEL_FILE, find_latest, load_model_file, load_state_dict_checked
from pretrain.config import ConfigError
from pretrain.models import MaskedAutoencoderViT, create_model


def resolve_weights_file(path: str | Path) -> Path:
    """A model.safetensors file, a checkpoint directory, a run's checkpoints/ directory or a run directory
    -> the weights file (the newest complete checkpoint where there are several)."""
    path = Path(path)
    if path.is_file():
        return path
    if (path / MODEL_FILE).is_file():
        return path / MODEL_FILE
    for root in (path / "checkpoints", path):
        latest = find_latest(root)
        if latest is not None:
            return latest / MODEL_FILE
    raise CheckpointError(f"no model weights found at {path} (expected a model.safetensors file, a checkpoint "
                          f"directory or a run directory with checkpoints/)")


def mae_from_checkpoint(path: str | Path) -> MaskedAutoencoderViT:
    """Rebuild an MAE model from the metadata stored in its weights file and load the weights."""
    weights_file = resolve_weights_file(path)
    state_dict, metadata = load_model_file(weights_file)
    if metadata.get("objective") != "mae" or "model_config" not in metadata:
        raise CheckpointError(f"{weights_file} is not an MAE checkpoint of this project (metadata: {sorted(metadata)})")
    model = MaskedAutoencoderViT(**json.loads(metadata["model_config"]))
    load_state_dict_checked(model, state_dict, weights_file)
    return model


def vit_encoder(mae: MaskedAutoencoderViT, image_size: int | None = None) -> nn.Module:
    """timm `VisionTransformer` (no head) holding the MAE encoder's weights; the fixed position embeddings are
    resampled when `image_size` differs from the pretraining size."""
    from timm.layers import resample_abs_pos_embed
    from timm.models.vision_transformer import VisionTransformer

    kwargs = mae.timm_vit_kwargs()
    old_grid = kwargs["img_size"] // kwargs["patch_size"]
    if image_size is not None:
        kwargs["img_size"] = image_size
    encoder = VisionTransformer(**kwargs, num_classes=0)
    state = mae.encoder_state_dict()
    new_grid = encoder.patch_embed.grid_size
    if tuple(new_grid) != (old_grid, old_grid):
        state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], list(new_grid), [old_grid, old_grid], num_prefix_tokens=1)
    encoder.load_state_dict(state, strict=True)
    return encoder


class PixelFeatures(nn.Module):
    """The raw-pixel baseline: the normalised image, flattened. [B, C, H, W] -> [B, C*H*W]"""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.flatten(1)


def build_feature_encoder(kind: str, checkpoint: str | None, model_name: str, image_size: int) -> tuple[nn.Module, str]:
    """(frozen encoder mapping images [B, 3, H, W] to features [B, D], a description for metrics.json)"""
    if kind == "pixels":
        return PixelFeatures(), "raw pixels"
    if checkpoint is not None:
        encoder, description = vit_encoder(mae_from_checkpoint(checkpoint), image_size), f"MAE checkpoint {resolve_weights_file(checkpoint)}"
    else:
        try:
            mae = create_model(model_name, img_size=image_size)
        except ValueError as err:
            raise ConfigError(f"'encoder.model_name' {model_name}: {err}") from None
        encoder, description = vit_encoder(mae), f"random init ({model_name})"
    return ClassTokenFeatures(encoder), description


class ClassTokenFeatures(nn.Module):
    """A timm ViT's class token after the final norm (MAE's linear-probe feature). [B, 3, H, W] -> [B, D]"""

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.vit = vit

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.vit.forward_head(self.vit.forward_features(images), pre_logits=True)
