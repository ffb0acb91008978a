"""Steps the Fashion-MNIST benchmarks share (linear_probe.py, clip_zeroshot.py, finetune_fmnist.py, swin_fmnist.py,
detr_fmnist.py): run one entry point with its argv, timed; keep the steps' wall times across invocations; write the
common 54,000 / 6,000 split once; run, resume or skip a training run (run_or_resume: every benchmark's one road),
a masked-image pretraining run among them."""
from __future__ import annotations

import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import yaml

from data import FASHION_MNIST_CLASSES
from data.__main__ import main as data_main
from pretrain.checkpoint import find_latest
from pretrain.cli import main as pretrain_main
from pretrain.config import MAEPretrainConfig, load_config, to_dict

from machine import describe as describe_machine

REPO = Path(__file__).resolve().parents[1]
MAE_CONFIG = REPO / "configs/mae_vit_tiny_fmnist.yaml"  # the benchmarks' one Fashion-MNIST MAE (WORK/mae)


def run(step: str, main, argv: list[str]) -> float:
    """`main(argv)` of `python -m data|pretrain|finetune`, announced; its seconds; a failure stops the benchmark."""
    print(f"\n== {step}: {' '.join(argv)}", flush=True)
    start = time.perf_counter()
    status = main(argv)
    if status:
        raise SystemExit(f"{step} failed with exit status {status}")
    return time.perf_counter() - start


# keys that change how a run is kept or shown, not what it computes
BOOKKEEPING_KEYS = {"train.resume", "train.overwrite", "train.save_every", "train.log_every", "logging"}


def recipe_changes(out: Path, schema: type, config: Path, overrides: list[str],
                   inputs: tuple[Path, ...] = ()) -> list[str]:
    """The config keys whose values in the run already in `out` (its config.yaml) differ from what `config` with
    the `key=value` `overrides` resolves to now (bookkeeping keys aside), then each of `inputs` (weights the run
    reads) written after the run began; [] when none differ or `out` holds no run. A run made by an older recipe
    (another teacher, another lr) or from weights retrained since under the same path is no result of this one."""
    saved = out / "config.yaml"
    if not saved.is_file():
        return []
    now = to_dict(load_config(schema, config, overrides))
    began = saved.stat().st_mtime
    return [*sorted(_differing(yaml.safe_load(saved.read_text()) or {}, now)),
            *(f"{path} written since" for path in inputs if path.stat().st_mtime > began)]


def _differing(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in dict.fromkeys([*old, *new]):
        dotted = prefix + key
        if dotted in BOOKKEEPING_KEYS:
            continue
        if isinstance(old.get(key), dict) and isinstance(new.get(key), dict):
            keys += _differing(old[key], new[key], dotted + ".")
        elif old.get(key) != new.get(key):
            keys.append(dotted)
    return keys


def run_or_resume(step: str, main, schema: type, config: Path, out: Path, overrides: list[str],
                  finished: Callable[[], bool], seconds: StepSeconds, inputs: tuple[Path, ...] = (),
                  restart: str | None = None) -> None:
    """Run `main` (`python -m pretrain|finetune`) on `config` with the `key=value` `overrides` (`output_dir=out`
    among them) unless `out` holds this recipe's run and `finished()` says it ended; resume an interrupted one from
    its latest checkpoint. A run of another recipe, or begun before the weights it reads (`inputs`) were written
    (recipe_changes), starts over, as does any run when `restart` names a reason (a smoke run). Its seconds go to
    `seconds` under `step`, also when it stops before the end."""
    changed = [restart] if restart else recipe_changes(out, schema, config, overrides, inputs=inputs)
    if changed and (out / "config.yaml").is_file():
        why = restart or f"a run of another recipe ({', '.join(changed)})"
        print(f"\n== {step}: {out} holds {why}: starting over")
    elif not changed and finished():
        print(f"\n== {step}: done earlier ({out})")
        seconds.found_done(step, out)
        return
    resume = not changed and find_latest(out / "checkpoints") is not None
    argv = ["--config", str(config), *overrides, "train.resume=latest" if resume else "train.overwrite=true"]
    start = time.perf_counter()
    try:
        run(step, main, argv)
    finally:  # a run stopped by SIGTERM (after its checkpoint) or a failure spent this time too: its resume adds on
        seconds.record(step, time.perf_counter() - start, resumed=resume, out=out)


def pretrain(step: str, config: Path, out: Path, overrides: list[str], seconds: StepSeconds) -> dict:
    """Run, resume or skip (once its reconstructions.png, written when it ends, exists) one masked-image
    `python -m pretrain` run of `config` (MAE, UM-MAE, SimMIM) into `out`; its steps, final loss and k-NN monitor
    from log.jsonl."""
    run_or_resume(step, pretrain_main, MAEPretrainConfig, config, out, [f"output_dir={out}", *overrides],
                  lambda: (out / "reconstructions.png").is_file(), seconds)
    return pretraining_summary(out)


def pretraining_summary(out: Path) -> dict:
    """A pretraining run's steps, final loss and k-NN monitor (top-1 by step), from its log.jsonl."""
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]
    last = next(line for line in reversed(log) if "loss" in line)
    knn = {line["step"]: line["eval/knn_top1"] for line in log if "eval/knn_top1" in line}  # a resume repeats steps
    return {"steps": last["step"], "final_loss": last["loss"], "knn_top1": sorted(knn.items())}


def pretrained_weights(out: Path) -> Path:
    """The checkpoint a finetune from the pretraining folder `out` reads (its latest), for recipe_changes' inputs."""
    latest = find_latest(out / "checkpoints")
    if latest is None:
        raise SystemExit(f"{out} holds no finished checkpoint to finetune from")
    return latest


def written_after(path: Path, inputs: tuple[Path, ...]) -> bool:
    """`path` exists and is newer than each of `inputs` (what it was computed from)."""
    return path.is_file() and all(path.stat().st_mtime > source.stat().st_mtime for source in inputs)


def image_counts(runs: dict[str, dict]) -> str:
    """'N training images, M validation images', from whichever run recorded them (rows kept from an older --json
    may not have)."""
    def count(key: str):
        return next((m[key] for m in runs.values() if key in m), "?")
    return f"{count('num_train')} training images, {count('num_samples')} validation images"


TIMED_BY = "benchmark_seconds.json"  # in a run folder: which StepSeconds file holds the run's wall time


class StepSeconds(dict):
    """Each step's wall seconds, kept in a JSON file so that a benchmark run again after a stop still reports the
    steps it skips as done. A run resumed after a stop adds its time to what the step had; a run started over
    replaces it. Beside it (`.machines.json`), each step's stretches: their seconds, when they ended and the
    machine they ran on (benchmarks/machine.py), as a step resumed in another session may run on another CPU.

    A training step's run folder names the file that timed it (TIMED_BY), and each run is counted once, in the
    file of the script that trained it: a script that finds the run done and timed by another (the MAE that
    linear_probe.py pretrained, which finetune_fmnist.py finetunes) drops any time it had for that step (an older
    run's)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.machines_path = self.path.with_suffix(".machines.json")
        super().__init__(json.loads(self.path.read_text()) if self.path.is_file() else {})
        # {step: [{"seconds", "ended", "machine"}]}; a step timed before machines were recorded has none
        self.stretches: dict[str, list[dict]] = (json.loads(self.machines_path.read_text())
                                                 if self.machines_path.is_file() else {})
        self.touched: set[str] = set()  # the steps this invocation ran or found done

    def record(self, step: str, seconds: float, resumed: bool = False, out: Path | None = None) -> None:
        """`step` took `seconds` (added to its time when `resumed`); `out`: its run folder, marked as timed here."""
        self[step] = seconds + (self.get(step, 0.0) if resumed else 0.0)
        stretch = {"seconds": seconds, "ended": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                   "machine": describe_machine()}
        self.stretches[step] = [*(self.stretches.get(step, []) if resumed else []), stretch]
        self.touched.add(step)
        self._save()
        if out is not None and out.is_dir():
            (out / TIMED_BY).write_text(json.dumps({"step": step, "seconds_file": self.path.name}) + "\n")

    def found_done(self, step: str, out: Path) -> None:
        """`step`'s run in `out` is done and kept; a time of this file's for it is dropped if another file timed
        the run (a folder without the mark, from before it, keeps the time)."""
        self.touched.add(step)
        marker = out / TIMED_BY
        if step in self and marker.is_file() and json.loads(marker.read_text())["seconds_file"] != self.path.name:
            del self[step]
            self.stretches.pop(step, None)
            self._save()

    def with_earlier(self, earlier: dict[str, float]) -> dict[str, float]:
        """These times, with an earlier results file's for the steps this invocation did not touch (the other part
        of a --part run, rows kept from an older file)."""
        return {**{step: t for step, t in earlier.items() if step not in self.touched}, **self}

    def timing(self, earlier: dict | None = None) -> dict:
        """A results file's timing entries: {"seconds": {step: s}, "machines": {step: stretches}}, each with the
        earlier results file's (`earlier`) for the steps this invocation did not touch."""
        earlier = earlier or {}
        machines = {step: kept for step, kept in earlier.get("machines", {}).items() if step not in self.touched}
        return {"seconds": self.with_earlier(earlier.get("seconds", {})), "machines": {**machines, **self.stretches}}

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for path, content in ((self.path, dict(self)), (self.machines_path, self.stretches)):
            partial = path.with_suffix(".partial")
            partial.write_text(json.dumps(content, indent=2) + "\n")
            os.replace(partial, path)  # never a half-written file after a kill


# the benchmarks' 54,000 / 6,000 split of Fashion-MNIST's 60,000 training images (data.split_val_indices tells
# which images are held out, e.g. for benchmarks/detr_fmnist.py's held-out canvases)
VAL_FRACTION, SPLIT_SEED = 0.1, 0


def write_split(fashion_mnist: str | Path, shards: Path, seconds: StepSeconds) -> None:
    """`shards/train` (54,000) and `shards/val` (6,000, seed 0) from the IDX files, unless already written."""
    if (shards / "val" / "stats.json").is_file():
        return
    src = Path(fashion_mnist)
    seconds.record("write shards", run("shards", data_main, [
        "idx", "--images", str(src / "train-images-idx3-ubyte.gz"), "--labels", str(src / "train-labels-idx1-ubyte.gz"),
        "--out", str(shards), "--val-fraction", str(VAL_FRACTION), "--seed", str(SPLIT_SEED), "--shard-size", "5000",
        "--no-progress", "--overwrite",
        "--classes", ",".join(FASHION_MNIST_CLASSES),
    ]))


def prepare_shards(fashion_mnist: str | Path, shards: Path, smoke: bool, seconds: StepSeconds) -> None:
    """The benchmarks' shards: the bundled 2,700 / 300 images for a smoke run, else the 54,000 / 6,000 split."""
    if smoke:
        from data import ensure_embedded_shards

        ensure_embedded_shards(shards)
    else:
        write_split(fashion_mnist, shards, seconds)
