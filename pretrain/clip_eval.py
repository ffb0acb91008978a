"""CLIP's evaluations, shared by the zero-shot and retrieval tasks (finetune/) and by monitoring during CLIP
pretraining: class names and prompt templates, the zero-shot classifier of a prompt ensemble, zero-shot accuracy
over labelled shards.

Zero-shot classification (Radford et al. 2021, section 3.1.4): each class is embedded by every prompt template
("a photo of a {}.", ...); the class embedding is the mean of the L2-normalised text embeddings of its prompts,
normalised again (open_clip's `build_zero_shot_classifier`). An image is assigned the class of highest cosine
similarity (logits = 100 x cosine, as CLIP's learned scale is near 100).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from data import ShardStream, count_samples, read_class_names
from data import make_loader as make_data_loader

from .config import ConfigError
from .metrics import TopKAccuracy

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
