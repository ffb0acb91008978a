"""Write samples into WebDataset tar shards, checking every image on the way in.

Layout of a shard directory:

    out_dir/train-000000.tar, train-000001.tar, ...   the samples, e.g. {"__key__", "<ext>": image bytes, "cls": b"3"}
    out_dir/sizes.json                                {"train-000000.tar": number of samples, ...} (WebDataset style)
    out_dir/shards.txt                                the shard names, one a line (a spec `expand_shards` reads)
    out_dir/stats.json                                the counts, skipped samples and the kind's statistics
    out_dir/INCOMPLETE                                present while a writer works on the directory, removed last

A shard is written to a temporary name and renamed when it is closed, so an interrupted run never leaves a
partial shard under a final name. A run that stops early (killed, or an exception such as a --strict failure or
Ctrl-C) leaves its finished shards and the INCOMPLETE marker, so that readers can tell the directory was never
completed; only a run that finished no shard at all removes its marker on the way out.

A writer refuses an output directory that already holds files unless `ShardOptions(overwrite=True)`; even then
it deletes only the names it writes itself (shards with its prefix, the index files, the marker, their temporary
files) and keeps every other file.

Every kind of data (labelled images here, image-text pairs in `pairs.py`, detection in `detection.py`) goes
through one engine, `write_shards`: a `prepare` function turns a source item into a `Prepared` sample (decoding
and re-encoding its image, possibly in a thread pool), and a `Tally` keeps that kind's statistics for stats.json.
Every writer takes one `ShardOptions` and returns a `WrittenShards` per directory it completed.
"""

from __future__ import annotations

import json
import os
import random
import re
import shlex
import sys
import warnings
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Iterator

import webdataset
from tqdm import tqdm

from .errors import DataError
from .images import ImageOptions, SampleSkipped, decode_checked, encode_for_shard, pixel_moments
from .sources import LabelledImage

STATS_FILE = "stats.json"
SIZES_FILE = "sizes.json"
SHARD_LIST_FILE = "shards.txt"
# present while a writer works on a directory, removed last: a directory holding it was never finished
INCOMPLETE_FILE = "INCOMPLETE"
_INDEX_FILES = (STATS_FILE, SIZES_FILE, SHARD_LIST_FILE, INCOMPLETE_FILE)
MAX_SKIPPED_EXAMPLES = 20  # kept in stats.json
MAX_SKIPPED_PRINTED = 5  # printed to stderr while writing
IN_FLIGHT_PER_WORKER = 4  # items handed to the pool ahead of the writer: bounds memory, keeps workers busy


class ShardWriter:
    """Write samples to `{prefix}-{index:06d}.tar` in `out_dir`, starting a new shard every `max_samples`
    samples or before a shard would exceed `max_bytes` (payload bytes; optional).

    Sample values must be bytes (encode JSON and text before writing). Use as a context manager: a clean exit
    finishes the last shard, an exception deletes the unfinished one.
    """

    def __init__(self, out_dir, prefix: str = "train", max_samples: int = 1000, max_bytes: int | None = None):
        if max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {max_samples}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix, self.max_samples, self.max_bytes = prefix, max_samples, max_bytes
        self.shards: list[str] = []  # finished shard file names, in order
        self.shard_counts: dict[str, int] = {}
        self._tar: webdataset.TarWriter | None = None
        self._file = None
        self._temp_path: Path | None = None
        self._count = self._bytes = 0

    def _shard_name(self, index: int) -> str:
        return f"{self.prefix}-{index:06d}.tar"

    def _open_next(self) -> None:
        name = self._shard_name(len(self.shards))
        self._temp_path = self.out_dir / f".{name}.tmp-{os.getpid()}"
        self._file = open(self._temp_path, "wb")
        self._tar = webdataset.TarWriter(self._file, mtime=0)  # fixed mtime: same input, same bytes
        self._count = self._bytes = 0

    def _finish_current(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        name = self._shard_name(len(self.shards))
        os.replace(self._temp_path, self.out_dir / name)
        self.shards.append(name)
        self.shard_counts[name] = self._count
        self._tar = self._file = self._temp_path = None

    def write(self, sample: dict) -> None:
        size = sum(len(v) for k, v in sample.items() if not k.startswith("__"))
        if self._tar is not None and (
            self._count >= self.max_samples
            or (self.max_bytes is not None and self._bytes + size > self.max_bytes)
        ):
            self._finish_current()
        if self._tar is None:
            self._open_next()
        self._tar.write(sample)
        self._count += 1
        self._bytes += size

    def close(self) -> None:
        self._finish_current()

    def abort(self) -> None:
        """Drop the unfinished shard (finished shards stay)."""
        if self._tar is not None:
            self._tar.close()  # else the tar stream's finaliser writes into a closed file
            self._file.close()
            self._temp_path.unlink(missing_ok=True)
            self._tar = self._file = self._temp_path = None

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


# ------------------------------------------------------------------------------------------------ the engine


@dataclass(frozen=True)
class ShardOptions:
    """How every writer writes, whatever the kind of data.

    shard_size: samples per shard. max_bytes: optional limit on a shard's payload bytes.
    strict: the first sample that would be skipped (or lose a part) raises DataError naming its source.
    progress: a progress bar on stderr. workers: threads preparing images (0: the calling thread); same output.
    image_options: keep the original bytes (the default) or re-encode (see ImageOptions).
    overwrite: write into a directory that already holds files, deleting what an earlier writer run left there (its
    shards, index files and marker; other files stay); False: such a directory is a DataError.
    """

    shard_size: int = 1000
    max_bytes: int | None = None
    strict: bool = False
    progress: bool = True
    workers: int = 0
    image_options: ImageOptions = ImageOptions()
    overwrite: bool = False

    def __post_init__(self):
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {self.shard_size}")
        if self.max_bytes is not None and self.max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {self.max_bytes}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")


@dataclass(frozen=True)
class WrittenShards:
    """One shard directory a writer completed, and the stats.json it wrote there."""

    directory: Path
    stats: dict


@dataclass
class Prepared:
    """One source item made ready for a shard, or the reason it is left out.

    sample: the tar members ({"__key__", "<ext>": bytes, ...}), None when skipped.
    skipped: (reason, message) when the whole item is left out.
    dropped: (reason, message) for each part left out of a written sample (e.g. a detection box).
    info: facts about the sample for its kind's Tally (label, caption, ...).
    pixels: the image's per-channel (mean, mean square), `pixel_moments`, for the shards' normalisation statistics.
    """

    source: str
    sample: dict | None = None
    skipped: tuple[str, str] | None = None
    dropped: list[tuple[str, str]] = field(default_factory=list)
    info: dict = field(default_factory=dict)
    pixels: tuple[list[float], list[float]] | None = None


class PixelTally:
    """The normalisation statistics of the written images: per-channel mean and standard deviation over all of
    them (each image weighted once), what `data.mean` / `data.std` should be for these shards."""

    def __init__(self):
        self.images, self.sums, self.square_sums = 0, [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]

    def add(self, pixels: tuple[list[float], list[float]]) -> None:
        mean, mean_square = pixels
        self.images += 1
        self.sums = [total + value for total, value in zip(self.sums, mean)]
        self.square_sums = [total + value for total, value in zip(self.square_sums, mean_square)]

    def summary(self) -> dict:
        if not self.images:
            return {}
        mean = [total / self.images for total in self.sums]
        std = [max(square / self.images - m * m, 0.0) ** 0.5 for square, m in zip(self.square_sums, mean)]
        return {"pixel_mean": [round(value, 4) for value in mean], "pixel_std": [round(value, 4) for value in std]}


class Tally:
    """Statistics of one kind of data for stats.json; this base keeps none."""

    def add(self, prepared: Prepared) -> None:
        pass

    def summary(self) -> dict:
        return {}


def _prepare_safely(prepare: Callable[..., Prepared], item) -> Prepared:
    try:
        return prepare(item)
    except SampleSkipped as skip:
        return Prepared(item.source, skipped=(skip.reason, skip.message))


def _prepared_in_order(items: Iterable, prepare: Callable[..., Prepared], workers: int) -> Iterator[Prepared]:
    """prepare(item) for every item, in input order; with workers > 0 in a thread pool (PIL releases the GIL
    while decoding, resizing and encoding), never more than IN_FLIGHT_PER_WORKER * workers items ahead."""
    if workers <= 0:
        for item in items:
            yield _prepare_safely(prepare, item)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="shard-prepare") as pool:
        pending: deque = deque()
        try:
            for item in items:
                pending.append(pool.submit(_prepare_safely, prepare, item))
                if len(pending) >= IN_FLIGHT_PER_WORKER * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:  # the writer failed or stopped: do not finish work nobody will write
            for future in pending:
                future.cancel()


class _ShardSink:
    """Feeds one ShardWriter with prepared samples, counts what was skipped and writes the index files."""

    def __init__(self, out_dir, prefix: str, options: ShardOptions, tally: Tally):
        self.out_dir, self.strict, self.tally = Path(out_dir), options.strict, tally
        _make_directory(self.out_dir)
        (self.out_dir / INCOMPLETE_FILE).write_text(_marker_text())  # before the first shard, removed last
        self.writer = ShardWriter(self.out_dir, prefix, options.shard_size, options.max_bytes)
        self.pixels = PixelTally()
        self.skipped, self.dropped = Counter(), Counter()
        self.skipped_examples: list[dict] = []
        self.dropped_examples: list[dict] = []

    def _count(self, source: str, reason: str, message: str, counter: Counter, examples: list, verb: str) -> None:
        if self.strict:
            raise DataError(f"{source}: {reason.replace('_', ' ')} ({message})")
        counter[reason] += 1
        if len(examples) < MAX_SKIPPED_EXAMPLES:
            examples.append({"source": source, "reason": reason, "message": message})
        if sum(self.skipped.values()) + sum(self.dropped.values()) <= MAX_SKIPPED_PRINTED:
            print(f"{verb} {source}: {reason} ({message})", file=sys.stderr)

    def add(self, prepared: Prepared) -> None:
        if prepared.skipped is not None:
            self._count(prepared.source, *prepared.skipped, self.skipped, self.skipped_examples, "skipping")
            return
        for reason, message in prepared.dropped:
            self._count(prepared.source, reason, message, self.dropped, self.dropped_examples, "dropping from")
        self.writer.write(prepared.sample)
        self.tally.add(prepared)
        if prepared.pixels is not None:
            self.pixels.add(prepared.pixels)

    def _write_atomically(self, name: str, text: str) -> None:
        temp = self.out_dir / f".{name}.tmp-{os.getpid()}"
        temp.write_text(text)
        os.replace(temp, self.out_dir / name)

    def finish(self, metadata: dict | None = None) -> WrittenShards:
        self.writer.close()
        stats = {
            "samples": sum(self.writer.shard_counts.values()),
            "shards": self.writer.shards,
            "shard_counts": self.writer.shard_counts,
            "bytes": sum((self.out_dir / name).stat().st_size for name in self.writer.shards),
            **self.tally.summary(),
            **self.pixels.summary(),
            "skipped": dict(self.skipped),
            "skipped_examples": self.skipped_examples,
            "dropped": dict(self.dropped),
            "dropped_examples": self.dropped_examples,
            **(metadata or {}),
        }
        if stats["samples"] == 0:
            warnings.warn(f"{self.out_dir}: no valid samples were written (skipped: {dict(self.skipped)})")
        self._write_atomically(SIZES_FILE, json.dumps(self.writer.shard_counts, indent=2) + "\n")
        self._write_atomically(SHARD_LIST_FILE, "".join(f"{name}\n" for name in self.writer.shards))
        self._write_atomically(STATS_FILE, json.dumps(stats, indent=2) + "\n")
        (self.out_dir / INCOMPLETE_FILE).unlink()  # last: the directory is complete
        return WrittenShards(self.out_dir, stats)

    def abort(self) -> None:
        """Stop after a failure: finished shards and the marker stay, unless this run finished no shard here."""
        self.writer.abort()
        if not self.writer.shards:
            (self.out_dir / INCOMPLETE_FILE).unlink(missing_ok=True)


def _marker_text() -> str:
    argv = list(sys.argv) or ["python"]
    if Path(argv[0]).name == "__main__.py":  # python -m data ...
        argv[:1] = ["python", "-m", Path(argv[0]).parent.name]
    return (f"process {os.getpid()} ({shlex.join(argv)}) is writing here; this directory is incomplete until "
            f"this file disappears\n")


def _make_directory(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DataError(f"{directory}: cannot create the output directory ({error.strerror or error})") from None


def _written_by_a_writer(name: str, prefix: str) -> bool:
    """Whether `name` is one a writer with this shard prefix gives a file: a shard, an index file, the marker, or
    the temporary name of one of them (left by a killed run)."""
    final = "|".join([rf"{re.escape(prefix)}-\d{{6}}\.tar", *map(re.escape, _INDEX_FILES)])
    return re.fullmatch(rf"(?:{final})|\.(?:{final})\.tmp-\d+", name) is not None


def _claim_output(out_dir: Path, prefix: str, overwrite: bool) -> None:
    """Make sure out_dir can take the new shards: it must be new or empty, or with `overwrite` lose what an earlier
    writer run left in it (unsplit: prefix-NNNNNN.tar; with a val split: train/ and val/), and nothing else."""
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"{out_dir}: exists and is not a directory; --out must name a directory")
    try:
        existing = sorted(path.name for path in out_dir.iterdir()) if out_dir.exists() else []
        if existing and not overwrite:
            listed = ", ".join(existing[:3]) + (", ..." if len(existing) > 3 else "")
            raise DataError(f"{out_dir} already holds {len(existing)} file(s) ({listed}); pass --overwrite "
                            f"(ShardOptions(overwrite=True)) to replace the shards written there before, or choose "
                            f"another output directory")
        for directory, name_prefix in ((out_dir, prefix), (out_dir / "train", "train"), (out_dir / "val", "val")):
            if directory.is_dir():
                for path in directory.iterdir():
                    if path.is_file() and _written_by_a_writer(path.name, name_prefix):
                        path.unlink()
    except OSError as error:
        raise DataError(f"{out_dir}: cannot clear the output directory ({error.strerror or error})") from None


def _note_foreign_shards(directory: Path) -> None:
    # Directory expansion (expand_shards) reads every *.tar: say so when files we did not write are among them.
    foreign = sorted(path.name for path in directory.glob("*.tar"))
    if foreign:
        print(f"note: {directory} also holds {len(foreign)} .tar file(s) this writer did not write "
              f"({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); they are kept, and read with the "
              f"directory unless you read {directory / SHARD_LIST_FILE}", file=sys.stderr)


def split_val_indices(total: int, val_fraction: float, seed: int) -> set[int]:
    """The positions of the items `write_shards` puts in val/ out of `total` (a random `val_fraction`, depending
    only on `total`, `val_fraction` and `seed`): for code that must use the same split without the shards."""
    return set(random.Random(seed).sample(range(total), round(total * val_fraction)))


def write_shards(
    items: Iterable,
    prepare: Callable[..., Prepared],
    out_dir,
    *,
    new_tally: Callable[[], Tally] = Tally,
    val_fraction: float = 0.0,
    seed: int = 0,
    prefix: str = "train",
    options: ShardOptions = ShardOptions(),
    metadata: dict | None = None,
) -> list[WrittenShards]:
    """Prepare every item (each has a `.source` string) with `prepare(item, image_options=...)` and write the
    samples; `metadata` entries are added to each stats.json.

    val_fraction 0: everything goes to `out_dir/{prefix}-NNNNNN.tar`; returns [that directory].
    val_fraction in (0, 1): a random `val_fraction` of the items (depending only on their count and `seed`) goes
    to `out_dir/val/val-NNNNNN.tar`, the rest to `out_dir/train/train-NNNNNN.tar`; returns [train, val]. A split
    that leaves train or val without items is a DataError.
    out_dir must be new or empty unless options.overwrite (see the module docstring). Items that `prepare` rejects
    (SampleSkipped) are counted by reason; with options.strict the first one raises DataError naming its source.
    A failure to write (disk full, no permission) is a DataError naming out_dir.
    """
    total = getattr(items, "__len__", lambda: None)()
    out_dir = Path(out_dir)
    val_indices: set[int] = set()
    if val_fraction == 0:
        splits = [(out_dir, prefix)]
    elif 0.0 < val_fraction < 1.0:
        if total is None:
            items = list(items)  # an exact split needs the count up front
            total = len(items)
        val_count = round(total * val_fraction)
        if not 0 < val_count < total:
            raise DataError(f"{out_dir}: a val_fraction of {val_fraction} of {total} items leaves "
                            f"{'val' if val_count == 0 else 'train'} empty")
        val_indices = split_val_indices(total, val_fraction, seed)
        splits = [(out_dir / split, split) for split in ("train", "val")]
    else:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    _claim_output(out_dir, prefix, options.overwrite)
    prepared = _prepared_in_order(items, partial(prepare, image_options=options.image_options), options.workers)
    sinks: list[_ShardSink] = []
    try:
        for directory, split_prefix in splits:
            sinks.append(_ShardSink(directory, split_prefix, options, new_tally()))
            _note_foreign_shards(directory)
        with tqdm(total=total, disable=not options.progress, desc=f"writing {out_dir}", unit="img",
                  file=sys.stderr) as bar:
            for index, sample in enumerate(prepared):
                sinks[index in val_indices].add(sample)  # sinks[1] is val; with no split the set is empty
                bar.update()
        return [sink.finish(metadata) for sink in sinks]
    except BaseException as failure:
        prepared.close()  # stop the pool before deleting what it was feeding
        for sink in sinks:
            sink.abort()
        if isinstance(failure, OSError):
            raise DataError(f"{out_dir}: cannot write the shards ({failure})") from failure
        raise


# ------------------------------------------------------------------------------------------------ labelled images


def _prepare_labelled(sample: LabelledImage, num_classes: int, image_options: ImageOptions) -> Prepared:
    if not 0 <= sample.label < num_classes:
        raise SampleSkipped("bad_label", f"label {sample.label} outside 0..{num_classes - 1}")
    image, ext = decode_checked(sample.image_bytes, sample.ext, sample.error)
    image_bytes, ext, _ = encode_for_shard(image, sample.image_bytes, ext, image_options)
    return Prepared(sample.source, {"__key__": sample.key, ext: image_bytes, "cls": str(sample.label).encode()},
                    info={"label": sample.label}, pixels=pixel_moments(image))


class _ClassTally(Tally):
    def __init__(self, class_names):
        self.class_names, self.counts = list(class_names), Counter()

    def add(self, prepared: Prepared) -> None:
        self.counts[prepared.info["label"]] += 1

    def summary(self) -> dict:
        return {"classes": self.class_names,
                "class_counts": {name: self.counts[label] for label, name in enumerate(self.class_names)}}


def write_labelled_shards(
    samples: Iterable[LabelledImage],
    out_dir,
    class_names,
    *,
    val_fraction: float = 0.0,
    seed: int = 0,
    prefix: str = "train",
    options: ShardOptions = ShardOptions(),
    metadata: dict | None = None,
) -> list[WrittenShards]:
    """Check and write every sample: [out_dir] (shards `{prefix}-NNNNNN.tar`), or [train, val] with a val split
    (`out_dir/train/`, `out_dir/val/`; see `write_shards`).

    Undecodable or unreadable images and labels outside the classes are skipped and counted by reason; with
    options.strict the first one raises DataError naming its source.
    """
    prepare = partial(_prepare_labelled, num_classes=len(class_names))
    return write_shards(samples, prepare, out_dir, new_tally=partial(_ClassTally, class_names),
                        val_fraction=val_fraction, seed=seed, prefix=prefix, options=options, metadata=metadata)
