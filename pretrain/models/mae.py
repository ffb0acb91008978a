"""Masked Autoencoder with a Vision Transformer backbone (He et al. 2021, "Masked Autoencoders Are Scalable
Vision Learners").

An image is cut into patches; a random 75% of them is dropped. The encoder (a plain ViT) sees only the visible
patches. A light decoder gets the encoded visible patches plus a shared, learned mask token at every dropped
position, and predicts the pixels of every patch. The loss is the mean squared error on the dropped patches only,
against per-patch normalised pixels (``norm_pix_loss``).

``encoder_mask_tokens=True`` is the paper's ablation (Table 1c, "encoder w/ [M]"): the encoder runs over the full
grid with a learned mask token in place of every dropped patch, and the decoder needs no unshuffling. The encoder
then sees 4x the tokens (a training step: 2.4x the FLOPs for ViT-B, 3.2x for ViT-L) for worse features; it exists
to measure what skipping the mask tokens saves (benchmarks/mae_speed.py).

Parameter names and shapes match the official release (facebookresearch/mae ``models_mae.py``), and the encoder
weights load into timm's ``VisionTransformer`` (see ``encoder_state_dict`` and ``timm_vit_kwargs``).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.utils.checkpoint
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block

from ..checkpoint import read_weights, state_dict_mismatch
from .pixel_patches import init_linear_and_layernorm, patch_targets, patchify, pred_to_pixels, unpatchify
from .pos_embed import sincos_pos_embed_2d

_ENCODER_PREFIXES = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.")


class MaskedAutoencoderViT(nn.Module):
    """MAE: ViT encoder on the visible patches, small ViT decoder that reconstructs every patch."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_pix_loss: bool = True,
        mask_ratio: float = 0.75,
        encoder_mask_tokens: bool = False,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        # Recorded so a checkpoint can rebuild the model: MaskedAutoencoderViT(**model.config).
        self.config = dict(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, depth=depth,
            num_heads=num_heads, decoder_embed_dim=decoder_embed_dim, decoder_depth=decoder_depth,
            decoder_num_heads=decoder_num_heads, mlp_ratio=mlp_ratio, norm_pix_loss=norm_pix_loss,
            mask_ratio=mask_ratio, encoder_mask_tokens=encoder_mask_tokens, norm_eps=norm_eps,
        )  # fmt: skip
        _check_mask_ratio(mask_ratio)
        if img_size % patch_size:  # patchify cuts images into whole patches only
            raise ValueError(f"img_size {img_size} is not divisible by patch_size {patch_size}")
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.norm_pix_loss = norm_pix_loss
        self.mask_ratio = mask_ratio
        self.encoder_mask_tokens = encoder_mask_tokens
        self.grad_checkpointing = False
        # MAE's LayerNorm epsilon; Hugging Face's ViTMAE ports keep their library's 1e-12 (finetune/hf_vit_mae.py)
        norm_layer = partial(nn.LayerNorm, eps=norm_eps)

        # --- Encoder: a standard ViT, run on the visible patches only ---
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # Fixed sin-cos embedding; row 0 (all zeros) belongs to the cls token.
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList(
            [Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer) for _ in range(depth)]
        )
        self.norm = norm_layer(embed_dim)
        if encoder_mask_tokens:  # the ablation only: the default model has no such parameter, as in the release
            self.encoder_mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))

        # --- Decoder: narrower ViT over all positions, used only for pretraining ---
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(
            torch.zeros(1, self.num_patches + 1, decoder_embed_dim), requires_grad=False
        )
        self.decoder_blocks = nn.ModuleList(
            [
                Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
                for _ in range(decoder_depth)
            ]
        )
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans, bias=True)  # pixels per patch

        self.initialize_weights()

    def initialize_weights(self) -> None:
        """MAE init: fixed sin-cos position embeddings, xavier-uniform Linears (the patch projection treated as a
        Linear), N(0, 0.02) for the cls and mask tokens, LayerNorm weight 1 and bias 0."""
        grid_size = self.patch_embed.grid_size
        self.pos_embed.data.copy_(sincos_pos_embed_2d(self.pos_embed.shape[-1], grid_size, cls_token=True)[None])
        self.decoder_pos_embed.data.copy_(
            sincos_pos_embed_2d(self.decoder_pos_embed.shape[-1], grid_size, cls_token=True)[None]
        )
        patch_proj = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(patch_proj.view(patch_proj.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        if self.encoder_mask_tokens:
            nn.init.normal_(self.encoder_mask_token, std=0.02)
        self.apply(init_linear_and_layernorm)

    # --- Patches <-> images ---

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs: [N, C, H, W] -> patches: [N, L, p*p*C], pixels ordered (row, column, channel) within a patch
        as in MAE, so that ``decoder_pred`` weights from the official release mean the same thing."""
        return patchify(imgs, self.patch_size, self.in_chans)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """patches: [N, L, p*p*C] -> imgs: [N, C, H, W], the inverse of ``patchify`` on the model's patch grid."""
        return unpatchify(patches, self.patch_size, self.in_chans, *self.patch_embed.grid_size)

    # --- Masking ---

    def random_masking(
        self, x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keep a random subset of round(L * (1 - mask_ratio)) patches per sample.

        Each sample's patches are shuffled by sorting per-patch noise (ascending: small noise is kept); passing
        the same ``noise`` gives the same mask.

        x: [N, L, D]; noise: [N, L] or None (uniform random).
        Returns x_masked: [N, L_keep, D] (kept patches, in shuffled order),
                mask: [N, L] in the original patch order, 1 = masked (removed), 0 = kept,
                ids_restore: [N, L], the permutation that undoes the shuffle.
        """
        _check_mask_ratio(mask_ratio)
        n, length, dim = x.shape
        len_keep = round(length * (1 - mask_ratio))
        if noise is None:
            noise = torch.rand(n, length, device=x.device)
        elif noise.shape != (n, length):
            raise ValueError(f"random_masking: noise must have shape {(n, length)}, got {tuple(noise.shape)}")

        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).expand(-1, -1, dim))

        mask = torch.ones(n, length, device=x.device, dtype=x.dtype)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, dim=1, index=ids_restore)  # back to the original patch order
        return x_masked, mask, ids_restore

    # --- Encoder, decoder, loss ---

    def forward_encoder(
        self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """imgs: [N, C, H, W] -> latent: [N, 1 + L_keep, D] (cls token first; [N, 1 + L, D] with
        ``encoder_mask_tokens``), mask: [N, L], ids_restore: [N, L]."""
        x = self.patch_embed(imgs)  # [N, L, D]
        if self.encoder_mask_tokens:  # ablation: every position stays, a dropped patch becomes the mask token
            _, mask, ids_restore = self.random_masking(x, mask_ratio, noise)
            x = torch.where(mask.unsqueeze(-1).bool(), self.encoder_mask_token.to(x.dtype), x)
            x = x + self.pos_embed[:, 1:, :]
        else:
            x = x + self.pos_embed[:, 1:, :]  # position is added before masking, so kept patches keep their place
            x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)

        cls_token = self.cls_token + self.pos_embed[:, :1, :]
        x = torch.cat([cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self._run_blocks(self.blocks, x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent: [N, 1 + L_keep, D] ([N, 1 + L, D] with ``encoder_mask_tokens``), ids_restore: [N, L]
        -> pred: [N, L, p*p*C] pixels of every patch."""
        x = self.decoder_embed(latent)  # [N, 1 + L_keep, D_dec]
        if not self.encoder_mask_tokens:  # (with them, the latent is already the full grid in patch order)
            n, length = ids_restore.shape
            mask_tokens = self.mask_token.expand(n, length + 1 - x.shape[1], -1)
            x_patches = torch.cat([x[:, 1:, :], mask_tokens], dim=1)  # shuffled order, cls token left out
            x_patches = torch.gather(x_patches, dim=1, index=ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
            x = torch.cat([x[:, :1, :], x_patches], dim=1)  # [N, 1 + L, D_dec], original patch order
        x = x + self.decoder_pos_embed

        x = self._run_blocks(self.decoder_blocks, x)
        x = self.decoder_pred(self.decoder_norm(x))
        return x[:, 1:, :]  # drop the cls token

    def patch_targets(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs: [N, C, H, W] -> reconstruction targets [N, L, p*p*C]: the patch pixels, normalised per patch to
        zero mean and unit variance when ``norm_pix_loss`` (MAE's better-representation variant)."""
        return patch_targets(self.patchify(imgs), self.norm_pix_loss)

    def pred_to_pixels(self, pred: torch.Tensor, imgs: torch.Tensor) -> torch.Tensor:
        """Undo the per-patch target normalisation for display: pred [N, L, p*p*C] -> pixel patches [N, L, p*p*C],
        pred * sqrt(var + eps) + mean with the statistics of each target patch of ``imgs``."""
        return pred_to_pixels(pred, self.patchify(imgs), self.norm_pix_loss)

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """imgs: [N, C, H, W], pred: [N, L, p*p*C], mask: [N, L] (1 = masked) -> scalar loss: the per-patch mean
        squared error, averaged over masked patches only (visible patches do not count)."""
        target = self.patch_targets(imgs)
        loss_per_patch = ((pred - target) ** 2).mean(dim=-1)  # [N, L]
        return (loss_per_patch * mask).sum() / mask.sum()

    def forward(
        self, imgs: torch.Tensor, mask_ratio: float | None = None, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """imgs: [N, C, H, W] -> (loss: scalar, pred: [N, L, p*p*C], mask: [N, L] with 1 = masked)."""
        mask_ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        loss = self.forward_loss(imgs, pred, mask)
        return loss, pred, mask

    def _run_blocks(self, blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        for block in blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                # Recompute activations in backward instead of storing them: less memory, ~1/3 more compute.
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x

    # --- Hooks used by the trainer, the optimizer and finetuning ---

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameters to exclude from weight decay (tokens and position embeddings)."""
        tokens = {"cls_token", "pos_embed", "mask_token", "decoder_pos_embed"}
        return tokens | {"encoder_mask_token"} if self.encoder_mask_tokens else tokens

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The encoder's weights with the keys timm's ``VisionTransformer`` uses (cls_token, pos_embed,
        patch_embed.*, blocks.*, norm.*); load into ``VisionTransformer(**self.timm_vit_kwargs(), num_classes=0)``."""
        return {k: v for k, v in self.state_dict().items() if k.startswith(_ENCODER_PREFIXES)}

    def timm_vit_kwargs(self) -> dict[str, Any]:
        """kwargs for ``timm.models.vision_transformer.VisionTransformer`` matching this encoder (cls-token
        pooling keeps ``norm`` a real layer, so ``encoder_state_dict()`` loads with nothing missing)."""
        cfg = self.config
        return dict(
            img_size=cfg["img_size"], patch_size=cfg["patch_size"], in_chans=cfg["in_chans"],
            embed_dim=cfg["embed_dim"], depth=cfg["depth"], num_heads=cfg["num_heads"], mlp_ratio=cfg["mlp_ratio"],
            qkv_bias=True, class_token=True, global_pool="token", norm_layer=partial(nn.LayerNorm, eps=cfg["norm_eps"]),
        )  # fmt: skip


def _check_mask_ratio(mask_ratio: float) -> None:
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")


def load_official_mae_checkpoint(
    model: MaskedAutoencoderViT, path_or_state_dict: str | Path | Mapping[str, torch.Tensor]
) -> dict[str, Any]:
    """Load weights in the facebookresearch/mae layout into ``model``.

    Accepts ``{"model": state_dict}`` or a bare state dict, given directly or as a ``.pth`` (read with
    ``weights_only=True``) or ``.safetensors`` file. A file with encoder keys only (the released
    ``mae_pretrain_vit_*.pth`` have no decoder) loads the encoder strictly and leaves the decoder as initialised.
    Any missing, unexpected or wrong-shape key raises ``ValueError`` naming the keys and the source.

    Returns {"loaded": number of tensors loaded, "decoder_loaded": bool, "not_loaded": [keys left as they were]}.
    """
    source = str(path_or_state_dict) if isinstance(path_or_state_dict, (str, Path)) else "<state dict>"
    state_dict = _read_state_dict(path_or_state_dict)

    expected = model.state_dict()
    encoder_keys = [k for k in expected if k.startswith(_ENCODER_PREFIXES)]
    has_decoder = any(k not in encoder_keys for k in state_dict if k in expected)
    required = list(expected) if has_decoder else encoder_keys

    problems = state_dict_mismatch({k: expected[k] for k in required}, state_dict)
    if problems is not None:
        raise ValueError(f"MAE checkpoint {source} does not fit the model; {problems}")

    model.load_state_dict({k: state_dict[k] for k in required}, strict=False)
    return {
        "loaded": len(required),
        "decoder_loaded": has_decoder,
        "not_loaded": [k for k in expected if k not in required],
    }


def _read_state_dict(path_or_state_dict: str | Path | Mapping[str, Any]) -> Mapping[str, torch.Tensor]:
    if isinstance(path_or_state_dict, (str, Path)):
        return read_weights(path_or_state_dict)[0]  # never runs code; takes off the {"model": ...} wrapper
    checkpoint = path_or_state_dict
    if "model" in checkpoint and isinstance(checkpoint["model"], Mapping):
        checkpoint = checkpoint["model"]  # the official training checkpoints wrap the weights
    return checkpoint
