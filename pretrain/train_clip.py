"""CLIP pretraining run: config -> image-text stream + open_clip model + contrastive task -> the shared engine ->
checkpoints and an open_clip export (`OUTPUT_DIR/open_clip/`)."""
from __future__ import annotations

import json
import logging
from typing import Any

from data import clip_train_transform

from .config import CLIPPretrainConfig, ConfigError
from .encoders import init_image_tower
from .engine import Trainer
from .monitor import clip_monitor
from .run import setup_run
from .tasks import CLIPTask
from .visualize import save_loss_curve

log = logging.getLogger(__name__)

EXPORT_DIR = "open_clip"


def run_clip(cfg: CLIPPretrainConfig) -> dict[str, Any]:
    from .models.clip import create_clip, export_open_clip, resolve_model_config, tokenizer_for

    try:  # the model config is checked before anything is written
        _, model_config = resolve_model_config(cfg.model.open_clip_config)
    except ValueError as err:
        raise ConfigError(f"'model.open_clip_config': {err}") from None
    image_size = model_config.get("vision_cfg", {}).get("image_size", cfg.data.image_size)
    image_size = image_size[0] if isinstance(image_size, (list, tuple)) else image_size
    if image_size != cfg.data.image_size:
        raise ConfigError(f"'data.image_size' is {cfg.data.image_size} but the image tower of "
                          f"{cfg.model.open_clip_config} takes {image_size}x{image_size} images")
    run = setup_run(cfg, captions=True)
    accelerator, output_dir = run.accelerator, run.output_dir
    try:
        model, name, model_config = create_clip(cfg.model.open_clip_config, patch_dropout=cfg.model.patch_dropout)
    except ValueError as err:  # the config resolved above: what is left is a tower without patch dropout
        raise ConfigError(f"'model.patch_dropout': {err}") from None
    if cfg.model.image_tower_checkpoint is not None:
        log.info("image tower from %s", init_image_tower(model, cfg.model.image_tower_checkpoint))
    if cfg.model.grad_checkpointing:
        model.set_grad_checkpointing(True)
    transform = clip_train_transform(cfg.data.image_size, scale=cfg.data.crop_scale, mean=cfg.data.mean, std=cfg.data.std)
    task = CLIPTask(cfg.model.local_loss, cfg.model.gather_with_grad, rank=accelerator.process_index,
                    world_size=accelerator.num_processes)
    tokenizer = tokenizer_for(name)
    trainer = Trainer.from_config(
        cfg, run, model=model, task=task, transform=transform, kind="image-text", tokenizer=tokenizer,
        model_metadata={"objective": "clip", "model_name": name, "model_config": json.dumps(model_config)},
        evaluator=clip_monitor(cfg, run, tokenizer),
    )
    summary = trainer.fit()

    if accelerator.is_main_process:
        export = export_open_clip(trainer.unwrapped_model, name, model_config, output_dir / EXPORT_DIR,
                                  cfg.data.image_size, cfg.data.mean, cfg.data.std)
        if (output_dir / "log.jsonl").is_file():
            save_loss_curve(output_dir / "log.jsonl", output_dir / "loss_curve.png")
        log.info(
            "done: step %d/%d, loss %.4f; weights in %s, open_clip export in %s (open_clip.create_model_and_transforms"
            "('local-dir:%s')), log in %s",
            summary["step"], summary["total_steps"], summary.get("loss", float("nan")), output_dir / "checkpoints",
            export, export, output_dir / "log.jsonl",
        )
    return summary
