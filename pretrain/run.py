"""Setting up a run: the accelerator, the output folder, the shards and the data stream, from a run's config.

    run = setup_run(cfg)                       # accelerator, output_dir (config.yaml written), shards, sample count
    trainer = Trainer.from_config(cfg, run, model=..., task=..., model_metadata=..., transform=...)

A run config is any of the dataclasses in pretrain/config.py or finetune/config.py: each has `output_dir` and the
shared `data`, `train`, `optim` and `logging` sections.
"""
from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from data import (
    DataError,
    ShardStream,
    count_samples,
    ensure_embedded_pair_shards,
    ensure_embedded_shards,
    eval_transform,
    expand_shards,
    make_loader,
    read_shard_stats,
)

from .checkpoint import find_latest
from .config import ConfigError, DataConfig, TrainConfig, save_config

log = logging.getLogger(__name__)

def cpu_has_fast_bf16() -> bool:
    """True on CPUs with native bf16 matmul units. Elsewhere (e.g. AVX2-only CPUs) bf16 autocast falls back to
    reference kernels that run ~100x slower than float32, so `auto` must not pick it there."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(requested: str) -> str:
    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_fast_bf16() else "no"


def make_accelerator(train: TrainConfig):
    from accelerate import Accelerator

    precision = resolve_precision(train.mixed_precision)
    if precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("'train.mixed_precision' fp16 needs a GPU; on CPU use bf16 (or no)")
    if train.mixed_precision == "auto":
        log.info("mixed precision: auto -> %s", precision)
    # accelerate only sets up CPU-only multi-process runs (torchrun / accelerate launch: gloo) when told cpu=True
    return Accelerator(mixed_precision=precision, gradient_accumulation_steps=train.grad_accum_steps,
                       cpu=not has_accelerator())


def has_accelerator() -> bool:
    if hasattr(torch, "accelerator"):  # torch >= 2.6: CUDA, XPU, MPS, ...
        return torch.accelerator.is_available()
    return torch.cuda.is_available()


def prepare_output_dir(output_dir: str | Path, config: Any, train: TrainConfig, accelerator) -> Path:
    """Create the run's folder and write the resolved config there. A fresh run (no `train.resume`) into a folder
    holding an earlier run's checkpoints or log stops here, before anything is written, unless `train.overwrite`."""
    output_dir = Path(output_dir)
    log_file, checkpoints = output_dir / "log.jsonl", output_dir / "checkpoints"
    earlier = find_latest(checkpoints)
    if not train.resume and (earlier is not None or log_file.exists()):
        if not train.overwrite:
            what = f"checkpoints up to {earlier.name}" if earlier else "a log.jsonl"
            raise ConfigError(
                f"{output_dir} already holds an earlier run ({what}): continue it with train.resume=latest, "
                f"replace it with train.overwrite=true, or choose another output_dir"
            )
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            shutil.rmtree(checkpoints, ignore_errors=True)
            log_file.unlink(missing_ok=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        try:
            save_config(config, output_dir / "config.yaml")
        except OSError as err:  # e.g. a read-only place or a path under a file
            raise ConfigError(f"'output_dir' {output_dir} cannot be written: {err.strerror or err}") from None
    return output_dir


EMBEDDED = "embedded"


def resolve_shards(data: DataConfig, output_dir: Path, accelerator, captions: bool = False,
                   read_train: bool = True) -> tuple[Optional[str], Optional[str]]:
    """Shard specs for `data.train` (None when not `read_train`) and `data.val` ("embedded" writes the bundled data
    set once, main process first; captions=True: its training images as image-text pairs), checked to name
    existing shards. Specs, not lists, so "a::b" sources keep their `data.weights`."""
    train = data.train if read_train else None
    embedded_train = embedded_val = None
    if EMBEDDED in (train, data.val):
        cache = Path(data.cache_dir) if data.cache_dir else Path(output_dir) / "data"
        with accelerator.main_process_first():
            ensure = ensure_embedded_pair_shards if captions else ensure_embedded_shards
            embedded_train, embedded_val = ensure(cache)
    train = embedded_train if train == EMBEDDED else train
    val = embedded_val if data.val == EMBEDDED else data.val
    for spec in (train, val):
        if spec is not None:
            expand_shards(spec)  # a missing shard or folder fails here, naming it
    check_normalisation(data, train if train is not None else val)
    return train, val


GREY_TOLERANCE = 0.01  # channel means closer than this: the images are grey
FAR_MEAN = 0.15  # ImageNet's mean is within ~0.05 of most photo collections'; grey Fashion-MNIST's is 0.2 off


def check_normalisation(data: DataConfig, spec: Optional[str]) -> None:
    """Log the shards' own pixel statistics (stats.json, `python -m data`) beside `data.mean` / `data.std`, and
    warn when grey images meet statistics that differ between channels (ImageNet's, the default): the three copies
    of each pixel are then shifted apart, and reconstructions and other pictures come out tinted."""
    if spec is None:
        return
    try:
        stats = read_shard_stats(spec)
    except DataError:
        return  # no readable stats.json: nothing to compare with (its absence is reported where it matters)
    mean, std = stats.get("pixel_mean"), stats.get("pixel_std")
    if not mean or not std:
        return
    log.info("shards' pixel mean %s, std %s; normalised with data.mean %s, data.std %s", mean, std,
             list(data.mean), list(data.std))
    grey = max(mean) - min(mean) < GREY_TOLERANCE and max(std) - min(std) < GREY_TOLERANCE
    if grey and (max(data.mean) - min(data.mean) >= GREY_TOLERANCE or max(data.std) - min(data.std) >= GREY_TOLERANCE):
        m, s = sum(mean) / 3, sum(std) / 3
        log.warning("the shards' images are grey (pixel mean %.3f, std %.3f in every channel) but data.mean %s / "
                    "data.std %s differ between channels: each grey pixel is made a coloured one (reconstructions come out "
                    "tinted); unless the encoder was pretrained with them, set data.mean=[%.3f,%.3f,%.3f] "
                    "data.std=[%.3f,%.3f,%.3f]", m, s, list(data.mean), list(data.std), m, m, m, s, s, s)
    elif max(abs(ours - theirs) for ours, theirs in zip(data.mean, mean)) > FAR_MEAN:
        log.warning("data.mean %s is far from the shards' own pixel mean %s (std %s): right for an encoder pretrained "
                    "with data.mean, else set data.mean / data.std to the shards' figures", list(data.mean), mean, std)


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


def first_images(shards: str, data: DataConfig, count: int) -> torch.Tensor:
    """The first `count` evaluation images [count, 3, H, W] (a fixed set, so pictures of runs are comparable)."""
    transform = eval_transform(data.image_size, crop_fraction=data.eval_crop_fraction, mean=data.mean, std=data.std)
    stream = ShardStream(shards, transform, batch_size=count, train=False)
    batch = next(iter(stream), None)
    if batch is None:
        raise DataError(f"the evaluation shards {shards} hold no readable image to draw pictures from")
    return batch["image"]


@dataclass
class Run:
    """What every run starts from."""
    accelerator: Any  # accelerate.Accelerator
    output_dir: Path
    train_shards: Optional[str]  # shard specs ("a::b" sources keep data.weights); None where a run reads no training data
    val_shards: Optional[str]
    samples_per_epoch: int  # data.samples_per_epoch, else the training shards' sample count (0 without training data)


def setup_run(cfg: Any, *, captions: bool = False, train_data: bool = True) -> Run:
    """The accelerator (cfg.train), the output folder (a fresh run refuses an earlier run's folder; config.yaml
    written), the shard specs (cfg.data; "embedded" written once; captions=True: as image-text pairs), the number of
    training samples per epoch, and the seed (the same initial weights on every process). train_data=False: only
    data.val is read (zero-shot evaluation)."""
    from accelerate.utils import set_seed

    accelerator = make_accelerator(cfg.train)
    output_dir = prepare_output_dir(cfg.output_dir, cfg, cfg.train, accelerator)
    train_shards, val_shards = resolve_shards(cfg.data, output_dir, accelerator, captions, read_train=train_data)
    samples_per_epoch = 0
    if train_shards is not None:
        samples_per_epoch = cfg.data.samples_per_epoch or count_samples(train_shards)
    set_seed(cfg.train.seed)
    return Run(accelerator, output_dir, train_shards, val_shards, samples_per_epoch)

