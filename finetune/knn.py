"""Weighted k-NN classification on frozen features (task `knn`), as DINO's eval_knn.py (Caron et al. 2021).

The training features are the bank: L2-normalised, gathered from every process, so each process holds all of
them. Each process classifies its own share of the evaluation features (every image once across processes),
chunk by chunk: a chunk's cosine similarities with the bank [chunk, N_train] are the only large matrix. An image's
k nearest neighbours each vote for their class with weight exp(similarity / T) (T = 0.07); classes are ranked by
their summed votes. A class nobody voted for is never a prediction (DINO's sort would rank such classes in an
arbitrary order after the voted ones). Top-1 / top-5 counts are summed over processes, so one process and many
give the same metrics.

    python -m finetune --config configs/knn_mae_tiny_demo.yaml      # -> runs/knn_demo/metrics.json

`train_features` / `val_features` read folders written by the `features` task instead of running the encoder.
"""
from __future__ import annotations

import json
import logging
from dataclasses import replace
from typing import Any, Optional

import torch

from data import eval_transform, read_class_names
from pretrain.config import ConfigError
from pretrain.metrics import class_count, gather_rows, knn_accuracy
from pretrain.run import setup_run

from .config import KNNConfig
from .feature_export import read_feature_files, read_feature_index
from .features import extract_features, feature_encoder

log = logging.getLogger(__name__)


class _Side:
    """One side of a k-NN run (the training bank or the evaluation set): its features and where they came from."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, encoder: str, kind: str, source: str,
                 from_files: bool = False, classes: Optional[list[str]] = None):
        self.features, self.labels, self.encoder, self.kind = features, labels, encoder, kind
        self.source, self.from_files, self.classes = source, from_files, classes


def _read_side(directory: str, what: str) -> _Side:
    index = read_feature_index(directory)
    if not index.get("labels"):
        raise ConfigError(f"'{what}' {directory} holds no labels (exported from {index.get('kind')} shards): "
                          f"k-NN needs features of labelled shards")
    features, labels, _ = read_feature_files(directory)
    return _Side(features, labels, index["encoder"], index["feature"], str(directory), from_files=True,
                 classes=index.get("classes"))


def run_knn(cfg: KNNConfig) -> dict[str, Any]:
    # shards read only where no feature files stand in for them (config.yaml then says so: data.val null)
    run_cfg = replace(cfg, data=replace(cfg.data, val=None)) if cfg.val_features else cfg
    run = setup_run(run_cfg, train_data=cfg.train_features is None)
    accelerator = run.accelerator
    rank, world = accelerator.process_index, accelerator.num_processes

    num_classes = None
    if cfg.train_features is None and cfg.val_features is None:  # fail on a class mismatch before extracting
        num_classes = class_count(cfg.num_classes, run.train_shards, run.val_shards)
    encoder = description = None
    if cfg.train_features is None or cfg.val_features is None:
        encoder, description = feature_encoder(cfg.encoder, cfg.data.image_size, cfg.feature)
        encoder.to(accelerator.device)
    transform = eval_transform(cfg.data.image_size, crop_fraction=cfg.data.eval_crop_fraction, mean=cfg.data.mean,
                               std=cfg.data.std)

    def extract(shards: str, what: str) -> _Side:
        features, labels = extract_features(encoder, shards, transform, cfg.train.batch_size, cfg.data.num_workers,
                                            accelerator, f"features ({what})", cfg.data.max_skip_rate,
                                            progress=cfg.logging.progress_bar)
        return _Side(features, labels, description, encoder.kind, shards)

    if cfg.train_features:
        train = _read_side(cfg.train_features, "train_features")  # every process: the whole bank
    else:
        train = extract(run.train_shards, "train")
        train.features, train.labels = gather_rows(train.features, accelerator), gather_rows(train.labels, accelerator)
    if cfg.val_features:
        val = _read_side(cfg.val_features, "val_features")
        val.features, val.labels = val.features[rank::world], val.labels[rank::world]  # this process's share
    else:
        val = extract(run.val_shards, "val")
    for attribute, name in (("encoder", "encoder"), ("kind", "feature")):
        if getattr(train, attribute) != getattr(val, attribute):
            raise ConfigError(f"the training and evaluation features differ in {name}: {getattr(train, attribute)!r} "
                              f"({train.source}) against {getattr(val, attribute)!r} ({val.source})")
    if train.features.shape[1] != val.features.shape[1]:
        raise ConfigError(f"the training features have dimension {train.features.shape[1]}, the evaluation "
                          f"features {val.features.shape[1]}")
    num_classes = num_classes or _num_classes(cfg.num_classes, train, val)

    accuracies = knn_accuracy(val.features, val.labels, train.features, train.labels, cfg.k, cfg.temperature,
                              num_classes, cfg.chunk_size, accelerator.device)
    results = {k: accuracies[k].result(accelerator) for k in cfg.k}
    metrics: dict[str, Any] = {
        "k": {str(k): {"top1": r["top1"], "top5": r["top5"]} for k, r in results.items()},
        "temperature": cfg.temperature, "num_train": len(train.features), "num_test": results[cfg.k[0]]["num_samples"],
        "num_classes": num_classes, "feature_dim": int(train.features.shape[1]), "encoder": train.encoder,
        "feature": train.kind,
    }
    if accelerator.is_main_process:
        (run.output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        summary = ", ".join(f"k={k} {r['top1']:.2f}% / {r['top5']:.2f}%" for k, r in results.items())
        log.info("k-NN on features %s of %s, top-1 / top-5 of %d images against %d: %s; metrics in %s", train.kind,
                 train.encoder, metrics["num_test"], metrics["num_train"], summary, run.output_dir / "metrics.json")
    return metrics


def _num_classes(num_classes: Optional[int], train: _Side, val: _Side) -> int:
    """class_count's rule (num_classes, else the class list train and val must share), with feature files giving
    the class names their index recorded."""
    if not train.from_files and not val.from_files:
        return class_count(num_classes, train.source, val.source)
    names = [side.classes if side.from_files else read_class_names(side.source) for side in (train, val)]
    if None in names:
        if num_classes is None:
            raise ConfigError(f"the feature files {train.source if names[0] is None else val.source} record no "
                              f"class names (their shards had no stats.json): set num_classes")
        return num_classes
    if names[0] != names[1]:
        raise ConfigError(f"the training features ({train.source}) and evaluation features ({val.source}) have "
                          f"different class lists: {names[0]} against {names[1]}")
    if num_classes is not None and num_classes < len(names[0]):
        raise ConfigError(f"'num_classes' is {num_classes} but {train.source} has {len(names[0])} classes")
    return num_classes or len(names[0])
