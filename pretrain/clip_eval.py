"""CLIP's evaluations, shared by the zero-shot and retrieval tasks (finetune/) and by monitoring during CLIP
pretraining: class names and prompt templates, the zero-shot classifier of a prompt ensemble, zero-shot accuracy
over labelled shards.

Zero-shot classification (Radford et al. 2021, section 3.1.4): each class is embedded by every prompt template
("a photo of a {}.", ...); the class embedding is the mean of the L2-normalised text embeddings of its prompts,
normalised again (open_clip's `build_zero_shot_classifier`). An image is assigned the class of highest cosine
similarity (logits = 100 x cosine, as CLIP's learned scale is near 100). The paper reports that the ensemble beats
single prompts; `single_template_weights` and `ensemble_vs_single_templates` measure whether it does here.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from data import DataError, ShardStream, count_samples, read_class_names
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


def class_names(spec: str, eval_shards: str | None, key: str = "classes") -> list[str]:
    """"stats": the evaluation shards' stats.json; "imagenet": open_clip's ImageNet-1k names; else a file. Label i
    of the shards is the i-th name: names given otherwise than by "stats" must be as many as the shards' classes
    (`key` names the config key in the error); shards without a stats.json are taken as they come."""
    if spec == "stats":
        return read_class_names(eval_shards)
    if spec == "imagenet":
        from open_clip import IMAGENET_CLASSNAMES

        names = list(IMAGENET_CLASSNAMES)
    else:
        names = _read_list(Path(spec), "class names")
    if eval_shards is not None:
        try:
            shard_names = read_class_names(eval_shards)
        except DataError:  # shards of other origin, no stats.json: nothing to check against
            shard_names = names
        if len(shard_names) != len(names):
            raise ConfigError(f"'{key}' {spec} gives {len(names)} class names but the shards {eval_shards} have "
                              f"{len(shard_names)} classes ({', '.join(shard_names)})")
    return names


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


@torch.no_grad()
def single_template_weights(model: nn.Module, tokenizer, names: Sequence[str], templates: Sequence,
                            device) -> torch.Tensor:
    """[T, D, C]: each template's classifier on its own (build_zero_shot_classifier with that template alone), to
    compare the ensemble with its single prompts; each forward embeds as many prompts as one of the ensemble's."""
    from open_clip import build_zero_shot_classifier

    return torch.stack([build_zero_shot_classifier(model, tokenizer, names, [template],
                                                   num_classes_per_batch=10 * len(templates), device=device)
                        for template in templates])


def ensemble_of_single_templates(single_classifiers: torch.Tensor) -> torch.Tensor:
    """[D, C]: the prompt ensemble (zero_shot_weights) from its templates' own classifiers [T, D, C], whose columns
    are already the normalised embeddings: the renormalised mean, without encoding every prompt a second time."""
    return nn.functional.normalize(single_classifiers.mean(dim=0), dim=0)


def template_text(template: str | Callable[[str], str]) -> str:
    """A template as text with "{}" where the class name goes (open_clip's templates are functions)."""
    return template if isinstance(template, str) else template("{}")


def ensemble_vs_single_templates(templates: Sequence, single_top1: Sequence[float],
                                 ensemble_top1: float) -> dict[str, Any]:
    """Each template's own top-1 (percent, in the templates' order), their mean and best, and the ensemble's top-1
    minus that mean: whether ensembling the prompts helps, as the CLIP paper found it does."""
    mean_top1 = sum(single_top1) / len(single_top1)
    return {"per_template_top1": [{"template": template_text(template), "top1": top1}
                                  for template, top1 in zip(templates, single_top1)],
            "mean_single_template_top1": mean_top1, "best_single_template_top1": max(single_top1),
            "ensemble_minus_mean_single": ensemble_top1 - mean_top1}


# ------------------------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def evaluate_zero_shot(model: nn.Module, classifier: torch.Tensor, shards: str, transform, batch_size: int,
                       num_workers: int, accelerator, max_skip_rate: float = 0.5,
                       confusion: bool = False, max_samples: int | None = None,
                       progress: bool = True, template_classifiers: torch.Tensor | None = None) -> dict[str, Any]:
    """Top-1 / top-5 and per-class accuracy over labelled shards, each sample counted once across processes
    (max_samples: the first of each process's share only, about max_samples in all, as embed_pairs);
    confusion=True adds "confusion_matrix", the [true, predicted] top-1 counts (int64 tensor [C, C]);
    template_classifiers [T, D, C] (single_template_weights) adds "single_template_top1", each one's top-1 (percent)
    on the same images, embedded once for all."""
    from tqdm.auto import tqdm

    num_classes = classifier.shape[1]
    stream = ShardStream(shards, transform, batch_size, train=False, rank=accelerator.process_index,
                         world_size=accelerator.num_processes, max_skip_rate=max_skip_rate)
    limit = None if max_samples is None else -(-max_samples // accelerator.num_processes)
    total = -(-min(count_samples(shards), max_samples or float("inf")) // (batch_size * accelerator.num_processes))
    accuracy = TopKAccuracy(num_classes)
    if template_classifiers is not None:
        template_classifiers = template_classifiers.float()
        template_hits = torch.zeros(len(template_classifiers), dtype=torch.float64)
    seen = 0
    batches = iter(make_data_loader(stream, num_workers))
    try:
        for batch in tqdm(batches, total=int(total), desc="zero-shot", unit="batch",
                          disable=not (progress and accelerator.is_main_process), dynamic_ncols=True):
            labels, images = batch["label"], batch["image"]
            if limit is not None:
                labels, images = labels[:limit - seen], images[:limit - seen]
            if int(labels.max()) >= num_classes:
                raise ConfigError(f"label {int(labels.max())} in {shards} but only {num_classes} class names")
            with accelerator.autocast():
                features = model.encode_image(images.to(accelerator.device), normalize=True).float()
            accuracy.update(LOGIT_SCALE * features @ classifier.float(), labels)
            if template_classifiers is not None:
                template_hits += _top1_hits(features, template_classifiers, labels.to(accelerator.device)).cpu()
            seen += len(labels)
            if limit is not None and seen >= limit:
                break
    finally:
        batches.close()  # stops the workers of a stream left unfinished (max_samples)
    metrics = accuracy.result(accelerator, per_class=True)
    if metrics["num_samples"] == 0:
        raise ConfigError(f"no evaluation images read from {shards}")
    if confusion:
        metrics["confusion_matrix"] = accuracy.confusion_matrix(accelerator)
    if template_classifiers is not None:
        if accelerator.num_processes > 1:  # summed as TopKAccuracy sums its counts
            template_hits = accelerator.reduce(template_hits.to(accelerator.device), reduction="sum").cpu()
        metrics["single_template_top1"] = (100.0 * template_hits / metrics["num_samples"]).tolist()
    return metrics


def _top1_hits(features: torch.Tensor, template_classifiers: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[T] float64: how many of the batch each single-template classifier puts first on the true class, one
    template's logits [n, C] at a time (all T at once would be 80 x n x 1000 for ImageNet's ensemble)."""
    return torch.stack([((features @ weights).argmax(dim=1) == labels).sum()
                        for weights in template_classifiers]).double()


# ------------------------------------------------------------------------------------------------ retrieval


def recall_at_k(similarity: torch.Tensor, ks: Sequence[int] = (1, 5, 10), chunk_size: int = 1024) -> dict[str, float]:
    """Recall@k of paired retrieval, open_clip's definition (`get_clip_metrics`): `similarity` [N, N] holds
    image i against text j, image i's partner is text i. For each image, the rank of its text among all N texts;
    image_to_text R@k is the share of images whose text ranks within the first k (and text_to_image the same by
    columns). A candidate scoring exactly as high as the partner does not push it down (ties counted in its
    favour), so the result never depends on how a sort breaks ties. Also the mean and median rank (1 = first).
    Percentages."""
    n = similarity.shape[0]
    if similarity.shape != (n, n) or n == 0:
        raise ValueError(f"retrieval needs a square, non-empty similarity matrix of pairs, got {tuple(similarity.shape)}")
    metrics: dict[str, float] = {}
    for name, matrix in (("image_to_text", similarity), ("text_to_image", similarity.T)):
        ranks = torch.empty(n, dtype=torch.long)
        for start in range(0, n, chunk_size):
            rows = matrix[start:start + chunk_size].float()
            partner = rows[torch.arange(len(rows)), torch.arange(start, start + len(rows))]
            ranks[start:start + len(rows)] = (rows > partner[:, None]).sum(dim=1)  # 0: the partner comes first
        for k in ks:
            metrics[f"{name}_R@{k}"] = 100.0 * float((ranks < k).double().mean())
        metrics[f"{name}_mean_rank"] = float(ranks.double().mean()) + 1
        # numpy's median (the mean of the two middle ranks when n is even), floored, as open_clip; torch's median
        # would take the lower middle rank
        metrics[f"{name}_median_rank"] = float(ranks.double().quantile(0.5).floor()) + 1
    return metrics


@torch.no_grad()
def embed_pairs(model: nn.Module, shards: str, transform, tokenizer, batch_size: int, num_workers: int,
                accelerator, max_skip_rate: float = 0.5, max_samples: int | None = None,
                progress: bool = True) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """This process's share of image-text shards (every pair once across processes; at most `max_samples` pairs
    in all, split evenly: the first ones of each process's share, so which pairs depends on the number of
    processes) -> (normalised image features [n, D], normalised text features [n, D], keys [n]) on the CPU, in
    float32."""
    from tqdm.auto import tqdm

    stream = ShardStream(shards, transform, batch_size, train=False, kind="image-text", tokenizer=tokenizer,
                         rank=accelerator.process_index, world_size=accelerator.num_processes,
                         max_skip_rate=max_skip_rate)
    limit = None  # this process's share of max_samples: the first (max_samples mod processes) ranks read one more
    if max_samples is not None:
        limit = max_samples // accelerator.num_processes
        limit += int(accelerator.process_index < max_samples % accelerator.num_processes)
    total = -(-min(count_samples(shards), max_samples or float("inf")) // (batch_size * accelerator.num_processes))
    images, texts, keys = [], [], []
    seen = 0
    batches = iter(make_data_loader(stream, num_workers))
    try:
        for batch in tqdm(batches, total=int(total), desc="retrieval", unit="batch",
                          disable=not (progress and accelerator.is_main_process), dynamic_ncols=True):
            with accelerator.autocast():
                images.append(model.encode_image(batch["image"].to(accelerator.device), normalize=True).float().cpu())
                texts.append(model.encode_text(batch["text"].to(accelerator.device), normalize=True).float().cpu())
            keys.extend(batch["key"])
            seen += len(batch["key"])
            if limit is not None and seen >= limit:
                break
    finally:
        batches.close()  # stops the workers of a stream left unfinished (max_samples)
    if not images:
        return torch.empty(0, 0), torch.empty(0, 0), []
    image_features, text_features = torch.cat(images), torch.cat(texts)
    if limit is not None:
        image_features, text_features, keys = image_features[:limit], text_features[:limit], keys[:limit]
    return image_features, text_features, keys


def retrieval_metrics(model: nn.Module, shards: str, transform, tokenizer, batch_size: int, num_workers: int,
                      accelerator, max_skip_rate: float = 0.5, max_samples: int | None = None,
                      ks: Sequence[int] = (1, 5, 10), progress: bool = True) -> dict[str, Any]:
    """Image->text and text->image recall@k (percent), mean and median rank over the pairs of image-text `shards`
    (at most `max_samples`), the candidates being every pair read by every process; "num_pairs" says how many.
    Every process returns the same metrics."""
    from .metrics import gather_rows

    image_features, text_features, _ = embed_pairs(model, shards, transform, tokenizer, batch_size, num_workers,
                                                   accelerator, max_skip_rate, max_samples, progress)
    if image_features.numel() == 0:
        image_features = text_features = torch.zeros(0, _embed_dim(model))
    image_features, text_features = gather_rows(image_features, accelerator), gather_rows(text_features, accelerator)
    if len(image_features) == 0:
        raise ConfigError(f"no image-text pairs read from {shards}")
    metrics: dict[str, Any] = recall_at_k(image_features @ text_features.T, ks)
    metrics["num_pairs"] = len(image_features)
    return metrics


def _embed_dim(model: nn.Module) -> int:
    """The width of a CLIP model's joint embedding (for a process that read no pair)."""
    projection = getattr(model, "text_projection", None)
    if isinstance(projection, torch.Tensor):
        return projection.shape[1]
    if isinstance(projection, nn.Linear):
        return projection.out_features
    raise ValueError(f"cannot tell the embedding width of {type(model).__name__}")
