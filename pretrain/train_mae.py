"""MAE pretraining run: config -> data stream + model + task -> the shared engine -> checkpoint and pictures."""
from __future__ import annotations

import json
import logging
from typing import Any

import torch

from data import mae_train_transform

from .config import ConfigError, MAEPretrainConfig
from .engine import Trainer
from .models import create_model
from .monitor import knn_monitor
from .run import first_images, setup_run
from .tasks import MAETask
from .visualize import save_loss_curve, save_reconstruction_grid

log = logging.getLogger(__name__)


def model_metadata(model: torch.nn.Module, name: str, objective: str) -> dict[str, str]:
    """Stored in model.safetensors, so the weights file alone says how to rebuild the model."""
    return {"objective": objective, "model_name": name, "model_config": json.dumps(model.config)}


def build_model(cfg: MAEPretrainConfig) -> torch.nn.Module:
    """The config's model; an unknown name or sizes that do not fit (an image not divisible by the patch) are a
    ConfigError naming the keys."""
    try:
        return create_model(cfg.model.name, img_size=cfg.data.image_size, norm_pix_loss=cfg.model.norm_pix_loss,
                            mask_ratio=cfg.model.mask_ratio)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"'model.name' {cfg.model.name} with 'data.image_size' {cfg.data.image_size}: {err}") from None


def run_mae(cfg: MAEPretrainConfig) -> dict[str, Any]:
    with torch.device("meta"):  # the sizes are checked before anything is written (no memory, no random draws)
        build_model(cfg)
    run = setup_run(cfg)
    accelerator, output_dir, val_shards = run.accelerator, run.output_dir, run.val_shards
    model = build_model(cfg)
    if cfg.model.grad_checkpointing:
        model.set_grad_checkpointing(True)

    transform = mae_train_transform(cfg.data.image_size, scale=cfg.data.crop_scale, mean=cfg.data.mean, std=cfg.data.std)
    trainer = Trainer.from_config(cfg, run, model=model, task=MAETask(cfg.model.mask_ratio), transform=transform,
                                  model_metadata=model_metadata(model, cfg.model.name, "mae"),
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
