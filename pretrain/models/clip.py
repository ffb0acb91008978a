"""CLIP models, built by open_clip from its JSON model configs: a timm image tower (ViT or Swin) and open_clip's
text transformer and tokenizer. Nothing here re-implements CLIP; this file only

- registers this package's model configs (`open_clip_configs/*.json`) and the timm towers they name that timm does
  not ship (a small ViT and a small Swin shaped like our CPU MAE / UM-MAE / SimMIM encoders, so such a checkpoint
  can initialise the image tower);
- builds a model by config name or JSON file (`pretrain.encoders.init_image_tower` starts its image tower from one
  of our checkpoints, through the one road from a checkpoint to an encoder);
- exports a trained model as an open_clip folder (`open_clip_config.json` + `open_clip_model.safetensors`) and loads
  our checkpoints, exports or any open_clip config with a local weights file back.

A checkpoint's `model.safetensors` holds open_clip's own state dict, so after `import pretrain.models.clip` (which
registers the configs and towers) it also loads with
`open_clip.create_model_and_transforms(MODEL_CONFIG, pretrained="run/checkpoints/step_.../model.safetensors")`.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import open_clip
from timm.models import register_model
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ..checkpoint import OPEN_CLIP_EXPORT_CONFIG

OPEN_CLIP_CONFIG_DIR = Path(__file__).resolve().parent / "open_clip_configs"
EXPORT_CONFIG_FILE = OPEN_CLIP_EXPORT_CONFIG  # the names open_clip's "local-dir:" schema looks for
EXPORT_WEIGHTS_FILE = "open_clip_model.safetensors"


# ------------------------------------------------------------------------------------------------ timm towers
# timm only builds registered names (open_clip passes no img_size/patch_size through), so the small towers are
# registered here, shaped exactly like the matching MAE encoders in pretrain.models (`timm_vit_kwargs`).

def _vit_tiny_patch4_32(name: str, depth: int, pretrained: bool, **kwargs) -> VisionTransformer:
    if pretrained:
        raise ValueError(f"{name} has no published weights; load a checkpoint instead")
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):  # timm's factory bookkeeping
        kwargs.pop(key, None)
    kwargs.setdefault("img_size", 32)  # (another size when a finetune rebuilds the tower at its resolution)
    model = VisionTransformer(patch_size=4, embed_dim=192, depth=depth, num_heads=3, **kwargs)
    size = kwargs["img_size"]
    model.pretrained_cfg = model.default_cfg = {"input_size": (3, size, size), "num_classes": 0}  # as timm attaches
    return model


@register_model
def vitpretrain_vit_tiny_patch4_32(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """The encoder of `mae_vit_tiny_patch4`: 32x32 images, 4x4 patches, 192 wide, 6 blocks, 3 heads."""
    return _vit_tiny_patch4_32("vitpretrain_vit_tiny_patch4_32", 6, pretrained, **kwargs)


@register_model
def vitpretrain_vit_tiny_d12_patch4_32(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """The encoder of `mae_vit_tiny_d12_patch4`: the same at ViT-Tiny's 12 blocks."""
    return _vit_tiny_patch4_32("vitpretrain_vit_tiny_d12_patch4_32", 12, pretrained, **kwargs)


@register_model
def vitpretrain_swin_tiny_patch2_32(pretrained: bool = False, **kwargs) -> SwinTransformer:
    """The encoder of `ummae_swin_tiny_cpu` / `simmim_swin_tiny_cpu`: 32x32 images, 2x2 patches, 48 wide, stages of
    2/2/2 blocks, windows of 4."""
    if pretrained:
        raise ValueError("vitpretrain_swin_tiny_patch2_32 has no published weights; load a checkpoint instead")
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    kwargs.setdefault("img_size", 32)
    model = SwinTransformer(patch_size=2, embed_dim=48, depths=(2, 2, 2), num_heads=(3, 6, 12), window_size=4, **kwargs)
    size = kwargs["img_size"]
    model.pretrained_cfg = model.default_cfg = {"input_size": (3, size, size), "num_classes": 0}
    return model


# ------------------------------------------------------------------------------------------------ configs

_registered = False


def register_open_clip_configs() -> None:
    """Make this package's open_clip model configs known to open_clip (idempotent)."""
    global _registered
    if not _registered:
        open_clip.add_model_config(OPEN_CLIP_CONFIG_DIR)
        _registered = True


def resolve_model_config(name_or_file: str) -> tuple[str, dict[str, Any]]:
    """An open_clip config name (open_clip's own or this package's) or a JSON file -> (name, config dict).
    A file is registered with open_clip under its stem."""
    register_open_clip_configs()
    path = Path(name_or_file)
    if path.suffix == ".json":
        if not path.is_file():
            raise ValueError(f"open_clip model config file not found: {path}")
        open_clip.add_model_config(path)
        name = path.stem
    else:
        name = name_or_file
    config = open_clip.get_model_config(name)
    if config is None:
        known = ", ".join(sorted(p.stem for p in OPEN_CLIP_CONFIG_DIR.glob("*.json")))
        raise ValueError(f"unknown open_clip model config {name_or_file!r}: give a JSON file, one of this "
                         f"package's ({known}) or one of open_clip.list_models()")
    return name, config


def ensure_registered(name: str, config: dict[str, Any]) -> None:
    """Register `config` under `name` unless open_clip already knows that name (a checkpoint carries its config,
    so it loads in a process that never saw the JSON file)."""
    register_open_clip_configs()
    if open_clip.get_model_config(name) is None:
        folder = Path(tempfile.mkdtemp(prefix="open_clip_config_"))
        (folder / f"{name}.json").write_text(json.dumps(config))
        open_clip.add_model_config(folder / f"{name}.json")


# ------------------------------------------------------------------------------------------------ models


def create_clip(name_or_file: str, patch_dropout: float | None = None) -> tuple[nn.Module, str, dict]:
    """(open_clip CLIP model, config name, config dict). `pretrain.encoders.init_image_tower` then starts its timm
    image tower from one of our checkpoints, where a run asks for it. `patch_dropout` (FLIP): the share of the
    image tower's patch tokens dropped in training mode, in place of the config's (None: the config's); a ViT
    tower only (a Swin's windows need every patch). The config dict stays as given: exports carry no dropout."""
    name, config = resolve_model_config(name_or_file)
    try:
        model = open_clip.create_model(name, pretrained=None, force_patch_dropout=patch_dropout)
    except TypeError as err:  # a timm tower without timm's patch_drop_rate (Swin)
        if "patch_drop" not in str(err):
            raise
        raise ValueError(f"the image tower of {name} takes no patch dropout ({err}); use a ViT tower") from None
    return model, name, config


def export_open_clip(model: nn.Module, name: str, config: dict, out_dir: str | Path, image_size: int,
                     mean, std) -> Path:
    """Write `out_dir/open_clip_config.json` + `open_clip_model.safetensors`: loads with
    `open_clip.create_model_and_transforms("local-dir:" + out_dir)`, no import of this package needed unless the
    image tower is one of the timm towers registered above."""
    from ..checkpoint import save_weights

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    preprocess = {"size": image_size, "mean": list(mean), "std": list(std), "interpolation": "bicubic",
                  "resize_mode": "shortest"}
    (out_dir / EXPORT_CONFIG_FILE).write_text(json.dumps({"model_name": name, "model_cfg": config,
                                                          "preprocess_cfg": preprocess}, indent=2) + "\n")
    save_weights(out_dir / EXPORT_WEIGHTS_FILE, model.state_dict())
    return out_dir


def load_clip(weights: str | Path, model_config: str | None = None) -> tuple[nn.Module, str]:
    """(open_clip model in eval mode, config name) from one of

    - our CLIP run directory, checkpoint directory or model.safetensors (the config is in its metadata);
    - an `export_open_clip` folder;
    - any open_clip model config (name or JSON file) plus a local weights file (`model_config` given).
    """
    import pickle

    from ..checkpoint import load_state_dict_checked, read_weights, resolve_weights_file, unsafe_pickle_error

    weights = Path(weights)
    if model_config is not None:
        name, _ = resolve_model_config(model_config)
        try:  # open_clip reads .pth/.pt/.bin files with torch.load(weights_only=True)
            model = open_clip.create_model(name, pretrained=str(weights))
        except pickle.UnpicklingError as err:
            raise unsafe_pickle_error(weights, err) from None
        return model.eval(), name
    if weights.is_dir() and (weights / EXPORT_CONFIG_FILE).is_file():
        exported = json.loads((weights / EXPORT_CONFIG_FILE).read_text())
        name = exported.get("model_name", "exported")
        ensure_registered(name, exported["model_cfg"])
        model = open_clip.create_model(name, pretrained=str(weights / EXPORT_WEIGHTS_FILE))
        return model.eval(), name
    weights_file = resolve_weights_file(weights)
    state_dict, metadata = read_weights(weights_file)
    if metadata.get("objective") != "clip" or "model_config" not in metadata:
        raise ValueError(f"{weights_file} is not a CLIP checkpoint of this project (metadata keys "
                         f"{sorted(metadata)}); for other weights give the open_clip model config too")
    name = metadata["model_name"]
    ensure_registered(name, json.loads(metadata["model_config"]))
    model = open_clip.create_model(name, pretrained=None)
    load_state_dict_checked(model, state_dict, weights_file)
    return model.eval(), name


def tokenizer_for(name: str):
    register_open_clip_configs()
    return open_clip.get_tokenizer(name)


__all__ = ["create_clip", "export_open_clip", "load_clip", "register_open_clip_configs", "resolve_model_config",
           "tokenizer_for"]
