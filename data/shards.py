"""Turn a shard specification into a list of tar files, and count the samples in them.

A spec may be a brace pattern (`dir/train-{000000..000003}.tar`), a directory (all `*.tar`, sorted), a `.txt`
file listing one shard per line (relative to the list file), a comma-separated string of any of these, or a
Python list of them. URLs (`http://...`, `s3://...`, `pipe:...`) pass through unchecked.
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


def expand_shards(spec) -> list[str]:
    """Expand a shard spec (pattern, directory, .txt list, comma-separated string or list) into shard paths."""
    if isinstance(spec, (str, Path)):
        shards = [s for part in _split_commas(str(spec)) for s in _expand_one(part)]
    else:
        shards = [s for item in spec for s in expand_shards(item)]
    if not shards:
        raise DataError(f"shard spec {spec!r} names no shards")
    return shards


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
        stats = json.loads(stats_file.read_text()) if stats_file.is_file() else {}
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
