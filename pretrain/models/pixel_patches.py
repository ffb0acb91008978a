"""Images <-> pixel patches, and the per-patch normalised targets of the masked-image objectives (MAE, UM-MAE,
SimMIM): one place for the pixel layout and the norm-pix statistics, so that every model's targets, reconstructions
and pictures mean the same thing.

Within a patch, pixels are ordered (row, column, channel) as in MAE's ``patchify``, so ``decoder_pred`` weights from
the official release mean the same thing here.
"""
from __future__ import annotations

import torch
import torch.nn as nn

NORM_PIX_EPS = 1e-6  # added to the per-patch variance of the target, as in MAE


def patchify(imgs: torch.Tensor, p: int, in_chans: int) -> torch.Tensor:
    """imgs: [N, C, H, W] -> patches: [N, (H/p)*(W/p), p*p*C]."""
    n, c, h, w = imgs.shape
    if h % p or w % p or c != in_chans:
        raise ValueError(f"patchify: images of shape {tuple(imgs.shape)} do not fit {in_chans} x (k*{p}) x (k*{p})")
    x = imgs.reshape(n, c, h // p, p, w // p, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(n, (h // p) * (w // p), p * p * c)


def unpatchify(patches: torch.Tensor, p: int, in_chans: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """patches: [N, grid_h*grid_w, p*p*C] -> imgs: [N, C, grid_h*p, grid_w*p], the inverse of ``patchify``."""
    n = patches.shape[0]
    x = patches.reshape(n, grid_h, grid_w, p, p, in_chans)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(n, in_chans, grid_h * p, grid_w * p)


def patch_targets(patches: torch.Tensor, norm_pix: bool) -> torch.Tensor:
    """Pixel patches [N, L, P] -> reconstruction targets: normalised per patch to zero mean and unit variance when
    ``norm_pix`` (MAE's better-representation variant), else the pixels."""
    if not norm_pix:
        return patches
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + NORM_PIX_EPS) ** 0.5


def pred_to_pixels(pred: torch.Tensor, patches: torch.Tensor, norm_pix: bool) -> torch.Tensor:
    """The inverse of ``patch_targets`` for display: pred * sqrt(var + eps) + mean with the statistics of the
    image's own pixel ``patches``."""
    if not norm_pix:
        return pred
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return pred * (var + NORM_PIX_EPS) ** 0.5 + mean


def init_linear_and_layernorm(module: nn.Module) -> None:
    """MAE's init of the Linears (xavier-uniform, zero bias) and LayerNorms (weight 1, bias 0); for ``Module.apply``."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
