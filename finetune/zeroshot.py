"""Zero-shot classification with a CLIP model and a prompt ensemble (Radford et al. 2021, section 3.1.4).

Each class is embedded by every prompt template ("a photo of a {}.", ...); the class embedding is the mean of the
L2-normalised text embeddings of its prompts, normalised again (open_clip's `build_zero_shot_classifier`). An
image is assigned the class of highest cosine similarity (logits = 100 x cosine, as CLIP's learned scale is near
100). Any labelled shards serve as the evaluation set; the classes are named by a file or the shards' stats.json.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from data import DataError, ShardStream, clip_eval_transform, count_samples, read_class_names
from data import make_loader as make_data_loader
from pretrain.config import ConfigError, to_dict
from pretrain.run import setup_run

from .config import ZeroShotConfig
from .metrics import TopKAccuracy

log = logging.getLogger(__name__)

LOGIT_SCALE = 100.0


# ------------------------------------------------------------------------------------------------ classes, prompts


def _read_list(path: Path, what: str) -> list[str]:
    """One entry per line of a text file, or a JSON list of strings."""
    if not path.is_file():
        raise ConfigError(f"{what} file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        entries = json.loads(text)
        if not (isinstance(entries, list) and all(isinstance(e, str) for e in entries)):
            raise ConfigError(f"{path} must hold a JSON list of strings")
    else:
        entries = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not entries:
        raise ConfigError(f"{path} lists no {what}")
    return entries


def class_names(spec: str, eval_shards: str | None) -> list[str]:
    """"stats": the evaluation shards' stats.json; "imagenet": open_clip's ImageNet-1k names; else a file."""
    if spec == "stats":
        return read_class_names(eval_shards)
    if spec == "imagenet":
        from open_clip import IMAGENET_CLASSNAMES

        return list(IMAGENET_CLASSNAMES)
    return _read_list(Path(spec), "class names")


def prompt_templates(spec: str) -> list[str | Callable[[str], str]]:
    """"openai": the 80 templates of the CLIP paper; "simple": open_clip's short ensemble of 7; a single template
    containing "{}"; else a file of templates, each with "{}" where the class name goes."""
    from open_clip import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

    named = {"openai": OPENAI_IMAGENET_TEMPLATES, "simple": SIMPLE_IMAGENET_TEMPLATES}
    if spec in named:
        return list(named[spec])
    templates = [spec] if "{}" in spec else _read_list(Path(spec), "prompt templates")
    missing = [t for t in templates if "{}" not in t]
    if missing:
        raise ConfigError(f"prompt templates need '{{}}' where the class name goes: {missing[:3]}")
    return templates


@torch.no_grad()
def zero_shot_weights(model: nn.Module, tokenizer, names: Sequence[str], templates: Sequence, device) -> torch.Tensor:
    """[D, C]: per class, the renormalised mean of its prompts' normalised text embeddings."""
    from open_clip import build_zero_shot_classifier

    return build_zero_shot_classifier(model, tokenizer, names, templates, num_classes_per_batch=10, device=device)


# ------------------------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def evaluate_zero_shot(model: nn.Module, classifier: torch.Tensor, shards: str, transform, batch_size: int,
                       num_workers: int, accelerator, max_skip_rate: float = 0.5) -> dict[str, Any]:
    """Top-1 / top-5 and per-class accuracy over labelled shards, each sample counted once across processes."""
    from tqdm.auto import tqdm

    num_classes = classifier.shape[1]
    stream = ShardStream(shards, transform, batch_size, train=False, rank=accelerator.process_index,
                         world_size=accelerator.num_processes, max_skip_rate=max_skip_rate)
    total = -(-count_samples(shards) // (batch_size * accelerator.num_processes))
    accuracy = TopKAccuracy(num_classes)
    for batch in tqdm(make_data_loader(stream, num_workers), total=total, desc="zero-shot", unit="batch",
                      disable=not accelerator.is_main_process, dynamic_ncols=True):
        labels = batch["label"]
        if int(labels.max()) >= num_classes:
            raise ConfigError(f"label {int(labels.max())} in {shards} but only {num_classes} class names")
        with accelerator.autocast():
            features = model.encode_image(batch["image"].to(accelerator.device), normalize=True)
        accuracy.update(LOGIT_SCALE * features.float() @ classifier.float(), labels)
    metrics = accuracy.result(accelerator, per_class=True)
    if metrics["num_samples"] == 0:
        raise ConfigError(f"no evaluation images read from {shards}")
    return metrics


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
