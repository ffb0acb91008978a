"""Steps the Fashion-MNIST benchmarks share (linear_probe.py, clip_zeroshot.py, finetune_fmnist.py): run one
entry point with its argv, timed, and write the common 54,000 / 6,000 split once."""
from __future__ import annotations

import time
from pathlib import Path

from data import FASHION_MNIST_CLASSES
from data.__main__ import main as data_main


def run(step: str, main, argv: list[str]) -> float:
    """`main(argv)` of `python -m data|pretrain|finetune`, announced; its seconds; a failure stops the benchmark."""
    print(f"\n== {step}: {' '.join(argv)}", flush=True)
    start = time.perf_counter()
    status = main(argv)
    if status:
        raise SystemExit(f"{step} failed with exit status {status}")
    return time.perf_counter() - start


def write_split(fashion_mnist: str | Path, shards: Path, seconds: dict[str, float]) -> None:
    """`shards/train` (54,000) and `shards/val` (6,000, seed 0) from the IDX files, unless already written."""
    if (shards / "val" / "stats.json").is_file():
        return
    src = Path(fashion_mnist)
    seconds["write shards"] = run("shards", data_main, [
        "idx", "--images", str(src / "train-images-idx3-ubyte.gz"), "--labels", str(src / "train-labels-idx1-ubyte.gz"),
        "--out", str(shards), "--val-fraction", "0.1", "--seed", "0", "--shard-size", "5000", "--no-progress",
        "--overwrite",
        "--classes", ",".join(FASHION_MNIST_CLASSES),
    ])


def prepare_shards(fashion_mnist: str | Path, shards: Path, smoke: bool, seconds: dict[str, float]) -> None:
    """The benchmarks' shards: the bundled 2,700 / 300 images for a smoke run, else the 54,000 / 6,000 split."""
    if smoke:
        from data import ensure_embedded_shards

        ensure_embedded_shards(shards)
    else:
        write_split(fashion_mnist, shards, seconds)
