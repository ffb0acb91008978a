"""Turn a shard specification into a list of tar files, count the samples in them, and read the stats.json that
`python -m data` writes beside them (`read_shard_stats`, `read_class_names`, `read_categories`).

A spec may be a brace pattern (`dir/train-{000000..000003}.tar`), a directory (all `*.tar`, sorted), a `.txt`
file listing one shard per line (relative to the list file), a comma-separated string of any of these, or a
Python list of them. URLs (`http://...`, `s3://...`, `pipe:...`) pass through unchecked.

Several sources to mix are separated by "::", as in open_clip: `"laion/{00000..00099}.tar::cc12m/"`. Each source
may carry a weight (`weights=[1.0, 3.0]` or `"1::3"`), an upsampling factor: in resampled streaming every shard of
source i is drawn with weight w_i, so source i supplies w_i * n_i / sum_j(w_j * n_j) of the shards (n_i its shard
count), the semantics of open_clip's ResampledShards2 and --train-data-upsampling-factors.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import braceexpand
from webdataset.handlers import reraise_exception
from webdataset.tariterators import tarfile_samples

from .errors import DataError
from .writer import STATS_FILE


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


def _expand_one(spec: str) -> list[str]:
    if _is_url(spec):
        return list(braceexpand.braceexpand(spec))
    if "{" in spec:
        paths = list(braceexpand.braceexpand(spec))
        missing = [p for p in paths if not Path(p).is_file()]
        if missing:
            raise DataError(f"shard {missing[0]} (from pattern {spec}) does not exist"
                            + (f", nor do {len(missing) - 1} more" if len(missing) > 1 else ""))
        return paths
    path = Path(spec)
    if path.is_dir():
        shards = sorted(str(p) for p in path.glob("*.tar"))
        if not shards:
            raise DataError(f"shard directory {path} holds no *.tar files")
        return shards
    if not path.exists():
        raise DataError(f"shard file or directory {path} does not exist")
    if path.suffix == ".txt":
        shards = []
        for line in path.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                entry = line if _is_url(line) or Path(line).is_absolute() else str(path.parent / line)
                shards += _expand_one(entry)
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
        return json.loads(stats_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{stats_file}: cannot read shard statistics ({error})") from error


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
        raise DataError(f"{stats_file} lists no classes: these are not labelled shards")
    return list(stats["classes"])


def read_categories(spec) -> list[dict]:
    """The categories ({"id", "name"}, in file order) of detection shards, from their stats.json."""
    stats_file, stats = _stats_beside(spec)
    if not stats.get("categories"):
        raise DataError(f"{stats_file} lists no categories: data.train must be detection shards written by "
                        f"`python -m data coco` / data.write_detection_shards")
    return list(stats["categories"])


def _scan_count(shard: str) -> int:
    return sum(1 for _ in tarfile_samples([{"url": shard}], handler=reraise_exception))


def count_samples(shards) -> int:
    """Number of samples in the given shards (a list or any spec `expand_shards` takes).

    Reads the stats.json beside the shards (summing over directories). Its per-shard counts make a subset of a
    directory count right; shards that no stats.json accounts for are scanned, with a warning.
    """
    by_dir: dict[Path, list[str]] = {}
    for shard in expand_shards(shards):
        by_dir.setdefault(Path(shard).parent, []).append(shard)
    total, scanned = 0, []
    for directory, dir_shards in by_dir.items():
        stats_file = directory / STATS_FILE
        stats = _load_stats(stats_file) if stats_file.is_file() else {}
        names = [Path(s).name for s in dir_shards]
        if "shard_counts" not in stats and set(names) == set(stats.get("shards", [])) and "samples" in stats:
            total += stats["samples"]  # a stats.json without per-shard counts still covers the whole directory
            continue
        for shard, name in zip(dir_shards, names):
            if name in stats.get("shard_counts", {}):
                total += stats["shard_counts"][name]
            else:
                scanned.append(shard)
                total += _scan_count(shard)
    if scanned:
        warnings.warn(f"no {STATS_FILE} entry for {len(scanned)} shard(s) (e.g. {scanned[0]}); "
                      f"counted samples by reading the tar files")
    return total
