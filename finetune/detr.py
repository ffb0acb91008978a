"""DETR (Carion et al., 2020, "End-to-End Object Detection with Transformers") on our pretrained ViT / Swin trunks.

    images [B, 3, H, W] + padding mask [B, H, W]
      -> backbone: a ViT's last-layer patch tokens (stride = patch size, 16 for ViT-B/16) or a Swin's last stage
         (stride 32), as a feature map [B, C, h, w], and the mask shrunk to [B, h, w]
      -> 1x1 convolution to the transformer width d; a fixed 2D sine position encoding [B, d, h, w]
      -> transformer encoder (post-norm; the position encoding added to queries and keys in every layer)
      -> transformer decoder: N learned object queries attend to each other and to the encoder's memory
      -> per decoder layer: class logits [B, N, K + 1] (the last class is "no object") and boxes [B, N, 4]
         (cx, cy, w, h as fractions of the unpadded image, through a sigmoid)

The final layer's outputs are the predictions; the other layers' ("aux_outputs") get the same loss in training
(finetune/detr_loss.py). Boxes are predicted relative to each image's own size, not the padded batch's.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_convert


# ------------------------------------------------------------------------------------------------ backbone

class Backbone(nn.Module):
    """A timm ViT or Swin built for any input size (`dynamic_img_size=True`: a ViT interpolates its position
    embeddings to each input's patch grid, a Swin pads to its windows), or one of the survey's backbones
    (pretrain/models/backbones), giving its last feature map.

    forward(images [B, 3, H, W], mask [B, H, W] True on padding) -> (features [B, C, H/s, W/s], mask [B, H/s, W/s])
    with s = `stride`; inputs whose sides are not multiples of the trunk's `size_multiple` (else s) are padded (as
    padding, in the mask) first.
    The trunk sees the zero padding, as DETR's ResNet does; the transformer ignores it through the mask.
    """

    def __init__(self, trunk: nn.Module):
        super().__init__()
        self.trunk = trunk
        self.is_vit = hasattr(trunk, "num_prefix_tokens")  # timm VisionTransformer (and its DeiT / EVA kin)
        self.stride = int(trunk.feature_info[-1]["reduction"])
        self.size_multiple = int(getattr(trunk, "size_multiple", self.stride))
        self.channels_last = getattr(trunk, "output_fmt", "NHWC") == "NHWC"  # timm's Swin and ours; a CNN: NCHW
        self.num_channels = int(trunk.num_features)

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        height, width = images.shape[-2:]
        pad_h, pad_w = -height % self.size_multiple, -width % self.size_multiple
        if pad_h or pad_w:
            images = F.pad(images, (0, pad_w, 0, pad_h))
            mask = F.pad(mask, (0, pad_w, 0, pad_h), value=True)
        grid = (images.shape[-2] // self.stride, images.shape[-1] // self.stride)
        if self.is_vit:
            tokens = self.trunk.forward_features(images)[:, self.trunk.num_prefix_tokens:]  # [B, h*w, C], normed
            tokens = getattr(self.trunk, "fc_norm", nn.Identity())(tokens)  # avg-pool ViTs norm here instead
            features = tokens.transpose(1, 2).reshape(len(images), -1, *grid)
        elif self.channels_last:
            features = self.trunk.forward_features(images).permute(0, 3, 1, 2)  # Swin: NHWC, normed
        else:
            features = self.trunk.forward_features(images)
        small_mask = F.interpolate(mask[:, None].float(), size=features.shape[-2:]).bool()[:, 0]
        return features, small_mask


# ------------------------------------------------------------------------------------------------ positions

def sine_position_encoding(mask: torch.Tensor, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """DETR's 2D sine encoding. mask [B, h, w] (True on padding) -> [B, dim, h, w].

    Each pixel's row and column, counted over the unpadded part only and normalised to (0, 2 pi], are encoded with
    dim / 2 sine / cosine features each (y first, then x), so the encoding describes positions within each image.
    """
    if dim % 2:
        raise ValueError(f"the position encoding needs an even dim, got {dim}")
    per_axis = dim // 2
    inside = (~mask).float()
    y = inside.cumsum(1)
    x = inside.cumsum(2)
    eps = 1e-6
    y = y / (y[:, -1:, :] + eps) * 2 * math.pi
    x = x / (x[:, :, -1:] + eps) * 2 * math.pi
    frequencies = temperature ** (2 * (torch.arange(per_axis, device=mask.device) // 2) / per_axis)

    def encode(position: torch.Tensor) -> torch.Tensor:  # [B, h, w] -> [B, h, w, per_axis], sin/cos interleaved
        angles = position[..., None] / frequencies
        return torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=4).flatten(3)

    return torch.cat((encode(y), encode(x)), dim=3).permute(0, 3, 1, 2)


# ------------------------------------------------------------------------------------------------ transformer

def _with_position(x: torch.Tensor, position: torch.Tensor | None) -> torch.Tensor:
    return x if position is None else x + position


class EncoderLayer(nn.Module):
    """Post-norm: x = norm1(x + attn(q=k=x+pos, v=x)); x = norm2(x + ffn(x)). Shapes [B, L, d]."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ffn_dim, dim))
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.dropout1, self.dropout2 = nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, padding: torch.Tensor | None, position: torch.Tensor) -> torch.Tensor:
        query = key = _with_position(x, position)
        x = self.norm1(x + self.dropout1(self.self_attn(query, key, x, key_padding_mask=padding, need_weights=False)[0]))
        return self.norm2(x + self.dropout2(self.ffn(x)))


class DecoderLayer(nn.Module):
    """Post-norm: self-attention among the queries (q=k=x+query_pos), cross-attention to the memory (q=x+query_pos,
    k=memory+pos, v=memory), FFN; each followed by residual + LayerNorm. x [B, N, d], memory [B, L, d]."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ffn_dim, dim))
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.dropout1, self.dropout2, self.dropout3 = nn.Dropout(dropout), nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, padding: torch.Tensor | None, position: torch.Tensor,
                query_position: torch.Tensor) -> torch.Tensor:
        query = key = _with_position(x, query_position)
        x = self.norm1(x + self.dropout1(self.self_attn(query, key, x, need_weights=False)[0]))
        attended = self.cross_attn(_with_position(x, query_position), _with_position(memory, position), memory,
                                   key_padding_mask=padding, need_weights=False)[0]
        x = self.norm2(x + self.dropout2(attended))
        return self.norm3(x + self.dropout3(self.ffn(x)))


class Transformer(nn.Module):
    """Encoder over the flattened feature map, decoder over the object queries (starting from zeros; the learned
    query embeddings enter as query positions). Returns every decoder layer's output, each through the decoder's
    final LayerNorm: [layers, B, N, d]."""

    def __init__(self, dim: int = 256, num_heads: int = 8, encoder_layers: int = 6, decoder_layers: int = 6,
                 ffn_dim: int = 2048, dropout: float = 0.1):
        super().__init__()
        self.encoder = nn.ModuleList(EncoderLayer(dim, num_heads, ffn_dim, dropout) for _ in range(encoder_layers))
        self.decoder = nn.ModuleList(DecoderLayer(dim, num_heads, ffn_dim, dropout) for _ in range(decoder_layers))
        self.decoder_norm = nn.LayerNorm(dim)
        for parameter in self.parameters():  # DETR's init of its transformer
            if parameter.dim() > 1:
                nn.init.xavier_uniform_(parameter)

    def forward(self, features: torch.Tensor, padding: torch.Tensor, position: torch.Tensor,
                query_embed: torch.Tensor) -> torch.Tensor:
        """features, position [B, d, h, w]; padding [B, h, w]; query_embed [N, d] -> [layers, B, N, d]"""
        memory = features.flatten(2).transpose(1, 2)  # [B, h*w, d]
        position = position.flatten(2).transpose(1, 2)
        padding = padding.flatten(1)
        if not padding.any():  # no padding in the batch: let attention take its fast unmasked kernels
            padding = None
        for layer in self.encoder:
            memory = layer(memory, padding, position)
        query_position = query_embed[None].expand(len(memory), -1, -1)
        x = torch.zeros_like(query_position)
        outputs = []
        for layer in self.decoder:
            x = layer(x, memory, padding, position, query_position)
            outputs.append(self.decoder_norm(x))
        return torch.stack(outputs)


# ------------------------------------------------------------------------------------------------ DETR

class MLP(nn.Module):
    """`layers` Linear layers with ReLU between them (DETR's box head: 3 layers, d -> d -> d -> 4)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, layers: int):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for index, layer in enumerate(self.layers):
            x = layer(x) if index == len(self.layers) - 1 else F.relu(layer(x))
        return x


class DETR(nn.Module):
    """Backbone + 1x1 projection + sine positions + transformer + class / box heads on every decoder layer.

    num_classes: class ids 0..num_classes-1 (DETR: the largest category id + 1; COCO's 91); index num_classes is
    "no object".

    forward(images [B, 3, H, W], mask [B, H, W] True on padding) ->
        {"pred_logits": [B, N, num_classes + 1], "pred_boxes": [B, N, 4] (cx, cy, w, h in [0, 1]),
         "aux_outputs": [{"pred_logits", "pred_boxes"}, ...] for the decoder layers before the last (with aux_loss)}
    """

    def __init__(self, backbone: Backbone, num_classes: int, hidden_dim: int = 256, num_heads: int = 8,
                 encoder_layers: int = 6, decoder_layers: int = 6, ffn_dim: int = 2048, dropout: float = 0.1,
                 num_queries: int = 100, aux_loss: bool = True):
        super().__init__()
        self.backbone = backbone
        self.input_proj = nn.Conv2d(backbone.num_channels, hidden_dim, kernel_size=1)
        self.transformer = Transformer(hidden_dim, num_heads, encoder_layers, decoder_layers, ffn_dim, dropout)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, layers=3)
        self.num_classes, self.hidden_dim, self.aux_loss = num_classes, hidden_dim, aux_loss

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> dict[str, Any]:
        features, small_mask = self.backbone(images, mask)
        position = sine_position_encoding(small_mask, self.hidden_dim).to(features.dtype)
        hidden = self.transformer(self.input_proj(features), small_mask, position, self.query_embed.weight)
        logits = self.class_embed(hidden)  # [layers, B, N, K + 1]
        boxes = self.bbox_embed(hidden).sigmoid()  # [layers, B, N, 4]
        outputs: dict[str, Any] = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        if self.aux_loss:
            outputs["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])]
        return outputs


@torch.no_grad()
def postprocess(outputs: dict[str, Any], sizes: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """DETR's PostProcess: per image, every query's most likely real class (the no-object column left out of the
    argmax but kept in the softmax), its probability as the score, and its box as (x0, y0, x1, y1) in pixels of
    `sizes` [B, 2] (height, width; e.g. the stored image size, for COCO evaluation)."""
    probabilities = outputs["pred_logits"].float().softmax(-1)[..., :-1]
    scores, labels = probabilities.max(-1)
    boxes = box_convert(outputs["pred_boxes"].float(), "cxcywh", "xyxy")
    height, width = sizes.unbind(1)
    boxes = boxes * torch.stack([width, height, width, height], dim=1)[:, None, :].to(boxes)
    return [{"scores": s, "labels": c, "boxes": b} for s, c, b in zip(scores, labels, boxes)]
