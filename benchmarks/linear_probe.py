"""Linear-probe quality on Fashion-MNIST: MAE-pretrained encoder vs the same encoder randomly initialised vs raw
pixels, each under the same probe (BatchNorm + Linear, LARS, no augmentation).

    python benchmarks/linear_probe.py --fashion-mnist ../shared/datasets/fashion-mnist --json runs/bench/probe.json

Steps (each skipped when its output already exists, so an interrupted benchmark continues):
1. `python -m data idx` writes 54,000 training / 6,000 held-out validation images as shards.
2. `python -m pretrain` trains MAE (configs/mae_vit_tiny_fmnist.yaml) on the training split.
3. `python -m finetune` probes the three encoders (configs/linprobe_fmnist.yaml) and the table is printed.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from finetune.cli import main as finetune_main  # noqa: E402
from pretrain.cli import main as pretrain_main  # noqa: E402

from fmnist_steps import run, write_split  # noqa: E402  (benchmarks/, first on sys.path when run as a script)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fashion-mnist", default=str(REPO.parent / "shared/datasets/fashion-mnist"),
                        help="folder with train-images-idx3-ubyte.gz and train-labels-idx1-ubyte.gz")
    parser.add_argument("--work-dir", default="runs/bench_fmnist")
    parser.add_argument("--pretrain-epochs", type=int, default=None, help="override the MAE config's epochs")
    parser.add_argument("--probe-epochs", type=int, default=None, help="override the probe config's epochs")
    parser.add_argument("--json", help="also write the figures as JSON to this path")
    args = parser.parse_args()

    work = Path(args.work_dir)
    shards = work / "shards"
    seconds: dict[str, float] = {}
    write_split(args.fashion_mnist, shards, seconds)
    data_overrides = [f"data.train={shards / 'train'}", f"data.val={shards / 'val'}"]
    mae_dir = work / "mae"
    pretrain_argv = ["--config", str(REPO / "configs/mae_vit_tiny_fmnist.yaml"), f"output_dir={mae_dir}", *data_overrides]
    if args.pretrain_epochs:
        pretrain_argv.append(f"train.epochs={args.pretrain_epochs}")
    if not (mae_dir / "reconstructions.png").is_file():
        seconds["MAE pretraining"] = run("pretrain", pretrain_main, pretrain_argv)

    probes = {
        "MAE pretrained": ["encoder.source=mae", f"encoder.checkpoint={mae_dir}"],
        "random init (same ViT)": ["encoder.source=mae", "encoder.checkpoint=null",
                                   "encoder.model_name=mae_vit_tiny_patch4"],
        "raw pixels": ["encoder.source=pixels", "encoder.checkpoint=null"],
    }
    rows = []
    for name, encoder_args in probes.items():
        out = work / ("probe_" + name.split()[0].lower())
        argv = ["--config", str(REPO / "configs/linprobe_fmnist.yaml"), f"output_dir={out}", "train.overwrite=true",
                *data_overrides, *encoder_args]
        if args.probe_epochs:
            argv.append(f"train.epochs={args.probe_epochs}")
        seconds[f"probe: {name}"] = run(f"probe {name}", finetune_main, argv)
        metrics = json.loads((out / "metrics.json").read_text())
        rows.append({"features": name, "dim": metrics["feature_dim"], "top1": metrics["top1"], "top5": metrics["top5"],
                     "val_images": metrics["num_samples"], "train_images": metrics["num_train"]})

    mae_log = [json.loads(line) for line in (mae_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    result = {
        "benchmark": "linear probe on Fashion-MNIST (54k train / 6k held-out val from the 60k training set)",
        "mae": {"config": "configs/mae_vit_tiny_fmnist.yaml", "steps": mae_log[-1]["step"], "final_loss": mae_log[-1]["loss"]},
        "probes": rows,
        "seconds": seconds,
    }
    print("\n| features | dim | top-1 (%) | top-5 (%) |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['features']} | {row['dim']} | {row['top1']:.2f} | {row['top5']:.2f} |")
    print(f"\nMAE: {result['mae']['steps']} steps, final loss {result['mae']['final_loss']:.4f}; "
          f"validation images: {rows[0]['val_images']}, training images: {rows[0]['train_images']}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
