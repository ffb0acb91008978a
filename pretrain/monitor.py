"""Monitoring during pretraining (the `eval` section, `MonitorConfig`): the evaluator that tells a good run from a
bad one before it ends. Each objective gets an `Evaluator` (pretrain/evaluation.py, the one evaluator road) whose
`measure` is built here; the engine calls it every `eval.every_epochs` epochs (or `eval.every_steps` steps) and
after the last step, and writes its metrics to log.jsonl ("eval/<name>"), wandb and metrics.json (with the history;
no weights are kept: the run's checkpoints hold them).

- MAE / UM-MAE / SimMIM: DINO's weighted k-NN (metrics.knn_accuracy) of bounded evaluation images against a bounded
  bank, both re-extracted at every evaluation since the encoder changes. The encoder is the timm model a checkpoint
  of that step gives the heads (`encoders.encoder_of`), pooled by its own default: a ViT's class token after the
  final norm, as MAE's linear probe and the `knn` task read it, so the monitor's knn_top1 is what `python -m finetune
  task=knn` reports on the same images (a Swin has no class token: its average-pooled last stage).
- CLIP: zero-shot top-1 / top-5 on labelled shards (eval.zeroshot_shards), the class embeddings recomputed each
  time (the text tower trains too), and image->text / text->image recall@1 among bounded image-text pairs
  (eval.shards, default data.val; pretrain/clip_eval.py). Labelled shards there (data.val "embedded" is the
  labelled validation split) serve zero-shot instead, when eval.zeroshot_shards is not set.

Bounded sets are the first images of the shards, each process reading its share (ceil(max / processes) images), so
every evaluation sees the same images and the curve compares like with like. Retrieval recall depends on how many
candidates there are: compare R@1 only between runs with the same `eval.max_images`.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

import torch
from torch import nn

from data import (
    DataError,
    clip_eval_transform,
    count_samples,
    eval_transform,
    read_class_names,
    read_matching_class_names,
    read_shard_stats,
)
from data.shards import check_kind, kind_of_stats

from .clip_eval import class_names, evaluate_zero_shot, prompt_templates, retrieval_metrics, zero_shot_weights
from .config import CLIPPretrainConfig, ConfigError, MAEPretrainConfig, MonitorConfig
from .encoders import encoder_of
from .evaluation import Evaluator, Measure
from .features import PooledFeatures, extract_features
from .metrics import gather_rows, knn_accuracy
from .run import Run

log = logging.getLogger(__name__)


def knn_monitor(cfg: MAEPretrainConfig, run: Run) -> Optional[Evaluator]:
    """The k-NN evaluator of a masked-image pretraining run (None when `eval` is off). The shards, their classes and
    the bank's size are checked here, before training, so a mistake stops the run at start-up."""
    monitor = cfg.eval
    if not monitor.enabled:
        return None
    shards, bank = monitor.shards or run.val_shards, monitor.bank or run.train_shards
    try:
        read_class_names(bank)
    except DataError as err:
        key = "eval.bank" if monitor.bank else "eval.bank' (default: 'data.train"
        raise ConfigError(f"'{key}' {bank}: the k-NN bank must be labelled shards ({err})") from None
    check_kind(shards, "labelled")
    names = read_matching_class_names(bank, shards)  # label i must mean the same class in both
    bank_size = min(count_samples(bank), monitor.max_bank_images)
    if monitor.k > bank_size:
        raise ConfigError(f"'eval.k' {monitor.k} exceeds the {bank_size} bank images of {bank}: "
                          f"choose k <= {bank_size}")
    transform = eval_transform(cfg.data.image_size, crop_fraction=cfg.data.eval_crop_fraction, mean=cfg.data.mean,
                               std=cfg.data.std)

    def features(encoder: nn.Module, spec: str, max_images: int, accelerator) -> tuple[torch.Tensor, torch.Tensor]:
        features, labels, _ = extract_features(encoder, spec, transform, cfg.train.batch_size, cfg.data.num_workers,
                                               accelerator, "k-NN monitor", cfg.data.max_skip_rate, progress=False,
                                               max_samples=max_images)
        return features, labels

    def measure(model: nn.Module, accelerator) -> dict[str, Any]:
        encoder = PooledFeatures(encoder_of(model, cfg.data.image_size)).to(accelerator.device)
        bank_features, bank_labels = features(encoder, bank, monitor.max_bank_images, accelerator)
        bank_features, bank_labels = gather_rows(bank_features, accelerator), gather_rows(bank_labels, accelerator)
        eval_features, eval_labels = features(encoder, shards, monitor.max_images, accelerator)  # this process's
        accuracy = knn_accuracy(eval_features, eval_labels, bank_features, bank_labels, [monitor.k],
                                monitor.temperature, len(names), device=accelerator.device)[monitor.k]
        result = accuracy.result(accelerator)
        return {"knn_top1": result["top1"], "knn_top5": result["top5"], "num_knn_images": result["num_samples"],
                "num_knn_bank": len(bank_features)}

    summary = {"monitor": f"weighted k-NN (k={monitor.k}, T={monitor.temperature}) of the encoder's pooled features",
               "eval_shards": str(shards), "bank_shards": str(bank), "num_classes": len(names)}
    return _evaluator(monitor, run, measure, "knn_top1", summary, cfg.train.resume)


def clip_monitor(cfg: CLIPPretrainConfig, run: Run, tokenizer) -> Optional[Evaluator]:
    """The zero-shot and retrieval evaluator of a CLIP run (None when `eval` is off); classes, templates and the
    kinds of shards are checked here, before training."""
    monitor = cfg.eval
    if not monitor.enabled:
        return None
    pairs, labelled = monitor.shards or run.val_shards, monitor.zeroshot_shards
    if pairs is not None and _kind_of(pairs) == "labelled":
        # e.g. data.val "embedded", the labelled validation split: what zero-shot reads, not pairs to retrieve
        if labelled is None:
            log.info("eval: %s holds labelled images: zero-shot on them, no retrieval (it needs image-text pairs)",
                     pairs)
            labelled = pairs
        else:
            log.info("eval: %s holds labelled images: no retrieval (it needs image-text pairs)", pairs)
        pairs = None
    if pairs is not None:
        check_kind(pairs, "image-text")
    names: list[str] = []
    templates: list = []
    if labelled is None:
        log.info("eval: no eval.zeroshot_shards, so no zero-shot accuracy; retrieval only")
    else:
        check_kind(labelled, "labelled")
        names = class_names(monitor.classes, labelled, key="eval.classes")
        templates = prompt_templates(monitor.templates)
    transform = clip_eval_transform(cfg.data.image_size, mean=cfg.data.mean, std=cfg.data.std)
    batch_size, workers, skip_rate = cfg.train.batch_size, cfg.data.num_workers, cfg.data.max_skip_rate

    def measure(model: nn.Module, accelerator) -> dict[str, Any]:
        model.eval()  # the engine puts it back in training mode
        metrics: dict[str, Any] = {}
        if labelled is not None:
            classifier = zero_shot_weights(model, tokenizer, names, templates, accelerator.device)
            result = evaluate_zero_shot(model, classifier, labelled, transform, batch_size, workers, accelerator,
                                        skip_rate, max_samples=monitor.max_images, progress=False)
            metrics.update(zeroshot_top1=result["top1"], zeroshot_top5=result["top5"],
                           num_zeroshot_images=result["num_samples"])
        if pairs is not None:
            result = retrieval_metrics(model, pairs, transform, tokenizer, batch_size, workers, accelerator,
                                       skip_rate, max_samples=monitor.max_images, ks=(1,), progress=False)
            metrics.update({name: result[name] for name in ("image_to_text_R@1", "text_to_image_R@1")},
                           num_retrieval_pairs=result["num_pairs"])
        return metrics

    summary = {"monitor": "zero-shot top-1 / top-5, retrieval R@1", "zeroshot_shards": labelled,
               "num_classes": len(names) or None, "num_templates": len(templates) or None,
               "retrieval_shards": str(pairs) if pairs is not None else None}
    key = "zeroshot_top1" if labelled is not None else "image_to_text_R@1"
    return _evaluator(monitor, run, measure, key, summary, cfg.train.resume)


def _kind_of(shards: str) -> Optional[str]:
    """"labelled", "image-text", ... as the stats.json beside the shards says; None without one."""
    try:
        return kind_of_stats(read_shard_stats(shards))
    except DataError:
        return None


def _evaluator(monitor: MonitorConfig, run: Run, measure: Measure, key: str, summary: dict[str, Any],
               resume: Optional[str]) -> Evaluator:
    """The one evaluator, told to keep no weights; `key` picks metrics.json's best evaluation."""
    return Evaluator(run.output_dir, measure, key=key, every=monitor.every_epochs or 1,
                     every_steps=monitor.every_steps, keep_weights=False, summary=summary, resume=bool(resume))
