"""Attention augmented convolution and AA-ResNet (Bello, Zoph, Vaswani, Shlens and Le, ICCV 2019, "Attention
Augmented Convolutional Networks").

An attention augmented convolution with F_out output channels concatenates a convolution with F_out - dv outputs
and multi-head self-attention over the whole (flattened) feature map with dv outputs:

    AAConv(X) = Concat[Conv(X), MHA(X)]                                      X [N, F_in, H, W] -> [N, F_out, H, W]
    MHA(X)    = Concat[O_1, ..., O_Nh] W^O                                   W^O: a 1x1 convolution, dv -> dv
    O_h       = Softmax(Q_h K_h^T + S_h^H + S_h^W) V_h                   Q_h = X W_q^h / sqrt(dkh), K_h, V_h alike

Keys, queries and values come from one 1x1 convolution with 2 dk + dv outputs, split in the paper's order
(k, q, v); head h takes the h-th contiguous slice of dkh = dk / Nh (dvh = dv / Nh) channels. The 2D relative
position logits are the paper's: separate height and width embeddings, learned per layer and shared by the heads,
key_rel_h [2H - 1, dkh] and key_rel_w [2W - 1, dkh], so that query (i, j) and key (a, b) get

    S[(i, j), (a, b)] = q_ij . (key_rel_w[b - j + W - 1] + key_rel_h[a - i + H - 1])

computed with the paper's memory-light ``rel_to_abs`` (logits against all 2L - 1 offsets, then a pad-and-reshape
that turns relative into absolute key positions) instead of an [HW, HW, dkh] table. The position term depends on
the offset only: the layer is translation equivariant, as a convolution is.

AA-ResNet (Section 4.2): a ResNet whose bottleneck 3x3 convolutions are augmented in every block of the last three
stages (not the first: its maps are the largest), each augmented convolution followed by the block's batch norm
(which learns how much of the convolution and of the attention to keep), with Nh = 8 heads, kappa = dk / F_out =
2 upsilon = 0.2 (upsilon = dv / F_out = 0.1) and at least 20 key dimensions per head; dv is rounded down to a
multiple of Nh. These settings give the paper's parameter counts: AA-ResNet-50 25.8 M (ResNet-50 25.6 M), and
45.4 M / 61.6 M for AA-ResNet-101 / -152 (not registered here).

Choices the paper leaves open, documented here:

- stride: the first block of stages 2-4 convolves with stride 2; its attention runs on the strided map, its input
  reduced by the paper's downsampling operation (3x3 average pooling with stride 2; padding not counted, as
  TensorFlow's "SAME" pooling), so both halves of the output have the convolution's size.
- memory: the paper "sometimes" also downsamples the attention's input in the layers with the largest maps
  (3x3 average pooling with stride 2, the output upsampled bilinearly for the concatenation). ``attn_pool``
  (one flag a stage, all off by default: exact global attention everywhere) does that; with it on in stage 2,
  AA-ResNet-50 costs 8.4 GFLOPs at 224 instead of 9.5 (2 per multiply-add; the paper's table: 8.3, ResNet-50
  8.2), which suggests the paper's ResNet-50 used it there.
- input size: the relative embeddings are sized for ``img_size``'s maps. For another map size, each table is
  resampled linearly over the offset axis (offset d of the new map reads offset d (L - 1) / (L' - 1) of the
  table; offset 0 stays offset 0), so any input whose sides are multiples of ``size_multiple`` (32; the cpu
  size: 16, its own reduction) works. ``checkpoint_filter_fn`` resamples a checkpoint's tables the same way.
- initialisation: relative embeddings ~ N(0, dkh^-0.5) (the appendix code passes dkh^-0.5 as the initializer's
  first argument, the mean, which reads as a slip for the standard deviation); convolutions as timm's ResNet
  (Kaiming normal, fan out) with the last batch norm of each block zero-initialised.

There is no official PyTorch code and no released checkpoint: the ResNet modules are named as torchvision's and
timm's ResNet (conv1 / bn1 / layer1..4 / fc; a block's conv1..3, bn1..3, downsample), so that an unaugmented
configuration loads timm's ``resnet50`` weights as they are; an augmented conv2 holds ``conv``, ``kqv``, ``proj``,
``key_rel_h`` and ``key_rel_w``.

The project's backbone contract (pretrain/models/backbones/__init__.py): ``forward_embed`` is the stem (conv 7x7/2,
BN, ReLU, max pool 3x3/2: patch_stride 4) in NHWC, ``forward_stages`` takes those tokens and returns the last
stage's map in NCHW (``output_fmt``: the one CNN of the package; a ResNet has no final norm).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, to_2tuple
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

__all__ = ["AugmentedConv2d", "AAResNet", "attention_dims", "rel_to_abs", "checkpoint_filter_fn"]


# ------------------------------------------------------------------------------------------------ relative logits

def rel_to_abs(x: torch.Tensor) -> torch.Tensor:
    """The paper's relative -> absolute indexing. x [..., L, 2L - 1] (query l, relative offset m - (L - 1)) ->
    [..., L, L] with out[..., l, j] = x[..., l, j - l + L - 1]: one zero column, flatten, L - 1 more zeros, and the
    rows of length 2L - 1 come out shifted by one each."""
    *batch, length, _ = x.shape
    x = F.pad(x, (0, 1)).flatten(-2)  # [..., L * 2L]
    x = F.pad(x, (0, length - 1))  # [..., (L + 1) (2L - 1)]
    return x.view(*batch, length + 1, 2 * length - 1)[..., :length, length - 1:]


def relative_logits_1d(q: torch.Tensor, rel_k: torch.Tensor) -> torch.Tensor:
    """q [N, Nh, X, L, dkh] (L along the axis of ``rel_k``), rel_k [2L - 1, dkh] -> [N, Nh, X, L, L]: query
    (x, l) against key column l' of the same row, q . rel_k[l' - l + L - 1]."""
    return rel_to_abs(q @ rel_k.transpose(0, 1))


def resize_rel_table(table: torch.Tensor, length: int) -> torch.Tensor:
    """A relative embedding table [2L - 1, d] for a map of side L, resampled linearly to [2L' - 1, d] (offset d
    of the new map reads offset d (L - 1) / (L' - 1) of the old; offset 0 is kept)."""
    size = 2 * length - 1
    if table.shape[0] == size:
        return table
    if size == 1:  # a map of one row: only offset 0
        centre = table.shape[0] // 2
        return table[centre:centre + 1]
    resized = F.interpolate(table.transpose(0, 1)[None].float(), size=size, mode="linear", align_corners=True)
    return resized[0].transpose(0, 1).to(table.dtype)


# ------------------------------------------------------------------------------------------------ the layer

def attention_dims(width: int, num_heads: int, key_ratio: float, value_ratio: float,
                   min_key_dim_per_head: int = 0) -> tuple[int, int]:
    """(dk, dv) for an augmented convolution with ``width`` = F_out outputs: dk = kappa F_out with at least
    ``min_key_dim_per_head`` per head, dv = upsilon F_out rounded down to a multiple of the heads (at least one
    channel a head)."""
    key_per_head = max(int(key_ratio * width) // num_heads, min_key_dim_per_head, 1)
    value_per_head = max(int(value_ratio * width) // num_heads, 1)
    return key_per_head * num_heads, value_per_head * num_heads


class AugmentedConv2d(nn.Module):
    """Concat[Conv(X), MHA(X)] along channels: x [N, in_chs, H, W] -> [N, out_chs, H / stride, W / stride],
    channels [0, out_chs - dv) from the convolution, the last dv from the attention.

    ``feat_size``: the (H, W) of the map the attention sees (after the stride and ``attn_pool``) at the model's
    ``img_size``; the relative embeddings are sized for it and resampled for other sizes. ``attn_pool``: attend
    over the map average-pooled 3x3 / 2 and upsample the result bilinearly (the paper's memory saving)."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 3, stride: int = 1, dk: int = 40, dv: int = 8,
                 num_heads: int = 8, feat_size: int | Sequence[int] = 14, attn_pool: bool = False,
                 bias: bool = False) -> None:
        super().__init__()
        if dk % num_heads or dv % num_heads:
            raise ValueError(f"dk {dk} and dv {dv} must be multiples of num_heads {num_heads}")
        if not 0 < dv < out_chs:
            raise ValueError(f"dv {dv} must be in (0, out_chs {out_chs})")
        self.out_chs, self.dk, self.dv, self.num_heads = out_chs, dk, dv, num_heads
        self.dkh, self.dvh = dk // num_heads, dv // num_heads
        self.scale = self.dkh ** -0.5
        height, width = to_2tuple(feat_size)
        self.conv = nn.Conv2d(in_chs, out_chs - dv, kernel_size, stride, padding=kernel_size // 2, bias=bias)
        # attention on the strided map: the paper's 3x3 / 2 average pooling (padding not counted, as "SAME")
        self.pool = nn.AvgPool2d(3, stride, padding=1, count_include_pad=False) if stride > 1 else nn.Identity()
        self.attn_pool = nn.AvgPool2d(3, 2, padding=1, count_include_pad=False) if attn_pool else nn.Identity()
        self.kqv = nn.Conv2d(in_chs, 2 * dk + dv, 1)  # keys, queries, values: the appendix's order
        self.proj = nn.Conv2d(dv, dv, 1)  # W^O mixes the heads
        self.key_rel_h = nn.Parameter(torch.randn(2 * height - 1, self.dkh) * self.dkh ** -0.5)
        self.key_rel_w = nn.Parameter(torch.randn(2 * width - 1, self.dkh) * self.dkh ** -0.5)

    def queries_keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
        """x [N, in_chs, H, W] -> q (scaled by dkh^-0.5), k [N, Nh, h*w, dkh], v [N, Nh, h*w, dvh], h, w (the
        strided (and attn_pool-ed) map, flattened row by row)."""
        x = self.attn_pool(self.pool(x))
        n, _, height, width = x.shape
        k, q, v = self.kqv(x).split([self.dk, self.dk, self.dv], dim=1)

        def heads(t: torch.Tensor) -> torch.Tensor:  # [N, Nh * d, h, w] -> [N, Nh, h*w, d]
            return t.reshape(n, self.num_heads, -1, height * width).transpose(-1, -2)

        return heads(q * self.scale), heads(k), heads(v), height, width

    def relative_logits(self, q: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """q [N, Nh, h*w, dkh] -> the position logits [N, Nh, h*w, h*w]: row (i, j), column (a, b) holds
        q_ij . (key_rel_w[b - j + w - 1] + key_rel_h[a - i + h - 1])."""
        n = q.shape[0]
        q = q.reshape(n, self.num_heads, height, width, self.dkh)
        rel_h = resize_rel_table(self.key_rel_h, height).to(q.dtype)
        rel_w = resize_rel_table(self.key_rel_w, width).to(q.dtype)
        logits_w = relative_logits_1d(q, rel_w)  # [N, Nh, h, w, w]: (i, j, b)
        logits_h = relative_logits_1d(q.transpose(2, 3), rel_h).transpose(2, 3)  # [N, Nh, h, w, h]: (i, j, a)
        logits = logits_h[..., :, None] + logits_w[..., None, :]  # [N, Nh, h, w, h, w]
        return logits.reshape(n, self.num_heads, height * width, height * width)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """MHA(X): x [N, in_chs, H, W] -> [N, dv, H / stride, W / stride]."""
        q, k, v, height, width = self.queries_keys_values(x)
        # content logits q k^T plus the position logits; q is already scaled, hence scale=1
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.relative_logits(q, height, width), scale=1.0)
        out = out.transpose(-1, -2).reshape(q.shape[0], self.dv, height, width)  # heads back to contiguous slices
        out = self.proj(out)
        if isinstance(self.attn_pool, nn.AvgPool2d):  # back to the convolution's size for the concatenation
            out = F.interpolate(out, size=[-(-side // self.conv.stride[0]) for side in x.shape[-2:]], mode="bilinear")
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.conv(x), self.attention(x)], dim=1)


# ------------------------------------------------------------------------------------------------ the network

class Bottleneck(nn.Module):
    """ResNet's bottleneck (stride on the 3x3, as torchvision, timm and the TPU ResNet the paper builds on):
    1x1 -> 3x3 (augmented when ``attention`` is given) -> 1x1 x4, each with BN, plus the shortcut.
    x [N, in_chs, H, W] -> [N, 4 planes, H / stride, W / stride]."""

    expansion = 4

    def __init__(self, in_chs: int, planes: int, stride: int = 1, attention: dict[str, Any] | None = None,
                 drop_path: float = 0.0) -> None:
        super().__init__()
        out_chs = planes * self.expansion
        self.conv1 = nn.Conv2d(in_chs, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = nn.ReLU(inplace=True)
        if attention is None:
            self.conv2 = nn.Conv2d(planes, planes, 3, stride, padding=1, bias=False)
        else:
            self.conv2 = AugmentedConv2d(planes, planes, 3, stride, **attention)
        self.bn2 = nn.BatchNorm2d(planes)  # also weighs the convolution against the attention channels
        self.act2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(planes, out_chs, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_chs)
        self.act3 = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_chs != out_chs:
            self.downsample = nn.Sequential(nn.Conv2d(in_chs, out_chs, 1, stride, bias=False), nn.BatchNorm2d(out_chs))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        x = self.bn3(self.conv3(x))
        return self.act3(self.drop_path(x) + shortcut)


class AAResNet(nn.Module):
    """A ResNet with attention augmented 3x3 convolutions in the stages where ``augment`` is True.

    images [N, in_chans, H, W] -> forward_embed -> [N, H/4, W/4, stem_width] -> forward_stages ->
    [N, 4 channels[-1], H/r, W/r] (r = 4 x prod(strides)) -> forward_head -> [N, num_classes]."""

    def __init__(
        self,
        layers: Sequence[int] = (3, 4, 6, 3),
        channels: Sequence[int] = (64, 128, 256, 512),
        strides: Sequence[int] = (1, 2, 2, 2),
        augment: Sequence[bool] = (False, True, True, True),
        attn_pool: Sequence[bool] = (False, False, False, False),
        num_heads: int = 8,
        key_ratio: float = 0.2,
        value_ratio: float = 0.1,
        min_key_dim_per_head: int = 20,
        stem_width: int = 64,
        img_size: int | Sequence[int] = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        zero_init_last: bool = True,
        dynamic_img_size: bool = False,  # accepted for timm's callers: every multiple of size_multiple works
    ) -> None:
        super().__init__()
        if not len(layers) == len(channels) == len(strides) == len(augment) == len(attn_pool):
            raise ValueError("layers, channels, strides, augment and attn_pool need one entry a stage")
        _check_global_pool(global_pool)
        self.num_classes, self.global_pool, self.drop_rate = num_classes, global_pool, drop_rate
        self.output_fmt = "NCHW"
        self.patch_stride = 4
        self.embed_dim = stem_width
        self.size_multiple = self.patch_stride * math.prod(strides)
        self.grad_checkpointing = False
        img_size = to_2tuple(img_size)
        if img_size[0] % self.size_multiple or img_size[1] % self.size_multiple:
            raise ValueError(f"img_size {img_size} must be a multiple of {self.size_multiple}")
        self.img_size = img_size

        # --- Stem: conv 7x7 / 2, BN, ReLU, max pool 3x3 / 2 (the patch embedding for masked-image pretraining) ---
        self.conv1 = nn.Conv2d(in_chans, stem_width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.act1 = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.feature_info = [dict(num_chs=stem_width, reduction=2, module="act1")]

        # --- Stages of bottlenecks; stochastic depth grows linearly over the blocks (timm's ResNet) ---
        num_blocks = sum(layers)
        block_rates = [drop_path_rate * i / max(num_blocks - 1, 1) for i in range(num_blocks)]
        in_chs, reduction, block_index = stem_width, self.patch_stride, 0
        stage_specs = zip(layers, channels, strides, augment, attn_pool)
        for stage, (depth, planes, stride, augmented, pooled) in enumerate(stage_specs, 1):
            reduction *= stride
            attention = None
            if augmented:
                dk, dv = attention_dims(planes, num_heads, key_ratio, value_ratio, min_key_dim_per_head)
                feat_size = tuple(side // reduction for side in img_size)
                feat_size = tuple(-(-side // 2) for side in feat_size) if pooled else feat_size
                attention = dict(dk=dk, dv=dv, num_heads=num_heads, feat_size=feat_size, attn_pool=pooled)
            blocks = []
            for i in range(depth):
                blocks.append(Bottleneck(in_chs, planes, stride if i == 0 else 1, attention, block_rates[block_index]))
                in_chs, block_index = planes * Bottleneck.expansion, block_index + 1
            self.add_module(f"layer{stage}", nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=in_chs, reduction=reduction, module=f"layer{stage}"))
        self.num_stages = len(layers)
        self.num_features = self.head_hidden_size = in_chs

        # --- Head ---
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights(zero_init_last)

    def init_weights(self, zero_init_last: bool = True) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if zero_init_last:  # each residual branch starts as zero (timm's ResNet, the TPU ResNet)
            for module in self.modules():
                if isinstance(module, Bottleneck):
                    nn.init.zeros_(module.bn3.weight)

    @property
    def stages(self) -> list[nn.Sequential]:
        return [getattr(self, f"layer{i}") for i in range(1, self.num_stages + 1)]

    # --- Hooks (timm's, and the package's contract) ---

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """The relative position embeddings."""
        return {name for name, _ in self.named_parameters() if name.endswith(("key_rel_h", "key_rel_w"))}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, str]:
        """The stem, then one group per block (per stage if coarse), as timm's ResNet."""
        return dict(stem=r"^conv1|^bn1", blocks=r"^layer(\d+)" if coarse else r"^layer(\d+)\.(\d+)")

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass (as timm's ResNet, the recomputation updates the batch norms'
        running statistics a second time)."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None:
            _check_global_pool(global_pool)
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    # --- Forward ---

    def _check_size(self, height: int, width: int, multiple: int, what: str) -> None:
        if height % multiple or width % multiple:
            raise ValueError(f"{type(self).__name__} takes {what} whose sides are multiples of {multiple}, "
                             f"got {height}x{width}")

    def forward_embed(self, x: torch.Tensor) -> torch.Tensor:
        """images [N, C, H, W] -> stem tokens [N, H/4, W/4, stem_width] (NHWC)."""
        self._check_size(*x.shape[-2:], self.size_multiple, "images")
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        return x.permute(0, 2, 3, 1)

    def forward_stages(self, x: torch.Tensor) -> torch.Tensor:
        """stem tokens [N, h, w, stem_width] -> the last stage's map [N, num_features, h/r, w/r] (NCHW)."""
        self._check_size(x.shape[1], x.shape[2], self.size_multiple // self.patch_stride, "token maps")
        x = x.permute(0, 3, 1, 2)
        for stage in self.stages:
            for block in stage:
                if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
                    x = checkpoint(block, x, use_reentrant=False)
                else:
                    x = block(x)
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_stages(self.forward_embed(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """x [N, C, h, w] -> "avg": [N, C] pooled (pre_logits) or [N, num_classes]; "": the map is kept and the
        head, if any, applies at every position ([N, num_classes, h, w])."""
        if self.global_pool == "avg":
            x = x.mean((2, 3))
        x = F.dropout(x, p=self.drop_rate, training=self.training) if self.drop_rate else x
        if pre_logits:
            return x
        if self.global_pool == "":
            return self.fc(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _check_global_pool(global_pool: str) -> None:
    if global_pool not in ("avg", ""):
        raise ValueError(f"AAResNet takes global_pool 'avg' or '', got {global_pool!r}")


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: AAResNet) -> dict[str, torch.Tensor]:
    """Our own state dict passes unchanged (there is no official checkpoint: the names are the ones above). A dict
    trained at another image size gets its relative embeddings resampled to the model's (linear, as at run time)."""
    own = model.state_dict()
    out = {}
    for key, value in state_dict.items():
        target = own.get(key)
        if key.endswith(("key_rel_h", "key_rel_w")) and target is not None and value.shape != target.shape:
            value = resize_rel_table(value, (target.shape[0] + 1) // 2)
        out[key] = value
    return out


# ------------------------------------------------------------------------------------------------ registry

def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7), "crop_pct": 0.875,
        "interpolation": "bilinear", "fixed_input_size": False, "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD, "first_conv": "conv1", "classifier": "fc", **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "aa_resnet_cpu": _cfg(input_size=(3, 32, 32), pool_size=(2, 2), crop_pct=1.0),
    "aa_resnet26": _cfg(),
    "aa_resnet50": _cfg(),
})


def _create(variant: str, pretrained: bool, defaults: dict[str, Any], kwargs: dict[str, Any]) -> AAResNet:
    if pretrained:
        raise ValueError(f"{variant}: the paper released no weights and nothing is downloaded here; build it with "
                         "pretrained=False and load a checkpoint with load_official_checkpoint")
    return build_model_with_cfg(AAResNet, variant, pretrained=False, pretrained_filter_fn=checkpoint_filter_fn,
                                **{**defaults, **kwargs})


@register_model
def aa_resnet_cpu(pretrained: bool = False, **kwargs: Any) -> AAResNet:
    """A CPU-sized AA-ResNet for 32x32 inputs: widths 24 / 48 / 96 / 192 (x4 out), one block a stage, stride 1 in
    the last stage (reduction 16: maps 8, 4, 2, 2), stages 2-4 augmented with 4 heads, kappa = 2 upsilon = 0.5
    (the paper's kappa = 2 upsilon, with more attention channels at this width) and >= 8 key dims a head."""
    defaults = dict(layers=(1, 1, 1, 1), channels=(24, 48, 96, 192), strides=(1, 2, 2, 1), stem_width=24,
                    num_heads=4, key_ratio=0.5, value_ratio=0.25, min_key_dim_per_head=8, img_size=32)
    return _create("aa_resnet_cpu", pretrained, defaults, kwargs)


@register_model
def aa_resnet26(pretrained: bool = False, **kwargs: Any) -> AAResNet:
    """AA-ResNet-26: the paper's ResNet-26 (bottlenecks 1-2-4-1, 13.7 M parameters unaugmented) augmented as
    AA-ResNet-50 (stages 2-4, Nh = 8, kappa = 2 upsilon = 0.2, >= 20 key dims a head)."""
    return _create("aa_resnet26", pretrained, dict(layers=(1, 2, 4, 1)), kwargs)


@register_model
def aa_resnet50(pretrained: bool = False, **kwargs: Any) -> AAResNet:
    """AA-ResNet-50 (the paper's Table: 25.8 M parameters, 8.3 GFLOPs, 77.7% top-1): bottlenecks 3-4-6-3, the
    3x3 convolutions of stages 2-4 augmented with Nh = 8, kappa = 2 upsilon = 0.2, >= 20 key dims a head."""
    return _create("aa_resnet50", pretrained, dict(layers=(3, 4, 6, 3)), kwargs)
