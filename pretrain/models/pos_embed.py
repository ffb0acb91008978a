"""Fixed 2D sine-cosine position embeddings, as in MAE (He et al. 2021) and MoCo v3."""

from __future__ import annotations

import torch


def sincos_pos_embed_1d(embed_dim: int, positions: torch.Tensor) -> torch.Tensor:
    """Transformer sin-cos embedding of scalar positions.

    positions: [M] -> returns [M, embed_dim], the first half sin(pos * omega), the second half cos(pos * omega),
    with omega_d = 1 / 10000^(d / (embed_dim / 2)) for d = 0 .. embed_dim/2 - 1.
    """
    if embed_dim % 2 != 0:
        raise ValueError(f"1D sin-cos embedding needs an even dimension, got {embed_dim}")
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega  # [D/2]
    angles = positions.to(torch.float64).reshape(-1, 1) * omega.reshape(1, -1)  # [M, D/2] outer product
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_pos_embed_2d(embed_dim: int, grid_size: int | tuple[int, int], cls_token: bool = False) -> torch.Tensor:
    """2D sin-cos position embedding of a patch grid, computed exactly as the official MAE code does.

    The first half of the channels embeds the column (w) index, the second half the row (h) index, each with
    ``sincos_pos_embed_1d(embed_dim // 2, ...)``; patches are in row-major order (the order of
    ``PatchEmbed``'s flattened output). (MAE builds ``np.meshgrid(grid_w, grid_h)``, so its "emb_h" half is in
    fact the w coordinate; keeping that order keeps released checkpoints interchangeable.)

    Returns float32 [grid_h * grid_w, embed_dim], or [1 + grid_h * grid_w, embed_dim] with a leading zero row
    for the cls token when ``cls_token`` is true.
    """
    if embed_dim % 4 != 0:
        raise ValueError(f"2D sin-cos embedding needs a dimension divisible by 4, got {embed_dim}")
    grid_h, grid_w = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    rows, cols = torch.meshgrid(
        torch.arange(grid_h, dtype=torch.float64), torch.arange(grid_w, dtype=torch.float64), indexing="ij"
    )  # each [grid_h, grid_w]
    embed = torch.cat(
        [sincos_pos_embed_1d(embed_dim // 2, cols.reshape(-1)), sincos_pos_embed_1d(embed_dim // 2, rows.reshape(-1))],
        dim=1,
    )  # [grid_h * grid_w, D]
    if cls_token:
        embed = torch.cat([torch.zeros(1, embed_dim, dtype=embed.dtype), embed], dim=0)
    return embed.float()
