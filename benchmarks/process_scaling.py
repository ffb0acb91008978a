"""Two processes of one thread against one process of two threads, for the same global batch (gloo on CPU).

    python benchmarks/process_scaling.py [--objectives mae clip] [--steps 40] [--rounds 2] [--json PATH]

Each row is a real run (`python -m pretrain`, or `torchrun --nproc_per_node 2 -m pretrain`) of the demo config
(`configs/mae_vit_tiny_demo.yaml`, `configs/clip_vit_tiny_demo.yaml`) for `--steps` steps at the config's global
batch (2 processes: half of it each), without evaluation or pictures; images/s is the run's own figure for the
second half of the steps. Rows alternate over `--rounds` rounds; the best of each is kept (the machine is shared).
Scaling efficiency = images/s of 2 x 1 thread / images/s of 1 x 2 threads: above 1, processes use the cores
better than intra-op threads do.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"mae": REPO / "configs" / "mae_vit_tiny_demo.yaml", "clip": REPO / "configs" / "clip_vit_tiny_demo.yaml"}
GLOBAL_BATCH = 128  # both demo configs' train.batch_size


def run(objective: str, processes: int, threads: int, steps: int, out: Path, extra: list[str]) -> float:
    """images/s over the second half of `steps` steps of one run."""
    launcher = [sys.executable, "-m", "pretrain"] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", "-m", "pretrain"]
    args = ["--config", str(CONFIGS[objective]), f"output_dir={out}", f"train.batch_size={GLOBAL_BATCH // processes}",
            f"train.stop_after_steps={steps}", f"train.log_every={steps // 2}", "train.save_every=1000000",
            "train.mixed_precision=no", "logging.wandb=disabled", "logging.progress_bar=false", "data.val=null",
            "train.overwrite=true", *extra]
    args += ["eval.every_epochs=0"] if objective == "clip" else ["num_pictures=0"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run(launcher + args, check=True, env=env, cwd=REPO, stdout=subprocess.DEVNULL)
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return float(records[-1]["images_per_s"])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objectives", nargs="+", choices=sorted(CONFIGS), default=["mae", "clip"])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides for every run")
    parser.add_argument("--json", help="also write the figures as JSON to this path")
    args = parser.parse_args(argv)

    layouts = [(1, 2), (2, 1)]  # (processes, threads per process)
    rates: dict[tuple[str, int, int], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="process_scaling_") as root:
        for _ in range(args.rounds):
            for objective in args.objectives:
                for processes, threads in layouts:
                    out = Path(root) / f"{objective}_{processes}x{threads}"
                    rates.setdefault((objective, processes, threads), []).append(
                        run(objective, processes, threads, args.steps, out, args.set))
    print(f"Demo runs, global batch {GLOBAL_BATCH}, float32, second half of {args.steps} steps, best of "
          f"{args.rounds} rounds\n")
    print("| objective | layout | images/s | vs 1 process x 2 threads | rounds |")
    print("|---|---|---:|---:|---|")
    rows = []
    for objective in args.objectives:
        base = max(rates[(objective, 1, 2)])
        for processes, threads in layouts:
            best = max(rates[(objective, processes, threads)])
            rows.append(dict(objective=objective, processes=processes, threads=threads, images_per_s=best,
                             efficiency=best / base, rounds=rates[(objective, processes, threads)]))
            print(f"| {objective} | {processes} process(es) x {threads} thread(s) | {best:.1f} | {best / base:.2f} | "
                  f"{', '.join(f'{r:.1f}' for r in rates[(objective, processes, threads)])} |")
    result = {"global_batch": GLOBAL_BATCH, "steps": args.steps, "rows": rows}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
