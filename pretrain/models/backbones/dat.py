"""DAT v1: Vision Transformer with Deformable Attention (Xia et al., CVPR 2022), as a timm model.

A four-stage pyramid (stride 4, 8, 16, 32) built like Swin, whose blocks attend in one of three ways, per the
stage's ``stage_spec`` letter:

    L  local attention inside non-overlapping windows, with a relative position bias table (Swin's);
    S  the same in windows shifted by ceil(window / 2) (a shift of 4 for window 7, not Swin's 3), masked;
    D  deformable attention: a small offset network looks at the queries and moves a grid of reference points;
       keys and values are sampled there (bilinear, ``grid_sample``) and every query attends to all of them,
       with a relative position bias read off a continuous table at each query/key displacement.

The published sizes pair them as L,S in the two first stages and L,D in the two last ones.

Names, parameters and buffers (``relative_position_index``, ``attn_mask``, both persistent) are the official
v1 code's (github.com/LeapLabTHU/DAT, tag CVPR2022: models/dat.py, models/dat_blocks.py), so a released
``{"model": state_dict}`` loads strictly; its numerics are followed step for step (logits within 1e-5 of the
official model's, tests/test_backbone_dat.py). As there, maps are NCHW inside the stages; the hooks of the
package contract (pretrain/models/backbones/__init__.py) speak NHWC.

Input size: the deformable stages' relative position tables ``rpe_table`` [heads, 2h-1, 2w-1] and the shifted
windows' masks ``attn_mask`` are built for the stage maps of ``img_size``; at that size the model is the official
one exactly. Any other multiple of ``size_multiple`` (every stage map then tiles into windows) runs as the official
``load_pretrained`` would convert the model to that size: the tables resized bicubically and the masks rebuilt for
the maps, on each call (other sides are a ValueError naming them). ``checkpoint_filter_fn`` does the same once, for
a checkpoint of another size loaded into a model built for the new one (e.g. DAT-B 384 from DAT-B 224; the windows
come with ``window_sizes=``), so both roads give the same outputs.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, to_2tuple, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["DAT", "checkpoint_filter_fn"]

OFFSET_KERNELS = (9, 7, 5, 3)  # the offset network's depthwise kernel, per stage (official, fixed)


# ------------------------------------------------------------------------------------------------ per-token layers

class LayerNormProxy(nn.Module):
    """LayerNorm over the channels of an NCHW map (the official wrapper; its ``norm`` names the weights)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class TransformerMLP(nn.Module):
    """Linear -> GELU -> Linear on every position of a [B, C, H, W] map."""

    def __init__(self, channels: int, expansion: int, drop: float):
        super().__init__()
        self.chunk = nn.Sequential()
        self.chunk.add_module("linear1", nn.Linear(channels, channels * expansion))
        self.chunk.add_module("act", nn.GELU())
        self.chunk.add_module("drop1", nn.Dropout(drop))
        self.chunk.add_module("linear2", nn.Linear(channels * expansion, channels))
        self.chunk.add_module("drop2", nn.Dropout(drop))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.chunk(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class TransformerMLPWithConv(nn.Module):
    """The MLP with a 3x3 depthwise convolution after the expansion (``use_dwc_mlps``; the published sizes don't)."""

    def __init__(self, channels: int, expansion: int, drop: float):
        super().__init__()
        hidden = channels * expansion
        self.linear1 = nn.Conv2d(channels, hidden, 1)
        self.drop1 = nn.Dropout(drop)
        self.act = nn.GELU()
        self.linear2 = nn.Conv2d(hidden, channels, 1)
        self.drop2 = nn.Dropout(drop)
        self.dwc = nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.linear2(self.drop1(self.act(self.dwc(self.linear1(x))))))


# ------------------------------------------------------------------------------------------------ window attention

class LocalAttention(nn.Module):
    """Multi-head self-attention inside non-overlapping ``window_size`` windows, plus a relative position bias
    looked up in ``relative_position_bias_table`` [(2Wh-1)(2Ww-1), heads] (Swin's)."""

    def __init__(self, dim: int, heads: int, window_size: int, attn_drop: float, proj_drop: float):
        super().__init__()
        self.window_size = to_2tuple(window_size)
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.proj_qkv = nn.Linear(dim, 3 * dim)
        self.proj_out = nn.Linear(dim, dim)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj_drop = nn.Dropout(proj_drop)

        wh, ww = self.window_size
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * wh - 1) * (2 * ww - 1), heads))
        trunc_normal_(self.relative_position_bias_table, std=0.01)
        coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")).flatten(1)
        relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # [Wh*Ww, Wh*Ww, 2], dy and dx
        index = (relative[..., 0] + wh - 1) * (2 * ww - 1) + (relative[..., 1] + ww - 1)
        self.register_buffer("relative_position_index", index)  # persistent, as in the official code

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, C, H, W] (H, W multiples of the window), mask: [nW, Wh*Ww, Wh*Ww] or None -> [B, C, H, W]."""
        B, C, H, W = x.shape
        wh, ww = self.window_size
        r1, r2 = H // wh, W // ww
        windows = x.reshape(B, C, r1, wh, r2, ww).permute(0, 2, 4, 3, 5, 1).reshape(B * r1 * r2, wh * ww, C)
        q, k, v = self.proj_qkv(windows).chunk(3, dim=2)
        q = q * self.scale
        q, k, v = (t.reshape(B * r1 * r2, wh * ww, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        attn = q @ k.transpose(-2, -1)  # [B*nW, heads, N, N]

        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        attn = attn + bias.view(wh * ww, wh * ww, -1).permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            n_windows = mask.shape[0]
            attn = (attn.view(B, n_windows, self.heads, wh * ww, wh * ww) + mask[None, :, None]).flatten(0, 1)
        attn = self.attn_drop(attn.softmax(dim=3))

        out = (attn @ v).transpose(1, 2).reshape(B * r1 * r2, wh * ww, C)
        out = self.proj_drop(self.proj_out(out))
        return out.reshape(B, r1, r2, wh, ww, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, H, W)


class ShiftWindowAttention(LocalAttention):
    """Window attention over the map rolled by ``shift_size`` up and left; ``attn_mask`` [nW, N, N] (-100 between
    tokens that were not neighbours before the roll) is the buffer for ``fmap_size``; other maps get theirs per call."""

    def __init__(self, dim: int, heads: int, window_size: int, attn_drop: float, proj_drop: float,
                 shift_size: int, fmap_size: int | tuple[int, int]):
        super().__init__(dim, heads, window_size, attn_drop, proj_drop)
        self.fmap_size = to_2tuple(fmap_size)
        self.shift_size = shift_size
        if not 0 < shift_size < min(self.window_size):
            raise ValueError(f"shift {shift_size} must lie strictly inside the window {self.window_size}")

        self.register_buffer("attn_mask", self.window_mask(*self.fmap_size))  # persistent, as in the official code

    def window_mask(self, H: int, W: int, device: torch.device | None = None) -> torch.Tensor:
        """[nW, N, N] for an H x W map: 0 between tokens of the same region before the roll, else -100."""
        (wh, ww), s = self.window_size, self.shift_size
        regions = torch.zeros(H, W, device=device)
        for i, rows in enumerate((slice(0, -wh), slice(-wh, -s), slice(-s, None))):
            for j, cols in enumerate((slice(0, -ww), slice(-ww, -s), slice(-s, None))):
                regions[rows, cols] = 3 * i + j
        regions = regions.reshape(H // wh, wh, W // ww, ww).permute(0, 2, 1, 3).reshape(-1, wh * ww)
        mask = regions.unsqueeze(1) - regions.unsqueeze(2)
        return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, (H, W) = self.shift_size, x.shape[2:]
        mask = self.attn_mask if (H, W) == self.fmap_size else self.window_mask(H, W, x.device).to(self.attn_mask)
        shifted = torch.roll(x, shifts=(-s, -s), dims=(2, 3))
        return torch.roll(super().forward(shifted, mask), shifts=(s, s), dims=(2, 3))


# ------------------------------------------------------------------------------------------------ deformable attention

class DeformableAttention(nn.Module):
    """Deformable multi-head attention (the official ``DAttentionBaseline``).

    The channels split into ``n_groups`` groups that each share one set of sampling points. Per group, the offset
    network (depthwise conv, stride ``stride`` + LayerNorm + GELU + 1x1 conv to 2 channels) turns the queries into
    an offset per reference point; offsets are bounded by ``tanh`` to ``offset_range_factor / (Hk, Wk)`` in the
    [-1, 1] coordinates of ``grid_sample`` (a factor <= 0: unbounded; < 0: the moved points squashed by tanh).
    Keys and values are projected from the input sampled at the moved points; every query attends to all
    Hk x Wk of them. ``use_pe``: a relative position bias, sampled (bilinear) from ``rpe_table`` [heads, 2H-1,
    2W-1] at each half query-to-key displacement; ``dwc_pe``: a depthwise 3x3 conv of the queries added to the
    output instead; ``fixed_pe``: a full [heads, HW, Hk*Wk] bias (stride 1). ``no_off``: the points stay on the
    grid. (The official v1 forward fails with either of the last two, so no released model uses them.)
    """

    def __init__(self, q_size: tuple[int, int], kv_size: tuple[int, int], n_heads: int, n_head_channels: int,
                 n_groups: int, attn_drop: float, proj_drop: float, stride: int, offset_range_factor: float,
                 use_pe: bool, dwc_pe: bool, no_off: bool, fixed_pe: bool, stage_idx: int):
        super().__init__()
        self.n_heads, self.n_head_channels, self.n_groups = n_heads, n_head_channels, n_groups
        self.nc = n_heads * n_head_channels
        self.n_group_channels = self.nc // n_groups
        self.n_group_heads = n_heads // n_groups
        self.scale = n_head_channels ** -0.5
        self.q_h, self.q_w = q_size
        self.kv_h, self.kv_w = kv_size
        self.offset_range_factor = offset_range_factor
        self.use_pe, self.dwc_pe, self.fixed_pe, self.no_off = use_pe, dwc_pe, fixed_pe, no_off

        kernel, cg = OFFSET_KERNELS[stage_idx], self.n_group_channels
        self.conv_offset = nn.Sequential(
            nn.Conv2d(cg, cg, kernel, stride, kernel // 2, groups=cg),
            LayerNormProxy(cg),
            nn.GELU(),
            nn.Conv2d(cg, 2, 1, 1, 0, bias=False),  # (dy, dx) per reference point
        )
        self.proj_q = nn.Conv2d(self.nc, self.nc, 1)
        self.proj_k = nn.Conv2d(self.nc, self.nc, 1)
        self.proj_v = nn.Conv2d(self.nc, self.nc, 1)
        self.proj_out = nn.Conv2d(self.nc, self.nc, 1)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj_drop = nn.Dropout(proj_drop)

        if use_pe and dwc_pe:
            self.rpe_table = nn.Conv2d(self.nc, self.nc, 3, 1, 1, groups=self.nc)
        elif use_pe:
            shape = (n_heads, self.q_h * self.q_w, self.kv_h * self.kv_w) if fixed_pe else \
                (n_heads, 2 * self.kv_h - 1, 2 * self.kv_w - 1)
            self.rpe_table = nn.Parameter(torch.zeros(shape))
            trunc_normal_(self.rpe_table, std=0.01)
        else:
            self.rpe_table = None

    @torch.no_grad()
    def reference_points(self, H: int, W: int, batch: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """[batch, H, W, 2]: the (y, x) centres (i + 0.5) / H * 2 - 1 of an H x W grid. grid_sample reads them with
        align_corners=True (as the official code does), i.e. at pixel (i + 0.5) (H - 1) / H of the sampled map."""
        ref_y, ref_x = torch.meshgrid(torch.linspace(0.5, H - 0.5, H, dtype=dtype, device=device),
                                      torch.linspace(0.5, W - 0.5, W, dtype=dtype, device=device), indexing="ij")
        ref = torch.stack((ref_y.div(H).mul(2).sub(1), ref_x.div(W).mul(2).sub(1)), -1)
        return ref[None].expand(batch, -1, -1, -1)

    def sampling_points(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q: the projected queries [B, C, H, W] -> (points, reference), both [B*groups, Hk, Wk, 2] as (y, x) in
        grid_sample's [-1, 1]: the reference grid moved by the offset network's bounded offsets, and the grid."""
        B, _, H, W = q.shape
        offset = self.conv_offset(q.reshape(B * self.n_groups, self.n_group_channels, H, W))  # [B*g, 2, Hk, Wk]
        Hk, Wk = offset.shape[2:]
        if self.offset_range_factor > 0:
            offset_range = torch.tensor([1.0 / Hk, 1.0 / Wk], device=q.device).reshape(1, 2, 1, 1)
            offset = offset.tanh().mul(offset_range).mul(self.offset_range_factor)
        offset = offset.permute(0, 2, 3, 1)
        reference = self.reference_points(Hk, Wk, B * self.n_groups, q.dtype, q.device)
        if self.no_off:
            offset = torch.zeros_like(offset)
        points = offset + reference if self.offset_range_factor >= 0 else (offset + reference).tanh()
        return points, reference

    def sample(self, x: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """x [B, C, H, W], points [B*groups, Hk, Wk, 2] -> [B, C, 1, Hk*Wk]: each group's channels read (bilinear)
        at that group's points; the keys and values are projected from these."""
        B, C, H, W = x.shape
        sampled = F.grid_sample(x.reshape(B * self.n_groups, self.n_group_channels, H, W), points[..., (1, 0)],
                                mode="bilinear", align_corners=True)  # (y, x) -> grid_sample's (x, y)
        return sampled.reshape(B, C, 1, points.shape[1] * points.shape[2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, C, H, W] -> [B, C, H, W]."""
        B, C, H, W = x.shape
        heads, hc = self.n_heads, self.n_head_channels
        q = self.proj_q(x)
        points, _ = self.sampling_points(q)
        n_sample = points.shape[1] * points.shape[2]
        sampled = self.sample(x, points)

        q = q.reshape(B * heads, hc, H * W)
        k = self.proj_k(sampled).reshape(B * heads, hc, n_sample)
        v = self.proj_v(sampled).reshape(B * heads, hc, n_sample)
        attn = torch.einsum("b c m, b c n -> b m n", q, k).mul(self.scale)  # [B*heads, HW, Ns]
        if self.use_pe and not self.dwc_pe:
            attn = attn + self.position_bias(points, B, H, W)
        attn = self.attn_drop(F.softmax(attn, dim=2))
        out = torch.einsum("b m n, b c n -> b c m", attn, v)
        if self.use_pe and self.dwc_pe:
            out = out + self.rpe_table(q.reshape(B, C, H, W)).reshape(B * heads, hc, H * W)
        return self.proj_drop(self.proj_out(out.reshape(B, C, H, W)))

    def position_bias(self, points: torch.Tensor, B: int, H: int, W: int) -> torch.Tensor:
        """The bias [B*heads, HW, Ns] of every query (an H x W grid) towards every sampled key (``points``)."""
        n_sample = points.shape[1] * points.shape[2]
        table = self.rpe_table[None]
        if self.fixed_pe:
            return table.expand(B, -1, -1, -1).reshape(B * self.n_heads, H * W, n_sample)
        if table.shape[-2:] != (2 * H - 1, 2 * W - 1):  # another map size: the table resized as load_pretrained does
            table = F.interpolate(table, (2 * H - 1, 2 * W - 1), mode="bicubic")
        table = table.expand(B, -1, -1, -1)
        g = self.n_groups
        queries = self.reference_points(H, W, B * g, points.dtype, points.device)
        # half the displacement: the table spans 2H-1 positions, i.e. displacements in [-2, 2] map onto [-1, 1]
        displacement = (queries.reshape(B * g, H * W, 2).unsqueeze(2)
                        - points.reshape(B * g, n_sample, 2).unsqueeze(1)).mul(0.5)
        bias = F.grid_sample(table.reshape(B * g, self.n_group_heads, 2 * H - 1, 2 * W - 1),
                             displacement[..., (1, 0)], mode="bilinear", align_corners=True)  # [B*g, h/g, HW, Ns]
        return bias.reshape(B * self.n_heads, H * W, n_sample)


# ------------------------------------------------------------------------------------------------ stages

class TransformerStage(nn.Module):
    """An optional 1x1 projection to ``dim_embed`` (``proj``), then ``depth`` pre-norm residual blocks
    x + attn(norm(x)), x + mlp(norm(x)), each attention chosen by its ``stage_spec`` letter (L / S / D).
    [B, dim_in, H, W] -> [B, dim_embed, H, W]."""

    def __init__(self, fmap_size: tuple[int, int], window_size: int, dim_in: int, dim_embed: int, depth: int,
                 stage_spec: Sequence[str], n_groups: int, use_pe: bool, heads: int, stride: int,
                 offset_range_factor: float, stage_idx: int, dwc_pe: bool, no_off: bool, fixed_pe: bool,
                 attn_drop: float, proj_drop: float, expansion: int, drop: float, drop_path: Sequence[float],
                 use_dwc_mlp: bool):
        super().__init__()
        self.depth = depth
        self.grad_checkpointing = False
        head_channels = dim_embed // heads
        self.proj = nn.Conv2d(dim_in, dim_embed, 1, 1, 0) if dim_in != dim_embed else nn.Identity()
        self.layer_norms = nn.ModuleList([LayerNormProxy(dim_embed) for _ in range(2 * depth)])  # 2d: attn, 2d+1: mlp
        mlp = TransformerMLPWithConv if use_dwc_mlp else TransformerMLP
        self.mlps = nn.ModuleList([mlp(dim_embed, expansion, drop) for _ in range(depth)])
        self.attns = nn.ModuleList()
        for kind in stage_spec:
            if kind == "L":
                self.attns.append(LocalAttention(dim_embed, heads, window_size, attn_drop, proj_drop))
            elif kind == "S":
                self.attns.append(ShiftWindowAttention(dim_embed, heads, window_size, attn_drop, proj_drop,
                                                       math.ceil(window_size / 2), fmap_size))
            else:  # "D" (checked by DAT)
                self.attns.append(DeformableAttention(
                    fmap_size, fmap_size, heads, head_channels, n_groups, attn_drop, proj_drop, stride,
                    offset_range_factor, use_pe, dwc_pe, no_off, fixed_pe, stage_idx))
        self.drop_path = nn.ModuleList([DropPath(p) if p > 0.0 else nn.Identity() for p in drop_path])

    def block(self, d: int, x: torch.Tensor) -> torch.Tensor:
        """Block d of the stage (its drop path serves both residuals, as in the official code)."""
        x = x + self.drop_path[d](self.attns[d](self.layer_norms[2 * d](x)))
        return x + self.drop_path[d](self.mlps[d](self.layer_norms[2 * d + 1](x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        for d in range(self.depth):
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(self.block, d, x, use_reentrant=False)
            else:
                x = self.block(d, x)
        return x


# ------------------------------------------------------------------------------------------------ the model

class DAT(nn.Module):
    """DAT v1, taking the official constructor's keywords (configs/dat_*.yaml under ``MODEL.DAT``) plus timm's
    ``in_chans``, ``global_pool`` ("avg" or "") and ``dynamic_img_size`` (accepted, ignored: every multiple of
    ``size_multiple`` runs, module docstring). Per-stage lists have four entries; ``sr_ratios`` and
    ``ns_per_pts`` are accepted and unused, as in the official v1 code. The defaults are DAT-T's.

    images [B, C, H, W] -> patch_proj (conv p x p, stride p + LN) -> 4 stages, a 2x2 stride-2 conv + LN
    (``down_projs``) between them -> cls_norm -> average -> cls_head.
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        patch_size: int = 4,
        num_classes: int = 1000,
        expansion: int = 4,
        dim_stem: int = 96,
        dims: Sequence[int] = (96, 192, 384, 768),
        depths: Sequence[int] = (2, 2, 6, 2),
        heads: Sequence[int] = (3, 6, 12, 24),
        window_sizes: Sequence[int] = (7, 7, 7, 7),
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        strides: Sequence[int] = (-1, -1, 1, 1),
        offset_range_factor: Sequence[float] = (-1, -1, 2, 2),
        stage_spec: Sequence[Sequence[str]] = ("LS", "LS", "LDLDLD", "LD"),
        groups: Sequence[int] = (-1, -1, 3, 6),
        use_pes: Sequence[bool] = (False, False, True, True),
        dwc_pes: Sequence[bool] = (False,) * 4,
        sr_ratios: Sequence[int] = (-1,) * 4,
        fixed_pes: Sequence[bool] = (False,) * 4,
        no_offs: Sequence[bool] = (False,) * 4,
        ns_per_pts: Sequence[int] = (4,) * 4,
        use_dwc_mlps: Sequence[bool] = (False,) * 4,
        use_conv_patches: bool = False,
        in_chans: int = 3,
        global_pool: str = "avg",
        dynamic_img_size: bool = False,
    ):
        super().__init__()
        del sr_ratios, ns_per_pts, dynamic_img_size  # unused in v1 / always dynamic (module docstring)
        if global_pool not in ("avg", ""):
            raise ValueError(f"DAT's global_pool is 'avg' or '', not {global_pool!r}")
        stage_spec = [list(spec) for spec in stage_spec]
        self.img_size = to_2tuple(img_size if isinstance(img_size, int) else tuple(img_size))
        maps = _check_config(self.img_size, patch_size, dim_stem, dims, depths, heads, window_sizes, strides,
                             stage_spec, groups)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.patch_stride = patch_size
        self.embed_dim = dim_stem
        self.num_features = self.head_hidden_size = dims[-1]
        self.output_fmt = "NHWC"
        self.depths = tuple(depths)
        # a full query x key bias table (fixed_pes) cannot be resized: it fixes the input size
        self.fixed_size = any("D" in spec and use_pe and fixed_pe and not dwc_pe
                              for spec, use_pe, fixed_pe, dwc_pe in zip(stage_spec, use_pes, fixed_pes, dwc_pes))
        self.size_multiple = math.lcm(patch_size * 8, *(
            patch_size * 2**i * window for i, (window, spec) in enumerate(zip(window_sizes, stage_spec))
            if {"L", "S"} & set(spec)))

        # --- Patch embedding: non-overlapping p x p patches (use_conv_patches: a 7x7 conv of stride p) ---
        self.patch_proj = nn.Sequential(
            nn.Conv2d(in_chans, dim_stem, 7, patch_size, 3) if use_conv_patches else
            nn.Conv2d(in_chans, dim_stem, patch_size, patch_size, 0),
            LayerNormProxy(dim_stem),
        )

        # --- Four stages; stage i (i > 0) is built for dims[i-1] * 2 input channels, as in the official code ---
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        self.stages = nn.ModuleList()
        for i in range(4):
            self.stages.append(TransformerStage(
                maps[i], window_sizes[i], dim_stem if i == 0 else dims[i - 1] * 2, dims[i], depths[i],
                stage_spec[i], groups[i], use_pes[i], heads[i], strides[i], offset_range_factor[i], i, dwc_pes[i],
                no_offs[i], fixed_pes[i], attn_drop_rate, drop_rate, expansion, drop_rate,
                dpr[sum(depths[:i]):sum(depths[:i + 1])], use_dwc_mlps[i]))
        # --- Down-projections between stages: halve the map, widen to the next stage's dims ---
        self.down_projs = nn.ModuleList([
            nn.Sequential(
                nn.Conv2d(dims[i], dims[i + 1], 3, 2, 1, bias=False) if use_conv_patches else
                nn.Conv2d(dims[i], dims[i + 1], 2, 2, 0, bias=False),
                LayerNormProxy(dims[i + 1]),
            ) for i in range(3)
        ])
        self.feature_info = [dict(num_chs=dims[i], reduction=patch_size * 2**i, module=f"stages.{i}")
                             for i in range(4)]

        # --- Head ---
        self.cls_norm = LayerNormProxy(dims[-1])
        self.cls_head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        # Initialisation: PyTorch's defaults, tables trunc-normal (std 0.01). The official reset_parameters()
        # loops over parameters looking for Linear/Conv2d modules, so it changes nothing; neither do we.

    # --- timm hooks ---

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """The relative position tables (official no_weight_decay_keywords: relative_position_bias_table,
        rpe_table)."""
        return {name for name, _ in self.named_parameters()
                if "relative_position_bias_table" in name or "rpe_table" in name}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm's parameter groups: the patch embedding, then one group per block (coarse: per stage) in order,
        each down-projection with the first block of the stage it feeds, the final norm; the head comes last."""
        def stage(i: int) -> str:  # a stage's entrance: its own projection and the down-projection feeding it
            return rf"stages\.{i}\.proj|down_projs\.{i - 1}" if i else r"stages\.0\.proj"

        if coarse:
            blocks = [(rf"^(?:stages\.{i}|{stage(i)})\.", (i,)) for i in range(4)]
        else:
            blocks = []
            for i, depth in enumerate(self.depths):
                blocks.append((rf"^(?:{stage(i)})\.", (i, 0)))
                for d in range(depth):  # block d: attns.d, mlps.d and layer_norms 2d, 2d+1
                    blocks.append((rf"^stages\.{i}\.(?:attns\.{d}|mlps\.{d}|layer_norms\.(?:{2 * d}|{2 * d + 1}))\.",
                                   (i, d)))
        return dict(stem=r"^patch_proj", blocks=blocks + [(r"^cls_norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.cls_head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ValueError(f"DAT's global_pool is 'avg' or '', not {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        weight = self.cls_norm.norm.weight
        self.cls_head = nn.Linear(self.num_features, num_classes, device=weight.device, dtype=weight.dtype) \
            if num_classes > 0 else nn.Identity()

    # --- Forward ---

    def check_size(self, height: int, width: int) -> None:
        """Raise a ValueError unless an H x W input fits (module docstring)."""
        if self.fixed_size and (height, width) != self.img_size:
            raise ValueError(f"this DAT (fixed_pes) takes {self.img_size[0]}x{self.img_size[1]} inputs only, not "
                             f"{height}x{width}")
        if height % self.size_multiple or width % self.size_multiple:
            raise ValueError(f"DAT takes sides that are multiples of {self.size_multiple}, not {height}x{width}")

    def forward_embed(self, images: torch.Tensor) -> torch.Tensor:
        """images [N, C, H, W] -> tokens [N, H/p, W/p, dim_stem]: the patch projection (conv + LayerNorm)."""
        self.check_size(*images.shape[-2:])
        return self.patch_proj(images).permute(0, 2, 3, 1)

    def forward_stages(self, x: torch.Tensor) -> torch.Tensor:
        """tokens [N, h, w, dim_stem] -> the last stage's map, cls_norm applied: [N, h/8, w/8, num_features]."""
        self.check_size(x.shape[1] * self.patch_stride, x.shape[2] * self.patch_stride)
        x = x.permute(0, 3, 1, 2)
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i < len(self.down_projs):
                x = self.down_projs[i](x)
        return self.cls_norm.norm(x.permute(0, 2, 3, 1))

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """images [N, C, H, W] -> [N, H/32, W/32, num_features] (p = 4)."""
        return self.forward_stages(self.forward_embed(images))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """x [N, h, w, D] -> logits [N, num_classes] (pre_logits: the pooled [N, D]); global_pool "": per position."""
        if self.global_pool == "avg":
            x = x.mean(dim=(1, 2))
        return x if pre_logits else self.cls_head(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(images))


def _check_config(img_size: tuple[int, int], patch_size: int, dim_stem: int, dims: Sequence[int],
                  depths: Sequence[int], heads: Sequence[int], window_sizes: Sequence[int], strides: Sequence[int],
                  stage_spec: Sequence[Sequence[str]], groups: Sequence[int]) -> list[tuple[int, int]]:
    """The four stage maps of img_size, or a ValueError saying which setting does not fit."""
    for name, values in dict(dims=dims, depths=depths, heads=heads, window_sizes=window_sizes, strides=strides,
                             stage_spec=stage_spec, groups=groups).items():
        if len(values) != 4:
            raise ValueError(f"DAT has four stages: {name} needs four entries, not {len(values)}")
    if img_size[0] % (patch_size * 8) or img_size[1] % (patch_size * 8):
        raise ValueError(f"DAT's img_size must be a multiple of {patch_size * 8}, not {img_size}")
    maps = [(img_size[0] // (patch_size * 2**i), img_size[1] // (patch_size * 2**i)) for i in range(4)]
    for i in range(4):
        spec, (h, w), window = stage_spec[i], maps[i], window_sizes[i]
        if len(spec) != depths[i] or not set(spec) <= {"L", "S", "D"}:
            raise ValueError(f"stage {i}'s stage_spec {spec} must hold depths[{i}] = {depths[i]} of L, S, D")
        if i and dims[i] != 2 * dims[i - 1]:  # the official stages expect dims[i - 1] * 2 input channels
            raise ValueError(f"DAT's dims must double from stage to stage, not {list(dims)}")
        if dims[i] % heads[i]:
            raise ValueError(f"stage {i}: {heads[i]} heads do not divide {dims[i]} channels")
        if {"L", "S"} & set(spec) and (h % window or w % window):
            raise ValueError(f"stage {i}: window {window} does not tile its {h}x{w} map (img_size {img_size})")
        if "D" in spec and (groups[i] <= 0 or heads[i] % groups[i] or strides[i] <= 0):
            raise ValueError(f"stage {i}: deformable attention needs groups dividing {heads[i]} heads and a "
                             f"stride >= 1, not groups {groups[i]}, stride {strides[i]}")
    return maps


# ------------------------------------------------------------------------------------------------ checkpoints

def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: DAT) -> dict[str, torch.Tensor]:
    """An official v1 checkpoint fitted to ``model``: the names are already ours; only where a shape differs (a
    checkpoint of another img_size or window) does it act, as the official ``load_pretrained`` does:
    ``rpe_table`` and ``relative_position_bias_table`` resized bicubically, ``relative_position_index`` and
    ``attn_mask`` taken from the model (they describe its own windows). Our own state dicts pass unchanged."""
    state_dict = state_dict.get("model", state_dict)
    own = model.state_dict()
    out = {}
    for key, value in state_dict.items():
        target = own.get(key)
        leaf = key.rsplit(".", 1)[-1]
        if target is None or target.shape == value.shape:
            out[key] = value
        elif leaf in ("relative_position_index", "attn_mask"):
            out[key] = target
        elif leaf == "rpe_table" and value.ndim == 3 == target.ndim:  # [heads, 2h-1, 2w-1]
            out[key] = F.interpolate(value[None].float(), target.shape[1:], mode="bicubic")[0].to(value.dtype)
        elif leaf == "relative_position_bias_table":  # [(2Wh-1)(2Ww-1), heads], square windows
            old, new = math.isqrt(value.shape[0]), math.isqrt(target.shape[0])
            grid = value.float().T.reshape(1, -1, old, old)
            out[key] = F.interpolate(grid, (new, new), mode="bicubic").reshape(-1, new * new).T.to(value.dtype)
        else:
            out[key] = value  # a real mismatch: the loader reports it
    return out


# ------------------------------------------------------------------------------------------------ registry

def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7), "crop_pct": 0.875,
        "interpolation": "bicubic", "fixed_input_size": True, "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD, "first_conv": "patch_proj.0", "classifier": "cls_head", "license": "apache-2.0",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "dat_cpu": _cfg(input_size=(3, 32, 32), pool_size=(2, 2), crop_pct=1.0),
    "dat_tiny": _cfg(),
    "dat_small": _cfg(),
    "dat_base": _cfg(),
})


def _create_dat(variant: str, pretrained: bool, **kwargs: Any) -> DAT:
    if pretrained:
        raise ValueError(f"{variant}: no pretrained weights are downloaded here; build it with pretrained=False "
                         "and load a released checkpoint with pretrain.models.backbones.load_official_checkpoint")
    return build_model_with_cfg(DAT, variant, pretrained=False, pretrained_filter_fn=checkpoint_filter_fn, **kwargs)


_PUBLISHED = dict(  # configs/dat_{tiny,small,base}.yaml; the papers' drop_path_rate 0.2 / 0.3 / 0.5 is the caller's
    patch_size=4, expansion=4, window_sizes=(7, 7, 7, 7), strides=(-1, -1, 1, 1), offset_range_factor=(-1, -1, 2, 2),
    use_pes=(False, False, True, True), use_conv_patches=False,
)


@register_model
def dat_cpu(pretrained: bool = False, **kwargs: Any) -> DAT:
    """A CPU-sized DAT for 32x32 inputs (1.7 M parameters): patches of 2 -> maps 16, 8, 4, 2; blocks L | S | L, D |
    D, windows of 4, 4, 2 (sides: multiples of 16), deformable attention with a position table in the two last
    stages."""
    model_args = dict(
        img_size=32, patch_size=2, dim_stem=32, dims=(32, 64, 128, 256), depths=(1, 1, 2, 1), heads=(2, 4, 8, 16),
        window_sizes=(4, 4, 2, 2), stage_spec=("L", "S", "LD", "D"), groups=(-1, -1, 2, 4), strides=(-1, -1, 1, 1),
        offset_range_factor=(-1, -1, 2, 2), use_pes=(False, False, True, True),
    )
    return _create_dat("dat_cpu", pretrained, **dict(model_args, **kwargs))


@register_model
def dat_tiny(pretrained: bool = False, **kwargs: Any) -> DAT:
    """DAT-T: 28.3 M parameters, 4.6 GFLOPs at 224 (the paper)."""
    model_args = dict(_PUBLISHED, dim_stem=96, dims=(96, 192, 384, 768), depths=(2, 2, 6, 2), heads=(3, 6, 12, 24),
                      stage_spec=("LS", "LS", "LDLDLD", "LD"), groups=(-1, -1, 3, 6))
    return _create_dat("dat_tiny", pretrained, **dict(model_args, **kwargs))


@register_model
def dat_small(pretrained: bool = False, **kwargs: Any) -> DAT:
    """DAT-S: 50 M parameters, 9.0 GFLOPs at 224 (the paper)."""
    model_args = dict(_PUBLISHED, dim_stem=96, dims=(96, 192, 384, 768), depths=(2, 2, 18, 2), heads=(3, 6, 12, 24),
                      stage_spec=("LS", "LS", "LD" * 9, "LD"), groups=(-1, -1, 3, 6))
    return _create_dat("dat_small", pretrained, **dict(model_args, **kwargs))


@register_model
def dat_base(pretrained: bool = False, **kwargs: Any) -> DAT:
    """DAT-B: 88 M parameters, 15.8 GFLOPs at 224 (the paper); the official 384 model is dat_base(img_size=384,
    window_sizes=(12, 12, 12, 12))."""
    model_args = dict(_PUBLISHED, dim_stem=128, dims=(128, 256, 512, 1024), depths=(2, 2, 18, 2),
                      heads=(4, 8, 16, 32), stage_spec=("LS", "LS", "LD" * 9, "LD"), groups=(-1, -1, 4, 8))
    return _create_dat("dat_base", pretrained, **dict(model_args, **kwargs))
