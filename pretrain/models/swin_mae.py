"""UM-MAE: MAE pretraining for a Swin Transformer by uniform masking (Li et al. 2022, "Uniform Masking: Enabling
MAE Pre-training for Pyramid-based Vision Transformers with Locality").

Why MAE cannot simply drop tokens from Swin: Swin attends inside local windows of a full 2D token grid and merges
2x2 neighbours between stages; a random 25% of the tokens is no grid.

Uniform masking. The image is cut into *mask patches* (16x16 pixels by default: MAE's ViT-B/16 patch and UM-MAE's
"token size" 16). In every 2x2 block of mask patches exactly one, chosen at random, is kept, so 75% is masked by
construction and the kept patches, moved next to each other, form an image of half the height and width (the
*compact image*). The Swin encoder runs on it unchanged: at 224 px with 4 px Swin patches the full token grid is
56x56 and the encoder's is 28x28, a quarter of the tokens and about a quarter of a full-image forward
(`encoder_flops`, benchmarks/swin_mae_flops.py). A "patch" in ``pred``, ``mask``, ``num_patches``, ``patchify``
is a mask patch, as in MAE; one mask patch is (16 / 4)^2 Swin tokens.

Secondary masking. Uniform masking alone makes reconstruction too easy (every masked patch has a visible
neighbour). So a share of the kept patches (25%, UM-MAE's ``vis_mask_ratio``) is replaced inside the encoder by a
learned mask token (in patch-embedding space, passed through the embedding's LayerNorm as UM-MAE does). These
patches still count as visible in the returned ``mask`` and are not in the loss, exactly as in UM-MAE: the loss
covers the 75% that uniform masking removed; the secondary-masked 25% of the rest only make the encoder's job
harder. It is applied in training mode only, like dropout; an eval forward (validation, the reconstruction
picture) encodes every kept patch.

Decoder, as UM-MAE's. The encoder's last stage (stride 32 px over the compact image) is projected to r*r*D_dec
channels and pixel-shuffled by r = 32 / 16 = 2, giving one token per kept mask patch. A narrow ViT decoder (timm
``Block``s; 512-d, 2 blocks at the Swin-T/B sizes, UM-MAE's "dec512d2b") gets these tokens at their original
positions and a shared mask token at every masked position, with fixed 2D sin-cos position embeddings, and
predicts every mask patch's pixels. Loss: MSE against per-patch normalised pixels, on the masked 75% only.

Windows and the timm export. The encoder is timm's ``PatchEmbed`` + ``SwinTransformerStage``s + ``LayerNorm``,
named as in timm's ``SwinTransformer``, so ``encoder_state_dict()`` loads into
``timm.create_model("swin_tiny_patch4_window7_224", num_classes=0)`` (or ``SwinTransformer(**model.
timm_swin_kwargs(), num_classes=0)``) with no missing or unexpected key. At 224 px with window 7 the stages see
28/14/7/4 tokens a side (the full image: 56/28/14/7). Each stage uses the window timm uses, clipped to the grid
as timm clips it (shifted windows only where a grid holds more than one window). Only the last stage's 4x4 grid
is smaller than the full model's 7x7 window; it attends over all 4x4 tokens, and its relative position bias table
keeps the full model's 13x13 entries (offsets -6..6), of which the 4x4 window reads offsets -3..3. The table
loads unchanged and pretraining trains the entries the finetuned window uses most. ``relative_position_index`` and
``attn_mask`` are non-persistent buffers that each model computes for its own grid, so they never travel in a
state dict.

Where this differs from UM-MAE's code: UM-MAE pretrains at 256 px with window 8 (compact stages 32/16/8/4) and
replaces the relative position bias tables by a small MLP over the true pre-compaction coordinates. Keeping
timm's tables keeps the weights loadable into timm's Swin; inside the encoder positions are then those of the
compact grid: exact within a mask patch, off by at most one mask patch between patches. The decoder sees the true
positions. 224 px with window 7 makes the encoder the standard ``swin_*_patch4_window7_224``.

Sizes must fit: ``img_size`` divisible by 2 * ``mask_patch_size``, and ``mask_patch_size`` = ``patch_size`` * 2^k
dividing the last stage's stride ``patch_size`` * 2^(stages - 1).
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.layers import PatchEmbed, trunc_normal_
from timm.models.swin_transformer import SwinTransformer, SwinTransformerStage, WindowAttention
from timm.models.vision_transformer import Block

from .pixel_patches import init_linear_and_layernorm, patch_targets, patchify, pred_to_pixels, unpatchify
from .pos_embed import sincos_pos_embed_2d

UM_MASK_RATIO = 0.75  # one kept patch in every 2x2 block
SWIN_ENCODER_PREFIXES = ("patch_embed.", "layers.", "norm.")  # timm SwinTransformer's names, head excluded


class UniformMaskedAutoencoderSwin(nn.Module):
    """UM-MAE: Swin encoder on the compact image of uniformly kept patches, light ViT decoder over all patches."""

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
        mask_patch_size: int = 16,
        secondary_mask_ratio: float = 0.25,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 2,
        decoder_num_heads: int = 16,
        norm_pix_loss: bool = True,
        mask_ratio: float = UM_MASK_RATIO,
    ) -> None:
        super().__init__()
        depths, num_heads = list(depths), list(num_heads)
        # Recorded so a checkpoint can rebuild the model: UniformMaskedAutoencoderSwin(**model.config).
        self.config = dict(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, depths=depths,
            num_heads=num_heads, window_size=window_size, mlp_ratio=mlp_ratio, drop_path_rate=drop_path_rate,
            mask_patch_size=mask_patch_size, secondary_mask_ratio=secondary_mask_ratio,
            decoder_embed_dim=decoder_embed_dim, decoder_depth=decoder_depth, decoder_num_heads=decoder_num_heads,
            norm_pix_loss=norm_pix_loss, mask_ratio=mask_ratio,
        )  # fmt: skip
        check_um_mask_ratio(mask_ratio)
        if not 0.0 <= secondary_mask_ratio < 1.0:
            raise ValueError(f"secondary_mask_ratio must be in [0, 1), got {secondary_mask_ratio}")
        last_stride = check_swin_sizes(img_size, patch_size, depths, num_heads, mask_patch_size)
        if img_size % (2 * mask_patch_size):
            raise ValueError(
                f"img_size {img_size} must be divisible by 2 x mask_patch_size ({2 * mask_patch_size}): uniform "
                f"masking keeps one patch of every 2x2 block of {mask_patch_size}-px patches"
            )
        self.img_size = img_size
        self.patch_size = patch_size  # Swin's token patch
        self.mask_patch_size = mask_patch_size  # the unit that is masked, predicted and scored
        self.in_chans = in_chans
        self.norm_pix_loss = norm_pix_loss
        self.mask_ratio = mask_ratio
        self.secondary_mask_ratio = secondary_mask_ratio
        self.grad_checkpointing = False
        self.grid_size = img_size // mask_patch_size  # mask patches a side: 14 at 224 / 16
        self.visible_grid_size = self.grid_size // 2  # the compact image, in mask patches: 7
        self.num_patches = self.grid_size**2
        self.tokens_per_mask_patch = mask_patch_size // patch_size  # a side: 4

        # --- Encoder: timm's Swin on the compact image (img_size / 2) ---
        encoder_grid = img_size // 2 // patch_size
        self.patch_embed, self.layers, self.norm = swin_encoder(
            img_size // 2, patch_size, in_chans, embed_dim, depths, num_heads, window_size, mlp_ratio,
            drop_path_rate,
            # Relative position tables sized as in the Swin that will load the weights: the one on the full image.
            table_windows=stage_window_sizes(img_size // patch_size, window_size, len(depths)),
        )
        self.encoder_grid_size = encoder_grid
        # Only where used: a parameter that never gets a gradient stops DistributedDataParallel.
        self.secondary_mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if secondary_mask_ratio > 0 else None

        # --- Decoder: one token per kept mask patch, mask tokens elsewhere, a narrow ViT over all patches ---
        self.decoder_upscale = last_stride // mask_patch_size  # r: 2 for a 32-px last stage and 16-px patches
        encoder_dim = self.norm.normalized_shape[0]
        self.decoder_embed = nn.Linear(encoder_dim, self.decoder_upscale**2 * decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, decoder_embed_dim), requires_grad=False)
        decoder_norm = partial(nn.LayerNorm, eps=1e-6)
        self.decoder_blocks = nn.ModuleList(
            [
                Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=decoder_norm)
                for _ in range(decoder_depth)
            ]
        )
        self.decoder_norm = decoder_norm(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, mask_patch_size**2 * in_chans, bias=True)

        self.initialize_weights()

    def initialize_weights(self) -> None:
        """UM-MAE's (= MAE's) init: xavier-uniform Linears (the patch projection treated as a Linear), LayerNorm
        1/0, N(0, 0.02) tokens, fixed sin-cos decoder positions; relative position tables stay trunc-normal 0.02."""
        self.decoder_pos_embed.data.copy_(sincos_pos_embed_2d(self.decoder_pos_embed.shape[-1], self.grid_size)[None])
        patch_proj = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(patch_proj.view(patch_proj.shape[0], -1))
        if self.secondary_mask_token is not None:
            nn.init.normal_(self.secondary_mask_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(init_linear_and_layernorm)

    # --- Patches <-> images (mask patches) ---

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs: [N, C, H, W] -> [N, L, p*p*C] with p = mask_patch_size, pixels in (row, column, channel) order."""
        return patchify(imgs, self.mask_patch_size, self.in_chans)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """[N, L, p*p*C] on the full mask-patch grid -> imgs [N, C, H, W]; the inverse of ``patchify``."""
        return unpatchify(patches, self.mask_patch_size, self.in_chans, self.grid_size, self.grid_size)

    # --- Masking ---

    def uniform_masking(
        self, batch_size: int, device: torch.device, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep one mask patch in every 2x2 block: the one with the smallest noise (random if ``noise`` is None).

        noise: [N, L] per mask patch in raster order (the shape MAE's random_masking takes), or None.
        Returns ids_keep: [N, L/4], the kept patches' indices in the raster order of their blocks, so that
                  ``ids_keep`` laid out on a (grid/2 x grid/2) grid is the compact image;
                mask: [N, L], 1 = masked (removed), 0 = kept; exactly one 0 per 2x2 block.
        """
        side, half = self.grid_size, self.visible_grid_size
        if noise is None:
            noise = torch.rand(batch_size, self.num_patches, device=device)
        elif noise.shape != (batch_size, self.num_patches):
            raise ValueError(
                f"uniform_masking: noise must have shape {(batch_size, self.num_patches)} (one value per mask "
                f"patch), got {tuple(noise.shape)}"
            )
        blocks = noise.reshape(batch_size, half, 2, half, 2).permute(0, 1, 3, 2, 4).reshape(batch_size, half, half, 4)
        choice = blocks.argmin(dim=-1)  # [N, half, half]: which of the block's 4 patches is kept
        block_rows = torch.arange(half, device=noise.device).view(1, half, 1)
        block_cols = torch.arange(half, device=noise.device).view(1, 1, half)
        rows = 2 * block_rows + torch.div(choice, 2, rounding_mode="floor")
        cols = 2 * block_cols + choice % 2
        ids_keep = (rows * side + cols).reshape(batch_size, half * half)

        mask = torch.ones(batch_size, self.num_patches, device=noise.device)
        mask.scatter_(1, ids_keep, 0.0)
        return ids_keep, mask

    def secondary_masking(self, batch_size: int, device: torch.device) -> torch.Tensor:
        """Which kept patches the encoder sees as the mask token: [N, L/4] (compact order), 1 = replaced, with
        round(secondary_mask_ratio * L/4) ones per sample at random positions."""
        num_visible = self.visible_grid_size**2
        num_replaced = round(self.secondary_mask_ratio * num_visible)
        ranks = torch.rand(batch_size, num_visible, device=device).argsort(dim=1).argsort(dim=1)
        return (ranks < num_replaced).float()

    # --- Encoder, decoder, loss ---

    def forward_encoder(
        self, imgs: torch.Tensor, mask_ratio: float = UM_MASK_RATIO, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """imgs: [N, C, H, W] -> latent: [N, h, w, D] (the last stage over the compact image), mask: [N, L],
        ids_keep: [N, L/4], secondary: [N, L/4] (1 = replaced by the mask token; all 0 in eval mode)."""
        check_um_mask_ratio(mask_ratio)
        n = imgs.shape[0]
        ids_keep, mask = self.uniform_masking(n, imgs.device, noise)

        # The kept patches side by side: an image of half the height and width (patch embedding is per patch,
        # so embedding the compact image equals compacting the embedded tokens, at a quarter of the cost).
        patches = self.patchify(imgs)
        kept = torch.gather(patches, 1, ids_keep.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
        compact = unpatchify(kept, self.mask_patch_size, self.in_chans, self.visible_grid_size, self.visible_grid_size)
        x = self.patch_embed(compact)  # [N, H/2p, W/2p, D]

        secondary = torch.zeros(n, self.visible_grid_size**2, device=imgs.device, dtype=x.dtype)
        if self.training and self.secondary_mask_ratio > 0:
            secondary = self.secondary_masking(n, imgs.device).to(x.dtype)
            replaced = self._mask_patches_to_tokens(secondary)  # [N, H/2p, W/2p, 1]
            mask_token = self.patch_embed.norm(self.secondary_mask_token)
            x = x * (1 - replaced) + mask_token * replaced

        x = self.layers(x)
        return self.norm(x), mask, ids_keep, secondary

    def forward_decoder(self, latent: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """latent: [N, h, w, D], ids_keep: [N, L/4] -> pred: [N, L, p*p*C] pixels of every mask patch."""
        x = self.decoder_embed(latent).permute(0, 3, 1, 2)  # [N, r*r*D_dec, h, w]
        x = F.pixel_shuffle(x, self.decoder_upscale)  # [N, D_dec, r*h, r*w]: one token per compact mask patch
        half = self.visible_grid_size
        x = x[:, :, :half, :half].flatten(2).transpose(1, 2)  # drop the padding of odd stage grids; [N, L/4, D_dec]

        n, dim = x.shape[0], x.shape[-1]
        mask_tokens = self.mask_token.to(x.dtype).expand(n, self.num_patches, -1)  # x is bf16 under autocast
        x = torch.scatter(mask_tokens, 1, ids_keep.unsqueeze(-1).expand(-1, -1, dim), x)  # kept patches in place

        x = x + self.decoder_pos_embed
        for block in self.decoder_blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.decoder_pred(self.decoder_norm(x))

    def patch_targets(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs -> targets [N, L, p*p*C]: mask-patch pixels, normalised per patch when ``norm_pix_loss``."""
        return patch_targets(self.patchify(imgs), self.norm_pix_loss)

    def pred_to_pixels(self, pred: torch.Tensor, imgs: torch.Tensor) -> torch.Tensor:
        """Undo the per-patch target normalisation for display: pred [N, L, p*p*C] -> pixel patches."""
        return pred_to_pixels(pred, self.patchify(imgs), self.norm_pix_loss)

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per-patch mean squared error averaged over the uniformly masked patches only (mask == 1); kept and
        secondary-masked patches do not count."""
        loss_per_patch = ((pred - self.patch_targets(imgs)) ** 2).mean(dim=-1)  # [N, L]
        return (loss_per_patch * mask).sum() / mask.sum()

    def forward(
        self, imgs: torch.Tensor, mask_ratio: float | None = None, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """imgs: [N, C, H, W] -> (loss, pred: [N, L, p*p*C], mask: [N, L] with 1 = masked). ``mask_ratio`` must be
        0.75 (or None); ``noise`` [N, L] fixes the kept patch of each 2x2 block (its smallest value)."""
        mask_ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        latent, mask, ids_keep, _ = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_keep)
        return self.forward_loss(imgs, pred, mask), pred, mask

    def _mask_patches_to_tokens(self, per_patch: torch.Tensor) -> torch.Tensor:
        """[N, L/4] per compact mask patch -> [N, H/2p, W/2p, 1] per Swin token."""
        t, half = self.tokens_per_mask_patch, self.visible_grid_size
        grid = per_patch.reshape(-1, half, half)
        return grid.repeat_interleave(t, dim=1).repeat_interleave(t, dim=2).unsqueeze(-1)

    # --- Hooks used by the trainer, the optimizer and finetuning ---

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Tokens, the fixed position embedding and (as in timm's Swin) the relative position bias tables."""
        return {"mask_token", "secondary_mask_token", "decoder_pos_embed"} | relative_position_tables(self)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for stage in self.layers:
            stage.grad_checkpointing = enable

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The encoder's weights under timm ``SwinTransformer``'s names (patch_embed.*, layers.*, norm.*); load into
        ``SwinTransformer(**self.timm_swin_kwargs(), num_classes=0)`` or the matching ``swin_*_window7_224``."""
        return {k: v for k, v in self.state_dict().items() if k.startswith(SWIN_ENCODER_PREFIXES)}

    def timm_swin_kwargs(self) -> dict[str, Any]:
        """kwargs for ``timm.models.swin_transformer.SwinTransformer`` on the full image, matching this encoder."""
        return timm_swin_kwargs(self.config)


# ----------------------------------------------------------------------------------------------------------------
# Pieces shared with SimMIM (pretrain/models/simmim.py)
# ----------------------------------------------------------------------------------------------------------------


def check_um_mask_ratio(mask_ratio: float) -> None:
    if mask_ratio != UM_MASK_RATIO:
        raise ValueError(
            f"mask_ratio must be 0.75 for UM-MAE (uniform masking keeps 1 patch of every 2x2 block), got {mask_ratio}"
        )


def check_swin_sizes(
    img_size: int, patch_size: int, depths: Sequence[int], num_heads: Sequence[int], mask_patch_size: int
) -> int:
    """Raise ValueError for sizes that do not fit; return the last stage's stride in pixels."""
    if len(depths) != len(num_heads):
        raise ValueError(f"depths {list(depths)} and num_heads {list(num_heads)} must have one entry per stage")
    last_stride = patch_size * 2 ** (len(depths) - 1)
    if img_size % mask_patch_size:
        raise ValueError(f"img_size {img_size} is not divisible by mask_patch_size {mask_patch_size}")
    if mask_patch_size % patch_size or last_stride % mask_patch_size:
        raise ValueError(
            f"mask_patch_size {mask_patch_size} must be a multiple of patch_size {patch_size} that divides the last "
            f"stage's stride {last_stride}"
        )
    return last_stride


def stage_window_sizes(grid: int, window_size: int, num_stages: int) -> list[int]:
    """The window timm's Swin uses in each stage on a ``grid`` x ``grid`` token grid: ``window_size``, clipped to
    the stage's grid (grids halve, rounding up, from stage 1 on)."""
    sizes, side = [], grid
    for stage in range(num_stages):
        if stage > 0:
            side = (side + 1) // 2
        sizes.append(min(window_size, side))
    return sizes


def swin_encoder(
    img_size: int,
    patch_size: int,
    in_chans: int,
    embed_dim: int,
    depths: Sequence[int],
    num_heads: Sequence[int],
    window_size: int,
    mlp_ratio: float,
    drop_path_rate: float,
    table_windows: Sequence[int] | None = None,
) -> tuple[PatchEmbed, nn.Sequential, nn.LayerNorm]:
    """(patch_embed, layers, norm) of a timm Swin for ``img_size`` inputs, built as ``SwinTransformer`` builds them
    (stage 0 without patch merging, channels doubling per stage), so their weights share timm's names.

    table_windows: per stage, the window whose relative position bias table the stage keeps: where a stage's grid
    is smaller than that window (UM-MAE's compact image), attention covers the whole grid and reads the middle of
    the larger table, so the weights load into a Swin on larger images. Default: the stage's own window.
    """
    patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, norm_layer=nn.LayerNorm, output_fmt="NHWC")
    dims = [embed_dim * 2**i for i in range(len(depths))]
    # Stochastic depth rising linearly over all blocks, split by stage, as timm's Swin does.
    rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu")  # numbers, even under torch.device("meta")
    drop_path = [stage_rates.tolist() for stage_rates in rates.split(list(depths))]
    stages, side = [], img_size // patch_size
    for i, (depth, heads) in enumerate(zip(depths, num_heads)):
        stage = SwinTransformerStage(
            dim=dims[max(i - 1, 0)], out_dim=dims[i], input_resolution=(side, side), depth=depth, downsample=i > 0,
            num_heads=heads, window_size=window_size, mlp_ratio=mlp_ratio, qkv_bias=True, drop_path=drop_path[i],
            norm_layer=nn.LayerNorm,
        )  # fmt: skip
        if table_windows is not None:
            for block in stage.blocks:
                if block.attn.window_size != (table_windows[i], table_windows[i]):
                    widen_bias_table(block.attn, table_windows[i])
        stages.append(stage)
        side = stage.output_resolution[0]
    return patch_embed, nn.Sequential(*stages), nn.LayerNorm(dims[-1])


def widen_bias_table(attn: WindowAttention, table_window: int) -> None:
    """Give ``attn`` the relative position bias table of a ``table_window`` window ((2w-1)^2 offsets) and make its
    own, smaller window read the entries of its offsets there. (Only the index, a non-persistent buffer, differs
    from timm's; a later call to timm's ``init_non_persistent_buffers`` would reset it.)"""
    win_h, win_w = attn.window_size
    if win_h > table_window or win_w > table_window:
        raise ValueError(f"window {attn.window_size} does not fit a bias table for window {table_window}")
    table = torch.empty((2 * table_window - 1) ** 2, attn.num_heads)
    attn.relative_position_bias_table = nn.Parameter(trunc_normal_(table, std=0.02))
    rows, cols = torch.meshgrid(torch.arange(win_h), torch.arange(win_w), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()
    d_row = rows[:, None] - rows[None, :] + table_window - 1  # offsets shifted to start at 0 in the larger table
    d_col = cols[:, None] - cols[None, :] + table_window - 1
    attn.register_buffer("relative_position_index", d_row * (2 * table_window - 1) + d_col, persistent=False)


def timm_swin_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    return dict(
        img_size=config["img_size"], patch_size=config["patch_size"], in_chans=config["in_chans"],
        embed_dim=config["embed_dim"], depths=tuple(config["depths"]), num_heads=tuple(config["num_heads"]),
        window_size=config["window_size"], mlp_ratio=config["mlp_ratio"], qkv_bias=True,
    )  # fmt: skip


def relative_position_tables(model: nn.Module) -> set[str]:
    return {name for name, _ in model.named_parameters() if name.endswith("relative_position_bias_table")}


def init_swin_weights(module: nn.Module) -> None:
    """Swin's init: trunc-normal 0.02 Linears with zero bias, LayerNorm 1 / 0 (other modules keep their own)."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


# ----------------------------------------------------------------------------------------------------------------
# FLOPs
# ----------------------------------------------------------------------------------------------------------------


@contextmanager
def unfused_attention(model: nn.Module) -> Iterator[None]:
    """Attention as explicit matmuls while inside: FlopCounterMode counts those, but not the fused CPU SDPA kernel."""
    fused = {m: m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")}
    for module in fused:
        module.fused_attn = False
    try:
        yield
    finally:
        for module, value in fused.items():
            module.fused_attn = value


@torch.no_grad()
def count_flops(model: nn.Module, fn: Callable[[], Any]) -> int:
    """FLOPs of ``fn()`` (which runs ``model``), counted by torch.utils.flop_counter.FlopCounterMode: a
    multiply-add counts 2 (Swin's paper counts it once: its "4.5G" for Swin-T is 9.0 GFLOPs here)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with unfused_attention(model), counter:
        fn()
    return counter.get_total_flops()


def encoder_flops(model: UniformMaskedAutoencoderSwin, batch_size: int = 1) -> dict[str, int]:
    """FLOPs of ``batch_size`` images at the model's size through
    - "ummae_encoder": UM-MAE's encoder on the compact image (patch embedding included, eval mode);
    - "full_grid_encoder": the same Swin encoder with the same weights on the whole image (timm ``SwinTransformer.
      forward_features``): what SimMIM's encoder or a finetuning forward costs;
    - "ummae_decoder": UM-MAE's decoder over all mask patches.
    """
    was_training = model.training
    model.eval()
    try:
        device = model.mask_token.device  # "meta" counts without computing: build the model under torch.device("meta")
        imgs = torch.randn(batch_size, model.in_chans, model.img_size, model.img_size, device=device)
        with torch.no_grad():
            latent, _, ids_keep, _ = model.forward_encoder(imgs)
        with torch.device(device):
            full = SwinTransformer(**model.timm_swin_kwargs(), num_classes=0).eval()
        full.load_state_dict(model.encoder_state_dict())
        return {
            "ummae_encoder": count_flops(model, lambda: model.forward_encoder(imgs)),
            "full_grid_encoder": count_flops(full, lambda: full.forward_features(imgs)),
            "ummae_decoder": count_flops(model, lambda: model.forward_decoder(latent, ids_keep)),
        }
    finally:
        model.train(was_training)


__all__ = ["UniformMaskedAutoencoderSwin", "count_flops", "encoder_flops"]
