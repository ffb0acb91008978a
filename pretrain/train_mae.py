"""MAE pretraining run: config -> data stream + model + task -> the shared engine -> checkpoint and pictures."""
from __future__ import annotations

import json
import logging
from typing import Any

import torch

from data import mae_train_transform

from .checkpoint import CheckpointError
from .config import ConfigError, MAEPretrainConfig
from .encoders import MAE_OBJECTIVE, checkpoint_kind, create_pretraining_model, load_pretraining_weights
from .encoders import pretraining_architecture
from .engine import Trainer
from .models import MaskedAutoencoderViT, create_model, load_official_mae_checkpoint
from .monitor import knn_monitor
from .run import first_images, setup_run
from .tasks import MAETask
from .visualize import save_loss_curve, save_reconstruction_grid

log = logging.getLogger(__name__)


def model_metadata(model: torch.nn.Module, name: str, objective: str) -> dict[str, str]:
    """Stored in model.safetensors, so the weights file alone says how to rebuild the model."""
    return {"objective": objective, "model_name": name, "model_config": json.dumps(model.config)}


def architecture(cfg: MAEPretrainConfig) -> tuple[str, dict[str, Any], bool]:
    """(model name, constructor arguments, whether they are recorded in a checkpoint): `model.name` at
    `data.image_size`, or the architecture recorded in `model.checkpoint` when that is one of ours; the run's mask
    ratio and target choice either way."""
    training = dict(norm_pix_loss=cfg.model.norm_pix_loss, mask_ratio=cfg.model.mask_ratio)
    if cfg.model.checkpoint is None or checkpoint_kind(cfg.model.checkpoint) != MAE_OBJECTIVE:
        return cfg.model.name, {"img_size": cfg.data.image_size, **training}, False
    name, config, weights_file = pretraining_architecture(cfg.model.checkpoint)
    if config.get("img_size", cfg.data.image_size) != cfg.data.image_size:
        raise ConfigError(f"'model.checkpoint' {weights_file} was built for {config['img_size']}-px images, "
                          f"'data.image_size' is {cfg.data.image_size}: set data.image_size={config['img_size']}")
    return name, {**config, **training}, True


def build_model(cfg: MAEPretrainConfig) -> torch.nn.Module:
    """The config's model; an unknown name or sizes that do not fit (an image not divisible by the patch) are a
    ConfigError naming the keys."""
    name, arguments, recorded = architecture(cfg)
    try:  # a recorded name may be one this process does not register (an imported ViTMAE): its config suffices
        return create_pretraining_model(name, arguments) if recorded else create_model(name, **arguments)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"'model.name' {name} with 'data.image_size' {cfg.data.image_size}: {err}") from None


def load_initial_weights(model: torch.nn.Module, checkpoint: str) -> str:
    """`model.checkpoint` into the freshly built model: ours through the one pretraining-weights loader, an
    official MAE release through its key check (the decoder stays initialised when the file has none)."""
    if checkpoint_kind(checkpoint) == MAE_OBJECTIVE:
        return f"weights of {load_pretraining_weights(model, checkpoint)}"
    if not isinstance(model, MaskedAutoencoderViT):
        raise ConfigError(f"'model.checkpoint' {checkpoint} is not a masked-image checkpoint of this project; "
                          f"other weights (an official MAE .pth) load into MAE ViTs only")
    try:
        loaded = load_official_mae_checkpoint(model, checkpoint)
    except (CheckpointError, ValueError) as err:
        raise ConfigError(f"'model.checkpoint': {err}") from None
    decoder = "with its decoder" if loaded["decoder_loaded"] else "encoder only, decoder initialised"
    return f"MAE weights of {checkpoint} ({decoder})"


def run_mae(cfg: MAEPretrainConfig) -> dict[str, Any]:
    with torch.device("meta"):  # the sizes are checked before anything is written (no memory, no random draws)
        build_model(cfg)
    run = setup_run(cfg)
    accelerator, output_dir, val_shards = run.accelerator, run.output_dir, run.val_shards
    model = build_model(cfg)
    if cfg.model.checkpoint is not None:
        log.info("starting from %s", load_initial_weights(model, cfg.model.checkpoint))
    if cfg.model.grad_checkpointing:
        model.set_grad_checkpointing(True)

    transform = mae_train_transform(cfg.data.image_size, scale=cfg.data.crop_scale, mean=cfg.data.mean, std=cfg.data.std)
    trainer = Trainer.from_config(cfg, run, model=model, task=MAETask(cfg.model.mask_ratio), transform=transform,
                                  model_metadata=model_metadata(model, architecture(cfg)[0], "mae"),
                                  evaluator=knn_monitor(cfg, run))
    summary = trainer.fit()

    if accelerator.is_main_process:
        if cfg.num_pictures > 0 and val_shards:
            images = first_images(val_shards, cfg.data, cfg.num_pictures)
            noise = torch.rand(images.shape[0], trainer.unwrapped_model.num_patches, generator=torch.Generator().manual_seed(0))
            save_reconstruction_grid(
                trainer.unwrapped_model.cpu() if accelerator.device.type != "cpu" else trainer.unwrapped_model,
                images, output_dir / "reconstructions.png", cfg.data.mean, cfg.data.std,
                mask_ratio=cfg.model.mask_ratio, noise=noise,
            )
        if (output_dir / "log.jsonl").is_file():
            save_loss_curve(output_dir / "log.jsonl", output_dir / "loss_curve.png")
        log.info(
            "done: step %d/%d, loss %.4f; weights in %s, log in %s, pictures in %s",
            summary["step"], summary["total_steps"], summary.get("loss", float("nan")),
            output_dir / "checkpoints", output_dir / "log.jsonl", output_dir,
        )
    return summary
