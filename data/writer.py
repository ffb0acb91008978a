"""Write labelled images into WebDataset tar shards, checking every image on the way in.

Layout of a shard directory:

    out_dir/train-000000.tar, train-000001.tar, ...   samples {"__key__", "<ext>": image bytes, "cls": b"<label>"}
    out_dir/stats.json                                written last: its presence means the directory is complete

A shard is written to a temporary name and renamed when it is closed, so an interrupted run never leaves a
partial shard under a final name.
"""

from __future__ import annotations

import io
import json
import os
import random
import sys
import warnings
from collections import Counter
from pathlib import Path
from typing import Iterable

import webdataset
from PIL import Image
from tqdm import tqdm

from .errors import DataError
from .sources import IMAGE_EXTENSIONS, LabelledImage

STATS_FILE = "stats.json"
MAX_SKIPPED_EXAMPLES = 20  # kept in stats.json
MAX_SKIPPED_PRINTED = 5  # printed to stderr while writing

# PIL format name -> extension, used when a file's own extension is not an image extension we know.
_EXT_FOR_PIL_FORMAT = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp", "PPM": "ppm", "BMP": "bmp", "GIF": "gif",
                       "TIFF": "tif"}


class ShardWriter:
    """Write samples to `{prefix}-{index:06d}.tar` in `out_dir`, starting a new shard every `max_samples`
    samples or before a shard would exceed `max_bytes` (payload bytes; optional).

    Use as a context manager: a clean exit finishes the last shard, an exception deletes the unfinished one.
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


def _check_image(sample: LabelledImage) -> tuple[str | None, str, str]:
    """Decode the image fully; returns (skip reason or None, message, extension to store)."""
    if sample.image_bytes is None:
        return "unreadable_file", sample.error or "cannot read file", sample.ext
    try:
        with Image.open(io.BytesIO(sample.image_bytes)) as image:
            image.load()  # verify() misses truncated pixel data; a full decode does not
            pil_format = image.format
    except Exception as error:  # PIL raises many types for bad data
        return "undecodable_image", f"{type(error).__name__}: {error}", sample.ext
    ext = sample.ext.lower()
    if ext not in IMAGE_EXTENSIONS:  # e.g. a manifest entry "img.dat" that is really a PNG
        ext = _EXT_FOR_PIL_FORMAT.get(pil_format)
        if ext is None:
            return "unsupported_format", f"image format {pil_format} has no supported extension", sample.ext
    return None, "", ext


class _ShardSink:
    """Validates samples, feeds one ShardWriter and keeps the statistics for stats.json."""

    def __init__(self, out_dir, class_names, prefix, shard_size, max_bytes, strict):
        self.out_dir, self.class_names, self.prefix, self.strict = Path(out_dir), list(class_names), prefix, strict
        self._remove_previous_stats()
        self.writer = ShardWriter(self.out_dir, prefix, shard_size, max_bytes)
        self.class_counts = Counter()
        self.skipped = Counter()
        self.skipped_examples: list[dict] = []

    def _remove_previous_stats(self) -> None:
        # stats.json marks a complete directory; drop an old one before rewriting the shards under it.
        (self.out_dir / STATS_FILE).unlink(missing_ok=True)

    def add(self, sample: LabelledImage) -> None:
        if not 0 <= sample.label < len(self.class_names):
            reason, message, ext = "bad_label", f"label {sample.label} outside 0..{len(self.class_names) - 1}", sample.ext
        else:
            reason, message, ext = _check_image(sample)
        if reason is not None:
            if self.strict:
                raise DataError(f"{sample.source}: {reason.replace('_', ' ')} ({message})")
            self.skipped[reason] += 1
            if len(self.skipped_examples) < MAX_SKIPPED_EXAMPLES:
                self.skipped_examples.append({"source": sample.source, "reason": reason, "message": message})
            if sum(self.skipped.values()) <= MAX_SKIPPED_PRINTED:
                print(f"skipping {sample.source}: {reason} ({message})", file=sys.stderr)
            return
        self.writer.write({"__key__": sample.key, ext: sample.image_bytes, "cls": str(sample.label).encode()})
        self.class_counts[self.class_names[sample.label]] += 1

    def finish(self, metadata: dict | None = None) -> dict:
        self.writer.close()
        self._remove_stale_shards()
        stats = {
            "samples": sum(self.writer.shard_counts.values()),
            "shards": self.writer.shards,
            "shard_counts": self.writer.shard_counts,
            "bytes": sum((self.out_dir / name).stat().st_size for name in self.writer.shards),
            "classes": self.class_names,
            "class_counts": {name: self.class_counts[name] for name in self.class_names},
            "skipped": dict(self.skipped),
            "skipped_examples": self.skipped_examples,
            **(metadata or {}),
        }
        if stats["samples"] == 0:
            warnings.warn(f"{self.out_dir}: no valid samples were written (skipped: {dict(self.skipped)})")
        temp = self.out_dir / f".{STATS_FILE}.tmp-{os.getpid()}"
        temp.write_text(json.dumps(stats, indent=2) + "\n")
        os.replace(temp, self.out_dir / STATS_FILE)
        return stats

    def _remove_stale_shards(self) -> None:
        # Shards of an earlier, larger run would otherwise be picked up by directory expansion.
        written = set(self.writer.shards)
        for path in self.out_dir.glob(f"{self.prefix}-[0-9][0-9][0-9][0-9][0-9][0-9].tar"):
            if path.name not in written:
                path.unlink()

    def abort(self) -> None:
        self.writer.abort()


def _progress(samples, total, progress: bool, description: str):
    return tqdm(samples, total=total, disable=not progress, desc=description, unit="img", file=sys.stderr)


def write_labelled_shards(
    samples: Iterable[LabelledImage],
    out_dir,
    class_names,
    *,
    prefix: str = "train",
    shard_size: int = 1000,
    max_bytes: int | None = None,
    strict: bool = False,
    progress: bool = True,
    metadata: dict | None = None,
) -> dict:
    """Check and write every sample into `out_dir/{prefix}-NNNNNN.tar`; returns (and saves) the stats.json dict.

    Undecodable or unreadable images are skipped and counted by reason; with strict=True the first one raises
    DataError naming its source. `metadata` entries are added to stats.json.
    """
    sink = _ShardSink(out_dir, class_names, prefix, shard_size, max_bytes, strict)
    try:
        for sample in _progress(samples, getattr(samples, "__len__", lambda: None)(), progress, f"writing {out_dir}"):
            sink.add(sample)
    except BaseException:
        sink.abort()
        raise
    return sink.finish(metadata)


def write_split(
    samples: Iterable[LabelledImage],
    out_dir,
    class_names,
    val_fraction: float,
    seed: int = 0,
    *,
    shard_size: int = 1000,
    max_bytes: int | None = None,
    strict: bool = False,
    progress: bool = True,
    metadata: dict | None = None,
) -> tuple[dict, dict]:
    """Write a random `val_fraction` of the samples to `out_dir/val/` (prefix "val") and the rest to
    `out_dir/train/` (prefix "train"); the split depends only on the sample count and `seed`.

    Returns (train stats, val stats).
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if not hasattr(samples, "__len__"):
        samples = list(samples)  # an exact split needs the count up front
    total = len(samples)
    num_val = round(total * val_fraction)
    val_indices = set(random.Random(seed).sample(range(total), num_val))
    out_dir = Path(out_dir)
    train = _ShardSink(out_dir / "train", class_names, "train", shard_size, max_bytes, strict)
    val = _ShardSink(out_dir / "val", class_names, "val", shard_size, max_bytes, strict)
    try:
        for index, sample in enumerate(_progress(samples, total, progress, f"writing {out_dir}")):
            (val if index in val_indices else train).add(sample)
    except BaseException:
        train.abort()
        val.abort()
        raise
    return train.finish(metadata), val.finish(metadata)
