"""Zero-shot classification with a CLIP model and a prompt ensemble (Radford et al. 2021, section 3.1.4).

Each class is embedded by every prompt template ("a photo of a {}.", ...); the class embedding is the mean of the
L2-normalised text embeddings of its prompts, normalised again (open_clip's `build_zero_shot_classifier`). An
image is assigned the class of highest cosine similarity (logits = 100 x cosine, as CLIP's learned scale is near
100). Any labelled shards serve as the evaluation set; the classes are named by a file or the shards' stats.json.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from data import ShardStream, clip_eval_transform, count_samples, expand_shards
from data.captions import read_class_names
from data import make_loader as make_data_loader
from pretrain.config import ConfigError, to_dict
from pretrain.datasets import resolve_shards
from pretrain.engine import make_accelerator, prepare_output_dir

from .config import ZeroShotConfig

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
        return read_class_names(expand_shards(eval_shards))
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
def build_classifier(model: nn.Module, tokenizer, names: Sequence[str], templates: Sequence, device) -> torch.Tensor:
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
    correct1, correct5 = torch.zeros(num_classes, dtype=torch.float64), torch.zeros(num_classes, dtype=torch.float64)
    seen = torch.zeros(num_classes, dtype=torch.float64)
    for batch in tqdm(make_data_loader(stream, num_workers), total=total, desc="zero-shot", unit="batch",
                      disable=not accelerator.is_main_process, dynamic_ncols=True):
        labels = batch["label"]
        if int(labels.max()) >= num_classes:
            raise ConfigError(f"label {int(labels.max())} in {shards} but only {num_classes} class names")
        with accelerator.autocast():
            features = model.encode_image(batch["image"].to(accelerator.device), normalize=True)
        logits = LOGIT_SCALE * features.float() @ classifier.float()
        top5 = logits.topk(min(5, num_classes), dim=1).indices.cpu()
        ones = torch.ones(len(labels), dtype=torch.float64)
        seen.index_add_(0, labels, ones)
        correct1.index_add_(0, labels, (top5[:, 0] == labels).double())
        correct5.index_add_(0, labels, (top5 == labels[:, None]).any(dim=1).double())
    counts = torch.stack([correct1, correct5, seen]).to(accelerator.device)
    correct1, correct5, seen = accelerator.reduce(counts, reduction="sum").cpu()
    total_seen = float(seen.sum())
    if total_seen == 0:
        raise ConfigError(f"no evaluation images read from {shards}")
    per_class = (100.0 * correct1 / seen.clamp(min=1)).tolist()
    return {"top1": 100.0 * float(correct1.sum()) / total_seen, "top5": 100.0 * float(correct5.sum()) / total_seen,
            "num_samples": int(total_seen), "per_class_top1": per_class, "per_class_samples": seen.long().tolist()}


def run_zero_shot(cfg: ZeroShotConfig) -> dict[str, Any]:
    from pretrain.models.clip import load_clip, tokenizer_for

    accelerator = make_accelerator(cfg.train)
    output_dir = prepare_output_dir(cfg.output_dir, cfg, cfg.train, accelerator)
    # only evaluation shards are read: resolve data.val alone ("embedded": the bundled validation split)
    _, eval_shards = resolve_shards(dataclasses.replace(cfg.data, train=cfg.data.val), output_dir, accelerator)
    try:
        model, name = load_clip(cfg.model.checkpoint, cfg.model.open_clip_config)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        raise ConfigError(f"'model.checkpoint' {cfg.model.checkpoint}: {err}") from None
    model = model.to(accelerator.device).eval()
    image_size = model.visual.image_size[0] if hasattr(model.visual, "image_size") else cfg.data.image_size
    if image_size != cfg.data.image_size:
        raise ConfigError(f"'data.image_size' is {cfg.data.image_size} but model {name} takes {image_size}x{image_size}")

    names = class_names(cfg.classes, eval_shards)
    templates = prompt_templates(cfg.templates)
    classifier = build_classifier(model, tokenizer_for(name), names, templates, accelerator.device)
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
