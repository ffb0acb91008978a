"""The labelled frozen features that the evaluations on frozen features start from (k-NN, the linear probes): a
training side and an evaluation side, each extracted from shards by the configured encoder (`encoder`, `feature`)
or read from a folder written by the `features` task (`train_features` / `val_features`), with where it came from.
Both sides must be the same feature of the same encoder, with the same class list; a mismatch is a ConfigError
naming both sources.

    run = setup_feature_run(cfg)                      # reads only the shards no feature folder stands in for
    train, val, num_classes = load_feature_sets(cfg, run, batch_size, whole_train=True)
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional

import torch

from data import DataError, eval_transform, read_class_names
from pretrain.config import ConfigError
from pretrain.features import extract_features
from pretrain.metrics import class_count, gather_rows
from pretrain.run import Run, setup_run

from .feature_export import read_feature_files, read_feature_index
from .features import feature_encoder


@dataclass
class FeatureSet:
    """One side of an evaluation (the training or the evaluation data): its features and where they came from."""
    features: torch.Tensor  # [N, D] float32, on the CPU
    labels: torch.Tensor  # [N] int64
    keys: list[str]  # the N sample keys
    encoder: str  # where the encoder's weights came from (feature_encoder's description)
    kind: str  # which feature of it (finetune/features.py)
    source: str  # the shards or the feature folder
    from_files: bool = False
    classes: Optional[list[str]] = None  # feature files: the class names their index recorded

    @property
    def described(self) -> str:
        """What these features are, for logs and pictures: "raw pixels", "avg features of MAE checkpoint ..."."""
        return self.encoder if self.kind == self.encoder else f"{self.kind} features of {self.encoder}"

    def rows(self, index: torch.Tensor | slice) -> "FeatureSet":
        """The rows `index` (a slice, or a tensor of row numbers), provenance kept."""
        keys = self.keys[index] if isinstance(index, slice) else [self.keys[i] for i in index.tolist()]
        return replace(self, features=self.features[index], labels=self.labels[index], keys=keys)

    def share(self, rank: int, world_size: int) -> "FeatureSet":
        """One process's share of the rows (every row once across processes)."""
        return self.rows(slice(rank, None, world_size))

    def sorted_by_key(self) -> "FeatureSet":
        """The rows in order of their sample keys: the same order whichever processes extracted or wrote them."""
        return self.rows(torch.tensor(sorted(range(len(self.keys)), key=self.keys.__getitem__), dtype=torch.long))


def setup_feature_run(cfg: Any) -> Run:
    """`setup_run` for a run on frozen features (KNNConfig, LinearProbeConfig): shards are read only where no
    feature folder stands in for them (config.yaml then says so: data.val null)."""
    run_cfg = replace(cfg, data=replace(cfg.data, val=None)) if cfg.val_features else cfg
    return setup_run(run_cfg, train_data=cfg.train_features is None)


def read_feature_set(directory: str, what: str, task: str) -> FeatureSet:
    """A `features` export folder of labelled shards, all of its rows ('what': the config key naming it)."""
    index = read_feature_index(directory)
    if not index.get("labels"):
        raise ConfigError(f"'{what}' {directory} holds no labels (exported from {index.get('kind')} shards): "
                          f"the {task} task needs features of labelled shards")
    features, labels, keys = read_feature_files(directory)
    return FeatureSet(features, labels, keys, index["encoder"], index["feature"], str(directory), from_files=True,
                      classes=index.get("classes"))


def load_feature_sets(cfg: Any, run: Run, batch_size: int, *, whole_train: bool
                      ) -> tuple[FeatureSet, FeatureSet, int]:
    """(training side, evaluation side, number of classes) of a run on frozen features (`cfg`: KNNConfig or
    LinearProbeConfig; `run`: from setup_feature_run). The evaluation side is this process's share (every image
    once across processes). The training side is this process's share too, or with `whole_train` every process's
    rows (gathered from all processes, or the whole feature folder), on every process."""
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

    def extract(shards: str, what: str) -> FeatureSet:
        features, labels, keys = extract_features(encoder, shards, transform, batch_size, cfg.data.num_workers,
                                                  accelerator, f"features ({what})", cfg.data.max_skip_rate,
                                                  progress=cfg.logging.progress_bar)
        return FeatureSet(features, labels, keys, description, encoder.kind, shards)

    if cfg.train_features:
        train = read_feature_set(cfg.train_features, "train_features", cfg.task)
        train = train if whole_train else train.share(rank, world)
    else:
        train = extract(run.train_shards, "train")
        if whole_train:
            from accelerate.utils import gather_object

            train = replace(train, features=gather_rows(train.features, accelerator),
                            labels=gather_rows(train.labels, accelerator), keys=gather_object(train.keys))
    if cfg.val_features:
        val = read_feature_set(cfg.val_features, "val_features", cfg.task).share(rank, world)
    else:
        val = extract(run.val_shards, "val")
    for attribute, name in (("encoder", "encoder"), ("kind", "feature")):
        if getattr(train, attribute) != getattr(val, attribute):
            raise ConfigError(f"the training and evaluation features differ in {name}: {getattr(train, attribute)!r} "
                              f"({train.source}) against {getattr(val, attribute)!r} ({val.source})")
    if train.features.shape[1] != val.features.shape[1]:
        raise ConfigError(f"the training features have dimension {train.features.shape[1]}, the evaluation "
                          f"features {val.features.shape[1]}")
    return train, val, num_classes or feature_class_count(cfg.num_classes, train, val)


def feature_class_count(num_classes: Optional[int], train: FeatureSet, val: FeatureSet) -> int:
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


def class_names(side: FeatureSet, num_classes: int) -> list[str]:
    """Names of the classes 0..num_classes-1 for plots: the side's class list (its feature index, or the
    stats.json of its shards), numbers where there is none."""
    names = side.classes
    if not side.from_files:
        try:
            names = read_class_names(side.source)
        except DataError:  # labelled shards without a stats.json: labels, no names
            names = None
    names = list(names or [])[:num_classes]
    return names + [str(label) for label in range(len(names), num_classes)]
