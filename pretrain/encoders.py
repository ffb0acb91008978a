"""One road from a checkpoint to an encoder: `build_encoder(cfg, image_size)` returns a timm model for any head.

Every head (linear probe, k-NN and feature export, finetuning, distillation teachers, DETR backbones) and the CLIP
image-tower initialisation get their trunk here, from an `EncoderConfig` (pretrain/config.py):

    our checkpoint, recognised by its metadata              ->  the timm model its encoder loads into
      "mae"        MAE's ViT, UM-MAE's / SimMIM's Swin      ->  VisionTransformer / SwinTransformer
                   SimMIM's CrossFormer, DAT, MSwin, AA-ResNet ->  that backbone (pretrain/models/backbones)
      "clip"       a CLIP run, checkpoint or open_clip export ->  the timm image tower (trunk)
      "finetune"   a finetuned classifier                   ->  the classifier (head kept or replaced)
    a timm model name + any local weights file              ->  timm.create_model(name)
    a registered pretraining model name, no checkpoint      ->  its encoder, randomly initialised

A timm model is described by a JSON-able *spec* (builder + constructor arguments, see `create_timm_model`), stored
in the metadata of every weights file a finetuning or detection run writes, so those files rebuild their model.

On the way in, the weights are fitted to the new model as MAE's finetuning does:
- position embeddings are resampled to the new patch grid (timm's `resample_abs_pos_embed`), and a distillation
  token that the checkpoint lacks starts from the class token's position;
- a new head is initialised small (trunc-normal std 2e-5, zero bias), the old one dropped;
- with global average pooling the encoder's final norm is dropped for a fresh `fc_norm` (MAE's models_vit);
- the model family's own conversion runs last (timm's `checkpoint_filter_fn`: e.g. Swin's relative position tables).
Anything else that does not fit is an error naming the keys.
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from .checkpoint import WEIGHTS_SUFFIXES, CheckpointError, read_weights, read_weights_metadata, resolve_weights_file
from .checkpoint import state_dict_mismatch
from .config import ConfigError, EncoderConfig
from .models import MODEL_REGISTRY, MaskedAutoencoderViT, create_model

# the `objective` in the metadata of the weights files this project writes
MAE_OBJECTIVE, CLIP_OBJECTIVE, CLASSIFIER_OBJECTIVE = "mae", "clip", "finetune"
SPEC_KEY = "classifier"  # metadata key of a classifier's spec
ACCEPTED = ("a masked-image pretraining checkpoint (MAE ViT, UM-MAE or SimMIM Swin, SimMIM CrossFormer / DAT / "
            "MSwin / AA-ResNet), a CLIP run, checkpoint or "
            "open_clip export, or a finetuned classifier of this project")


@dataclass
class Encoder:
    model: nn.Module  # a timm model (num_classes=0: features; else a classifier)
    spec: dict[str, Any]  # rebuilds `model` untrained (create_timm_model)
    description: str  # where the weights came from, for logs and metrics.json

    def __iter__(self):  # model, spec, description = build_encoder(...)
        return iter((self.model, self.spec, self.description))


# ------------------------------------------------------------------------------------------------ specs -> models

def create_timm_model(spec: dict[str, Any], drop_path: float = 0.0) -> nn.Module:
    """An untrained timm model from its spec:
    {"builder": "vit" | "swin" | "timm", "kwargs": {...}, "num_classes": int, "global_pool": str | None,
     "distilled": bool (vit), "norm_eps": float (vit, default 1e-6), "model_name": str (timm)}."""
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.vision_transformer import VisionTransformer

    common: dict[str, Any] = dict(num_classes=spec["num_classes"])
    if spec.get("global_pool") is not None:
        common["global_pool"] = spec["global_pool"]
    if drop_path > 0:
        common["drop_path_rate"] = drop_path
    builder = spec["builder"]
    if builder == "vit":  # shaped like our MAE encoders (pretrain/models/mae.py timm_vit_kwargs)
        vit = VisionTransformerDistilled if spec.get("distilled") else VisionTransformer
        norm_layer = partial(nn.LayerNorm, eps=spec.get("norm_eps", 1e-6))
        return vit(**spec["kwargs"], norm_layer=norm_layer, **common)
    if builder == "swin":  # shaped like our Swin encoders (pretrain/models/swin_mae.py timm_swin_kwargs)
        return SwinTransformer(**spec["kwargs"], **common)
    if builder == "timm":
        import timm

        if not timm.is_model(spec["model_name"]):
            from .models import clip  # noqa: F401  (registers this package's timm towers)
        return timm.create_model(spec["model_name"], pretrained=False, **spec["kwargs"], **common)
    raise ValueError(f"unknown model builder {builder!r}")


def spec_for_pretrained(pretrained: nn.Module, image_size: int) -> dict[str, Any]:
    """The spec of the timm model that our pretraining model's encoder loads into, at `image_size`."""
    if hasattr(pretrained, "timm_spec"):  # SimMIM over a registered backbone: its timm name and arguments
        return pretrained.timm_spec()
    if hasattr(pretrained, "timm_vit_kwargs"):
        kwargs = {k: v for k, v in pretrained.timm_vit_kwargs().items() if k not in ("norm_layer", "global_pool")}
        spec = {"builder": "vit", "kwargs": {**kwargs, "img_size": image_size}}
        norm_eps = pretrained.config.get("norm_eps", 1e-6)
        return spec if norm_eps == 1e-6 else {**spec, "norm_eps": norm_eps}  # (older specs hold none: 1e-6)
    if hasattr(pretrained, "timm_swin_kwargs"):
        kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in pretrained.timm_swin_kwargs().items()}
        return {"builder": "swin", "kwargs": {**kwargs, "img_size": image_size}}
    raise ConfigError(f"{type(pretrained).__name__} has no timm encoder (timm_vit_kwargs / timm_swin_kwargs)")


def encoder_of(pretrained: nn.Module, image_size: int) -> nn.Module:
    """The encoder of our pretraining model `pretrained` (MAE's ViT, UM-MAE's / SimMIM's Swin) as the timm model a
    checkpoint of it gives `build_encoder` (encoder.global_pool null: the model's own pooling, a ViT's class token,
    a Swin's average), without a head, its weights copied from `pretrained.encoder_state_dict()`; in eval mode.
    Monitoring during pretraining measures this model, so its numbers are those of the heads on the checkpoint."""
    spec = {**spec_for_pretrained(pretrained, image_size), "num_classes": 0, "global_pool": None}
    model = _create_for_image_size(spec, image_size, drop_path=0.0)
    load_trunk(model, pretrained.encoder_state_dict(), f"the {type(pretrained).__name__} being trained")
    return model.eval()


# ------------------------------------------------------------------------------------------------ the one road

def build_encoder(cfg: EncoderConfig, image_size: Optional[int] = None, *, num_classes: int = 0,
                  distill_token: bool = False, dynamic_img_size: bool = False, keep_head: bool = False) -> Encoder:
    """The timm model `cfg` describes, its weights loaded, built for `cfg.image_size` or else `image_size` inputs
    (None and no cfg.image_size: the size recorded in a classifier checkpoint).

    num_classes 0: no head (`forward_head(..., pre_logits=True)` gives the pooled features); else a new head,
    initialised small. keep_head: the checkpoint's own head is kept (a distillation teacher: every weight,
    classifier included, must be there). distill_token: a ViT gets a distillation token and head (timm's
    VisionTransformerDistilled). dynamic_img_size: the model takes any input size (DETR)."""
    if cfg.source == "pixels":
        raise ConfigError("encoder.source=pixels has no encoder model (the pixels are the features)")
    size = cfg.image_size or image_size
    spec, state, description = _trunk_source(cfg, size)
    if size is None:
        size = recorded_image_size(spec)
        if size is None:
            raise ConfigError(f"the input size of {description} is not recorded: set encoder.image_size")
    if keep_head:
        if "num_classes" not in spec:
            spec["num_classes"] = num_classes
    else:
        spec.update(num_classes=num_classes, global_pool=cfg.global_pool)
    if spec["builder"] == "vit":
        spec["distilled"] = bool(distill_token) or (keep_head and spec.get("distilled", False))
        if spec["distilled"] and spec.get("global_pool") not in (None, "token"):
            raise ConfigError("a distillation token needs encoder.global_pool=token (the distilled head reads the "
                              f"class and distillation tokens), got {spec.get('global_pool')!r}")
    if dynamic_img_size:
        spec["kwargs"] = {**spec["kwargs"], "dynamic_img_size": True}
    model = _create_for_image_size(spec, size, cfg.drop_path)
    if state is not None:
        load_trunk(model, state, description, new_head=not keep_head)
    if not keep_head:
        init_heads(model, cfg.head_init_std)
    return Encoder(model, spec, description)


def recorded_image_size(spec: dict[str, Any]) -> Optional[int]:
    """The input size a classifier's spec records: a ViT's or Swin's `img_size`; for a CNN, which takes any size,
    the size it was trained at (`image_size`, written by finetuning); None if neither is there."""
    return spec["kwargs"].get("img_size") or spec.get("image_size")


def _trunk_source(cfg: EncoderConfig, image_size: Optional[int]
                  ) -> tuple[dict[str, Any], Optional[dict[str, torch.Tensor]], str]:
    """(spec without head settings, the trunk's weights or None, a description) for `cfg`."""
    if cfg.checkpoint is None:
        if cfg.source == "timm":
            return {"builder": "timm", "model_name": cfg.model_name, "kwargs": dict(cfg.model_kwargs)}, None, \
                f"random init (timm {cfg.model_name})"
        try:
            pretrained = create_model(cfg.model_name, img_size=image_size or 224, **cfg.model_kwargs)
        except (ValueError, TypeError) as err:
            raise ConfigError(f"'encoder.model_name' {cfg.model_name} / 'encoder.model_kwargs' "
                              f"{cfg.model_kwargs}: {err}") from None
        kwargs = f" {cfg.model_kwargs}" if cfg.model_kwargs else ""
        return spec_for_pretrained(pretrained, image_size or 224), None, f"random init ({cfg.model_name}{kwargs})"
    kind = checkpoint_kind(cfg.checkpoint)
    if kind == CLIP_OBJECTIVE or (kind is None and cfg.source == "clip"):
        return _clip_tower(cfg, image_size)
    if kind is None:
        weights_file = resolve_weights_file(cfg.checkpoint)
        if cfg.source != "timm":
            raise CheckpointError(f"{weights_file} is not a checkpoint of this project (its metadata names no "
                                  f"objective); an encoder comes from {ACCEPTED}, or, for other weights "
                                  f"({', '.join(WEIGHTS_SUFFIXES)}), set encoder.source=timm and encoder.model_name "
                                  f"to its timm model")
        state, _ = read_weights(weights_file)
        return {"builder": "timm", "model_name": cfg.model_name, "kwargs": dict(cfg.model_kwargs)}, state, \
            f"timm {cfg.model_name} + {weights_file}"
    weights_file = resolve_weights_file(cfg.checkpoint)
    if kind == MAE_OBJECTIVE:
        pretrained, weights_file = pretraining_model_from_checkpoint(weights_file)
        spec = spec_for_pretrained(pretrained, image_size or pretrained.config["img_size"])
        return spec, pretrained.encoder_state_dict(), f"MAE checkpoint {weights_file}"
    if kind == CLASSIFIER_OBJECTIVE:
        state, metadata = read_weights(weights_file)
        spec = json.loads(metadata[SPEC_KEY])
        return spec, state, f"finetuned classifier {weights_file}"
    raise CheckpointError(f"{weights_file} is a checkpoint of objective {kind!r}, which holds no encoder to "
                          f"reuse; an encoder comes from {ACCEPTED}")


def checkpoint_kind(path: str | Path) -> Optional[str]:
    """The objective that wrote our checkpoint at `path` ("mae", "clip", "finetune", "linear_probe", "detr"; "clip"
    for an open_clip export folder), or None for weights of other origin."""
    from .models.clip import EXPORT_CONFIG_FILE

    path = Path(path)
    if path.is_dir() and (path / EXPORT_CONFIG_FILE).is_file():
        return CLIP_OBJECTIVE
    weights_file = resolve_weights_file(path)
    if weights_file.suffix != ".safetensors":
        return None
    metadata = read_weights_metadata(weights_file)
    return metadata.get("objective")


def pretraining_architecture(path: str | Path) -> tuple[str, dict[str, Any], Path]:
    """(registered model name, constructor arguments, weights file) of a `python -m pretrain` masked-image checkpoint,
    from its metadata alone (no tensors read)."""
    weights_file = resolve_weights_file(path)
    metadata = read_weights_metadata(weights_file)
    if metadata.get("objective") != MAE_OBJECTIVE or "model_config" not in metadata:
        raise CheckpointError(f"{weights_file} is not a masked-image pretraining checkpoint of this project "
                              f"(metadata: {sorted(metadata)})")
    return metadata.get("model_name", ""), json.loads(metadata["model_config"]), weights_file


def create_pretraining_model(name: str, config: dict[str, Any]) -> nn.Module:
    """Our pretraining model `name` with constructor arguments `config`; a name we do not register (an imported
    Hugging Face ViTMAE, finetune/export.py) is a MaskedAutoencoderViT."""
    return create_model(name, **config) if name in MODEL_REGISTRY else MaskedAutoencoderViT(**config)


def load_pretraining_weights(model: nn.Module, path: str | Path) -> Path:
    """Load the weights of our masked-image checkpoint at `path` into `model` (the architecture must match: an error
    lists what does not fit); returns the weights file."""
    weights_file = resolve_weights_file(path)
    state_dict, _ = read_weights(weights_file)
    problem = state_dict_mismatch(model.state_dict(), state_dict)
    if problem is not None:
        raise CheckpointError(f"checkpoint {weights_file} does not fit the model ({type(model).__name__}): {problem}")
    model.load_state_dict(state_dict)
    return weights_file


def pretraining_model_from_checkpoint(path: str | Path) -> tuple[nn.Module, Path]:
    """(our pretraining model of a `python -m pretrain` masked-image checkpoint, the weights file), rebuilt from the
    model name and constructor arguments in its metadata."""
    name, config, _ = pretraining_architecture(path)
    model = create_pretraining_model(name, config)
    return model, load_pretraining_weights(model, path)


def _clip_tower(cfg: EncoderConfig, image_size: Optional[int]
                ) -> tuple[dict[str, Any], dict[str, torch.Tensor], str]:
    import open_clip

    from .models.clip import load_clip

    try:
        clip, name = load_clip(cfg.checkpoint, cfg.open_clip_config)
    except ValueError as err:
        raise ConfigError(f"'encoder.checkpoint' {cfg.checkpoint}: {err}") from None
    trunk = getattr(clip.visual, "trunk", None)
    vision = (open_clip.get_model_config(name) or {}).get("vision_cfg", {})
    if trunk is None or "timm_model_name" not in vision:
        raise ConfigError(f"the image tower of CLIP model {name} is not a timm model ({type(clip.visual).__name__}); "
                          f"only timm towers serve as encoders here")
    kwargs = dict(cfg.model_kwargs)
    kwargs["img_size"] = image_size or vision.get("image_size")
    spec = {"builder": "timm", "model_name": vision["timm_model_name"], "kwargs": kwargs}
    return spec, trunk.state_dict(), f"CLIP image tower ({name}, timm {vision['timm_model_name']}) of {cfg.checkpoint}"


def _create_for_image_size(spec: dict[str, Any], image_size: int, drop_path: float) -> nn.Module:
    """Build the model for `image_size` inputs (updating `spec`). A timm name gets `img_size` where its
    constructor takes one (ViTs, Swins); CNNs take any size and have no such argument."""
    if spec["builder"] in ("vit", "swin"):
        spec["kwargs"] = {**spec["kwargs"], "img_size": image_size}
    candidates = [spec]
    if spec["builder"] == "timm":
        candidates.insert(0, {**spec, "kwargs": {**spec["kwargs"], "img_size": image_size}})
    what = spec.get("model_name", spec["builder"])
    for candidate in candidates:
        try:
            model = create_timm_model(candidate, drop_path)
        except TypeError as err:
            if "img_size" in str(err) and candidate is not candidates[-1]:
                continue
            raise ConfigError(f"encoder {what} with {spec['kwargs']}: {err}") from None
        except (ValueError, AssertionError, RuntimeError) as err:
            raise ConfigError(f"encoder {what} with {spec['kwargs']}: {err}") from None
        spec.update(candidate)
        break
    built = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if built is not None and tuple(built) != (image_size, image_size):
        raise ConfigError(f"the encoder is built for {tuple(built)} images and cannot take {image_size}x{image_size}")
    return model


# ------------------------------------------------------------------------------------------------ fitting weights

def head_names(model: nn.Module) -> list[str]:
    """Module names of the classifier head(s): "head" (ViT), "head"/"head_dist" (distilled ViT), "head.fc" (Swin),
    "fc" (ResNet) ..."""
    heads = model.get_classifier() if hasattr(model, "get_classifier") else ()
    heads = heads if isinstance(heads, tuple) else (heads,)
    return [name for name, module in model.named_modules() if name and any(module is head for head in heads)]


def init_heads(model: nn.Module, std: float) -> None:
    """MAE's head init: trunc_normal(std) weights (2e-5: the pretrained features start almost unchanged), zero bias."""
    from timm.layers import trunc_normal_

    for name in head_names(model):
        head = model.get_submodule(name)
        if isinstance(head, nn.Linear):
            trunc_normal_(head.weight, std=std)
            nn.init.zeros_(head.bias)


def fit_pos_embed(pos_embed: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """A checkpoint's ViT position embeddings [1, prefix + g*g, D] fitted to `model`: prefix entries (class,
    distillation token) matched, the g x g grid resampled to the model's patch grid (bicubic)."""
    from timm.layers import resample_abs_pos_embed

    target_prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
    total = pos_embed.shape[1]
    for source_prefix in dict.fromkeys((target_prefix, 1, 0, 2)):
        side = math.isqrt(total - source_prefix)
        if side * side == total - source_prefix:
            break
    else:
        raise CheckpointError(f"position embeddings of {total} tokens are not prefix tokens + a square grid")
    prefix, grid = pos_embed[:, :source_prefix], pos_embed[:, source_prefix:]
    if source_prefix < target_prefix:
        if source_prefix == 0:
            raise CheckpointError("the checkpoint's position embeddings have no class-token entry the model needs")
        # DeiT's distillation token sits beside the class token: it starts from the class token's position
        prefix = torch.cat([prefix, prefix[:, :1].expand(-1, target_prefix - source_prefix, -1)], dim=1)
    prefix = prefix[:, :target_prefix]
    new_grid = list(model.patch_embed.grid_size)
    if [side, side] != new_grid:
        grid = resample_abs_pos_embed(grid, new_size=new_grid, old_size=[side, side], num_prefix_tokens=0)
    return torch.cat([prefix, grid], dim=1)


def load_trunk(model: nn.Module, state: dict[str, torch.Tensor], where: str, new_head: bool = True) -> None:
    """Load pretrained weights into `model`, fitted as the module docstring says. new_head=True: the checkpoint's
    head is dropped and the model's head (and fc_norm, distillation token) may be missing from it; False: every
    weight must be there (a teacher)."""
    state = dict(state)
    if "pos_embed" in state and getattr(model, "pos_embed", None) is not None and hasattr(model, "num_prefix_tokens"):
        state["pos_embed"] = fit_pos_embed(state["pos_embed"], model)
    filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None:  # timm's per-family conversions (it also drops non-persistent buffers)
        state = filter_fn(state, model)
    allowed_missing: set[str] = set()
    if new_head:
        heads = tuple(f"{name}." for name in head_names(model))
        # the checkpoint's own head (a classifier's; a CLIP tower's projection) is not part of the trunk
        state = {k: v for k, v in state.items() if not k.startswith(heads) and not k.startswith("head.")}
        allowed_missing |= {k for k in model.state_dict() if k.startswith(heads)}
        if isinstance(getattr(model, "norm", None), nn.Identity):  # global average pooling: a new fc_norm
            state = {k: v for k, v in state.items() if not k.startswith("norm.")}
            allowed_missing |= {k for k in model.state_dict() if k.startswith("fc_norm.")}
        allowed_missing |= {"dist_token"} if hasattr(model, "dist_token") else set()
    problems = state_dict_mismatch(model.state_dict(), state, allowed_missing)
    if problems is not None:
        hint = ""
        if "fc_norm.weight" in state and "norm.weight" not in state and "norm.weight" in model.state_dict():
            # a classifier finetuned with global average pooling has no final token norm, only the pooled fc_norm
            hint = " (a classifier finetuned with global average pooling: set encoder.global_pool=avg)"
        raise CheckpointError(f"the weights of {where} do not fit the model ({type(model).__name__}): "
                              f"{problems}{hint}")
    model.load_state_dict(state, strict=False)


def load_encoder_into(target: nn.Module, cfg: EncoderConfig, image_size: int) -> str:
    """Copy the trunk `cfg` describes into the existing timm model `target` (e.g. a CLIP image tower's trunk), its
    head left as it is; a checkpoint whose architecture differs from `target` is a CheckpointError listing the
    keys. Returns the encoder's description."""
    encoder = build_encoder(cfg, image_size)
    source = {k: v for k, v in encoder.model.state_dict().items() if not k.startswith(("head.", "fc_norm."))}
    expected = {k: v for k, v in target.state_dict().items() if not k.startswith(("head.", "fc_norm."))}
    problems = state_dict_mismatch(expected, source)
    if problems is not None:
        raise CheckpointError(f"{encoder.description} ({type(encoder.model).__name__}) does not fit the "
                              f"{type(target).__name__}: {problems}")
    target.load_state_dict(source, strict=False)
    return encoder.description


def init_image_tower(model: nn.Module, checkpoint: str | Path) -> str:
    """Start the timm trunk of a CLIP model's image tower (open_clip's TimmModel) from the encoder of one of our
    checkpoints (MAE's ViT, UM-MAE's / SimMIM's Swin, another CLIP run); the projection stays as initialised.
    Returns the encoder's description."""
    trunk = getattr(model.visual, "trunk", None)
    if trunk is None:
        raise ConfigError(f"only a timm image tower can start from a checkpoint, not {type(model.visual).__name__}")
    # a ViT trunk that pools the average has a fresh fc_norm in place of its final norm (MAE's finetuning models);
    # otherwise the checkpoint's architecture keeps its own default pooling and final norm
    pool = "avg" if isinstance(getattr(trunk, "norm", None), nn.Identity) else None
    cfg = EncoderConfig(source="mae", checkpoint=str(checkpoint), global_pool=pool, drop_path=0.0)
    return load_encoder_into(trunk, cfg, model.visual.image_size[0])
