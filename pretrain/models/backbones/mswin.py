"""MSwin: the multi-scale window attention of V2X-ViT (Xu et al., ECCV 2022, "V2X-ViT: Vehicle-to-Everything
Cooperative Perception with Vision Transformer"), built as a hierarchical image backbone.

In V2X-ViT, MSwin attends over a bird's-eye feature map with several window-attention branches side by side
(official config: windows 4 / 8 / 16 with 16 / 8 / 4 heads of 16 / 32 / 64 channels, each branch spanning the full
256 channels). Each branch has its own relative position bias; a split attention (ResNeSt-style) fuses them with
per-channel weights that are a softmax over the branches. There are no shifted windows: the large windows give the
long range that Swin gets from shifting, and all branches see the same input (parallel, not serial).

Here that attention replaces Swin's (shifted) window attention in a Swin hierarchy:

    patch embedding (conv, stride patch_size) + LayerNorm                    -> [N, H/p, W/p, C]
    stages i = 0..S-1: patch merging (i > 0, as Swin), then depths[i] blocks of
        x = x + drop_path(PyramidWindowAttention(LN(x)))
        x = x + drop_path(MLP(LN(x)))
    final LayerNorm; head: global average pool + linear

Choices where the official fusion block says nothing about images (documented, adjustable by arguments):

* ``window_sizes`` (one side per branch, shared by all stages): mswin_tiny uses 7 / 14 / 28, Swin's window 7
  doubled as the official 4 / 8 / 16 doubles, so each divides the 56 / 28 / 14 / 7 stage maps at 224 or is clipped
  to the map (stage 3: 7 / 14 / 14, stage 4: 7 / 7 / 7). Windows are clipped to each stage's map at ``img_size``
  when the model is built (as timm clips Swin's); at run time a map smaller than a window is attended whole, and a
  map that is not a multiple of a window is padded inside the attention with the padded keys masked (as Swin pads),
  so any input side that is a multiple of ``size_multiple`` = patch_size * 2**(S-1) works.
* ``branch_heads`` (per stage, per branch): the official halves the head count (doubling the head width) as the
  window doubles, every branch spanning the full width. mswin_tiny takes Swin-T's 3 / 6 / 12 / 24 heads of 32
  channels for the middle window, twice as many heads (16 channels) for the small one and half as many (64
  channels) for the large one: (6, 3, 2) (12, 6, 3) (24, 12, 6) (48, 24, 12), where stage 1's large branch has 2
  heads of 48 as 1.5 heads cannot be. Since every branch spans the full width (as the official), a block's attention
  holds ~4x Swin's parameters and mswin_tiny ~2x Swin-T's: 54.2 M parameters and 18.8 GFLOPs at 224 (2 per
  multiply-add) against Swin-T's 28.3 M and 9.0.
* MLP ratio 4 and the stride-4 patch embedding are Swin's (the official feed-forward is 256 -> 256).

Names inside the attention are the official ones (``pwmsa.{i}.to_qkv / pos_embedding / to_out.0``,
``split_attn.fc1 / bn1 / fc2``; ``relative_indices`` is not saved, the official keeps it as a plain tensor); the
hierarchy around it is named as timm's Swin (``patch_embed``, ``layers.{i}.downsample / blocks.{j}``, ``norm``,
``head.fc``). Linear layers start as Swin's (truncated normal 0.02), the relative position tables as the official
ones (standard normal). The official also offers a plain mean of the branches and absolute window embeddings;
V2X-ViT uses the split attention and relative tables, the only ones kept here.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import ClassifierHead, DropPath, Mlp, PatchEmbed
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.swin_transformer import PatchMerging
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..swin_mae import init_swin_weights

__all__ = ["MSwinTransformer", "PyramidWindowAttention", "SplitAttn", "checkpoint_filter_fn"]


def relative_distances(window_size: int) -> torch.Tensor:
    """[w*w, w*w, 2]: entry [i, j] = (row, col) of token j minus (row, col) of token i, tokens of a w x w window in
    row-major order (the official ``get_relative_distances``)."""
    coords = torch.stack(torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij"), -1)
    coords = coords.flatten(0, 1)
    return coords[None, :, :] - coords[:, None, :]


class BaseWindowAttention(nn.Module):
    """One branch: multi-head self-attention within non-overlapping window_size x window_size windows, plus a
    relative position bias that all heads share (one (2w-1) x (2w-1) table, as the official).

    forward(x [N, H, W, C]) -> [N, H, W, C]. Windows are clipped to a map smaller than them; a map that is not a
    multiple of the window is zero-padded and the padded keys are masked out (every window keeps at least one real
    key, as the padding is less than a window)."""

    def __init__(self, dim: int, heads: int, dim_head: int, window_size: int, proj_drop: float = 0.0) -> None:
        super().__init__()
        inner_dim = heads * dim_head
        self.heads = heads
        self.scale = dim_head**-0.5
        self.window_size = window_size
        self.to_qkv = nn.Linear(dim, inner_dim * 3, bias=False)
        # (dy, dx) + w - 1 indexes the table; not saved (a plain tensor in the official code)
        self.register_buffer("relative_indices", relative_distances(window_size) + window_size - 1, persistent=False)
        self.pos_embedding = nn.Parameter(torch.randn(2 * window_size - 1, 2 * window_size - 1))
        self.to_out = nn.Sequential(nn.Linear(inner_dim, dim), nn.Dropout(proj_drop))

    def position_bias(self, win_h: int, win_w: int) -> torch.Tensor:
        """[win_h*win_w, win_h*win_w]: the bias between the tokens of a win_h x win_w window (<= the table's)."""
        side = torch.arange(self.window_size, device=self.relative_indices.device)
        keep = ((side[:, None] < win_h) & (side[None, :] < win_w)).flatten()
        index = self.relative_indices[keep][:, keep]
        return self.pos_embedding[index[..., 0], index[..., 1]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, h, w, _ = x.shape
        win_h, win_w = min(self.window_size, h), min(self.window_size, w)
        pad_h, pad_w = -h % win_h, -w % win_w
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        rows, cols = (h + pad_h) // win_h, (w + pad_w) // win_w

        # [N, H', W', 3 * heads * d] -> q, k, v: [N, windows, heads, win_h*win_w, d]
        qkv = self.to_qkv(x).view(n, rows, win_h, cols, win_w, 3, self.heads, -1)
        q, k, v = qkv.permute(5, 0, 1, 3, 6, 2, 4, 7).flatten(5, 6).flatten(2, 3).unbind(0)

        dots = (q @ k.transpose(-2, -1)) * self.scale + self.position_bias(win_h, win_w)
        if pad_h or pad_w:
            dots = dots + self.padding_mask(h, w, win_h, win_w, x.device, dots.dtype)
        out = dots.softmax(dim=-1) @ v  # [N, windows, heads, win_h*win_w, d]

        out = out.view(n, rows, cols, self.heads, win_h, win_w, -1).permute(0, 1, 4, 2, 5, 3, 6)
        out = out.reshape(n, rows * win_h, cols * win_w, -1)[:, :h, :w]
        return self.to_out(out)

    @staticmethod
    def padding_mask(h: int, w: int, win_h: int, win_w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """[windows, 1, 1, win_h*win_w]: 0 on real keys, -inf on the padding of an h x w map padded to the windows."""
        real_rows = torch.arange(h + -h % win_h, device=device) < h
        real_cols = torch.arange(w + -w % win_w, device=device) < w
        real = (real_rows[:, None] & real_cols[None, :]).view(len(real_rows) // win_h, win_h, -1, win_w)
        real = real.transpose(1, 2).flatten(2).flatten(0, 1)  # [windows, win_h*win_w]
        mask = torch.zeros(real.shape, device=device, dtype=dtype).masked_fill(~real, float("-inf"))
        return mask[:, None, None, :]


class SplitAttn(nn.Module):
    """Fuses the branches (the official split attention, for any number of branches): the global average of their
    sum -> fc1 -> LayerNorm -> ReLU -> fc2 gives one weight per branch and channel, a softmax over the branches.

    forward(branches: list of [N, H, W, C]) -> [N, H, W, C] = sum_b weights[:, b] * branches[b]."""

    def __init__(self, input_dim: int, num_branches: int = 3) -> None:
        super().__init__()
        self.input_dim = input_dim
        self.num_branches = num_branches
        self.fc1 = nn.Linear(input_dim, input_dim, bias=False)
        self.bn1 = nn.LayerNorm(input_dim)  # (a LayerNorm, named as in the official code)
        self.act1 = nn.ReLU()
        self.fc2 = nn.Linear(input_dim, input_dim * num_branches, bias=False)

    def branch_weights(self, branches: Sequence[torch.Tensor]) -> torch.Tensor:
        """[N, branches, C], positive and summing to 1 over the branches (fc2's output is branch-major)."""
        pooled = torch.stack(list(branches)).sum(0).mean((1, 2))  # [N, C]
        logits = self.fc2(self.act1(self.bn1(self.fc1(pooled))))
        return logits.view(pooled.shape[0], self.num_branches, self.input_dim).softmax(dim=1)

    def forward(self, branches: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(branches) != self.num_branches:
            raise ValueError(f"SplitAttn fuses {self.num_branches} branches, got {len(branches)}")
        weights = self.branch_weights(branches)
        return sum(branch * weights[:, i, None, None, :] for i, branch in enumerate(branches))


class PyramidWindowAttention(nn.Module):
    """MSwin: the window-attention branches (``window_sizes``, ``heads``, ``dim_heads`` one per branch) run on the
    same input and ``split_attn`` fuses them. forward(x [N, H, W, C]) -> [N, H, W, C]."""

    def __init__(self, dim: int, heads: Sequence[int], dim_heads: Sequence[int], window_sizes: Sequence[int],
                 proj_drop: float = 0.0) -> None:
        super().__init__()
        if not len(heads) == len(dim_heads) == len(window_sizes):
            raise ValueError(f"one head count, head width and window per branch: got heads {list(heads)}, "
                             f"dim_heads {list(dim_heads)}, window_sizes {list(window_sizes)}")
        self.pwmsa = nn.ModuleList(
            BaseWindowAttention(dim, head, dim_head, window, proj_drop)
            for head, dim_head, window in zip(heads, dim_heads, window_sizes)
        )
        self.split_attn = SplitAttn(dim, len(self.pwmsa))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.split_attn([branch(x) for branch in self.pwmsa])


class MSwinBlock(nn.Module):
    """x + drop_path(MSwin(LN(x))), then x + drop_path(MLP(LN(x))). forward(x [N, H, W, C]) -> [N, H, W, C]."""

    def __init__(self, dim: int, branch_heads: Sequence[int], window_sizes: Sequence[int], mlp_ratio: float = 4.0,
                 proj_drop: float = 0.0, drop_path: float = 0.0) -> None:
        super().__init__()
        for heads in branch_heads:
            if dim % heads:
                raise ValueError(f"{heads} heads do not divide the width {dim}")
        self.norm1 = nn.LayerNorm(dim)
        # every branch spans the full width, as the official (16 x 16 = 8 x 32 = 4 x 64 = 256)
        self.attn = PyramidWindowAttention(dim, branch_heads, [dim // heads for heads in branch_heads], window_sizes,
                                           proj_drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class MSwinStage(nn.Module):
    """Patch merging (halves the map, doubles the width; Identity in stage 0), then the blocks.
    forward(x [N, H, W, C_in]) -> [N, H/2, W/2, C] (or [N, H, W, C] in stage 0)."""

    def __init__(self, dim: int, out_dim: int, depth: int, downsample: bool, branch_heads: Sequence[int],
                 window_sizes: Sequence[int], mlp_ratio: float, proj_drop: float, drop_path: Sequence[float]) -> None:
        super().__init__()
        self.grad_checkpointing = False
        self.downsample = PatchMerging(dim, out_dim) if downsample else nn.Identity()
        self.blocks = nn.Sequential(*[
            MSwinBlock(out_dim, branch_heads, window_sizes, mlp_ratio, proj_drop, drop_path[i]) for i in range(depth)
        ])  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x


class MSwinTransformer(nn.Module):
    """A Swin hierarchy of MSwin blocks.

    Args (as timm's SwinTransformer where they are shared):
        img_size: the input side the windows are clipped for (any multiple of ``size_multiple`` runs).
        patch_size: the patch embedding's kernel and stride.
        depths: blocks per stage; the width doubles and the map halves from one stage to the next.
        window_sizes: one window side per branch, the same in every stage (clipped to the stage map at img_size).
        branch_heads: per stage, the head count of each branch (one entry per window); a branch's head width is the
            stage width / its heads, so every branch spans the full width.
        dynamic_img_size: accepted for timm's interface and ignored (every multiple of size_multiple runs).
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        window_sizes: Sequence[int] = (7, 14, 28),
        branch_heads: Sequence[Sequence[int]] = ((6, 3, 2), (12, 6, 3), (24, 12, 6), (48, 24, 12)),
        mlp_ratio: float = 4.0,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        dynamic_img_size: bool = False,
    ) -> None:
        super().__init__()
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        if len(branch_heads) != len(depths) or any(len(heads) != len(window_sizes) for heads in branch_heads):
            raise ValueError(f"branch_heads needs one entry per stage ({len(depths)}), each with one head count per "
                             f"window ({list(window_sizes)}); got {[list(heads) for heads in branch_heads]}")
        num_stages = len(depths)
        img_h, img_w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.output_fmt = "NHWC"
        self.patch_stride = patch_size
        self.size_multiple = patch_size * 2 ** (num_stages - 1)
        self.embed_dim = embed_dim
        dims = [embed_dim * 2**i for i in range(num_stages)]
        self.num_features = self.head_hidden_size = dims[-1]

        # --- Patch embedding: conv of stride patch_size, then LayerNorm; NHWC out ---
        self.patch_embed = PatchEmbed(img_size=(img_h, img_w), patch_size=patch_size, in_chans=in_chans,
                                      embed_dim=embed_dim, norm_layer=nn.LayerNorm, output_fmt="NHWC",
                                      strict_img_size=False)

        # --- Stages of MSwin blocks, patch merging between them ---
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()  # numbers, even on "meta"
        self.layers = nn.Sequential()
        self.feature_info = []
        for i, depth in enumerate(depths):
            side = min(img_h, img_w) // (patch_size * 2**i)
            stage_windows = [max(1, min(window, side)) for window in window_sizes]  # clipped as timm's Swin
            self.layers.add_module(str(i), MSwinStage(
                dims[max(i - 1, 0)], dims[i], depth, downsample=i > 0, branch_heads=branch_heads[i],
                window_sizes=stage_windows, mlp_ratio=mlp_ratio, proj_drop=proj_drop_rate,
                drop_path=rates[sum(depths[:i]):sum(depths[: i + 1])],
            ))  # fmt: skip
            self.feature_info.append(dict(num_chs=dims[i], reduction=patch_size * 2**i, module=f"layers.{i}"))
        self.norm = nn.LayerNorm(dims[-1])

        # --- Head: global average pool + linear ---
        self.head = ClassifierHead(dims[-1], num_classes, pool_type=global_pool, drop_rate=drop_rate,
                                   input_fmt="NHWC")
        self.apply(init_swin_weights)  # Linears as Swin's; the relative position tables keep the official N(0, 1)

    # --- Forward: embedding, stages, head ---

    def forward_embed(self, x: torch.Tensor) -> torch.Tensor:
        """images [N, C, H, W] -> tokens [N, H/p, W/p, embed_dim] (the patch embedding alone)."""
        height, width = x.shape[-2:]
        if height % self.size_multiple or width % self.size_multiple:
            raise ValueError(f"MSwin takes sides that are multiples of {self.size_multiple}, got {height}x{width}")
        return self.patch_embed(x)

    def forward_stages(self, x: torch.Tensor) -> torch.Tensor:
        """tokens [N, h, w, embed_dim] -> the last stage's map [N, h/2**(S-1), w/2**(S-1), num_features], normed."""
        return self.norm(self.layers(x))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_stages(self.forward_embed(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """[N, h, w, num_features] -> logits [N, num_classes] (pre_logits: the pooled [N, num_features]);
        global_pool "" keeps the map."""
        return self.head(x, pre_logits=True) if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    # --- timm hooks ---

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """The relative position tables."""
        return {name for name, _ in self.named_parameters() if name.endswith("pos_embedding")}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """As timm's Swin: the stem, then one group per block (a stage's patch merging joins its first block),
        then the final norm."""
        return dict(
            stem=r"^patch_embed",
            blocks=r"^layers\.(\d+)" if coarse else [
                (r"^layers\.(\d+)\.downsample", (0,)),
                (r"^layers\.(\d+)\.\w+\.(\d+)", None),
                (r"^norm", (99999,)),
            ],
        )  # fmt: skip

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.layers:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None and global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
        self.head.reset(num_classes, pool_type=global_pool)


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Our own state dict passes unchanged. No official image checkpoint exists (V2X-ViT releases a fusion model
    over bird's-eye features); the attention's keys are the official names, so only ``relative_indices``, which is
    never saved (derived from the window), is dropped should a dict carry it."""
    return {key: value for key, value in state_dict.items() if not key.endswith("relative_indices")}


# --- Registered sizes ---

def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7), "crop_pct": 0.9,
        "interpolation": "bicubic", "fixed_input_size": False, "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD, "first_conv": "patch_embed.proj", "classifier": "head.fc", **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "mswin_cpu": _cfg(input_size=(3, 32, 32), pool_size=(4, 4), crop_pct=1.0),
    "mswin_tiny": _cfg(),
})


def _create(variant: str, pretrained: bool, defaults: dict[str, Any], kwargs: dict[str, Any]) -> MSwinTransformer:
    if pretrained:
        raise ValueError(f"{variant}: V2X-ViT released no image weights and nothing is downloaded here; build it "
                         "with pretrained=False and load a checkpoint with load_official_checkpoint")
    args = {**defaults, **kwargs}
    return build_model_with_cfg(
        MSwinTransformer, variant, pretrained=False, pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(flatten_sequential=True, out_indices=tuple(range(len(args["depths"])))), **args,
    )


@register_model
def mswin_cpu(pretrained: bool = False, **kwargs) -> MSwinTransformer:
    """32x32 inputs: patch 2, width 32 / 64 / 128, 2 blocks a stage, windows 4 / 8 / 16 (the official ones;
    16x16 / 8x8 / 4x4 maps), heads as the official 16 / 8 / 4 at 128 wide, halved with the width; 1.2 M params."""
    defaults = dict(img_size=32, patch_size=2, embed_dim=32, depths=(2, 2, 2), window_sizes=(4, 8, 16),
                    branch_heads=((4, 2, 1), (8, 4, 2), (16, 8, 4)))
    return _create("mswin_cpu", pretrained, defaults, kwargs)


@register_model
def mswin_tiny(pretrained: bool = False, **kwargs) -> MSwinTransformer:
    """Swin-T's layout (patch 4, width 96, depths 2-2-6-2) with MSwin blocks: windows 7 / 14 / 28, heads
    (2h, h, h/2) for Swin-T's h = 3 / 6 / 12 / 24 (stage 1: 6 / 3 / 2); 54.2 M params, 18.8 GFLOPs at 224."""
    defaults = dict(img_size=224, patch_size=4, embed_dim=96, depths=(2, 2, 6, 2), window_sizes=(7, 14, 28),
                    branch_heads=((6, 3, 2), (12, 6, 3), (24, 12, 6), (48, 24, 12)))
    return _create("mswin_tiny", pretrained, defaults, kwargs)
