"""SimMIM (Xie et al. 2022, "SimMIM: A Simple Framework for Masked Image Modeling") for Swin and for the survey's
backbones (pretrain/models/backbones: CrossFormer, DAT, MSwin, the attention-augmented ResNet).

Random mask patches (32x32 pixels, 60% of them: the paper's best setting for Swin) are replaced by a learned mask
token right after the patch embedding; the Swin encoder runs over the full token grid; a linear head (the paper's
1x1 convolution) maps every last-stage feature (stride 32) to its 32x32x3 pixels, laid out by a pixel shuffle;
the loss is the L1 distance on the masked pixels only.

Compared with UM-MAE (pretrain/models/swin_mae.py): the encoder sees every token, masked or not, so a step costs
about 4x UM-MAE's encoder (benchmarks/swin_mae_flops.py), but there is no decoder and no geometry to rearrange.

Same interface as ``MaskedAutoencoderViT``: ``forward(imgs, mask_ratio=None, noise=None)`` returns (loss, pred,
mask) where pred [N, L, p*p*C] is the head's pixel output cut into mask patches (p = ``mask_patch_size``; the
prediction for visible patches is there too, it is just not scored) and mask [N, L] has 1 = masked.

``norm_pix_loss``: SimMIM regresses the (mean/std-normalised) pixels themselves, so the registered sizes default
to False; True scores MAE-style per-patch normalised targets instead (pred is then in that space and
``pred_to_pixels`` maps it back).

``SimMIMBackbone`` runs the same objective over any backbone keeping that package's contract (``forward_embed``
then ``forward_stages``). Their patch embeddings may overlap the patch borders (CrossFormer's 32-px kernel, a
ResNet's 7x7 stem), so the masked pixels are zeroed before the embedding: what a visible token sees of a masked
patch is the dataset mean, never its content.

``SimMIMSwin``'s encoder is timm's Swin on the full image, windows and relative position tables exactly as timm builds them,
named as in timm's ``SwinTransformer``: ``encoder_state_dict()`` loads into the matching
``swin_*_patch4_window7_224`` (224 px, window 7 here; the paper pretrains at 192 px with window 6 and finetunes at
224 with window 7, interpolating the tables).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

from .pixel_patches import patch_targets, patchify, pred_to_pixels, unpatchify
from .swin_mae import (
    init_swin_weights,
    SWIN_ENCODER_PREFIXES,
    check_swin_sizes,
    relative_position_tables,
    swin_encoder,
    timm_swin_kwargs,
)


class SimMIM(nn.Module):
    """The objective: random mask patches, mask tokens on the full grid, a linear head + pixel shuffle from the last
    stage, L1 on the masked pixels. Subclasses build the encoder and define ``forward_encoder``,
    ``encoder_state_dict`` and ``no_weight_decay``."""

    def __init__(self, img_size: int, in_chans: int, mask_patch_size: int, mask_ratio: float, norm_pix_loss: bool,
                 embed_dim: int, token_stride: int, num_features: int, last_stride: int) -> None:
        super().__init__()
        _check_mask_ratio(mask_ratio)
        self.img_size = img_size
        self.mask_patch_size = mask_patch_size
        self.in_chans = in_chans
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.grid_size = img_size // mask_patch_size  # mask patches a side: 7 at 224 / 32
        self.num_patches = self.grid_size**2
        self.tokens_per_mask_patch = mask_patch_size // token_stride
        self.last_stride = last_stride
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # --- Prediction head: each last-stage feature -> its last_stride x last_stride pixels ---
        self.pixel_head = nn.Linear(num_features, last_stride**2 * in_chans)

    # --- Patches <-> images (mask patches) ---

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs: [N, C, H, W] -> [N, L, p*p*C] with p = mask_patch_size."""
        return patchify(imgs, self.mask_patch_size, self.in_chans)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """[N, L, p*p*C] -> imgs [N, C, H, W]."""
        return unpatchify(patches, self.mask_patch_size, self.in_chans, self.grid_size, self.grid_size)

    # --- Masking ---

    def random_masking(
        self, batch_size: int, mask_ratio: float, device: torch.device, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        """mask [N, L] (1 = masked): ceil(L * mask_ratio) mask patches per sample, as SimMIM counts them; those with
        the largest ``noise`` ([N, L], uniform random if None), so small noise is kept as in MAE."""
        _check_mask_ratio(mask_ratio)
        num_masked = math.ceil(self.num_patches * mask_ratio)
        if noise is None:
            noise = torch.rand(batch_size, self.num_patches, device=device)
        elif noise.shape != (batch_size, self.num_patches):
            raise ValueError(
                f"random_masking: noise must have shape {(batch_size, self.num_patches)}, got {tuple(noise.shape)}"
            )
        ranks = noise.argsort(dim=1).argsort(dim=1)
        return (ranks >= self.num_patches - num_masked).float()

    def upsample_mask(self, mask: torch.Tensor, cells_per_patch: int) -> torch.Tensor:
        """mask [N, L] -> [N, g*c, g*c, 1]: each mask patch's value repeated over its c x c cells (tokens, pixels)."""
        side = self.grid_size
        grid = mask.reshape(-1, side, side)
        return grid.repeat_interleave(cells_per_patch, 1).repeat_interleave(cells_per_patch, 2).unsqueeze(-1)

    def mask_tokens(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """tokens [N, h, w, D] of the patch embedding: the masked ones become the mask token."""
        masked = self.upsample_mask(mask, self.tokens_per_mask_patch).to(tokens.dtype)
        return tokens * (1 - masked) + self.mask_token * masked

    # --- Encoder, head, loss ---

    def forward_encoder(self, imgs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """imgs: [N, C, H, W], mask: [N, L] -> latent [N, h, w, D], the last stage over the full image."""
        raise NotImplementedError

    def forward_decoder(self, latent: torch.Tensor) -> torch.Tensor:
        """latent [N, h, w, D] -> pred [N, L, p*p*C]: a linear map to pixels, pixel-shuffled into the image and
        cut into mask patches."""
        x = self.pixel_head(latent).permute(0, 3, 1, 2)  # [N, s*s*C, h, w]
        x = F.pixel_shuffle(x, self.last_stride)[:, :, : self.img_size, : self.img_size]  # [N, C, H, W]
        return self.patchify(x)

    def patch_targets(self, imgs: torch.Tensor) -> torch.Tensor:
        return patch_targets(self.patchify(imgs), self.norm_pix_loss)

    def pred_to_pixels(self, pred: torch.Tensor, imgs: torch.Tensor) -> torch.Tensor:
        return pred_to_pixels(pred, self.patchify(imgs), self.norm_pix_loss)

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean absolute error over the masked pixels (and channels) only: SimMIM's sum(|x - x_rec| * mask) /
        (masked pixels * C); every mask patch has the same p*p*C values, so it is the mean per-patch L1 over
        masked patches."""
        loss_per_patch = (pred - self.patch_targets(imgs)).abs().mean(dim=-1)  # [N, L]
        return (loss_per_patch * mask).sum() / mask.sum()

    def forward(
        self, imgs: torch.Tensor, mask_ratio: float | None = None, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """imgs: [N, C, H, W] -> (loss, pred: [N, L, p*p*C], mask: [N, L] with 1 = masked)."""
        mask_ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        mask = self.random_masking(imgs.shape[0], mask_ratio, imgs.device, noise)
        pred = self.forward_decoder(self.forward_encoder(imgs, mask))
        return self.forward_loss(imgs, pred, mask), pred, mask


class SimMIMSwin(SimMIM):
    """SimMIM over timm's Swin (its weights under timm ``SwinTransformer``'s names)."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
        mask_patch_size: int = 32,
        mask_ratio: float = 0.6,
        norm_pix_loss: bool = False,
    ) -> None:
        depths, num_heads = list(depths), list(num_heads)
        last_stride = check_swin_sizes(img_size, patch_size, depths, num_heads, mask_patch_size)
        super().__init__(img_size, in_chans, mask_patch_size, mask_ratio, norm_pix_loss, embed_dim=embed_dim,
                         token_stride=patch_size, num_features=embed_dim * 2 ** (len(depths) - 1),
                         last_stride=last_stride)
        self.config = dict(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, depths=depths,
            num_heads=num_heads, window_size=window_size, mlp_ratio=mlp_ratio, drop_path_rate=drop_path_rate,
            mask_patch_size=mask_patch_size, mask_ratio=mask_ratio, norm_pix_loss=norm_pix_loss,
        )  # fmt: skip
        self.patch_size = patch_size

        # --- Encoder: timm's Swin over the whole image; masked tokens become the mask token ---
        self.patch_embed, self.layers, self.norm = swin_encoder(
            img_size, patch_size, in_chans, embed_dim, depths, num_heads, window_size, mlp_ratio, drop_path_rate
        )
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Swin's init (as SimMIM keeps it): trunc-normal 0.02 Linears with zero bias, LayerNorm 1/0, and the mask
        token; relative position tables stay trunc-normal 0.02."""
        trunc_normal_(self.mask_token, std=0.02)
        self.apply(init_swin_weights)

    def forward_encoder(self, imgs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """imgs: [N, C, H, W], mask: [N, L] -> latent [N, h, w, D], the last stage over the full image."""
        x = self.mask_tokens(self.patch_embed(imgs), mask)  # [N, H/p, W/p, D]; Swin's patches do not overlap
        x = self.layers(x)
        return self.norm(x)

    # --- Hooks used by the trainer, the optimizer and finetuning ---

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"mask_token"} | relative_position_tables(self)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.layers:
            stage.grad_checkpointing = enable

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The encoder under timm ``SwinTransformer``'s names; load into ``SwinTransformer(**self.timm_swin_kwargs(),
        num_classes=0)``."""
        return {k: v for k, v in self.state_dict().items() if k.startswith(SWIN_ENCODER_PREFIXES)}

    def timm_swin_kwargs(self) -> dict[str, Any]:
        return timm_swin_kwargs(self.config)


class SimMIMBackbone(SimMIM):
    """SimMIM over a backbone of pretrain/models/backbones (any timm model with ``forward_embed``,
    ``forward_stages``, ``patch_stride``, ``embed_dim``, ``feature_info``, ``output_fmt``), built by timm name;
    its weights are ``encoder.*``, loadable into ``timm.create_model(backbone, num_classes=0, **backbone_kwargs)``."""

    def __init__(
        self,
        backbone: str,
        img_size: int = 224,
        in_chans: int = 3,
        mask_patch_size: int = 32,
        mask_ratio: float = 0.6,
        norm_pix_loss: bool = False,
        drop_path_rate: float = 0.0,
        backbone_kwargs: dict[str, Any] | None = None,
    ) -> None:
        import timm

        backbone_kwargs = dict(backbone_kwargs or {})
        encoder = timm.create_model(backbone, pretrained=False, img_size=img_size, in_chans=in_chans, num_classes=0,
                                    drop_path_rate=drop_path_rate, **backbone_kwargs)
        token_stride, last_stride = int(encoder.patch_stride), int(encoder.feature_info[-1]["reduction"])
        if mask_patch_size % token_stride or img_size % mask_patch_size:
            raise ValueError(f"mask_patch_size {mask_patch_size} must be a multiple of {backbone}'s patch stride "
                             f"{token_stride} and divide img_size {img_size}")
        if img_size % encoder.size_multiple:
            raise ValueError(f"{backbone} takes sides that are multiples of {encoder.size_multiple}, not {img_size}")
        super().__init__(img_size, in_chans, mask_patch_size, mask_ratio, norm_pix_loss, embed_dim=encoder.embed_dim,
                         token_stride=token_stride, num_features=encoder.num_features, last_stride=last_stride)
        self.config = dict(
            backbone=backbone, img_size=img_size, in_chans=in_chans, mask_patch_size=mask_patch_size,
            mask_ratio=mask_ratio, norm_pix_loss=norm_pix_loss, drop_path_rate=drop_path_rate,
            backbone_kwargs=backbone_kwargs,
        )  # fmt: skip
        self.encoder = encoder  # keeps its own init (the official one); the mask token and head as SimMIM's
        trunc_normal_(self.mask_token, std=0.02)
        init_swin_weights(self.pixel_head)

    def forward_encoder(self, imgs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """imgs: [N, C, H, W], mask: [N, L] -> latent [N, h, w, D], the last stage over the full image."""
        visible = imgs * (1 - self.upsample_mask(mask, self.mask_patch_size).to(imgs.dtype).permute(0, 3, 1, 2))
        x = self.mask_tokens(self.encoder.forward_embed(visible), mask)  # [N, H/s, W/s, D]
        x = self.encoder.forward_stages(x)
        return x.permute(0, 2, 3, 1) if self.encoder.output_fmt == "NCHW" else x

    # --- Hooks used by the trainer, the optimizer and finetuning ---

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"mask_token"} | {f"encoder.{name}" for name in self.encoder.no_weight_decay()}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.encoder.set_grad_checkpointing(enable)

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The backbone's weights under its own (official) names."""
        prefix = "encoder."
        return {k[len(prefix):]: v for k, v in self.state_dict().items() if k.startswith(prefix)}

    def timm_spec(self) -> dict[str, Any]:
        """The spec (pretrain/encoders.py) of the timm model `encoder_state_dict()` loads into."""
        kwargs = dict(self.config["backbone_kwargs"])
        if self.in_chans != 3:
            kwargs["in_chans"] = self.in_chans
        return {"builder": "timm", "model_name": self.config["backbone"], "kwargs": kwargs}


def _check_mask_ratio(mask_ratio: float) -> None:
    if not 0.0 < mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
