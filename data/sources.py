"""Sources of labelled images: IDX files, one-folder-per-class trees and CSV/JSONL manifests.

Every reader returns a `LabelledSource(class_names, samples)`: the ordered class names (label id = position)
and a lazy, sized iterable of `LabelledImage`. Images are read only while iterating, so a reader can describe
a data set larger than memory. A file that cannot be read does not stop the iteration: it comes out as a
`LabelledImage` with `image_bytes=None` and `error` set, and the shard writer decides whether to skip it.

    classes, samples = read_image_folder("photos/")
    write_labelled_shards(samples, "shards/", classes)
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Sequence

import numpy as np
from PIL import Image

from .errors import DataError

# Extensions we accept from folders/manifests; all of them are decoded by PIL and by webdataset's "pil" decoder.
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "ppm", "pgm", "bmp", "gif", "tif", "tiff")

IDX_IMAGES_MAGIC = 2051  # uint8 tensor with 3 dimensions: count, rows, cols
IDX_LABELS_MAGIC = 2049  # uint8 tensor with 1 dimension: count


@dataclass(frozen=True)
class LabelledImage:
    """One encoded image and its integer label.

    key: unique within the data set, without dots (webdataset splits file names at the first dot).
    image_bytes: the encoded file (PNG, JPEG, ...), or None when the file could not be read (see `error`).
    ext: the image format as a lower-case extension, e.g. "png"; it becomes the sample's field name.
    label: index into the source's class names.
    source: where the image came from (a path, or "file.idx[index]"), for error messages.
    """

    key: str
    image_bytes: bytes | None
    ext: str
    label: int
    source: str
    error: str = ""


_MISSING = object()


class SizedIterable:
    """An iterable that knows its length (for progress bars and exact splits) but builds items lazily."""

    def __init__(self, length: int, make_iterator: Callable[[], Iterator]):
        self._length = length
        self._make_iterator = make_iterator

    def __len__(self) -> int:
        return self._length

    def __iter__(self) -> Iterator:
        return self._make_iterator()


class LabelledSource(NamedTuple):
    class_names: list[str]
    samples: SizedIterable


# ---------------------------------------------------------------------------------------------- IDX (MNIST)


def _read_maybe_gzipped(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise DataError(f"{path}: cannot read IDX file ({error.strerror or error})") from error
    if raw[:2] == b"\x1f\x8b":  # gzip magic, whatever the file is called
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError) as error:
            raise DataError(f"{path}: corrupt gzip data ({error})") from error
    return raw


def _parse_idx(path: Path, expected_magic: int, num_dims: int) -> np.ndarray:
    """Parse an IDX file holding unsigned bytes; returns an array of shape [count, *dims]."""
    data = _read_maybe_gzipped(path)
    header_size = 4 + 4 * num_dims
    magic = struct.unpack(">I", data[:4])[0] if len(data) >= 4 else None
    if magic != expected_magic:
        kind = "images" if expected_magic == IDX_IMAGES_MAGIC else "labels"
        raise DataError(
            f"{path}: bad IDX magic number {magic}, expected {expected_magic} for an IDX {kind} file "
            f"(are the images and labels files swapped?)"
        )
    if len(data) < header_size:
        raise DataError(f"{path}: too short for an IDX header ({len(data)} bytes)")
    dims = struct.unpack(f">{num_dims}I", data[4:header_size])
    expected_size = header_size + math.prod(dims)  # exact: np.prod would wrap around for a garbage header
    if len(data) != expected_size:
        raise DataError(
            f"{path}: header promises {dims[0]} items of shape {tuple(dims[1:])} "
            f"({expected_size} bytes in all) but the file holds {len(data)} bytes"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_size).reshape(dims)


def _encode_png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def read_idx(images_path, labels_path, class_names: Sequence[str] | None = None) -> LabelledSource:
    """Read an MNIST-style IDX pair (gzip or raw); each image is encoded to a lossless greyscale PNG.

    class_names: names for label ids 0..K-1; by default "0", "1", ... up to the largest label.
    """
    images_path, labels_path = Path(images_path), Path(labels_path)
    images = _parse_idx(images_path, IDX_IMAGES_MAGIC, num_dims=3)  # [N, rows, cols]
    labels = _parse_idx(labels_path, IDX_LABELS_MAGIC, num_dims=1)  # [N]
    if len(images) != len(labels):
        raise DataError(f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels")
    largest = int(labels.max()) if len(labels) else -1
    if class_names is None:
        class_names = [str(i) for i in range(largest + 1)]
    elif largest >= len(class_names):
        raise DataError(f"{labels_path}: label {largest} but only {len(class_names)} class names were given")
    elif len(set(class_names)) != len(class_names) or not all(name.strip() for name in class_names):
        raise DataError(f"class names (--classes) must be distinct and non-empty, got {list(class_names)}")

    def iterate() -> Iterator[LabelledImage]:
        for index in range(len(images)):
            yield LabelledImage(
                key=f"{index:07d}",
                image_bytes=_encode_png(images[index]),
                ext="png",
                label=int(labels[index]),
                source=f"{images_path}[{index}]",
            )

    return LabelledSource(list(class_names), SizedIterable(len(images), iterate))


# ------------------------------------------------------------------------------ folders and manifests


def _image_ext(path: Path) -> str | None:
    ext = path.suffix.lower().lstrip(".")
    return ext if ext in IMAGE_EXTENSIONS else None


def _key_for(index: int, relative: str) -> str:
    """A unique, dot-free, tar-friendly key: running index plus a readable slug of the relative path."""
    slug = re.sub(r"[^A-Za-z0-9_-]+", "_", relative.rsplit(".", 1)[0]).strip("_")
    return f"{index:07d}-{slug[-60:]}" if slug else f"{index:07d}"


def read_image_file(path: Path) -> tuple[bytes | None, str]:
    """(the file's bytes, "") or (None, why it cannot be read); never raises, and never waits on a pipe or device."""
    try:
        if path.exists() and not path.is_file():
            return None, "not a regular file"
        return path.read_bytes(), ""
    except (OSError, ValueError) as error:  # ValueError: a NUL byte in the path
        return None, f"{getattr(error, 'strerror', None) or error}"


def _load(index: int, path: Path, relative: str, label: int) -> LabelledImage:
    key, ext = _key_for(index, relative), _image_ext(path) or path.suffix.lower().lstrip(".")
    image_bytes, error = read_image_file(path)
    return LabelledImage(key, image_bytes, ext, label, str(path), error=error)


def read_image_folder(root) -> LabelledSource:
    """Read `root/<class name>/**/<image>`: sorted sub-folder names are the classes, files are picked by extension."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: image folder does not exist or is not a directory")
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise DataError(f"{root}: no class sub-folders found (expected {root}/<class name>/<image files>)")
    files: list[tuple[Path, int]] = []
    for label, class_dir in enumerate(class_dirs):
        files += [(p, label) for p in sorted(class_dir.rglob("*")) if p.is_file() and _image_ext(p)]
    if not files:
        raise DataError(f"{root}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in any class sub-folder")

    def iterate() -> Iterator[LabelledImage]:
        for index, (path, label) in enumerate(files):
            yield _load(index, path, path.relative_to(root).as_posix(), label)

    return LabelledSource([d.name for d in class_dirs], SizedIterable(len(files), iterate))


def _described(columns: dict[str, tuple[str, ...]], quote: str = "") -> list[str]:
    """["path", "caption (or text)"]: each column with the other names it may go by."""
    return [f"{quote}{names[0]}{quote}" + "".join(f" (or {quote}{alias}{quote})" for alias in names[1:])
            for names in columns.values()]


def manifest_records(path, columns: dict[str, tuple[str, ...]],
                     may_be_empty: tuple[str, ...] = ()) -> list[tuple[int, dict]]:
    """(line number, {column: value}) for every row of a CSV, TSV or JSONL manifest.

    columns: each column's name -> the header names (JSON keys) it may go by, the first found wins.
    A missing column is a DataError naming the file and line; an empty value too, except in `may_be_empty`
    columns, whose empty values come out as None.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a byte-order mark (Excel's CSVs) is not part of the header
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: cannot read manifest ({getattr(error, 'strerror', None) or error})") from error
    wanted = " and ".join(_described(columns, quote='"'))
    suffix = path.suffix.lower()
    rows = []
    if suffix in (".jsonl", ".ndjson"):
        for line_number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{line_number}: not valid JSON ({error.msg})") from error
            found = {} if not isinstance(record, dict) else {
                column: next((record[name] for name in names if name in record), _MISSING)
                for column, names in columns.items()}
            if not isinstance(record, dict) or _MISSING in found.values():
                raise DataError(f"{path}:{line_number}: expected an object with {wanted}, got {line.strip()[:80]}")
            rows.append((line_number, found))
    elif suffix in (".csv", ".tsv"):
        reader = csv.DictReader(io.StringIO(text), delimiter="\t" if suffix == ".tsv" else ",")
        header = set(reader.fieldnames or [])
        chosen = {column: next((name for name in names if name in header), None) for column, names in columns.items()}
        missing = sorted(column for column, name in chosen.items() if name is None)
        if missing:
            raise DataError(f"{path}:1: header must have columns {','.join(_described(columns))}; "
                            f"missing {', '.join(missing)}")
        try:
            for record in reader:
                found = {column: record.get(name) for column, name in chosen.items()}
                if any(found[c] in (None, "") for c in columns if c not in may_be_empty):
                    raise DataError(f"{path}:{reader.line_num}: empty or missing {'/'.join(columns)} in row {record}")
                rows.append((reader.line_num, {c: None if v == "" else v for c, v in found.items()}))
        except csv.Error as error:  # e.g. a field beyond csv.field_size_limit()
            raise DataError(f"{path}: not valid {suffix[1:].upper()} after line {reader.line_num} ({error})") from None
    else:
        raise DataError(f"{path}: unknown manifest format; use .csv or .tsv (columns "
                        f"{','.join(_described(columns))}) or .jsonl")
    for line_number, record in rows:
        if not isinstance(record["path"], str) or not record["path"]:
            raise DataError(f"{path}:{line_number}: path must be a non-empty string, got {record['path']!r}")
    if not rows:
        raise DataError(f"{path}: manifest has no rows")
    return rows


def resolve_relative(manifest: Path, image_path: str) -> Path:
    """An image path from a manifest: relative paths are relative to the manifest's folder."""
    return Path(image_path) if Path(image_path).is_absolute() else manifest.parent / image_path


def read_manifest(path) -> LabelledSource:
    """Read a CSV (header `path,label`) or JSONL (`{"path": ..., "label": ...}`) manifest.

    Relative image paths resolve against the manifest's folder. If every label is an integer the labels are
    used as ids (classes "0".."K-1"); otherwise every label is a class name, and sorted names give the ids.
    """
    path = Path(path)
    rows = manifest_records(path, {"path": ("path",), "label": ("label",)})
    for line_number, record in rows:
        if not isinstance(record["label"], (int, str)) or isinstance(record["label"], bool):
            raise DataError(f"{path}:{line_number}: label must be an int or a class name, got {record['label']!r}")
    texts = [str(record["label"]).strip() for _, record in rows]
    is_id = [re.fullmatch(r"\d+", t) is not None for t in texts]
    if any(is_id) and not all(is_id):  # e.g. "1.0" among ids: a typo, not a new class that shifts every id
        odd = is_id.index(2 * sum(is_id) < len(is_id))  # the first label of the rarer kind
        usual = is_id.index(not is_id[odd])
        raise DataError(f"{path}:{rows[odd][0]}: label {texts[odd]!r} mixes class names and class ids (line "
                        f"{rows[usual][0]} has {texts[usual]!r}); use only ids (0, 1, ...) or only names")
    if all(is_id):
        ids = [int(t) for t in texts]
        class_names = [str(i) for i in range(max(ids) + 1)]
    else:
        class_names = sorted(set(texts))
        ids = [class_names.index(t) for t in texts]

    def iterate() -> Iterator[LabelledImage]:
        for index, ((line_number, record), label) in enumerate(zip(rows, ids)):
            resolved = resolve_relative(path, record["path"])
            sample = _load(index, resolved, record["path"], label)
            yield LabelledImage(sample.key, sample.image_bytes, sample.ext, label,
                                f"{resolved} ({path}:{line_number})", sample.error)

    return LabelledSource(class_names, SizedIterable(len(rows), iterate))
