"""Zero-shot classification with a CLIP model and a prompt ensemble (task `zeroshot`; the classifier and the
accuracy are pretrain/clip_eval.py's). Any labelled shards serve as the evaluation set; the classes are named by a
file or the shards' stats.json.
"""
from __future__ import annotations

import json
import logging
from typing import Any

from data import DataError, clip_eval_transform, read_class_names
from pretrain.clip_eval import class_names, evaluate_zero_shot, prompt_templates, zero_shot_weights
from pretrain.config import ConfigError, to_dict
from pretrain.run import setup_run

from .config import ZeroShotConfig

log = logging.getLogger(__name__)

def run_zero_shot(cfg: ZeroShotConfig) -> dict[str, Any]:
    from pretrain.models.clip import load_clip, tokenizer_for

    # only evaluation shards are read: data.val alone ("embedded": the bundled validation split)
    run = setup_run(cfg, train_data=False)
    accelerator, output_dir, eval_shards = run.accelerator, run.output_dir, run.val_shards
    names = class_names(cfg.classes, eval_shards)
    if cfg.classes != "stats":  # label i of the shards is the i-th name: the counts must agree
        try:
            shard_names = read_class_names(eval_shards)
        except DataError:  # shards of other origin, no stats.json: nothing to check against
            shard_names = names
        if len(shard_names) != len(names):
            raise ConfigError(f"'classes' {cfg.classes} gives {len(names)} class names but the shards {eval_shards} "
                              f"have {len(shard_names)} classes ({', '.join(shard_names)})")
    try:
        model, name = load_clip(cfg.model.checkpoint, cfg.model.open_clip_config)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        raise ConfigError(f"'model.checkpoint' {cfg.model.checkpoint}: {err}") from None
    model = model.to(accelerator.device).eval()
    image_size = model.visual.image_size[0] if hasattr(model.visual, "image_size") else cfg.data.image_size
    if image_size != cfg.data.image_size:
        raise ConfigError(f"'data.image_size' is {cfg.data.image_size} but model {name} takes {image_size}x{image_size}")

    templates = prompt_templates(cfg.templates)
    classifier = zero_shot_weights(model, tokenizer_for(name), names, templates, accelerator.device)
    transform = clip_eval_transform(image_size, mean=cfg.data.mean, std=cfg.data.std)
    metrics = evaluate_zero_shot(model, classifier, eval_shards, transform, cfg.train.batch_size,
                                 cfg.data.num_workers, accelerator, cfg.data.max_skip_rate)
    metrics["per_class_top1"] = dict(zip(names, metrics["per_class_top1"]))
    metrics["per_class_samples"] = dict(zip(names, metrics["per_class_samples"]))
    metrics.update(model=str(cfg.model.checkpoint), open_clip_config=name, eval_shards=str(eval_shards),
                   num_classes=len(names), num_templates=len(templates), templates=cfg.templates,
                   config=to_dict(cfg))
    if accelerator.is_main_process:
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        log.info("zero-shot (%s, %d classes x %d prompts): top-1 %.2f%%, top-5 %.2f%% on %d images; metrics in %s",
                 name, len(names), len(templates), metrics["top1"], metrics["top5"], metrics["num_samples"],
                 output_dir / "metrics.json")
    return metrics
