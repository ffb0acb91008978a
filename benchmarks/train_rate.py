"""End-to-end training rate against the step alone: does the data pipeline starve the step?

    python benchmarks/train_rate.py [--config configs/mae_vit_tiny_demo.yaml] [--steps 40] [--workers 0 1 2]
                                    [--rounds 2] [--compile] [--set key=value ...] [--json PATH]

Every row runs the same loop (`pretrain.engine.Trainer`: the config's model, task, optimizer, schedule, logging)
for `--steps` steps of the config's batch; images/s is the loop's own figure for the second half of the steps (the
first half, with its warm-up and the workers' start, is not counted):

- "step only": the batches come from memory (decoded and augmented once, beforehand), so the rate is the step's;
- "end to end, N workers": the batches come from the shards through the config's transform, `data.num_workers=N`
  DataLoader worker processes (0: decoded in the training process, between steps);
- "step only, torch.compile" (`--compile`): the first row with `train.compile=true`; its first step compiles, so
  give it enough `--steps` that the compiling falls in the uncounted first half.

A last figure, "the data path alone", times the training stream read in this process with no step (what 0
workers add to each step). Rows alternate over `--rounds` rounds; the best round of each row is kept (the machine
is shared), and each round's end to end / step only ratio (a paired figure: the two ran minutes apart) gives a
median over the rounds.
The figure to read is end to end / step only (issue 18: >= 0.9 for the demo's tiny ViT on 2 cores).
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data import mae_train_transform  # noqa: E402
from pretrain.config import MAEPretrainConfig, load_config  # noqa: E402
from pretrain.engine import Trainer  # noqa: E402
from pretrain.run import setup_run, training_loader_factory  # noqa: E402
from pretrain.tasks import MAETask  # noqa: E402
from pretrain.train_mae import build_model, model_metadata  # noqa: E402


def run_config(config: str, out: Path, steps: int, workers: int, overrides: list[str]) -> MAEPretrainConfig:
    return load_config(MAEPretrainConfig, config, [*overrides, f"output_dir={out}", f"data.num_workers={workers}",
                                                 f"train.stop_after_steps={steps}", f"train.log_every={steps // 2}",
                                                 "train.save_every=1000000", "logging.wandb=disabled",
                                                 "logging.progress_bar=false", "train.overwrite=true"])


def train_transform(cfg: MAEPretrainConfig):
    return mae_train_transform(cfg.data.image_size, scale=cfg.data.crop_scale, mean=cfg.data.mean, std=cfg.data.std)


def measure(config: str, root: Path, steps: int, workers: int | None, overrides: list[str]) -> float:
    """images/s of the second half of `steps` steps; workers None: batches from memory."""
    out = root / ("memory" if workers is None else f"workers_{workers}")
    cfg = run_config(config, out, steps, 0 if workers is None else workers, overrides)
    run = setup_run(cfg)
    model = build_model(cfg)
    transform = train_transform(cfg)
    make_loader = None
    if workers is None:
        stream = training_loader_factory(run.train_shards, transform, cfg.data, cfg.train)(0, 0, 1)
        cached = list(itertools.islice(iter(stream), 8))
        make_loader = lambda start_batch, rank, world_size: itertools.cycle(cached)  # noqa: E731
    trainer = Trainer.from_config(cfg, run, model=model, task=MAETask(cfg.model.mask_ratio), transform=transform,
                                  model_metadata=model_metadata(model, cfg.model.name, "mae"), make_loader=make_loader)
    trainer.fit()
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return float(records[-1]["images_per_s"])


def measure_data_only(config: str, root: Path, steps: int, overrides: list[str]) -> float:
    """images/s of the training stream alone, read in this process (0 workers) with no step: `steps // 2` batches
    timed after two. What 0 workers add to every step is the step's batch size over this rate."""
    cfg = run_config(config, root / "data_only", steps, 0, overrides)
    run = setup_run(cfg)
    transform = train_transform(cfg)
    batches = iter(training_loader_factory(run.train_shards, transform, cfg.data, cfg.train)(0, 0, 1))
    for _ in range(2):
        next(batches)
    timed = max(1, steps // 2)
    start = time.perf_counter()
    images = sum(len(next(batches)["image"]) for _ in range(timed))
    return images / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "mae_vit_tiny_demo.yaml"))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="also the step-only row under train.compile=true")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    parser.add_argument("--json", help="also write the figures as JSON to this path")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import torch

    root = Path(tempfile.mkdtemp(prefix="train_rate_"))
    rows: dict[str, list[float]] = {}
    data_only: list[float] = []
    try:
        for _ in range(args.rounds):
            for workers in [None, *args.workers]:
                name = "step only (batches in memory)" if workers is None else f"end to end, {workers} workers"
                rows.setdefault(name, []).append(measure(args.config, root, args.steps, workers, args.set))
                _reset_accelerate()
            if args.compile:
                rows.setdefault("step only, torch.compile (train.compile)", []).append(
                    measure(args.config, root, args.steps, None, [*args.set, "train.compile=true"]))
                _reset_accelerate()
            data_only.append(measure_data_only(args.config, root, args.steps, args.set))
            _reset_accelerate()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    step_rounds = rows["step only (batches in memory)"]
    step_only = max(step_rounds)
    batch_size = load_config(MAEPretrainConfig, args.config, args.set).train.batch_size
    print(f"Training rate of {args.config} {' '.join(args.set)} (batch {batch_size}), "
          f"second half of {args.steps} steps, best of {args.rounds} rounds, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads\n")
    print("| rows | images/s (best) | vs step only (best) | vs step only (median of rounds) | rounds |")
    print("|---|---:|---:|---:|---|")
    table = []
    for name, rates in rows.items():
        best = max(rates)
        paired = statistics.median(rate / step for rate, step in zip(rates, step_rounds))
        table.append(dict(row=name, images_per_s=best, vs_step_only=best / step_only,
                          vs_step_only_median=paired, rounds=rates))
        print(f"| {name} | {best:.1f} | {best / step_only:.2f} | {paired:.2f} | {', '.join(f'{r:.1f}' for r in rates)} |")
    share = statistics.median(step / data for data, step in zip(data_only, step_rounds))
    print(f"\nThe data path alone (0 workers, no step, {torch.get_num_threads()} threads): "
          f"{', '.join(f'{r:.0f}' for r in data_only)} images/s, {1000 / max(data_only):.3f} ms an image; "
          f"it adds {share:.1%} to the step's time when it runs in the training process (median of rounds)")
    result = {"config": args.config, "overrides": args.set, "steps": args.steps, "rows": table,
              "data_only_images_per_s": data_only, "data_only_vs_step_time": share}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


def _reset_accelerate() -> None:
    """accelerate keeps one process-wide state; each row builds its own Accelerator."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


if __name__ == "__main__":
    main()
