"""Image-text pairs as WebDataset shards: read them from a manifest or an img2dataset-style folder, write them,
and decode a stored sample back.

A stored sample is {"__key__", "<ext>": image bytes, "txt": caption (UTF-8)}; stats.json adds caption length
statistics (characters and words) to the usual counts. Pairs without a caption are skipped and counted.

    pairs = read_pair_manifest("captions.csv")        # columns path,caption (or image,text)
    write_pair_shards(pairs, "shards/", options=ShardOptions(workers=4))
    image, caption = decode_pair(raw_sample)
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from PIL import Image

from .errors import DataError
from .images import ImageOptions, SampleSkipped, decode_checked, decode_image, encode_for_shard, pixel_moments
from .sources import (
    IMAGE_EXTENSIONS,
    SizedIterable,
    _image_ext,
    _key_for,
    manifest_records,
    read_image_file,
    resolve_relative,
)
from .writer import Prepared, ShardOptions, Tally, WrittenShards, write_shards

PAIR_COLUMNS = {"path": ("path", "image"), "caption": ("caption", "text")}


@dataclass(frozen=True)
class ImageTextPair:
    """One image file and its caption; the file is read when the pair is written (in a worker).

    key: unique within the data set, without dots. caption: None when there is none (the pair is then skipped).
    source: where the pair came from, for error messages.
    problem: (reason, message) when the pair is known to be unusable before it is read; it is skipped and counted.
    """

    key: str
    image_path: Path
    caption: str | None
    source: str
    problem: tuple[str, str] | None = None
    image_bytes: bytes | None = None  # the encoded image itself (then image_path only names its format)


def read_pair_manifest(path) -> SizedIterable:
    """Pairs from a CSV, TSV or JSONL manifest with columns path,caption (or image,text).

    Relative image paths resolve against the manifest's folder. A missing column is a DataError naming the file
    and line; an empty caption in a row is kept here and skipped (counted) by the writer.
    """
    path = Path(path)
    rows = manifest_records(path, PAIR_COLUMNS, may_be_empty=("caption",))
    for line_number, record in rows:
        if record["caption"] is not None and not isinstance(record["caption"], str):
            raise DataError(f"{path}:{line_number}: caption must be a string, got {record['caption']!r}")

    def iterate() -> Iterator[ImageTextPair]:
        for index, (line_number, record) in enumerate(rows):
            image_path = resolve_relative(path, record["path"])
            yield ImageTextPair(_key_for(index, record["path"]), image_path, record["caption"],
                                f"{image_path} ({path}:{line_number})")

    return SizedIterable(len(rows), iterate)


def read_pair_folder(root) -> SizedIterable:
    """Pairs from an img2dataset-style folder: `0000.jpg` + `0000.txt` side by side, possibly in sub-folders.

    Every image file is a pair; one without a caption file is kept here and skipped (counted) by the writer.
    Other files (img2dataset's .json, a .txt without an image) are ignored.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: pair folder does not exist or is not a directory")
    images = [p for p in sorted(root.rglob("*")) if p.is_file() and _image_ext(p)]
    if not images:
        raise DataError(f"{root}: no image files ({', '.join(IMAGE_EXTENSIONS)}) found")

    def iterate() -> Iterator[ImageTextPair]:
        for index, image_path in enumerate(images):
            caption_path = image_path.with_suffix(".txt")
            caption, problem = None, None
            try:
                caption = caption_path.read_text(encoding="utf-8")
            except FileNotFoundError:
                problem = ("missing_caption", f"no caption file {caption_path.name}")
            except (OSError, UnicodeDecodeError) as failure:
                problem = ("missing_caption",
                           f"cannot read {caption_path.name} ({getattr(failure, 'strerror', None) or failure})")
            yield ImageTextPair(_key_for(index, image_path.relative_to(root).as_posix()), image_path, caption,
                                str(image_path), problem=problem)

    return SizedIterable(len(images), iterate)


def _prepare_pair(pair: ImageTextPair, image_options: ImageOptions) -> Prepared:
    if pair.problem is not None:
        raise SampleSkipped(*pair.problem)
    caption = (pair.caption or "").strip()
    if not caption:
        raise SampleSkipped("missing_caption", "empty caption")
    image_bytes, error = pair.image_bytes, ""
    if image_bytes is None:
        image_bytes, error = read_image_file(pair.image_path)
    image, ext = decode_checked(image_bytes, pair.image_path.suffix.lstrip("."), error)
    image_bytes, ext, _ = encode_for_shard(image, image_bytes, ext, image_options)
    return Prepared(pair.source, {"__key__": pair.key, ext: image_bytes, "txt": caption.encode("utf-8")},
                    info={"caption": caption}, pixels=pixel_moments(image))


def _length_stats(values: list[int]) -> dict:
    if not values:
        return {"min": 0, "mean": 0.0, "max": 0}
    return {"min": min(values), "mean": round(statistics.fmean(values), 3), "max": max(values)}


class _CaptionTally(Tally):
    def __init__(self):
        self.chars: list[int] = []
        self.words: list[int] = []

    def add(self, prepared: Prepared) -> None:
        self.chars.append(len(prepared.info["caption"]))
        self.words.append(len(prepared.info["caption"].split()))

    def summary(self) -> dict:
        return {"caption_chars": _length_stats(self.chars), "caption_words": _length_stats(self.words)}


def write_pair_shards(
    pairs: Iterable[ImageTextPair],
    out_dir,
    *,
    val_fraction: float = 0.0,
    seed: int = 0,
    options: ShardOptions = ShardOptions(),
    metadata: dict | None = None,
) -> list[WrittenShards]:
    """Check and write every pair: [out_dir], or [train, val] with a val split (`out_dir/train/`,
    `out_dir/val/`; see `write_shards`). Missing captions and unreadable images are skipped and counted by reason
    (options.strict: the first one raises DataError naming its source)."""
    return write_shards(pairs, _prepare_pair, out_dir, new_tally=_CaptionTally, val_fraction=val_fraction, seed=seed,
                        options=options, metadata={"kind": "image-text", **(metadata or {})})


# ------------------------------------------------------------------------------------------------ reading back


def decode_pair(sample: dict) -> tuple[Image.Image, str]:
    """A raw image-text sample (as read by plain `webdataset.WebDataset`) -> (RGB PIL image, caption)."""
    if "txt" not in sample:
        raise DataError(f"sample {sample.get('__key__')!r} in {sample.get('__url__', '?')} has no txt field")
    return decode_image(sample), sample["txt"].decode("utf-8")
