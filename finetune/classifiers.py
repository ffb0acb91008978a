"""Classifiers for finetuning and distillation: a timm model with a new head on a pretrained trunk.

Where the trunk comes from (`encoder.source`, see finetune/config.py FinetuneEncoderConfig): our masked-image
checkpoints ("mae": MAE's ViT, UM-MAE's / SimMIM's Swin, whose `encoder_state_dict()` uses timm's names), the timm
image tower of our CLIP models ("clip"), or any timm model with a local weights file ("timm").

On the way in, the weights are fitted to the new model as MAE's finetuning does:
- position embeddings are resampled to the new patch grid (timm's `resample_abs_pos_embed`), and a distillation
  token that the checkpoint lacks starts from the class token's position;
- the old head is dropped and the new one initialised small (trunc-normal std 2e-5, zero bias);
- with global average pooling the encoder's final norm is dropped for a fresh `fc_norm` (MAE's models_vit);
- the model family's own conversion runs last (timm's `checkpoint_filter_fn`: e.g. Swin's relative position tables).
Anything else that does not fit is an error naming the keys.

A classifier is described by a JSON-able *spec* (builder + constructor arguments), stored in the metadata of every
weights file a finetuning run writes, so `classifier_from_checkpoint` rebuilds it, e.g. as a distillation teacher.
"""
from __future__ import annotations

import json
import math
import sys
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pretrain.checkpoint import (
    MODEL_FILE,
    CheckpointError,
    load_model_file,
    load_state_dict_checked,
    load_weights_file,
    state_dict_mismatch,
)
from pretrain.config import ConfigError
from pretrain.models import MODEL_REGISTRY, MaskedAutoencoderViT, create_model

from .encoders import resolve_weights_file

FINETUNE_OBJECTIVE = "finetune"  # the `objective` in the metadata of our classifier weights
BEST_DIR, LAST_DIR = "best", "last"  # a finetuning run's best and last weights (OUTPUT_DIR/best/model.safetensors)
SPEC_KEY = "classifier"


# ------------------------------------------------------------------------------------------------ specs -> models

def create_classifier(spec: dict[str, Any], drop_path: float = 0.0) -> nn.Module:
    """An untrained classifier from its spec:
    {"builder": "vit" | "swin" | "timm", "kwargs": {...}, "num_classes": int, "global_pool": str | None,
     "distilled": bool (vit), "model_name": str (timm)}."""
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
        return vit(**spec["kwargs"], norm_layer=partial(nn.LayerNorm, eps=1e-6), **common)
    if builder == "swin":  # shaped like our Swin encoders (pretrain/models/swin_mae.py timm_swin_kwargs)
        return SwinTransformer(**spec["kwargs"], **common)
    if builder == "timm":
        import timm

        if not timm.is_model(spec["model_name"]):
            import pretrain.models.clip  # noqa: F401  (registers this package's timm towers)
        return timm.create_model(spec["model_name"], pretrained=False, **spec["kwargs"], **common)
    raise ValueError(f"unknown classifier builder {builder!r}")


def build_classifier(encoder, num_classes: int, image_size: int, distill_token: bool = False
                     ) -> tuple[nn.Module, dict[str, Any], str]:
    """(classifier with its trunk loaded and a new head, its spec, a description) for the `encoder` config section
    (FinetuneEncoderConfig). `distill_token`: a ViT gets a distillation token and head (timm's
    VisionTransformerDistilled); other models keep their single head."""
    state, description = None, None
    if encoder.source == "mae":
        if encoder.checkpoint is not None:
            pretrained, weights_file = masked_model_from_checkpoint(encoder.checkpoint)
            state, description = pretrained.encoder_state_dict(), f"MAE checkpoint {weights_file}"
        else:
            try:
                pretrained = create_model(encoder.model_name, img_size=image_size, **encoder.model_kwargs)
            except (ValueError, TypeError) as err:
                raise ConfigError(f"'encoder.model_name' {encoder.model_name} / 'encoder.model_kwargs' "
                                  f"{encoder.model_kwargs}: {err}") from None
            description = f"random init ({encoder.model_name}{' ' + str(encoder.model_kwargs) if encoder.model_kwargs else ''})"
        spec = spec_for_pretrained(pretrained, image_size)
    elif encoder.source == "clip":
        spec, state, description = _clip_tower(encoder, image_size)
    else:
        spec = {"builder": "timm", "model_name": encoder.model_name, "kwargs": dict(encoder.model_kwargs)}
        if encoder.checkpoint is not None:
            weights_file = resolve_weights_file(encoder.checkpoint)
            state, description = read_weights_file(weights_file), f"timm {encoder.model_name} + {weights_file}"
        else:
            description = f"random init (timm {encoder.model_name})"
    spec.update(num_classes=num_classes, global_pool=encoder.global_pool)
    if spec["builder"] == "vit":
        spec["distilled"] = bool(distill_token)
        if distill_token and encoder.global_pool not in (None, "token"):
            raise ConfigError("a distillation token needs encoder.global_pool=token (the distilled head reads the "
                              f"class and distillation tokens), got {encoder.global_pool!r}")
    model = _create_for_image_size(spec, image_size, encoder.drop_path)
    if state is not None:
        load_trunk(model, state, description)
    init_heads(model, encoder.head_init_std)
    return model, spec, description


def _create_for_image_size(spec: dict[str, Any], image_size: int, drop_path: float) -> nn.Module:
    """Build the classifier for `image_size` inputs (updating `spec`). A timm name gets `img_size` where its
    constructor takes one (ViTs, Swins); CNNs take any size and have no such argument."""
    candidates = [spec]
    if spec["builder"] == "timm" and "img_size" not in spec["kwargs"]:
        candidates.insert(0, {**spec, "kwargs": {**spec["kwargs"], "img_size": image_size}})
    for candidate in candidates:
        try:
            model = create_classifier(candidate, drop_path)
        except TypeError as err:
            if "img_size" in str(err) and candidate is not candidates[-1]:
                continue
            raise ConfigError(f"encoder {spec.get('model_name', spec['builder'])} with {spec['kwargs']}: {err}") from None
        except (ValueError, AssertionError, RuntimeError) as err:
            raise ConfigError(f"encoder {spec.get('model_name', spec['builder'])} with {spec['kwargs']}: {err}") from None
        spec.update(candidate)
        break
    built = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if built is not None and tuple(built) != (image_size, image_size):
        raise ConfigError(f"the encoder is built for {tuple(built)} images and cannot take data.image_size={image_size}")
    return model


def spec_for_pretrained(pretrained: nn.Module, image_size: int) -> dict[str, Any]:
    """The spec of the timm model that our pretraining model's encoder loads into, at `image_size`."""
    if hasattr(pretrained, "timm_vit_kwargs"):
        kwargs = {k: v for k, v in pretrained.timm_vit_kwargs().items() if k not in ("norm_layer", "global_pool")}
        return {"builder": "vit", "kwargs": {**kwargs, "img_size": image_size}}
    if hasattr(pretrained, "timm_swin_kwargs"):
        kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in pretrained.timm_swin_kwargs().items()}
        return {"builder": "swin", "kwargs": {**kwargs, "img_size": image_size}}
    raise ConfigError(f"{type(pretrained).__name__} has no timm encoder (timm_vit_kwargs / timm_swin_kwargs)")


def masked_model_from_checkpoint(path: str | Path) -> tuple[nn.Module, Path]:
    """(our pretraining model of a `python -m pretrain` masked-image checkpoint, the weights file), rebuilt from the
    model name and constructor arguments in its metadata."""
    weights_file = resolve_weights_file(path)
    state_dict, metadata = load_model_file(weights_file)
    if metadata.get("objective") != "mae" or "model_config" not in metadata:
        raise CheckpointError(f"{weights_file} is not a masked-image (MAE) checkpoint of this project (metadata: "
                              f"{sorted(metadata)}); use encoder.source=timm or clip for other weights")
    config = json.loads(metadata["model_config"])
    name = metadata.get("model_name")
    model = create_model(name, **config) if name in MODEL_REGISTRY else MaskedAutoencoderViT(**config)
    load_state_dict_checked(model, state_dict, weights_file)
    return model, weights_file


def _clip_tower(encoder, image_size: int) -> tuple[dict[str, Any], dict[str, torch.Tensor], str]:
    import open_clip

    from pretrain.models.clip import load_clip

    try:
        clip, name = load_clip(encoder.checkpoint, encoder.open_clip_config)
    except ValueError as err:
        raise ConfigError(f"'encoder.checkpoint' {encoder.checkpoint}: {err}") from None
    trunk = getattr(clip.visual, "trunk", None)
    vision = (open_clip.get_model_config(name) or {}).get("vision_cfg", {})
    if trunk is None or "timm_model_name" not in vision:
        raise ConfigError(f"the image tower of CLIP model {name} is not a timm model ({type(clip.visual).__name__}); "
                          f"only timm towers can be finetuned here")
    kwargs = dict(encoder.model_kwargs)
    if image_size != vision.get("image_size"):
        kwargs["img_size"] = image_size
    spec = {"builder": "timm", "model_name": vision["timm_model_name"], "kwargs": kwargs}
    return spec, trunk.state_dict(), f"CLIP image tower ({name}, timm {vision['timm_model_name']}) of {encoder.checkpoint}"


def classifier_from_checkpoint(path: str | Path) -> tuple[nn.Module, dict[str, Any], Path]:
    """(classifier, spec, weights file) of our finetuning run (its best weights), one of its checkpoint directories
    or a weights file, rebuilt from the spec in the metadata."""
    path = Path(path)
    weights_file = path / BEST_DIR / MODEL_FILE if (path / BEST_DIR / MODEL_FILE).is_file() else resolve_weights_file(path)
    state_dict, metadata = load_model_file(weights_file)
    if metadata.get("objective") != FINETUNE_OBJECTIVE or SPEC_KEY not in metadata:
        raise CheckpointError(f"{weights_file} is not a classifier of this project's finetuning (metadata: "
                              f"{sorted(metadata)}); for other weights give distillation.teacher_model too")
    spec = json.loads(metadata[SPEC_KEY])
    model = create_classifier(spec)
    problem = state_dict_mismatch(model.state_dict(), state_dict)
    if problem is not None:
        raise CheckpointError(f"{weights_file} does not fit its own spec {spec}: {problem}")
    model.load_state_dict(state_dict)
    return model, spec, weights_file


def timm_classifier_with_weights(name: str, weights: str | Path, num_classes: int, kwargs: dict | None = None) -> nn.Module:
    """timm model `name` with every weight, classifier included, from a local file (a teacher)."""
    spec = {"builder": "timm", "model_name": name, "kwargs": dict(kwargs or {}), "num_classes": num_classes}
    try:
        model = create_classifier(spec)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ConfigError(f"teacher model {name} with {kwargs}: {err}") from None
    weights_file = resolve_weights_file(weights)
    load_trunk(model, read_weights_file(weights_file), f"{name} + {weights_file}", new_head=False)
    return model


# ------------------------------------------------------------------------------------------------ weights

def read_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors, or from .pth/.pt/.bin/.ckpt read with torch.load(weights_only=True) (a pickle
    that would run code is refused: pretrain.checkpoint.load_weights_file); the usual wrappers ({"model": ...},
    {"state_dict": ...}, DDP's "module." prefix) are taken off."""
    state: Any = load_weights_file(path)
    if not isinstance(state, dict):
        raise CheckpointError(f"weights file {path} holds a {type(state).__name__}, not a state dict")
    for wrapper in ("model", "state_dict", "module"):
        if isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if all(key.startswith("module.") for key in state):
        state = {key[len("module."):]: value for key, value in state.items()}
    return dict(state)


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
        state = {k: v for k, v in state.items() if not k.startswith(heads)}
        allowed_missing |= {k for k in model.state_dict() if k.startswith(heads)}
        if isinstance(getattr(model, "norm", None), nn.Identity):  # global average pooling: a new fc_norm
            state = {k: v for k, v in state.items() if not k.startswith("norm.")}
            allowed_missing |= {k for k in model.state_dict() if k.startswith("fc_norm.")}
        allowed_missing |= {"dist_token"} if hasattr(model, "dist_token") else set()
    problems = state_dict_mismatch(model.state_dict(), state, allowed_missing)
    if problems is not None:
        raise CheckpointError(f"the weights of {where} do not fit the classifier ({type(model).__name__}): {problems}")
    model.load_state_dict(state, strict=False)
