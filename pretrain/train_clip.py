"""CLIP pretraining run: config -> image-text stream + open_clip model + contrastive task -> the shared engine ->
checkpoints and an open_clip export (`OUTPUT_DIR/open_clip/`)."""
from __future__ import annotations

import json
import logging
from typing import Any

from data import SkipGuard, clip_train_transform, count_samples

from .config import CLIPPretrainConfig, ConfigError, to_dict
from .datasets import resolve_shards, training_loader_factory
from .engine import Trainer, make_accelerator, prepare_output_dir
from .tasks import CLIPTask
from .visualize import save_loss_curve

log = logging.getLogger(__name__)

EXPORT_DIR = "open_clip"


def run_clip(cfg: CLIPPretrainConfig) -> dict[str, Any]:
    from accelerate.utils import set_seed

    from .models.clip import create_clip, export_open_clip, tokenizer_for

    accelerator = make_accelerator(cfg.train)
    output_dir = prepare_output_dir(cfg.output_dir, cfg, cfg.train, accelerator)
    train_shards, _ = resolve_shards(cfg.data, output_dir, accelerator, captions=True)
    samples_per_epoch = cfg.data.samples_per_epoch or count_samples(train_shards)

    set_seed(cfg.train.seed)  # the same initial weights on every process
    try:
        model, name, model_config = create_clip(cfg.model.open_clip_config, cfg.model.image_tower_checkpoint)
    except ValueError as err:
        raise ConfigError(f"'model': {err}") from None
    image_size = model.visual.image_size[0] if hasattr(model.visual, "image_size") else cfg.data.image_size
    if image_size != cfg.data.image_size:
        raise ConfigError(f"'data.image_size' is {cfg.data.image_size} but the image tower of "
                          f"{cfg.model.open_clip_config} takes {image_size}x{image_size} images")
    if cfg.model.grad_checkpointing:
        model.set_grad_checkpointing(True)
    tokenizer = tokenizer_for(name)
    transform = clip_train_transform(cfg.data.image_size, scale=cfg.data.crop_scale, mean=cfg.data.mean, std=cfg.data.std)


    trainer = Trainer(
        model=model,
        task=CLIPTask(cfg.model.local_loss, cfg.model.gather_with_grad, rank=accelerator.process_index,
                      world_size=accelerator.num_processes),
        make_loader=training_loader_factory(train_shards, transform, cfg.data, cfg.train, kind="image-text",
                                            tokenizer=tokenizer),
        samples_per_epoch=samples_per_epoch,
        train=cfg.train,
        optim=cfg.optim,
        logging_cfg=cfg.logging,
        output_dir=output_dir,
        run_config=to_dict(cfg),
        model_metadata={"objective": "clip", "model_name": name, "model_config": json.dumps(model_config)},
        accelerator=accelerator,
        skip_guard=SkipGuard(cfg.data.max_skip_rate, where=f"training data {train_shards}"),
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
