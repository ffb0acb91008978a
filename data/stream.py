"""Stream batches from WebDataset shards (labelled images, image-text pairs or detection), split over ranks and
DataLoader workers.

Every reading slot is one (rank, worker) pair: slot = rank * num_workers + worker_id (with the worker ids rotated
by start_batch on resume, see ShardStream). A slot's stream is a pure function of (shards, seed, slot,
num_slots), so training is reproducible and resuming needs only the number of batches already produced:

    raw samples  ->  [train: shuffle buffer]  ->  skip samples already consumed (no decoding)
        ->  kind.prepare: decode + transform (torch seeded per sample)  ->  kind.collate: batches of batch_size

Three ways to read (see ShardStream): evaluation (one pass, every sample once), finite epochs (endless passes,
each a new shuffle of whole shards, every sample once per pass) and resampled (each slot draws shards with
replacement, weighted by source; open_clip's --dataset-resampled).

Bad data never stops the stream: undecodable images, samples missing a field and unreadable tar files are
dropped and counted in each batch's "skipped" dict; a shard that cannot be read to its end counts the samples it
lost (what its sizes.json/stats.json says it holds, minus what was read). When more than max_skip_rate of a slot's
samples are bad (after a first skip_guard_min_samples, or at the end of an evaluation pass), the stream raises
DataError instead of training on scraps or waiting forever for a batch that never fills. Shards whose stats.json
says they hold another kind of samples are refused up front.

make_loader's DataLoader stops its worker processes as soon as iteration stops early (an error, `close()`), so that
an error raised while reading ends the process instead of leaving it waiting for its workers at exit.

    stream = ShardStream("shards/train", mae_train_transform(224), 64, train=True,
                         rank=rank, world_size=world_size, start_batch=step)
    for batch in make_loader(stream, num_workers=8): ...
"""

from __future__ import annotations

import itertools
import logging
import random
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .errors import DataError
from .guard import SkipGuard
from .images import SampleSkipped
from .samples import SampleKind, make_kind
from .shards import (
    KIND_FIELDS,
    check_kind,
    describe_read_error,
    expand_sources,
    kind_of_fields,
    read_tar_samples,
    shard_sizes,
    tar_cut_short,
    wrong_kind,
)

logger = logging.getLogger(__name__)

MAX_EMPTY_DRAWS = 100  # resampled: this many shard draws in a row without one sample means there is no data


_MASK64 = (1 << 64) - 1


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from several non-negative integers (seed, pass, slot, ...): splitmix64 over the
    parts. Called once per sample, so it is plain integer arithmetic (numpy's SeedSequence costs ~40 us)."""
    state = 0x9E3779B97F4A7C15
    for part in parts:
        state = (state ^ int(part)) * 0xBF58476D1CE4E5B9 & _MASK64
        state = (state ^ (state >> 31)) * 0x94D049BB133111EB & _MASK64
        state ^= state >> 29
    return state >> 1


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
    """Batches from WebDataset shards, plus `"skipped": dict[str, int]` (samples dropped since the last batch).

    kind: "labelled" (`{"image", "label", "key"}`), "image-text" (`{"image", "text", "caption", "key"}`, captions
    tokenized by `tokenizer`) or "detection" (`{"image", "mask", "target", "key"}`, transform on (image, target)),
    or a kind object; see data.samples. `transform` gets each image decoded to an RGB uint8 tensor [3, H, W]
    (see data.samples.open_image) and returns what the batch stacks; torchvision.transforms.v2 transforms take
    such tensors, and so do all of data.transforms.

    train=False (evaluation): one pass over the sorted shards, no shuffling; the last batch may be partial. Over all
    slots every sample appears exactly once: slot s reads shards order[s::num_slots], or, with fewer shards than
    slots, every slot reads every shard and keeps the samples whose running index i has i % num_slots == s.

    train=True, resampled=False (finite epochs): endless passes; pass p reads the shards in the order
    `random.Random(seed + p)` gives them (the same on every rank), slot s reads order[s::num_slots], through a
    per-slot shuffle buffer seeded by (seed, p, slot): each pass shuffles differently and holds every sample once.
    Only full batches, which run across passes. Needs at least as many shards as slots (DataError otherwise).

    train=True, resampled=True: each slot draws shards with replacement, from a RNG seeded by (seed, slot), and
    reads them through one endless shuffle buffer; works with any number of shards (1 shard, 4 slots is fine).
    weights: one per "::"-separated source of `shards` (see data.shards.expand_sources), upsampling factors.

    An epoch is the engine's notion (samples_per_epoch, e.g. count_samples(shards)); the stream just goes on.

    start_batch: number of batches this rank's DataLoader already produced (training only). The DataLoader
    takes batch b from worker b % num_workers, so worker w of the resumed loader plays the part of worker
    (w + start_batch) % num_workers of the first one and skips that worker's share of the produced batches,
    as raw samples, before decoding. The resumed stream then equals the tail of the uninterrupted one, exactly
    so when no sample in the skipped part was dropped as undecodable (the writer checks every image).

    decode_size: decode JPEGs in PIL draft mode, no smaller than decode_size on either side (faster for large
    images cropped small; set it to the crop size). None decodes at full size.
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
        kind: str | SampleKind = "labelled",
        tokenizer: Callable | None = None,
        resampled: bool = False,
        weights=None,
        decode_size: int | None = None,
        max_skip_rate: float = 0.5,
        skip_guard_min_samples: int = 200,
    ):
        super().__init__()
        if resampled and not train:
            raise ValueError("resampled=True is for training; evaluation reads every sample exactly once")
        if weights is not None and not resampled:
            raise ValueError("source weights need resampled=True (a finite epoch reads every shard once)")
        sources = expand_sources(shards, weights)  # also checks that every shard exists
        self.shards = sorted(shard for source, _ in sources for shard in source)
        self.shard_weights = [(shard, weight) for source, weight in sources for shard in source]
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if seed < 0 or start_batch < 0 or shuffle_buffer < 0:
            raise ValueError(f"seed, start_batch and shuffle_buffer must be >= 0 (got {seed}, {start_batch}, "
                             f"{shuffle_buffer})")
        if start_batch and not train:
            raise ValueError("start_batch is for resuming training; evaluation always reads the full pass")
        if decode_size is not None and decode_size < 1:
            raise ValueError(f"decode_size must be >= 1 or None, got {decode_size}")
        self.kind = make_kind(kind, tokenizer, decode_size)
        if self.kind.name in KIND_FIELDS:
            check_kind(self.shards, self.kind.name)  # e.g. labelled shards for CLIP: say so now, not 200 skips later
        self.shard_sizes = shard_sizes(self.shards)  # what a damaged shard should have held
        self.transform, self.batch_size, self.train, self.resampled = transform, batch_size, train, resampled
        self.seed, self.shuffle_buffer = seed, shuffle_buffer
        self.rank, self.world_size, self.start_batch = rank, world_size, start_batch
        self.max_skip_rate, self.skip_guard_min_samples = max_skip_rate, skip_guard_min_samples
        SkipGuard(max_skip_rate, skip_guard_min_samples)  # checks the arguments now, not in a worker

    # -------------------------------------------------------------------------------- raw samples

    def _read_shard(self, shard: str, counts: _SkipCounts, report: bool = True, share: int = 1) -> Iterator[dict]:
        """Raw samples of one tar file. A shard that cannot be read to its end (a read error, a file cut short, fewer
        samples than its index says) ends there and counts as "bad_tar" (if `report`), once per sample lost: what
        its sizes.json/stats.json says it holds minus what was read, at least 1 (one when its size is unknown).
        share: this slot keeps 1/share of the samples read (evaluation with fewer shards than slots)."""
        read = 0
        try:
            for sample in read_tar_samples(shard):
                read += 1
                yield sample
            problem = tar_cut_short(shard)
        except Exception as error:  # not a tar file, truncated, missing, duplicate names, ...
            problem = describe_read_error(error)
        expected = self.shard_sizes.get(shard)
        if problem is None and expected is not None and read < expected:
            problem = f"it holds {read} samples, its index {expected}"
        if problem is None:
            return
        counts.unreadable[shard] = problem
        if report:
            lost = max(1, expected - read) if expected is not None else 1
            logger.warning("shard %s cannot be read to its end (%s): %d sample(s) read, %s lost", shard, problem,
                           read, lost if expected is not None else "an unknown number")
            damage = "is unreadable" if read == 0 else f"cannot be read past sample {read}"
            counts.damaged_shard(read // share, lost, example=f"{shard} {damage} ({problem})")

    def _pass_samples(self, pass_index: int, slot: int, num_slots: int, counts: _SkipCounts) -> Iterator[dict]:
        """This slot's raw samples for one pass (evaluation or finite epochs), before the shuffle buffer."""
        order = list(self.shards)
        if self.train:
            random.Random(self.seed + pass_index).shuffle(order)
        if len(order) >= num_slots:
            for shard in order[slot::num_slots]:
                yield from self._read_shard(shard, counts)
        else:  # evaluation with too few shards: every slot reads everything and keeps its share of samples
            # Every slot meets the same bad tar; slot 0 alone reports it, so it is counted once.
            samples = (s for shard in order for s in self._read_shard(shard, counts, report=slot == 0,
                                                                         share=num_slots))
            for index, sample in enumerate(samples):
                if index % num_slots == slot:
                    yield sample

    def _epoch_stream(self, slot: int, num_slots: int, counts: _SkipCounts) -> Iterator[tuple[int, dict]]:
        """(pass index, raw sample) for this slot: one pass, or endless shuffled passes when training."""
        for pass_index in itertools.count() if self.train else [0]:
            samples = self._pass_samples(pass_index, slot, num_slots, counts)
            if self.train and self.shuffle_buffer > 1:
                samples = _shuffle_buffer(samples, self.shuffle_buffer,
                                          random.Random(derive_seed(self.seed, pass_index, slot)))
            count = 0
            for sample in samples:
                count += 1
                yield pass_index, sample
            if self.train and count == 0:  # an endless stream of nothing would hang training
                raise DataError(self._nothing_read(slot, num_slots, counts))

    def _nothing_read(self, slot: int, num_slots: int, counts: _SkipCounts) -> str:
        """Why a slot's pass over its shards gave not one sample: they are unreadable, or empty."""
        where = f"reading slot {slot} of {num_slots} (rank {self.rank})"
        mine = len(range(slot, len(self.shards), num_slots))  # the slot's share of the shards, in every pass
        if not counts.unreadable:
            return (f"{where}: its {mine} shard(s) of {len(self.shards)} (starting with {self.shards[0]}) hold no "
                    f"samples")
        shard, problem = next(iter(counts.unreadable.items()))
        example = f"e.g. {shard}: {problem}"
        if len(counts.unreadable) < mine:
            return (f"{where}: its {mine} shard(s) gave no samples: {len(counts.unreadable)} cannot be read ("
                    f"{example}), the others are empty; check the shards, e.g. rewrite them with `python -m data`")
        which = ("every shard is unreadable" if mine == len(self.shards)
                 else f"none of the {mine} shard(s) it reads (of {len(self.shards)}) can be read")
        return f"{where}: {which} ({example}); check the shards, e.g. rewrite them with `python -m data`"

    def _resampled_stream(self, slot: int, num_slots: int, counts: _SkipCounts) -> Iterator[tuple[int, dict]]:
        """(0, raw sample) for this slot, endlessly: shards drawn with replacement, weighted, one shuffle buffer."""
        rng = random.Random(derive_seed(self.seed, slot, num_slots, 1))
        shards = [shard for shard, _ in self.shard_weights]
        cumulative = list(itertools.accumulate(weight for _, weight in self.shard_weights))

        def draws() -> Iterator[dict]:
            empty_draws = 0
            while True:
                shard = rng.choices(shards, cum_weights=cumulative)[0]
                empty = True
                for sample in self._read_shard(shard, counts):
                    empty = False
                    yield sample
                empty_draws = empty_draws + 1 if empty else 0
                if empty_draws >= MAX_EMPTY_DRAWS:
                    why = f": {counts.unreadable[shard]}" if shard in counts.unreadable else ", empty"
                    raise DataError(f"reading slot {slot} of {num_slots} (rank {self.rank}): {empty_draws} shard "
                                    f"draws in a row gave no samples (last: {shard}{why}); check the shards "
                                    f"({len(shards)} in all, starting with {shards[0]})")

        samples = draws()
        if self.shuffle_buffer > 1:
            samples = _shuffle_buffer(samples, self.shuffle_buffer, random.Random(derive_seed(self.seed, slot, num_slots, 2)))
        for sample in samples:
            yield 0, sample

    def _raw_stream(self, slot: int, num_slots: int, counts: _SkipCounts) -> Iterator[tuple[int, dict]]:
        if self.resampled:
            return self._resampled_stream(slot, num_slots, counts)
        if self.train and len(self.shards) < num_slots:
            workers_that_fit = len(self.shards) // self.world_size  # per process; 0 workers still read in 1 slot
            fewer_workers = (f", at most {workers_that_fit} DataLoader worker(s) (data.num_workers)"
                             if workers_that_fit >= 1 else "")
            raise DataError(
                f"{len(self.shards)} shard(s) (starting with {self.shards[0]}) for {num_slots} reading slots "
                f"({self.world_size} process(es) x {num_slots // self.world_size} DataLoader worker(s)): finite-epoch "
                f"training gives every slot whole shards of its own. Use resampled=True (data.resampled=true: "
                f"shards drawn with replacement){fewer_workers}, or write the data into at least {num_slots} shards"
            )
        return self._epoch_stream(slot, num_slots, counts)

    # -------------------------------------------------------------------------------- decoding

    def _prepare(self, raw: dict, sample_seed: int) -> dict:
        # Augmentation randomness is a function of the sample's position, not of what ran before it.
        # Only the CPU generator: torch.manual_seed would also seed every accelerator (~0.25 ms a sample).
        torch.default_generator.manual_seed(sample_seed)
        return self.kind.prepare(raw, self.transform)

    # -------------------------------------------------------------------------------- batches

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker_id, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # A fresh DataLoader takes its first batch from worker 0, but after `start_batch` batches the next one
        # is due from worker start_batch % num_workers: each worker takes over that shifted worker's stream.
        role = (worker_id + self.start_batch) % num_workers
        slot, num_slots = self.rank * num_workers + role, self.world_size * num_workers
        samples_to_skip = len(range(role, self.start_batch, num_workers)) * self.batch_size

        counts = _SkipCounts(SkipGuard(
            self.max_skip_rate, self.skip_guard_min_samples,
            where=f"reading slot {slot} of {num_slots} (rank {self.rank}) from {len(self.shards)} shard(s) "
                  f"starting with {self.shards[0]}"))
        # In the training process (0 workers) the caller's RNG is set aside while samples are prepared, and given
        # back before each batch goes out: its stream is the same as if no sample had been prepared.
        callers_rng = _CallersRNG(active=info is None)
        try:
            callers_rng.set_aside()
            yield from callers_rng.around_batches(self._batches(slot, num_slots, samples_to_skip, counts))
        finally:
            callers_rng.give_back()

    def _batches(self, slot: int, num_slots: int, samples_to_skip: int, counts: _SkipCounts) -> Iterator[dict]:
        """This slot's batches, after the `samples_to_skip` raw samples that batches before a resume consumed."""
        items = []
        current_pass, usable_in_pass = 0, False
        for index, (pass_index, raw) in enumerate(self._raw_stream(slot, num_slots, counts)):
            if pass_index != current_pass:  # finite epochs: a whole pass without one usable sample never ends well
                if not usable_in_pass:
                    counts.guard.check(final=True)
                    raise DataError(f"reading slot {slot} of {num_slots} (rank {self.rank}): a whole pass over its "
                                    f"shards gave no usable sample (skipped: {dict(counts.guard.skipped)}); check "
                                    f"the shards")
                current_pass, usable_in_pass = pass_index, False
            if index < samples_to_skip:
                usable_in_pass = True  # consumed before the resume
                if index == samples_to_skip - 1:
                    counts.reset()  # these counts belonged to batches produced before the resume
                continue
            try:
                items.append(self._prepare(raw, derive_seed(self.seed, pass_index, slot, index)))
            except SampleSkipped as skip:
                logger.debug("sample %s in %s skipped: %s", raw.get("__key__"), raw.get("__url__"), skip)
                counts.skip(skip.reason, example=lambda raw=raw, skip=skip: self._explain(raw, skip))
                continue
            counts.keep()
            usable_in_pass = True
            if len(items) == self.batch_size:
                yield self._batch(items, counts)
                items = []
        counts.guard.check(final=True)  # only in evaluation: the pass is over, judge it however small
        if items:  # only in evaluation: training never ends
            yield self._batch(items, counts)
        elif counts.batch:
            logger.warning("slot %d: samples dropped after the last batch: %s", slot, dict(counts.batch))

    def _explain(self, raw: dict, skip: SampleSkipped) -> str:
        """A skipped sample for the guard's message; a missing field that another kind's samples carry names that
        kind (e.g. labelled shards given to CLIP) and how to write the right shards."""
        url = raw.get("__url__", "?")
        fields = sorted(name for name in raw if not name.startswith("__"))
        found = kind_of_fields(fields)
        if skip.reason == "missing_field" and found not in (None, self.kind.name) and self.kind.name in KIND_FIELDS:
            directory = str(Path(url).parent)
            return f"sample {raw.get('__key__')} has fields {', '.join(fields)}: " + wrong_kind(directory, found,
                                                                                                self.kind.name)
        return f"sample {raw.get('__key__')} in {url}: {skip.message}"

    def _batch(self, items: list[dict], counts: _SkipCounts) -> dict:
        batch = {**self.kind.collate(items), "skipped": dict(counts.batch)}
        counts.batch.clear()  # the next batch reports what was dropped after this one
        return batch


class _CallersRNG:
    """The caller's CPU RNG state, set aside while a stream in the caller's process reseeds the generator for each
    sample: saved and restored once a batch rather than once a sample (torch.random.fork_rng costs ~10 us)."""

    def __init__(self, active: bool):
        self.active, self.saved = active, None

    def set_aside(self) -> None:
        if self.active:
            self.saved = torch.get_rng_state()

    def give_back(self) -> None:
        if self.saved is not None:
            torch.set_rng_state(self.saved)
            self.saved = None

    def around_batches(self, batches: Iterator[dict]) -> Iterator[dict]:
        for batch in batches:
            self.give_back()
            yield batch
            self.set_aside()


class _SkipCounts:
    """A slot's skipped samples: those since the last batch (reported in the next one) and, through the guard,
    all of them (raising DataError when too many are bad); and the shards it could not read to their end."""

    def __init__(self, guard: SkipGuard):
        self.guard, self.batch = guard, Counter()
        self.unreadable: dict[str, str] = {}  # shard -> what is wrong with it
        self.read_ahead = 0  # samples counted as kept before they were prepared (see damaged_shard)

    def skip(self, reason: str, count: int = 1, example: str | Callable[[], str] | None = None) -> None:
        """`example`: one such skip for the guard's message (a callable: made only for a reason's first skip)."""
        if self.read_ahead and reason != "bad_tar":  # a sample counted as kept ahead turned out bad
            self.read_ahead -= 1
            self.guard.kept -= 1
        if example is not None and reason not in self.guard.examples:
            self.guard.explain(reason, example() if callable(example) else example)
        self.batch[reason] += count
        self.guard.update(0, {reason: count})

    def damaged_shard(self, read: int, lost: int, example: str) -> None:
        """A shard that ended early: `lost` samples count as "bad_tar", judged beside the `read` ones before the
        damage, which count as kept now: they still wait in the shuffle buffer, and a guard that saw the loss
        alone would take one damaged shard for data that is all bad."""
        self.guard.kept += read
        self.read_ahead += read
        self.skip("bad_tar", lost, example)

    def keep(self) -> None:
        if self.read_ahead:
            self.read_ahead -= 1  # counted when its shard was found damaged
        else:
            self.guard.kept += 1

    def reset(self) -> None:
        self.batch.clear()
        self.guard.reset()
        self.read_ahead = 0


class ShardLoader(DataLoader):
    """A DataLoader whose iterator stops its worker processes as soon as iteration stops early: an error from a
    worker (before it reaches the caller), or `close()` on the iterator (the caller's error: see
    pretrain.engine). torch's own iterator stops them only once garbage-collected, and the traceback of an error
    keeps it alive through the frames that hold it: the workers, still waiting for work, then block the process's
    exit (multiprocessing joins its children; a worker that outlives a first SIGTERM never leaves)."""

    def __iter__(self) -> Iterator:
        # torch's iterator (and its workers) only once the first batch is asked for: an iterator made and dropped
        # unused (tqdm.auto makes one) then starts no worker that nobody stops
        batches = super().__iter__()
        try:
            yield from batches
        except BaseException:
            stop_workers = getattr(batches, "_shutdown_workers", None)  # torch has no public way
            if stop_workers is not None:
                stop_workers()
            raise


def make_loader(stream: ShardStream, num_workers: int, **loader_kwargs) -> ShardLoader:
    """A DataLoader that passes the stream's ready-made batches through (batch_size=None). Its workers' base seed
    comes from a generator of its own, seeded by the stream: torch's global RNG, which the training loop reseeds
    every step, is left alone, whenever the loader starts."""
    loader_kwargs.setdefault("generator", torch.Generator().manual_seed(stream.seed))
    loader_kwargs.setdefault("persistent_workers", False)
    if num_workers > 0:
        loader_kwargs.setdefault("prefetch_factor", 2)
    return ShardLoader(stream, batch_size=None, num_workers=num_workers, **loader_kwargs)
