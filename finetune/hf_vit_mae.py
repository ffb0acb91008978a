"""Our MAE ViT <-> Hugging Face transformers' ViTMAE, both ways, without needing transformers installed.

Ours keeps the official facebookresearch/mae names (timm blocks: one fused `qkv` Linear); Hugging Face's port splits
it into query / key / value and renames every module. An export is written in the layout of the `facebook/vit-mae-*`
repositories on the Hub, which every transformers version loads (transformers 5 renames on the way in); an import
accepts that layout and transformers 5's own names.

Semantics that differ, and how they are bridged:
- LayerNorm epsilon: MAE's 1e-6, HF's ports 1e-12 (their library default): the value travels in `layer_norm_eps` /
  our `norm_eps`, so both sides compute the same thing.
- kept patches: ours round(L * (1 - mask_ratio)), HF int(...); equal for every grid and ratio the papers use; an
  export where they differ is refused (`hf_config` says so) rather than giving different masks for the same noise.
- one `mlp_ratio` for encoder and decoder here, two intermediate sizes there: an HF model whose ratios differ is
  refused by name.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import torch

HF_MAE_MODEL_TYPE, HF_VIT_MODEL_TYPE = "vit_mae", "vit"

# (our name, HF's) inside one transformer block; the fused qkv is split apart separately
_BLOCK_NAMES = (
    ("norm1", "layernorm_before"),
    ("attn.proj", "attention.output.dense"),
    ("norm2", "layernorm_after"),
    ("mlp.fc1", "intermediate.dense"),
    ("mlp.fc2", "output.dense"),
)
_QKV = ("query", "key", "value")
_EMBEDDINGS = (
    ("cls_token", "embeddings.cls_token"),
    ("pos_embed", "embeddings.position_embeddings"),
    ("patch_embed.proj.weight", "embeddings.patch_embeddings.projection.weight"),
    ("patch_embed.proj.bias", "embeddings.patch_embeddings.projection.bias"),
    ("norm.weight", "layernorm.weight"),
    ("norm.bias", "layernorm.bias"),
)
_DECODER = ("decoder_embed.weight", "decoder_embed.bias", "mask_token", "decoder_pos_embed", "decoder_norm.weight",
            "decoder_norm.bias", "decoder_pred.weight", "decoder_pred.bias")
# transformers 5's module names -> the Hub layout (its save_pretrained also writes "decoder.decoder_encoder.layer.")
_HF5_RENAMES = (
    (r"^(vit\.)?layers\.(\d+)\.", r"\1encoder.layer.\2."),
    (r"^decoder\.decoder_encoder\.layer\.(\d+)\.", r"decoder.decoder_layers.\1."),
    (r"\.attention\.q_proj\.", ".attention.attention.query."),
    (r"\.attention\.k_proj\.", ".attention.attention.key."),
    (r"\.attention\.v_proj\.", ".attention.attention.value."),
    (r"\.attention\.o_proj\.", ".attention.output.dense."),
    (r"\.mlp\.fc1\.", ".intermediate.dense."),
    (r"\.mlp\.fc2\.", ".output.dense."),
)


# ------------------------------------------------------------------------------------------------ ours -> HF

def hf_config(model_config: Mapping[str, Any]) -> dict[str, Any]:
    """config.json of `transformers.ViTMAEForPreTraining` for our MaskedAutoencoderViT's `config`."""
    c = model_config
    if c.get("encoder_mask_tokens"):
        raise ValueError("the encoder-with-mask-tokens ablation has no Hugging Face counterpart (ViTMAE's encoder "
                         "sees the visible patches only)")
    num_patches = (c["img_size"] // c["patch_size"]) ** 2
    if round(num_patches * (1 - c["mask_ratio"])) != int(num_patches * (1 - c["mask_ratio"])):
        raise ValueError(f"mask_ratio {c['mask_ratio']} on {num_patches} patches keeps a different number of patches "
                         f"here (round) than in ViTMAE (int): choose a ratio that keeps a whole number")
    return {
        "architectures": ["ViTMAEForPreTraining"], "model_type": HF_MAE_MODEL_TYPE,
        "image_size": c["img_size"], "patch_size": c["patch_size"], "num_channels": c["in_chans"],
        "hidden_size": c["embed_dim"], "num_hidden_layers": c["depth"], "num_attention_heads": c["num_heads"],
        "intermediate_size": int(c["embed_dim"] * c["mlp_ratio"]),
        "decoder_hidden_size": c["decoder_embed_dim"], "decoder_num_hidden_layers": c["decoder_depth"],
        "decoder_num_attention_heads": c["decoder_num_heads"],
        "decoder_intermediate_size": int(c["decoder_embed_dim"] * c["mlp_ratio"]),
        "hidden_act": "gelu", "qkv_bias": True, "layer_norm_eps": c.get("norm_eps", 1e-6),
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02,
        "mask_ratio": c["mask_ratio"], "norm_pix_loss": c["norm_pix_loss"],
    }  # fmt: skip


def hf_vit_config(model_config: Mapping[str, Any]) -> dict[str, Any]:
    """config.json of `transformers.ViTModel` for the encoder of our MaskedAutoencoderViT."""
    mae = hf_config(model_config)
    keep = ("image_size", "patch_size", "num_channels", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "intermediate_size", "hidden_act", "qkv_bias", "layer_norm_eps", "hidden_dropout_prob",
            "attention_probs_dropout_prob", "initializer_range")
    return {"architectures": ["ViTModel"], "model_type": HF_VIT_MODEL_TYPE, **{k: mae[k] for k in keep}}


def to_hf_state_dict(state_dict: Mapping[str, torch.Tensor], depth: int, decoder_depth: int,
                     encoder_only: bool = False) -> dict[str, torch.Tensor]:
    """Our MAE's weights -> ViTMAEForPreTraining's (Hub layout), or with `encoder_only` ViTModel's (no prefix)."""
    prefix = "" if encoder_only else "vit."
    out = {prefix + hf: state_dict[ours] for ours, hf in _EMBEDDINGS}
    for i in range(depth):
        out.update(_block_to_hf(state_dict, f"blocks.{i}.", f"{prefix}encoder.layer.{i}."))
    if encoder_only:
        return {k: v.contiguous() for k, v in out.items()}
    for i in range(decoder_depth):
        out.update(_block_to_hf(state_dict, f"decoder_blocks.{i}.", f"decoder.decoder_layers.{i}."))
    out.update({f"decoder.{name}": state_dict[name] for name in _DECODER})
    return {k: v.contiguous() for k, v in out.items()}  # (safetensors refuses the views chunk() makes)


def _block_to_hf(state_dict: Mapping[str, torch.Tensor], ours: str, hf: str) -> dict[str, torch.Tensor]:
    out = {}
    for kind in ("weight", "bias"):
        for name, part in zip(_QKV, state_dict[f"{ours}attn.qkv.{kind}"].chunk(3, dim=0)):
            out[f"{hf}attention.attention.{name}.{kind}"] = part
        out.update({f"{hf}{theirs}.{kind}": state_dict[f"{ours}{mine}.{kind}"] for mine, theirs in _BLOCK_NAMES})
    return out


# ------------------------------------------------------------------------------------------------ HF -> ours

def mae_config_from_hf(config: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Our MaskedAutoencoderViT's constructor arguments for a ViTMAE config.json; what we cannot represent is a
    ValueError naming the key and `source`."""
    if config.get("model_type") != HF_MAE_MODEL_TYPE:
        raise ValueError(f"{source}: model_type {config.get('model_type')!r} is not {HF_MAE_MODEL_TYPE!r} "
                         f"(a ViTMAE folder holds config.json with model_type vit_mae)")
    get = {**_HF_MAE_DEFAULTS, **config}.get  # (a config.json leaves the defaults out)
    for key, expected in (("hidden_act", "gelu"), ("qkv_bias", True)):
        if get(key) != expected:
            raise ValueError(f"{source}: {key}={get(key)!r} is not supported (our MAE blocks use {expected!r})")
    for key in ("image_size", "patch_size"):
        if not isinstance(get(key), int):
            raise ValueError(f"{source}: {key}={get(key)!r}: only square images and patches (one integer) are "
                             f"supported")
    mlp_ratio = get("intermediate_size") / get("hidden_size")
    decoder_mlp_ratio = get("decoder_intermediate_size") / get("decoder_hidden_size")
    if decoder_mlp_ratio != mlp_ratio:
        raise ValueError(f"{source}: the encoder's MLP ratio ({mlp_ratio}) differs from the decoder's "
                         f"({decoder_mlp_ratio}); our MAE has one mlp_ratio")
    return dict(
        img_size=get("image_size"), patch_size=get("patch_size"), in_chans=get("num_channels"),
        embed_dim=get("hidden_size"), depth=get("num_hidden_layers"), num_heads=get("num_attention_heads"),
        decoder_embed_dim=get("decoder_hidden_size"), decoder_depth=get("decoder_num_hidden_layers"),
        decoder_num_heads=get("decoder_num_attention_heads"), mlp_ratio=mlp_ratio,
        norm_pix_loss=get("norm_pix_loss"), mask_ratio=get("mask_ratio"), norm_eps=get("layer_norm_eps"),
    )  # fmt: skip


# ViTMAEConfig's defaults, for keys a config.json leaves out
_HF_MAE_DEFAULTS: dict[str, Any] = dict(
    hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, hidden_act="gelu",
    layer_norm_eps=1e-12, image_size=224, patch_size=16, num_channels=3, qkv_bias=True, decoder_num_attention_heads=16,
    decoder_hidden_size=512, decoder_num_hidden_layers=8, decoder_intermediate_size=2048, mask_ratio=0.75,
    norm_pix_loss=False,
)  # fmt: skip


def from_hf_state_dict(state_dict: Mapping[str, torch.Tensor], depth: int, decoder_depth: int
                       ) -> dict[str, torch.Tensor]:
    """ViTMAEForPreTraining's weights (Hub layout or transformers 5's names) -> our MAE's. A checkpoint without the
    decoder (a ViTMAEModel, an encoder-only release) gives the encoder's keys only. A missing key is a KeyError
    naming it."""
    hf = {_hub_name(key): value for key, value in state_dict.items()}
    if not any(key.startswith("vit.") for key in hf):  # a ViTMAEModel's own folder: the encoder, unprefixed
        hf = {f"vit.{key}": value for key, value in hf.items()}
    out = {ours: hf[f"vit.{theirs}"] for ours, theirs in _EMBEDDINGS}
    for i in range(depth):
        out.update(_block_from_hf(hf, f"vit.encoder.layer.{i}.", f"blocks.{i}."))
    if not any(key.startswith("decoder.") for key in hf):
        return out
    for i in range(decoder_depth):
        out.update(_block_from_hf(hf, f"decoder.decoder_layers.{i}.", f"decoder_blocks.{i}."))
    out.update({name: hf[f"decoder.{name}"] for name in _DECODER})
    return out


def _hub_name(key: str) -> str:
    for pattern, replacement in _HF5_RENAMES:
        key = re.sub(pattern, replacement, key)
    return key


def _block_from_hf(hf: Mapping[str, torch.Tensor], theirs: str, ours: str) -> dict[str, torch.Tensor]:
    out = {}
    for kind in ("weight", "bias"):
        out[f"{ours}attn.qkv.{kind}"] = torch.cat([hf[f"{theirs}attention.attention.{n}.{kind}"] for n in _QKV])
        out.update({f"{ours}{mine}.{kind}": hf[f"{theirs}{hf_name}.{kind}"] for mine, hf_name in _BLOCK_NAMES})
    return out
