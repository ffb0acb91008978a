"""CrossFormer v1: A Versatile Vision Transformer Hinging on Cross-scale Attention (Wang et al., ICLR 2022), as a
timm model.

A four-stage pyramid (stride 4, 8, 16, 32) whose three ideas are:

    CEL   cross-scale embedding: the patch embedding is several convolutions of one stride and different kernels
          (4, 8, 16, 32 at stride 4), each centred on the same patch, their outputs concatenated along the
          channels (the small kernels get more channels: 1/2, 1/4, 1/8, 1/8 of them). Every patch merging between
          stages is the same with kernels 2 and 4 at stride 2 (1/2 each), after a LayerNorm.
    LSDA  long short distance attention: the blocks of a stage alternate short distance attention (SDA, within
          groups of G x G adjacent tokens) and long distance attention (LDA, within groups of tokens sampled
          every I tokens: token (i, j) of group (a, b) is at (i*I + a, j*I + b)). A stage whose map is no larger
          than G on a side is one group of min(h, w) tokens a side, SDA only.
    DPB   dynamic position bias: a small MLP maps each relative offset (dy, dx) inside a group to one bias per
          head, so that a group of any shape has a position bias.

Names, parameters and buffers are the official v1 code's (github.com/cheerss/CrossFormer, branch ``crossformer``:
models/crossformer.py), the DPB's ``biases`` and ``relative_position_index`` included (persistent buffers sized
for the group each block is built with), so a released ``{"model": state_dict}`` loads strictly and gives the
official logits (tests/test_backbone_crossformer.py compares to a fixture made by the official model).

Input size. The official classification model takes ``img_size`` only; its dense-prediction backbone (same branch,
models/crossformer_backbone.py) takes any size: each block pads its map to a multiple of G (SDA) or I (LDA),
masks the padded keys and crops them off again, and a block whose map is no larger than G falls back to SDA
over min(h, w)-sided groups at run time. Both are followed: the interval of a stage is fixed (``crs_interval``;
by default h // G of each stage at ``img_size``, as the classification model groups: 8, 4, 2, 1 at 224 with
G = 7), so at ``img_size`` nothing is padded and every group is the official one, while other sizes work as in
the dense-prediction backbone. The merges halve the map, so sides must be multiples of ``size_multiple`` = patch stride
* 2^(stages - 1) (32 for the published sizes); any other side is a ValueError naming it.

Maps are NHWC between modules (the official blocks take [B, H*W, C] and a fixed input_resolution instead).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, to_2tuple, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["CrossFormer", "checkpoint_filter_fn"]

NEG_INF = -1000000.0  # added to the scores of padded keys (the official dense-prediction backbone's value)


# ------------------------------------------------------------------------------------------------ CEL

def cross_scale_dims(dim_out: int, num_kernels: int) -> list[int]:
    """Output channels of each kernel of a cross-scale layer, smallest kernel first: 1/2, 1/4, ... of dim_out,
    the last kernel taking what the one before it took (64 over 4 kernels: 32, 16, 8, 8)."""
    return [dim_out // 2 ** (i + 1) if i < num_kernels - 1 else dim_out // 2**i for i in range(num_kernels)]


class PatchEmbed(nn.Module):
    """Cross-scale embedding of the image: one conv per kernel size, all of stride ``patch_size[0]`` and padded by
    (k - stride) / 2 so that they are centred on the same patch, concatenated; then LayerNorm (``patch_norm``).

    images [B, C, H, W] -> tokens [B, H/s, W/s, embed_dim], s = patch_size[0]."""

    def __init__(self, img_size: int | Sequence[int] = 224, patch_size: Sequence[int] = (4, 8, 16, 32),
                 in_chans: int = 3, embed_dim: int = 64, norm_layer: type[nn.Module] | None = nn.LayerNorm):
        super().__init__()
        self.img_size = to_2tuple(img_size)
        self.patch_size = list(patch_size)
        stride = self.patch_size[0]
        self.patches_resolution = [self.img_size[0] // stride, self.img_size[1] // stride]
        self.num_patches = self.patches_resolution[0] * self.patches_resolution[1]
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.projs = nn.ModuleList([
            nn.Conv2d(in_chans, dim, kernel_size=k, stride=stride, padding=(k - stride) // 2)
            for k, dim in zip(self.patch_size, cross_scale_dims(embed_dim, len(self.patch_size)))
        ])
        self.norm = norm_layer(embed_dim) if norm_layer is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([proj(x) for proj in self.projs], dim=1).permute(0, 2, 3, 1)
        return self.norm(x) if self.norm is not None else x


class PatchMerging(nn.Module):
    """Cross-scale merging between stages: LayerNorm, then one conv of stride 2 per kernel size (padded by
    (k - 2) / 2), concatenated to twice the channels.

    x [B, H, W, dim] -> [B, H/2, W/2, 2*dim]."""

    def __init__(self, dim: int, patch_size: Sequence[int] = (2, 4), norm_layer: type[nn.Module] = nn.LayerNorm):
        super().__init__()
        self.dim = dim
        self.patch_size = list(patch_size)
        self.norm = norm_layer(dim)
        self.reductions = nn.ModuleList([
            nn.Conv2d(dim, out_dim, kernel_size=k, stride=2, padding=(k - 2) // 2)
            for k, out_dim in zip(self.patch_size, cross_scale_dims(2 * dim, len(self.patch_size)))
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[1:3]
        if height % 2 or width % 2:
            raise ValueError(f"CrossFormer's patch merging halves the map: a {height}x{width} map has an odd side")
        x = self.norm(x).permute(0, 3, 1, 2)
        return torch.cat([reduction(x) for reduction in self.reductions], dim=1).permute(0, 2, 3, 1)


# ------------------------------------------------------------------------------------------------ DPB

def relative_coordinates(group_h: int, group_w: int, device: torch.device | None = None,
                         dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(biases [(2gh-1)*(2gw-1), 2]: every relative offset (dy, dx) inside a gh x gw group, dy major;
    relative_position_index [gh*gw, gh*gw]: for tokens i, j of the group (row-major), the row of biases holding
    their offset coords_i - coords_j)."""
    offsets = torch.stack(torch.meshgrid(torch.arange(1 - group_h, group_h, device=device),
                                         torch.arange(1 - group_w, group_w, device=device), indexing="ij"))
    biases = offsets.flatten(1).transpose(0, 1).to(dtype)
    coords = torch.stack(torch.meshgrid(torch.arange(group_h, device=device), torch.arange(group_w, device=device),
                                        indexing="ij")).flatten(1)  # [2, gh*gw]
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # [gh*gw, gh*gw, 2]
    index = (relative[..., 0] + group_h - 1) * (2 * group_w - 1) + relative[..., 1] + group_w - 1
    return biases, index


class DynamicPosBias(nn.Module):
    """The DPB MLP: offsets [n, 2] -> biases [n, num_heads], Linear(2, d) then three (LayerNorm, ReLU, Linear)
    blocks; ``residual`` adds the two middle blocks to their input (the official option, off in CrossFormer)."""

    def __init__(self, dim: int, num_heads: int, residual: bool):
        super().__init__()
        self.residual = residual
        self.num_heads = num_heads
        self.pos_dim = dim // 4
        self.pos_proj = nn.Linear(2, self.pos_dim)
        self.pos1 = _norm_relu_linear(self.pos_dim, self.pos_dim)
        self.pos2 = _norm_relu_linear(self.pos_dim, self.pos_dim)
        self.pos3 = _norm_relu_linear(self.pos_dim, num_heads)

    def forward(self, biases: torch.Tensor) -> torch.Tensor:
        pos = self.pos_proj(biases)
        if self.residual:
            pos = pos + self.pos1(pos)
            pos = pos + self.pos2(pos)
            return self.pos3(pos)
        return self.pos3(self.pos2(self.pos1(pos)))


def _norm_relu_linear(dim_in: int, dim_out: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(dim_in), nn.ReLU(inplace=True), nn.Linear(dim_in, dim_out))


class Attention(nn.Module):
    """Multi-head self-attention inside each group, with the dynamic position bias.

    ``group_size`` (gh, gw) is the group the ``biases`` / ``relative_position_index`` buffers are built for (the
    official checkpoints hold them); a group of another shape gets its coordinates computed on the fly, the same
    MLP turning them into biases."""

    def __init__(self, dim: int, group_size: tuple[int, int], num_heads: int, qkv_bias: bool = True,
                 qk_scale: float | None = None, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.dim = dim
        self.group_size = tuple(group_size)
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.pos = DynamicPosBias(dim // 4, num_heads, residual=False)  # pos_dim = dim / 16, as official
        biases, index = relative_coordinates(*self.group_size)
        self.register_buffer("biases", biases)
        self.register_buffer("relative_position_index", index)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.softmax = nn.Softmax(dim=-1)

    def position_bias(self, group: tuple[int, int]) -> torch.Tensor:
        """The DPB of a gh x gw group: [num_heads, gh*gw, gh*gw]."""
        if tuple(group) == self.group_size:
            biases, index = self.biases, self.relative_position_index
        else:
            biases, index = relative_coordinates(*group, device=self.biases.device, dtype=self.biases.dtype)
        n = group[0] * group[1]
        return self.pos(biases)[index.view(-1)].view(n, n, -1).permute(2, 0, 1)

    def forward(self, x: torch.Tensor, group: tuple[int, int], mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B*nG, gh*gw, C] (groups of a sample consecutive), mask [nG, 1, gh*gw] (0 / NEG_INF per key) or None
        -> [B*nG, gh*gw, C]."""
        B_, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B_, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        attn = (q * self.scale) @ k.transpose(-2, -1) + self.position_bias(group).unsqueeze(0)
        if mask is not None:
            nG = mask.shape[0]
            attn = attn.view(B_ // nG, nG, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, N, N)
        attn = self.attn_drop(self.softmax(attn))
        x = (attn @ v).transpose(1, 2).reshape(B_, N, C)
        return self.proj_drop(self.proj(x))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, group_size={self.group_size}, num_heads={self.num_heads}"


# ------------------------------------------------------------------------------------------------ LSDA

def group_tokens(x: torch.Tensor, long: bool, step: tuple[int, int]) -> torch.Tensor:
    """x [B, H, W, C] (sides multiples of step) -> groups [B*nG, gh*gw, C].

    Short distance (step = (G, G)): the G x G blocks of adjacent tokens. Long distance (step = interval (Ih, Iw)):
    group (a, b) holds the tokens (i*Ih + a, j*Iw + b), H/Ih x W/Iw of them."""
    B, H, W, C = x.shape
    sh, sw = step
    x = x.view(B, H // sh, sh, W // sw, sw, C)
    x = x.permute(0, 2, 4, 1, 3, 5) if long else x.permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, x.shape[3] * x.shape[4], C)


def ungroup_tokens(x: torch.Tensor, long: bool, step: tuple[int, int], batch: int, height: int, width: int
                   ) -> torch.Tensor:
    """The inverse of ``group_tokens``: [B*nG, gh*gw, C] -> [B, H, W, C]."""
    sh, sw = step
    n, m, C = height // sh, width // sw, x.shape[-1]
    if long:
        x = x.view(batch, sh, sw, n, m, C).permute(0, 3, 1, 4, 2, 5)
    else:
        x = x.view(batch, n, m, sh, sw, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(batch, height, width, C)


class Mlp(nn.Module):
    """fc1 -> GELU -> dropout -> fc2 -> dropout."""

    def __init__(self, in_features: int, hidden_features: int, act_layer: type[nn.Module] = nn.GELU,
                 drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class CrossFormerBlock(nn.Module):
    """Pre-norm block: x + LSDA(LN(x)), then x + MLP(LN(x)); ``lsda_flag`` 0 = SDA, 1 = LDA.

    ``group_size`` G and ``interval`` (Ih, Iw) are the configured ones; which grouping a map gets is decided per
    forward (``grouping``). ``input_resolution`` (the map at img_size) only sizes the DPB buffers: min(h, w) if
    that is <= G (the official fallback), else G."""

    def __init__(self, dim: int, input_resolution: tuple[int, int], num_heads: int, group_size: int = 7,
                 interval: tuple[int, int] = (8, 8), lsda_flag: int = 0, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, qk_scale: float | None = None, drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: float = 0.0, act_layer: type[nn.Module] = nn.GELU,
                 norm_layer: type[nn.Module] = nn.LayerNorm):
        super().__init__()
        self.dim = dim
        self.input_resolution = tuple(input_resolution)
        self.num_heads = num_heads
        self.group_size = group_size
        self.interval = tuple(interval)
        self.lsda_flag = lsda_flag
        self.mlp_ratio = mlp_ratio
        built = min(self.input_resolution) if min(self.input_resolution) <= group_size else group_size
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, group_size=(built, built), num_heads=num_heads, qkv_bias=qkv_bias,
                              qk_scale=qk_scale, attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=drop)

    def grouping(self, height: int, width: int) -> tuple[bool, tuple[int, int]]:
        """(long, step) for an H x W map: a map no larger than G on a side is SDA in min(H, W)-sided groups;
        else SDA in G x G groups or LDA at the stage's interval, per ``lsda_flag``."""
        if min(height, width) <= self.group_size:
            return False, (min(height, width),) * 2
        if self.lsda_flag == 0:
            return False, (self.group_size, self.group_size)
        return True, self.interval

    def lsda(self, x: torch.Tensor) -> torch.Tensor:
        """Attention within the groups (the block's token mixer). x [B, H, W, C] (normed) -> [B, H, W, C].

        The map is zero-padded at the bottom / right to a multiple of the step and the padded keys are masked,
        as in the official dense-prediction backbone; at img_size nothing is padded."""
        B, H, W, C = x.shape
        long, step = self.grouping(H, W)
        pad_b, pad_r = -H % step[0], -W % step[1]
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        Hp, Wp = H + pad_b, W + pad_r
        group = (Hp // step[0], Wp // step[1]) if long else step
        mask = None
        if pad_b or pad_r:
            padded = torch.zeros(1, Hp, Wp, 1, device=x.device, dtype=x.dtype)
            padded[:, H:] = 1
            padded[:, :, W:] = 1
            keys = group_tokens(padded, long, step).transpose(1, 2)  # [nG, 1, gh*gw]
            mask = torch.zeros_like(keys).masked_fill(keys > 0, NEG_INF)
        x = self.attn(group_tokens(x, long, step), group, mask)
        return ungroup_tokens(x, long, step, B, Hp, Wp)[:, :H, :W]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, H, W, C] -> [B, H, W, C]."""
        x = x + self.drop_path(self.lsda(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, input_resolution={self.input_resolution}, num_heads={self.num_heads}, "
                f"group_size={self.group_size}, interval={self.interval}, lsda_flag={self.lsda_flag}, "
                f"mlp_ratio={self.mlp_ratio}")


class Stage(nn.Module):
    """``depth`` blocks alternating SDA (even) and LDA (odd), then the cross-scale merging into the next stage
    (``merge_size`` kernels; None for the last stage). x [B, H, W, dim] -> [B, H/2, W/2, 2*dim] (last: unchanged)."""

    def __init__(self, dim: int, input_resolution: tuple[int, int], depth: int, num_heads: int, group_size: int,
                 interval: tuple[int, int], mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 qk_scale: float | None = None, drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: Sequence[float] = (), norm_layer: type[nn.Module] = nn.LayerNorm,
                 merge_size: Sequence[int] | None = None):
        super().__init__()
        self.dim = dim
        self.input_resolution = tuple(input_resolution)
        self.depth = depth
        self.grad_checkpointing = False
        self.blocks = nn.ModuleList([
            CrossFormerBlock(dim, input_resolution, num_heads, group_size, interval, lsda_flag=i % 2,
                             mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale, drop=drop,
                             attn_drop=attn_drop, drop_path=drop_path[i], norm_layer=norm_layer)
            for i in range(depth)
        ])
        self.downsample = PatchMerging(dim, merge_size, norm_layer) if merge_size is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.downsample(x) if self.downsample is not None else x


# ------------------------------------------------------------------------------------------------ the model

class CrossFormer(nn.Module):
    """CrossFormer v1 (module docstring); the keyword names are the official constructor's, the defaults
    CrossFormer-T's.

    images [B, C, H, W] -> patch_embed (CEL) -> [absolute_pos_embed if ape] -> stages ``layers`` (LSDA blocks, a
    CEL merging after each but the last) -> norm -> average -> head.

    patch_size: the CEL kernels (the first is the stride); group_size: G, one per stage (or one for all);
    crs_interval: I per stage (or one for all); None: max(1, side // G) of each stage at img_size (8, 4, 2, 1 at
    224); merge_size: the kernels of each merging; use_checkpoint: gradient checkpointing from the start.
    dynamic_img_size: accepted for timm's factory; every model takes any multiple of ``size_multiple``."""

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        patch_size: int | Sequence[int] = (4, 8, 16, 32),
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 64,
        depths: Sequence[int] = (1, 1, 8, 6),
        num_heads: Sequence[int] = (2, 4, 8, 16),
        group_size: int | Sequence[int] = 7,
        crs_interval: int | Sequence[int] | None = None,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        ape: bool = False,
        patch_norm: bool = True,
        use_checkpoint: bool = False,
        merge_size: Sequence[Sequence[int]] = ((2, 4), (2, 4), (2, 4)),
        global_pool: str = "avg",
        dynamic_img_size: bool = False,
    ):
        super().__init__()
        del dynamic_img_size  # any multiple of size_multiple is taken (module docstring)
        patch_size = [patch_size] if isinstance(patch_size, int) else list(patch_size)
        num_stages = len(depths)
        group_size = _per_stage(group_size, num_stages, "group_size")
        self.img_size = to_2tuple(img_size if isinstance(img_size, int) else tuple(img_size))
        self.patch_stride = patch_size[0]
        self.size_multiple = self.patch_stride * 2 ** (num_stages - 1)
        _check_config(self.img_size, self.size_multiple, patch_size, embed_dim, depths, num_heads, merge_size,
                      global_pool)
        sides = [(self.img_size[0] // self.patch_stride // 2**i, self.img_size[1] // self.patch_stride // 2**i)
                 for i in range(num_stages)]
        if crs_interval is None:
            intervals = [(max(1, h // g), max(1, w // g)) for (h, w), g in zip(sides, group_size)]
        else:
            intervals = [to_2tuple(i) for i in _per_stage(crs_interval, num_stages, "crs_interval")]
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_layers = num_stages
        self.embed_dim = embed_dim
        self.ape = ape
        self.patch_norm = patch_norm
        self.num_features = self.head_hidden_size = embed_dim * 2 ** (num_stages - 1)
        self.mlp_ratio = mlp_ratio
        self.output_fmt = "NHWC"
        self.depths = tuple(depths)

        # --- Cross-scale embedding (+ optional absolute position embedding) ---
        self.patch_embed = PatchEmbed(self.img_size, patch_size, in_chans, embed_dim,
                                      norm_layer if patch_norm else None)
        self.patches_resolution = self.patch_embed.patches_resolution
        if ape:
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches, embed_dim))
            trunc_normal_(self.absolute_pos_embed, std=0.02)
        self.pos_drop = nn.Dropout(p=drop_rate)

        # --- Stages of LSDA blocks, each but the last ending with a cross-scale merging ---
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()  # stochastic depth, linear
        self.layers = nn.ModuleList([
            Stage(embed_dim * 2**i, sides[i], depths[i], num_heads[i], group_size[i], intervals[i],
                  mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale, drop=drop_rate, attn_drop=attn_drop_rate,
                  drop_path=dpr[sum(depths[:i]):sum(depths[:i + 1])], norm_layer=norm_layer,
                  merge_size=merge_size[i] if i < num_stages - 1 else None)
            for i in range(num_stages)
        ])
        self.feature_info = [dict(num_chs=embed_dim * 2**i, reduction=self.patch_stride * 2**i,
                                  module=f"layers.{i}.blocks.{depths[i] - 1}")  # a stage's map before its merging
                             for i in range(num_stages)]

        # --- Head ---
        self.norm = norm_layer(self.num_features)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)
        self.set_grad_checkpointing(use_checkpoint)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        """Official: Linears trunc-normal 0.02 with zero bias, LayerNorms 1 / 0, convs PyTorch's default."""
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    # --- timm hooks ---

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """The absolute position embedding and the position-bias MLPs (``attn.pos.*``). The official recipe
        exempts only absolute_pos_embed (and 1-D parameters); its keyword 'relative_position_bias_table' matches
        nothing in CrossFormer, so there the DPB weights are decayed."""
        return {"absolute_pos_embed"} | {name for name, _ in self.named_parameters() if ".attn.pos." in name}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm's parameter groups: the embedding, then one group per block in order (coarse: per stage), each
        merging with the last block of its stage and the final norm with the last block; the head comes last."""
        return dict(
            stem=r"^(?:patch_embed|absolute_pos_embed)",
            blocks=r"^layers\.(\d+)" if coarse else [
                (r"^layers\.(\d+)\.blocks\.(\d+)\.", None),
                (r"^layers\.(\d+)\.downsample\.", (99999,)),
                (r"^norm\.", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.layers:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None:
            _check_global_pool(global_pool)
            self.global_pool = global_pool
        self.num_classes = num_classes
        weight = self.norm.weight
        self.head = nn.Linear(self.num_features, num_classes, device=weight.device, dtype=weight.dtype) \
            if num_classes > 0 else nn.Identity()

    # --- Forward ---

    def check_size(self, height: int, width: int) -> None:
        """Raise a ValueError unless both sides are multiples of ``size_multiple``."""
        if height % self.size_multiple or width % self.size_multiple:
            raise ValueError(f"CrossFormer takes sides that are multiples of {self.size_multiple}, not "
                             f"{height}x{width}")

    def forward_embed(self, images: torch.Tensor) -> torch.Tensor:
        """images [N, C, H, W] -> tokens [N, H/4, W/4, embed_dim]: the cross-scale embedding (convs + LayerNorm)."""
        self.check_size(*images.shape[-2:])
        return self.patch_embed(images)

    def forward_stages(self, x: torch.Tensor) -> torch.Tensor:
        """tokens [N, h, w, embed_dim] -> the last stage's map, final norm applied: [N, h/8, w/8, num_features]
        (4 stages). The absolute position embedding (ape), if any, is added here, after any masking."""
        self.check_size(x.shape[1] * self.patch_stride, x.shape[2] * self.patch_stride)
        if self.ape:
            x = x + self._absolute_pos_embed(x.shape[1], x.shape[2])
        x = self.pos_drop(x)
        for stage in self.layers:
            x = stage(x)
        return self.norm(x)

    def _absolute_pos_embed(self, height: int, width: int) -> torch.Tensor:
        """[1, h, w, D]: the table of img_size's grid, resized bicubically for another grid."""
        grid_h, grid_w = self.patches_resolution
        pos = self.absolute_pos_embed.view(1, grid_h, grid_w, -1)
        if (height, width) != (grid_h, grid_w):
            pos = F.interpolate(pos.permute(0, 3, 1, 2), size=(height, width), mode="bicubic",
                                align_corners=False).permute(0, 2, 3, 1)
        return pos

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """images [N, C, H, W] -> [N, H/32, W/32, num_features] (4 stages)."""
        return self.forward_stages(self.forward_embed(images))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """x [N, h, w, D] -> logits [N, num_classes] (pre_logits: the pooled [N, D]); global_pool "": per position."""
        if self.global_pool == "avg":
            x = x.mean(dim=(1, 2))
        return x if pre_logits else self.head(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(images))


def _per_stage(value: int | Sequence[int], num_stages: int, name: str) -> list[int]:
    values = [value] * num_stages if isinstance(value, int) else list(value)
    if len(values) != num_stages:
        raise ValueError(f"CrossFormer's {name} needs one value per stage ({num_stages}), got {values}")
    return values


def _check_global_pool(global_pool: str) -> None:
    if global_pool not in ("avg", ""):
        raise ValueError(f"CrossFormer's global_pool is 'avg' or '', not {global_pool!r}")


def _check_config(img_size: tuple[int, int], size_multiple: int, patch_size: Sequence[int], embed_dim: int,
                  depths: Sequence[int], num_heads: Sequence[int], merge_size: Sequence[Sequence[int]],
                  global_pool: str) -> None:
    """Fail at construction, naming the argument, where the official code would fail later (or silently)."""
    _check_global_pool(global_pool)
    if img_size[0] % size_multiple or img_size[1] % size_multiple:
        raise ValueError(f"CrossFormer's img_size must have sides that are multiples of {size_multiple} (patch "
                         f"stride * 2^(stages - 1)), not {img_size[0]}x{img_size[1]}")
    if len(num_heads) != len(depths) or min(depths) < 1:
        raise ValueError(f"CrossFormer needs depths >= 1 and one num_heads per stage, got {depths} / {num_heads}")
    if len(merge_size) < len(depths) - 1:
        raise ValueError(f"CrossFormer needs merge_size kernels for each of the {len(depths) - 1} mergings")
    uneven = sum(cross_scale_dims(embed_dim, len(patch_size))) != embed_dim
    if uneven or any((k - patch_size[0]) % 2 for k in patch_size):
        raise ValueError(f"CrossFormer's patch_size kernels {list(patch_size)} must differ from the stride by an "
                         f"even number and split embed_dim {embed_dim} evenly")
    for i, heads in enumerate(num_heads):
        if (embed_dim * 2**i) % heads:
            raise ValueError(f"stage {i}: width {embed_dim * 2**i} is not a multiple of num_heads {heads}")


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: CrossFormer) -> dict[str, torch.Tensor]:
    """An official checkpoint has our names already (``{"model": ...}`` unwrapped if still wrapped); our own
    state dict passes unchanged. The DPB buffers ``biases`` / ``relative_position_index`` are coordinates of the
    group a block was built for; where a checkpoint of another img_size has them for another group, the model's
    own are kept (the DPB MLP they feed is the same for any group)."""
    if isinstance(state_dict.get("model"), dict):
        state_dict = state_dict["model"]
    own = model.state_dict()
    out = {}
    for key, value in state_dict.items():
        if key.endswith((".attn.biases", ".attn.relative_position_index")) and key in own \
                and own[key].shape != value.shape:
            value = own[key]
        out[key] = value
    return out


# ------------------------------------------------------------------------------------------------ registry

def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7), "crop_pct": 0.875,
        "interpolation": "bicubic", "fixed_input_size": False, "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD, "first_conv": "patch_embed.projs.0", "classifier": "head", **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "crossformer_cpu": _cfg(input_size=(3, 32, 32), pool_size=(2, 2), crop_pct=1.0),
    "crossformer_tiny": _cfg(),
    "crossformer_small": _cfg(),
    "crossformer_base": _cfg(),
    "crossformer_large": _cfg(),
})


def _create_crossformer(variant: str, pretrained: bool, **kwargs: Any) -> CrossFormer:
    if pretrained:
        raise ValueError(f"{variant}: no pretrained weights are downloaded here; build it with pretrained=False "
                         "and load a released checkpoint with pretrain.models.backbones.load_official_checkpoint")
    # features_only: each stage's map (feature_info) taken by hooks, the model left as it is
    feature_cfg = dict(feature_cls="hook", no_rewrite=True, out_indices=tuple(range(len(kwargs["depths"]))))
    return build_model_with_cfg(CrossFormer, variant, pretrained=False, pretrained_filter_fn=checkpoint_filter_fn,
                                feature_cfg=feature_cfg, **kwargs)


# configs/{tiny,small,base,large}_patch4_group7_224.yaml of the official v1 branch; their drop_path_rate
# (0.1 / 0.2 / 0.3 / 0.5) is the trainer's to pass
_PUBLISHED = dict(img_size=224, patch_size=(4, 8, 16, 32), group_size=(7, 7, 7, 7),
                  merge_size=((2, 4), (2, 4), (2, 4)), mlp_ratio=4.0)


@register_model
def crossformer_cpu(pretrained: bool = False, **kwargs: Any) -> CrossFormer:
    """A CPU-sized CrossFormer for 32x32 inputs (0.65 M parameters with 10 classes): the CEL kernels 4 / 8 / 16 /
    32, widths 32 / 64 / 128, two blocks a stage; maps 8, 4, 2 with G = 4: stage 1 alternates SDA (4x4 groups) and
    LDA (interval 2), the two last stages are one group each. A training step of batch 32 takes ~0.2 s on a core."""
    model_args = dict(img_size=32, patch_size=(4, 8, 16, 32), embed_dim=32, depths=(2, 2, 2), num_heads=(2, 4, 8),
                      group_size=(4, 4, 4), merge_size=((2, 4), (2, 4)))
    return _create_crossformer("crossformer_cpu", pretrained, **dict(model_args, **kwargs))


@register_model
def crossformer_tiny(pretrained: bool = False, **kwargs: Any) -> CrossFormer:
    """CrossFormer-T: 27.8 M parameters, 2.9 G multiply-adds at 224 (the paper)."""
    model_args = dict(_PUBLISHED, embed_dim=64, depths=(1, 1, 8, 6), num_heads=(2, 4, 8, 16))
    return _create_crossformer("crossformer_tiny", pretrained, **dict(model_args, **kwargs))


@register_model
def crossformer_small(pretrained: bool = False, **kwargs: Any) -> CrossFormer:
    """CrossFormer-S: 30.7 M parameters, 4.9 G multiply-adds at 224 (the paper)."""
    model_args = dict(_PUBLISHED, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
    return _create_crossformer("crossformer_small", pretrained, **dict(model_args, **kwargs))


@register_model
def crossformer_base(pretrained: bool = False, **kwargs: Any) -> CrossFormer:
    """CrossFormer-B: 52.0 M parameters, 9.2 G multiply-adds at 224 (the paper)."""
    model_args = dict(_PUBLISHED, embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24))
    return _create_crossformer("crossformer_base", pretrained, **dict(model_args, **kwargs))


@register_model
def crossformer_large(pretrained: bool = False, **kwargs: Any) -> CrossFormer:
    """CrossFormer-L: 92.0 M parameters, 16.1 G multiply-adds at 224 (the paper)."""
    model_args = dict(_PUBLISHED, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))
    return _create_crossformer("crossformer_large", pretrained, **dict(model_args, **kwargs))
