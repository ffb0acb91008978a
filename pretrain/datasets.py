"""From a run's `data` config section to shard lists (writing the embedded data set where asked)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from data import (
    STATS_FILE,
    DataError,
    ShardStream,
    ensure_embedded_pair_shards,
    ensure_embedded_shards,
    eval_transform,
    expand_shards,
    make_loader,
)

from .config import DataConfig, TrainConfig

EMBEDDED = "embedded"


def resolve_shards(data: DataConfig, output_dir: Path, accelerator, captions: bool = False) -> tuple[str, str | None]:
    """Shard specs for `data.train` / `data.val` ("embedded" writes the bundled data set once, main process first;
    captions=True: its training images as image-text pairs), checked to name existing shards. Specs, not lists,
    so "a::b" sources keep their `data.weights`."""
    embedded_train = embedded_val = None
    if EMBEDDED in (data.train, data.val):
        cache = Path(data.cache_dir) if data.cache_dir else Path(output_dir) / "data"
        with accelerator.main_process_first():
            ensure = ensure_embedded_pair_shards if captions else ensure_embedded_shards
            embedded_train, embedded_val = ensure(cache)
    train = embedded_train if data.train == EMBEDDED else data.train
    val = embedded_val if data.val == EMBEDDED else data.val
    for spec in (train, val):
        if spec is not None:
            expand_shards(spec)  # a missing shard or folder fails here, naming it
    return train, val


def training_loader_factory(shards: str, transform, data: DataConfig, train: TrainConfig, kind: str = "labelled",
                            tokenizer=None):
    """The Trainer's `make_loader(start_batch, rank, world_size)`: this rank's share of the training stream, as the
    run's `data` and `train` sections configure it, resuming after `start_batch` batches."""

    def make(start_batch: int, rank: int, world_size: int):
        stream = ShardStream(
            shards, transform, train.batch_size, train=True, kind=kind, tokenizer=tokenizer, seed=train.seed,
            shuffle_buffer=data.shuffle_buffer, rank=rank, world_size=world_size, start_batch=start_batch,
            resampled=data.resampled, weights=data.weights, decode_size=data.decode_size,
            max_skip_rate=data.max_skip_rate,
        )
        return make_loader(stream, data.num_workers)

    return make


def read_class_names(spec: str) -> list[str]:
    """Class names from the stats.json beside the shards (written by `python -m data`)."""
    shards = expand_shards(spec)
    stats_file = Path(shards[0]).parent / STATS_FILE
    if not stats_file.is_file():
        raise DataError(f"no {STATS_FILE} beside {shards[0]}: set num_classes in the config")
    classes = json.loads(stats_file.read_text()).get("classes")
    if not classes:
        raise DataError(f"{stats_file} lists no classes: set num_classes in the config")
    return list(classes)


def first_images(shards: str, data: DataConfig, count: int) -> torch.Tensor:
    """The first `count` evaluation images [count, 3, H, W] (a fixed set, so pictures of runs are comparable)."""
    transform = eval_transform(data.image_size, crop_fraction=data.eval_crop_fraction, mean=data.mean, std=data.std)
    stream = ShardStream(shards, transform, batch_size=count, train=False)
    return next(iter(stream))["image"]
