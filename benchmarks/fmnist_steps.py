"""Steps the Fashion-MNIST benchmarks share (linear_probe.py, clip_zeroshot.py, finetune_fmnist.py, swin_fmnist.py,
detr_fmnist.py): run one entry point with its argv, timed; keep the steps' wall times across invocations; write the
common 54,000 / 6,000 split once."""
from __future__ import annotations

import json
import os
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


class StepSeconds(dict):
    """Each step's wall seconds, kept in a JSON file so that a benchmark run again after a stop still reports the
    steps it skips as done. A run resumed after an interruption adds its time to what the step had (the part before
    the stop is not counted: the process that timed it was killed); a run started over replaces it."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        super().__init__(json.loads(self.path.read_text()) if self.path.is_file() else {})

    def record(self, step: str, seconds: float, resumed: bool = False) -> None:
        self[step] = seconds + (self.get(step, 0.0) if resumed else 0.0)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".partial")
        partial.write_text(json.dumps(self, indent=2) + "\n")
        os.replace(partial, self.path)  # never a half-written file after a kill


def write_split(fashion_mnist: str | Path, shards: Path, seconds: StepSeconds) -> None:
    """`shards/train` (54,000) and `shards/val` (6,000, seed 0) from the IDX files, unless already written."""
    if (shards / "val" / "stats.json").is_file():
        return
    src = Path(fashion_mnist)
    seconds.record("write shards", run("shards", data_main, [
        "idx", "--images", str(src / "train-images-idx3-ubyte.gz"), "--labels", str(src / "train-labels-idx1-ubyte.gz"),
        "--out", str(shards), "--val-fraction", "0.1", "--seed", "0", "--shard-size", "5000", "--no-progress",
        "--overwrite",
        "--classes", ",".join(FASHION_MNIST_CLASSES),
    ]))


def prepare_shards(fashion_mnist: str | Path, shards: Path, smoke: bool, seconds: StepSeconds) -> None:
    """The benchmarks' shards: the bundled 2,700 / 300 images for a smoke run, else the 54,000 / 6,000 split."""
    if smoke:
        from data import ensure_embedded_shards

        ensure_embedded_shards(shards)
    else:
        write_split(fashion_mnist, shards, seconds)
