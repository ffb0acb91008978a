"""Turn a shard specification into a list of tar files, count the samples in them, and read the stats.json that
`python -m data` writes beside them (`read_shard_stats`, `read_class_names`, `read_categories`).

A spec may be a brace pattern (`dir/train-{000000..000003}.tar`), a directory (all `*.tar`, sorted), a `.txt`
file listing one shard per line (relative to the list file), a comma-separated string of any of these, or a
Python list of them. URLs (`http://...`, `s3://...`, `pipe:...`) pass through unchecked.

Several sources to mix are separated by "::", as in open_clip: `"laion/{00000..00099}.tar::cc12m/"`. Each source
may carry a weight (`weights=[1.0, 3.0]` or `"1::3"`), an upsampling factor: in resampled streaming every shard of
source i is drawn with weight w_i, so source i supplies w_i * n_i / sum_j(w_j * n_j) of the shards (n_i its shard
count), the semantics of open_clip's ResampledShards2 and --train-data-upsampling-factors.

A directory that still holds the writer's INCOMPLETE marker was never finished: expanding a spec refuses it. What
kind of samples shards hold (labelled, image-text, detection) is told by their stats.json (`check_kind`), and how
many each holds by stats.json or a sizes.json (`shard_sizes`), so that a reader can count what a damaged shard lost.
`read_tar_samples` reads one shard's samples (every reader's road to a tar file).
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import braceexpand
from webdataset.handlers import reraise_exception
from webdataset.tariterators import base_plus_ext, tarfile_samples

from .errors import DataError
from .writer import INCOMPLETE_FILE, SIZES_FILE, STATS_FILE


def _is_url(text: str) -> bool:
    return "://" in text or text.startswith("pipe:")


def _split_commas(spec: str) -> list[str]:
    """Split at commas that are not inside braces (`a.tar,b-{0..1}.tar` -> two parts, `{a,b}` stays whole)."""
    parts, depth, current = [], 0, ""
    for char in spec:
        depth += {"{": 1, "}": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return [p.strip() for p in parts + [current] if p.strip()]


def _refuse_unfinished(directory: Path) -> None:
    if (directory / INCOMPLETE_FILE).exists():
        raise DataError(f"{directory}: writing these shards was interrupted, or is still under way (the folder "
                        f"holds {INCOMPLETE_FILE}); rewrite it with `python -m data`")


def _expand_one(spec: str) -> list[str]:
    if _is_url(spec):
        return list(braceexpand.braceexpand(spec))
    shards = _expand_local(spec)
    for directory in sorted({Path(shard).parent for shard in shards}):
        _refuse_unfinished(directory)
    return shards


def _expand_local(spec: str) -> list[str]:
    if "{" in spec:
        paths = list(braceexpand.braceexpand(spec))
        missing = [p for p in paths if not Path(p).is_file()]
        if missing:
            raise DataError(f"shard {missing[0]} (from pattern {spec}) does not exist"
                            + (f", nor do {len(missing) - 1} more" if len(missing) > 1 else ""))
        return paths
    path = Path(spec)
    if path.is_dir():
        _refuse_unfinished(path)  # before "no *.tar files": the writer may have stopped before its first shard
        shards = sorted(str(p) for p in path.glob("*.tar"))
        if not shards:
            raise DataError(f"shard directory {path} holds no *.tar files")
        return shards
    if not path.exists():
        raise DataError(f"shard file or directory {path} does not exist")
    if path.suffix == ".txt":
        try:
            lines = path.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise DataError(f"shard list {path}: cannot read it ({error})") from error
        shards = []
        for number, line in enumerate(lines, 1):
            line = line.strip()
            if line and not line.startswith("#"):
                entry = line if _is_url(line) or Path(line).is_absolute() else str(path.parent / line)
                try:
                    shards += _expand_one(entry)
                except DataError as error:
                    raise DataError(f"{error} (listed in {path}, line {number})") from None
        return shards
    return [str(path)]


SOURCE_SEPARATOR = "::"


def expand_shards(spec) -> list[str]:
    """Expand a shard spec (pattern, directory, .txt list, comma- or "::"-separated string, or list) into shard
    paths: all sources together, in order."""
    if isinstance(spec, (str, Path)):
        parts = [p for source in str(spec).split(SOURCE_SEPARATOR) for p in _split_commas(source)]
        shards = [s for part in parts for s in _expand_one(part)]
    else:
        shards = [s for item in spec for s in expand_shards(item)]
    if not shards:
        raise DataError(f"shard spec {spec!r} names no shards")
    return shards


def expand_sources(spec, weights=None) -> list[tuple[list[str], float]]:
    """[(shards of source i, weight w_i)] for a spec whose sources are separated by "::" (a string) or that is a list
    with one spec per source. weights: one positive number per source, as a list or a "1::3" string; default 1 each.
    """
    if isinstance(spec, (str, Path)):
        specs = [part for part in str(spec).split(SOURCE_SEPARATOR) if part.strip()]
    else:
        specs = list(spec)
    if weights is None:
        weights = [1.0] * len(specs)
    elif isinstance(weights, str):
        weights = weights.split(SOURCE_SEPARATOR)
    try:
        weights = [float(w) for w in weights]
    except ValueError as error:
        raise DataError(f"source weights must be numbers, got {weights!r}") from error
    if len(weights) != len(specs):
        raise DataError(f"{len(weights)} weight(s) {weights} for {len(specs)} source(s) in shard spec {spec!r}")
    if any(not w > 0 for w in weights):
        raise DataError(f"source weights must be > 0, got {weights}")
    return [(expand_shards(source), weight) for source, weight in zip(specs, weights)]


def _load_stats(stats_file: Path) -> dict:
    try:
        stats = json.loads(stats_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{stats_file}: cannot read shard statistics ({error})") from error
    if not isinstance(stats, dict):
        raise DataError(f"{stats_file}: cannot read shard statistics (a JSON {type(stats).__name__}, not an object)")
    return stats


def _stats_of(directory: Path) -> dict:
    """The stats.json of a shard directory; {} when it has none."""
    stats_file = directory / STATS_FILE
    return _load_stats(stats_file) if stats_file.is_file() else {}


def _by_directory(shards: list[str]) -> dict[Path, list[str]]:
    by_dir: dict[Path, list[str]] = {}
    for shard in shards:
        by_dir.setdefault(Path(shard).parent, []).append(shard)
    return by_dir


def shard_sizes(shards) -> dict[str, int]:
    """{shard: number of samples} for the shards (a list or any spec `expand_shards` takes) whose count is known:
    from the `shard_counts` of the stats.json beside them, else from a sizes.json there (WebDataset's index)."""
    sizes = {}
    for directory, dir_shards in _by_directory(expand_shards(shards)).items():
        known = _stats_of(directory).get("shard_counts")
        sizes_file = directory / SIZES_FILE
        if known is None and sizes_file.is_file():
            known = _load_stats(sizes_file)
        try:
            sizes.update({shard: int(known[Path(shard).name]) for shard in dir_shards
                          if Path(shard).name in (known or {})})
        except (TypeError, ValueError) as error:
            raise DataError(f"{directory}: a shard's sample count in {STATS_FILE}/{SIZES_FILE} is not a number "
                            f"({error})") from error
    return sizes


# ------------------------------------------------------------------------------------------------ kinds of shards

# The field only samples of each kind carry, and how to write shards of that kind.
KIND_FIELDS = {"labelled": "cls", "image-text": "txt", "detection": "json"}
HOW_TO_WRITE = {
    "labelled": "`python -m data folder|idx|manifest|embedded` writes labelled shards",
    "image-text": "`python -m data captions` makes image-text pairs from labelled shards (`python -m data pairs` "
                  "from captioned images)",
    "detection": "`python -m data coco` writes detection shards",
}


def kind_of_stats(stats: dict) -> str | None:
    """The kind of samples a stats.json describes (None: unknown): its "kind", else what only that kind's writer
    records (categories, caption lengths, classes)."""
    if stats.get("kind") in KIND_FIELDS:
        return stats["kind"]
    for kind, entry in (("detection", "categories"), ("image-text", "caption_words"), ("labelled", "classes")):
        if entry in stats:
            return kind
    return None


def kind_of_fields(fields) -> str | None:
    """The kind of shards a raw sample with these fields (e.g. {"png", "cls"}) comes from; None: unknown."""
    kinds = [kind for kind, field in KIND_FIELDS.items() if field in fields]
    return kinds[0] if len(kinds) == 1 else None


def wrong_kind(where: str, found: str, wanted: str) -> str:
    """Why `found` shards cannot feed a stream of `wanted` samples, and how to write the right ones."""
    how = HOW_TO_WRITE[wanted]
    if (found, wanted) == ("labelled", "image-text"):
        how = f"`python -m data captions --shards {where} --out DIR` makes image-text pairs from them"
    return (f"{where} holds {found} shards (no {KIND_FIELDS[wanted]} field), but this run reads {wanted} samples; "
            f"{how}")


def check_kind(shards, kind: str) -> None:
    """DataError when the stats.json beside some of `shards` says they hold another kind of samples than `kind`
    ("labelled", "image-text" or "detection"); shards without one are not checked here."""
    for directory in _by_directory(expand_shards(shards)):
        found = kind_of_stats(_stats_of(directory))
        if found is not None and found != kind:
            raise DataError(wrong_kind(str(directory), found, kind))


def _stats_beside(spec) -> tuple[Path, dict]:
    """(the stats.json beside the first shard of `spec`, its contents)."""
    stats_file = Path(expand_shards(spec)[0]).parent / STATS_FILE
    if not stats_file.is_file():
        raise DataError(f"{stats_file} does not exist: shard statistics are written by `python -m data` "
                        f"beside the shards")
    return stats_file, _load_stats(stats_file)


def read_shard_stats(spec) -> dict:
    """The stats.json beside the first shard of `spec` (anything `expand_shards` takes, e.g. a list of shards)."""
    return _stats_beside(spec)[1]


def read_class_names(spec) -> list[str]:
    """The class names of labelled shards (label i is the i-th name), from their stats.json."""
    stats_file, stats = _stats_beside(spec)
    if not stats.get("classes"):
        found = kind_of_stats(stats)
        if found not in (None, "labelled"):
            raise DataError(wrong_kind(str(stats_file.parent), found, "labelled"))
        raise DataError(f"{stats_file} lists no classes: these are not labelled shards")
    return list(stats["classes"])


def read_categories(spec) -> list[dict]:
    """The categories ({"id", "name"}, in file order) of detection shards, from their stats.json."""
    stats_file, stats = _stats_beside(spec)
    if not stats.get("categories"):
        raise DataError(f"{stats_file} lists no categories: data.train must be detection shards written by "
                        f"`python -m data coco` / data.write_detection_shards")
    return list(stats["categories"])


def describe_read_error(error: Exception) -> str:
    """A tar reading error in a few words: webdataset appends the stream and the URL to the exception's args."""
    first = error.args[0] if error.args and isinstance(error.args[0], str) else str(error)
    return f"{type(error).__name__}: {first}"


TAR_BLOCK = 512


def tar_cut_short(shard: str) -> str | None:
    """What is wrong with the end of a local .tar file that read without an error, or None. A tar file ends with
    two zero blocks; one cut short at a header boundary reads as a shorter archive, the rest silently lost."""
    path = Path(shard)
    if _is_url(shard) or path.suffix != ".tar" or not path.is_file():
        return None
    size = path.stat().st_size
    with open(path, "rb") as file:
        file.seek(max(0, size - 2 * TAR_BLOCK))
        tail = file.read()
    if size % TAR_BLOCK or len(tail) < 2 * TAR_BLOCK or tail.count(0) != len(tail):
        return f"cut short: {size} bytes, without the zero blocks that end a tar file"
    return None


def read_tar_samples(shard: str) -> Iterator[dict]:
    """The samples of one shard, as webdataset's `tarfile_samples` gives them ({"__key__", "__url__", one bytes
    value per file suffix}), and raising what it raises.

    A local, uncompressed tar file whose headers are plain ustar ones (what `python -m data` and webdataset's
    TarWriter write) is parsed here: Python's tarfile spends ~20 us a member decoding every header field, as much
    as decoding a 28x28 PNG. Anything else (a URL, a compressed tar, pax or GNU long-name headers, a bad checksum,
    a file cut short, a duplicate file in a sample) goes through `tarfile_samples`, from the start of the file,
    past the samples already given: it decides, and words the error."""
    yielded = 0
    if not _is_url(shard) and Path(shard).is_file():
        try:
            for sample in _plain_tar_samples(shard):
                yield sample
                yielded += 1
            return
        except _NotPlainTar:
            pass
    for index, sample in enumerate(tarfile_samples([{"url": shard}], handler=reraise_exception)):
        if index >= yielded:
            yield sample


class _NotPlainTar(Exception):
    """Something `_plain_tar_samples` leaves to tarfile."""


_META_FILE = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta: "__key__"-like names are not sample files
_REGULAR_TYPES = (b"0", b"\0", b"7")
_DATALESS_TYPES = (b"1", b"2", b"3", b"4", b"5", b"6")  # links, devices, directories, FIFOs: no data blocks


def _octal(field: bytes) -> int:
    """A header's number field as tarfile reads it (NUL-terminated octal digits, spaces around them; empty: 0)."""
    if field[0] & 0x80:  # base-256, for numbers too large for octal
        raise _NotPlainTar
    try:
        return int(field.split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        raise _NotPlainTar from None


def _plain_tar_samples(shard: str) -> Iterator[dict]:
    """webdataset's grouping of a plain ustar file's regular members into samples; raises _NotPlainTar (before
    giving the sample concerned) at the first thing it does not read exactly as tarfile + webdataset would."""
    sample: dict | None = None
    with open(shard, "rb", buffering=1 << 20) as file:  # large sequential reads suit network file systems
        while True:
            header = file.read(TAR_BLOCK)
            if len(header) != TAR_BLOCK or header[257:262] != b"ustar":
                if header == bytes(TAR_BLOCK) and sample is not None:
                    break  # the zero block that ends the archive (what follows is tar_cut_short's business)
                raise _NotPlainTar  # end of file without zero blocks, an old or damaged header, a compressed file
            # the checksum counts its own eight bytes as spaces (tarfile also accepts a signed sum: left to it)
            if _octal(header[148:156]) != sum(header) - sum(header[148:156]) + 256:
                raise _NotPlainTar
            kind, size = header[156:157], _octal(header[124:136])
            if kind in _DATALESS_TYPES:
                continue
            if kind not in _REGULAR_TYPES:  # pax headers, GNU long names, sparse files, ...
                raise _NotPlainTar
            name = header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            if kind == b"\0" and name.endswith("/"):  # tarfile: an old-style directory, no data blocks
                continue
            prefix = header[345:500].split(b"\0", 1)[0]  # ustar splits a long name into prefix/name
            if prefix:
                name = prefix.decode("utf-8", "surrogateescape") + "/" + name
            data = file.read(size)
            if len(data) != size:
                raise _NotPlainTar
            file.seek(-size % TAR_BLOCK, 1)
            if _META_FILE.match(name) or ("/" not in name and name.startswith("__") and name.endswith("__")):
                continue
            key, suffix = base_plus_ext(name)  # webdataset's own split into sample key and file suffix
            if key is None:
                continue
            suffix = suffix.lower()
            if sample is None or key != sample["__key__"]:
                if sample is not None:
                    yield sample
                sample = {"__key__": key, "__url__": shard}
            if suffix in sample:
                raise _NotPlainTar  # a duplicate file: tarfile_samples raises its own error for it
            sample[suffix] = data
    if sample is not None:
        yield sample


def _scan_count(shard: str) -> tuple[int, str | None]:
    """(samples read, what ended the reading early or None)."""
    count = 0
    try:
        for _ in read_tar_samples(shard):
            count += 1
    except Exception as error:  # not a tar file, truncated, unreadable...
        return count, describe_read_error(error)
    return count, tar_cut_short(shard)


def count_samples(shards) -> int:
    """Number of samples in the given shards (a list or any spec `expand_shards` takes).

    Reads the stats.json beside the shards (summing over directories). Its per-shard counts make a subset of a
    directory count right; shards that no stats.json accounts for are scanned, with a warning. A shard that cannot
    be read to its end counts the samples before the damage, with a warning naming it; DataError when the shards
    hold no readable sample and some could not be read (e.g. a file that is not a tar file).
    """
    total, scanned, damaged = 0, [], {}
    for directory, dir_shards in _by_directory(expand_shards(shards)).items():
        stats = _stats_of(directory)
        names = [Path(s).name for s in dir_shards]
        if "shard_counts" not in stats and set(names) == set(stats.get("shards", [])) and "samples" in stats:
            total += stats["samples"]  # a stats.json without per-shard counts still covers the whole directory
            continue
        for shard, name in zip(dir_shards, names):
            if name in stats.get("shard_counts", {}):
                total += stats["shard_counts"][name]
            else:
                scanned.append(shard)
                count, problem = _scan_count(shard)
                total += count
                if problem is not None:
                    damaged[shard] = problem
    if damaged:
        shard, problem = next(iter(damaged.items()))
        others = len(damaged) - 1
        if total == 0:
            raise DataError(f"no readable samples in {shards}: {shard} is not a readable tar file ({problem})"
                            + (f", nor are {others} more" if others else "")
                            + "; shards are WebDataset .tar files, e.g. written by `python -m data`")
    if scanned:
        warnings.warn(f"no {STATS_FILE} entry for {len(scanned)} shard(s) (e.g. {scanned[0]}); "
                      f"counted samples by reading the tar files")
    if damaged:
        warnings.warn(f"{shard}" + (f" and {others} more shard(s)" if others else "") + f" cannot be read to the end "
                      f"({problem}): counted the samples before the damage")
    return total


def read_matching_class_names(train_spec, val_spec) -> list[str]:
    """The class names of labelled training shards, checked against those of their evaluation shards (label i must
    name the same class in both; a DataError names both lists otherwise). Evaluation shards without a stats.json
    cannot be checked: a warning says so."""
    names = read_class_names(train_spec)
    if val_spec is None:
        return names
    try:
        val_names = read_class_names(val_spec)
    except DataError as error:
        warnings.warn(f"the class names of the evaluation shards cannot be checked against the training shards' "
                      f"({error})")
        return names
    if val_names != names:
        raise DataError(f"the evaluation shards {val_spec} name other classes than the training shards {train_spec}: "
                        f"{val_names} vs {names} (label i must mean the same class in both)")
    return names
