"""A small real data set shipped inside the package: 3000 Fashion-MNIST images (28x28 greyscale, MIT licence).

It lets every entry point (pretraining, finetuning, tests, CI) run offline with nothing but this repository.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from .sources import read_idx
from .writer import INCOMPLETE_FILE, STATS_FILE, ShardOptions, write_labelled_shards

EMBEDDED_DIR = Path(__file__).resolve().parent / "embedded"
EMBEDDED_IMAGES = EMBEDDED_DIR / "fashion-mnist-3k-images-idx3-ubyte.gz"
EMBEDDED_LABELS = EMBEDDED_DIR / "fashion-mnist-3k-labels-idx1-ubyte.gz"

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
# Fashion-MNIST's normalisation statistics (its 60,000 training images; the embedded 2,700 give 0.2856 / 0.3515):
# grey images, so the same in every channel
FASHION_MNIST_MEAN = (0.286, 0.286, 0.286)
FASHION_MNIST_STD = (0.353, 0.353, 0.353)


def read_embedded():
    """The embedded images as a LabelledSource (class names, samples)."""
    return read_idx(EMBEDDED_IMAGES, EMBEDDED_LABELS, class_names=FASHION_MNIST_CLASSES)


@contextlib.contextmanager
def _exclusive_lock(path: Path):
    """Serialise concurrent writers (several ranks on one machine) with an OS file lock, where there is one."""
    try:
        import fcntl
    except ImportError:  # not POSIX: rely on the atomic renames alone
        yield
        return
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _written_with(directory: Path, key: str, value) -> bool:
    """Whether a writer completed `directory` (stats.json, no INCOMPLETE marker) with stats[key] == value."""
    stats_file = directory / STATS_FILE
    if (directory / INCOMPLETE_FILE).exists() or not stats_file.is_file():
        return False
    return json.loads(stats_file.read_text()).get(key) == value


def _is_complete(train_dir: Path, val_dir: Path, split: dict) -> bool:
    return _written_with(train_dir, "split", split) and _written_with(val_dir, "split", split)


def ensure_embedded_shards(cache_dir, val_fraction: float = 0.1, seed: int = 0,
                           shard_size: int = 500) -> tuple[str, str]:
    """Write the embedded images once as `cache_dir/train/` and `cache_dir/val/` shards; returns both directories.

    Idempotent: when both stats.json files exist (for the same split settings) it returns at once.
    """
    if not 0.0 < val_fraction < 1.0:  # 0 would write no split, and no val/ to return
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    cache_dir = Path(cache_dir)
    train_dir, val_dir = cache_dir / "train", cache_dir / "val"
    split = {"source": "fashion-mnist-3k", "val_fraction": val_fraction, "seed": seed, "shard_size": shard_size}
    if _is_complete(train_dir, val_dir, split):
        return str(train_dir), str(val_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(cache_dir / ".write.lock"):
        if not _is_complete(train_dir, val_dir, split):  # another process may have finished while we waited
            class_names, samples = read_embedded()
            # overwrite: our own cache, written before with other settings or cut short
            write_labelled_shards(samples, cache_dir, class_names, val_fraction=val_fraction, seed=seed,
                                  options=ShardOptions(shard_size=shard_size, progress=False, overwrite=True),
                                  metadata={"split": split})
    return str(train_dir), str(val_dir)


def ensure_embedded_pair_shards(cache_dir, seed: int = 0) -> tuple[str, str]:
    """The embedded training images as image-text shards (`cache_dir/pairs/`, captions written from their labels
    by data.captions) and the labelled validation split (`cache_dir/val/`, for zero-shot evaluation); returns both
    directories. Idempotent like `ensure_embedded_shards`."""
    from .captions import CAPTION_RECIPE, captioned_pairs
    from .pairs import write_pair_shards
    from .shards import expand_shards

    train_dir, val_dir = ensure_embedded_shards(cache_dir)
    pairs_dir = Path(cache_dir) / "pairs"
    made_from = {"captions_from": "embedded train split", "caption_seed": seed, "captions": CAPTION_RECIPE}
    if not _written_with(pairs_dir, "made_from", made_from):
        with _exclusive_lock(Path(cache_dir) / ".write.lock"):
            if not _written_with(pairs_dir, "made_from", made_from):
                pairs = captioned_pairs(expand_shards(train_dir), FASHION_MNIST_CLASSES, seed=seed)
                write_pair_shards(pairs, pairs_dir, options=ShardOptions(shard_size=500, progress=False,
                                                                         overwrite=True),
                                  metadata={"made_from": made_from})
    return str(pairs_dir), val_dir
