"""Stream batches of (image, label) from WebDataset shards, split over ranks and DataLoader workers.

Every reading slot is one (rank, worker) pair: slot = rank * num_workers + worker_id (with the worker ids rotated
by start_batch on resume, see ShardStream). A slot's stream is a pure function of (shards, seed, slot,
num_slots), so training is reproducible and resuming needs only the number of batches already produced:

    raw samples of pass p  ->  [train: shuffle buffer]  ->  skip samples already consumed (no decoding)
        ->  decode + transform (torch seeded per sample)  ->  batches of batch_size

Bad data never stops the stream: undecodable images, samples missing a field and unreadable tar files are
dropped and counted in each batch's "skipped" dict.

    stream = ShardStream(expand_shards("shards/train"), mae_train_transform(224), 64, train=True,
                         rank=rank, world_size=world_size, start_batch=step)
    for batch in make_loader(stream, num_workers=8): ...
"""

from __future__ import annotations

import io
import itertools
import logging
import random
from collections import Counter
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.handlers import reraise_exception
from webdataset.tariterators import tarfile_samples

from .errors import DataError
from .shards import expand_shards
from .sources import IMAGE_EXTENSIONS

logger = logging.getLogger(__name__)


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from several non-negative integers (seed, pass, slot, ...)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _shuffle_buffer(samples, size: int, rng: random.Random):
    """Yield samples in a locally shuffled order, holding at most `size` of them."""
    buffer = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        index = rng.randrange(size)
        yield buffer[index]
        buffer[index] = sample
    rng.shuffle(buffer)
    yield from buffer


class ShardStream(IterableDataset):
    """Batches `{"image": FloatTensor[B, 3, H, W], "label": LongTensor[B], "key": list[str],
    "skipped": dict[str, int]}` from labelled WebDataset shards.

    train=True: endless passes; pass p reads the shards in the order `random.Random(seed + p)` gives them
    (the same on every rank), through a per-slot shuffle buffer; only full batches, which run across passes.
    train=False: one pass over the sorted shards, no shuffling; the last batch may be partial. Over all
    slots every sample appears exactly once.

    With at least as many shards as slots, slot s reads shards order[s::num_slots]; otherwise each slot reads
    every shard and keeps the samples whose running index i has i % num_slots == s.

    start_batch: number of batches this rank's DataLoader already produced (training only). The DataLoader
    takes batch b from worker b % num_workers, so worker w of the resumed loader plays the part of worker
    (w + start_batch) % num_workers of the first one and skips that worker's share of the produced batches,
    as raw samples, before decoding. The resumed stream then equals the tail of the uninterrupted one, exactly
    so when no sample in the skipped part was dropped as undecodable (the writer checks every image).
    """

    def __init__(
        self,
        shards,
        transform: Callable,
        batch_size: int,
        *,
        train: bool,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        rank: int = 0,
        world_size: int = 1,
        start_batch: int = 0,
    ):
        super().__init__()
        self.shards = sorted(expand_shards(shards))  # also checks that every shard exists
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if seed < 0 or start_batch < 0 or shuffle_buffer < 0:
            raise ValueError(f"seed, start_batch and shuffle_buffer must be >= 0 (got {seed}, {start_batch}, "
                             f"{shuffle_buffer})")
        if start_batch and not train:
            raise ValueError("start_batch is for resuming training; evaluation always reads the full pass")
        self.transform, self.batch_size, self.train = transform, batch_size, train
        self.seed, self.shuffle_buffer = seed, shuffle_buffer
        self.rank, self.world_size, self.start_batch = rank, world_size, start_batch

    # -------------------------------------------------------------------------------- raw samples

    def _read_shard(self, shard: str, skipped: Counter, report: bool = True) -> Iterator[dict]:
        """Raw samples of one tar file; a read error counts as "bad_tar" (if `report`) and ends this shard only."""
        try:
            yield from tarfile_samples([{"url": shard}], handler=reraise_exception)
        except Exception as error:  # truncated tar, missing file, duplicate names, ...
            if report:
                skipped["bad_tar"] += 1
                logger.warning("skipping the rest of shard %s: %s: %s", shard, type(error).__name__, error)

    def _pass_samples(self, pass_index: int, slot: int, num_slots: int, skipped: Counter) -> Iterator[dict]:
        """This slot's raw samples for one pass, in reading order (before the shuffle buffer)."""
        order = list(self.shards)
        if self.train:
            random.Random(self.seed + pass_index).shuffle(order)
        if len(order) >= num_slots:
            for shard in order[slot::num_slots]:
                yield from self._read_shard(shard, skipped)
        else:  # too few shards: every slot reads everything and keeps its share of samples
            # Every slot meets the same bad tar; slot 0 alone reports it, so it is counted once.
            samples = (s for shard in order for s in self._read_shard(shard, skipped, report=slot == 0))
            for index, sample in enumerate(samples):
                if index % num_slots == slot:
                    yield sample

    def _raw_stream(self, slot: int, num_slots: int, skipped: Counter) -> Iterator[tuple[int, dict]]:
        """(pass index, raw sample) for this slot: one pass, or endless shuffled passes when training."""
        for pass_index in itertools.count() if self.train else [0]:
            samples = self._pass_samples(pass_index, slot, num_slots, skipped)
            if self.train and self.shuffle_buffer > 1:
                samples = _shuffle_buffer(samples, self.shuffle_buffer,
                                          random.Random(derive_seed(self.seed, pass_index, slot)))
            count = 0
            for sample in samples:
                count += 1
                yield pass_index, sample
            if self.train and count == 0:  # an endless stream of nothing would hang training
                raise DataError(
                    f"reading slot {slot} of {num_slots} (rank {self.rank}, {num_slots // self.world_size} "
                    f"workers per rank) got no readable samples from {len(self.shards)} shard(s) starting with "
                    f"{self.shards[0]}; use fewer workers or more data"
                )

    # -------------------------------------------------------------------------------- decoding

    def _decode(self, raw: dict, skipped: Counter) -> tuple[Image.Image, int] | None:
        image_field = next((ext for ext in IMAGE_EXTENSIONS if ext in raw), None)
        if image_field is None or "cls" not in raw:
            skipped["missing_field"] += 1
            logger.debug("sample %s in %s lacks an image or cls field", raw.get("__key__"), raw.get("__url__"))
            return None
        try:
            label = int(raw["cls"].decode().strip())
        except (UnicodeDecodeError, ValueError):
            skipped["bad_label"] += 1
            return None
        try:
            with Image.open(io.BytesIO(raw[image_field])) as image:
                image = image.convert("RGB")
        except Exception as error:  # PIL raises many types for bad data
            skipped["undecodable_image"] += 1
            logger.debug("sample %s in %s: undecodable image (%s)", raw.get("__key__"), raw.get("__url__"), error)
            return None
        return image, label

    def _transform(self, image: Image.Image, sample_seed: int) -> torch.Tensor:
        # Augmentation randomness is a function of the sample's position, not of what ran before it.
        if get_worker_info() is not None:
            torch.manual_seed(sample_seed)
            return self.transform(image)
        with torch.random.fork_rng(devices=[]):  # leave the caller's RNG alone in the main process
            torch.manual_seed(sample_seed)
            return self.transform(image)

    # -------------------------------------------------------------------------------- batches

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker_id, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # A fresh DataLoader takes its first batch from worker 0, but after `start_batch` batches the next one
        # is due from worker start_batch % num_workers: each worker takes over that shifted worker's stream.
        role = (worker_id + self.start_batch) % num_workers
        slot, num_slots = self.rank * num_workers + role, self.world_size * num_workers
        samples_to_skip = len(range(role, self.start_batch, num_workers)) * self.batch_size

        skipped = Counter()
        images, labels, keys = [], [], []
        for index, (pass_index, raw) in enumerate(self._raw_stream(slot, num_slots, skipped)):
            if index < samples_to_skip:
                if index == samples_to_skip - 1:
                    skipped.clear()  # these counts belonged to batches produced before the resume
                continue
            decoded = self._decode(raw, skipped)
            if decoded is None:
                continue
            image, label = decoded
            images.append(self._transform(image, derive_seed(self.seed, pass_index, slot, index)))
            labels.append(label)
            keys.append(raw["__key__"])
            if len(images) == self.batch_size:
                batch = self._batch(images, labels, keys, skipped)
                images, labels, keys = [], [], []
                skipped.clear()  # the same Counter the raw stream adds to
                yield batch
        if images:  # only in evaluation: training never ends
            yield self._batch(images, labels, keys, skipped)
        elif skipped:
            logger.warning("slot %d: samples dropped after the last batch: %s", slot, dict(skipped))

    @staticmethod
    def _batch(images, labels, keys, skipped: Counter) -> dict:
        return {
            "image": torch.stack(images),
            "label": torch.tensor(labels, dtype=torch.long),
            "key": keys,
            "skipped": dict(skipped),
        }


def make_loader(stream: ShardStream, num_workers: int, **loader_kwargs) -> DataLoader:
    """A DataLoader that passes the stream's ready-made batches through (batch_size=None)."""
    loader_kwargs.setdefault("persistent_workers", False)
    if num_workers > 0:
        loader_kwargs.setdefault("prefetch_factor", 2)
    return DataLoader(stream, batch_size=None, num_workers=num_workers, **loader_kwargs)
