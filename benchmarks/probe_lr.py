"""The MAE-protocol linear probe's learning rate, chosen without the evaluation data: the training features of an
export (`python -m finetune task=features`, e.g. the folders benchmarks/linear_probe.py writes) are split as the
L-BFGS probe splits them for its C sweep (sorted by sample key, 10% held out, seed 0: finetune.logistic's
validation_split), and configs/linprobe_fmnist.yaml (LARS, BatchNorm + Linear) is trained on the fit part at each
base lr and measured on the held-out part. The held-out validation shards are never read.

    python benchmarks/probe_lr.py --features runs/bench_fmnist/features/pixels --json runs/bench_fmnist/lr_pixels.json

benchmarks/linear_probe.py runs this sweep for each encoder's MAE-protocol row and probes with the best lr.

Each lr's run is kept in WORK_DIR/lr_<lr>/ (default: FEATURES/lr_sweep) and its metrics.json reused on a rerun.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from finetune.cli import main as finetune_main  # noqa: E402
from finetune.feature_export import INDEX_FILE, FeatureWriter, read_feature_files, read_feature_index  # noqa: E402
from finetune.feature_sets import FeatureSet  # noqa: E402
from finetune.logistic import validation_split  # noqa: E402

from fmnist_steps import run, written_after  # noqa: E402  (benchmarks/, first on sys.path when run as a script)

DEFAULT_CONFIG = REPO / "configs/linprobe_fmnist.yaml"
LRS = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0)  # LARS scales each step to 0.001 x lr x ||w||: wide, in half decades


def write_split(features: Path, out: Path, val_fraction: float, seed: int) -> tuple[Path, Path]:
    """features/train split into out/fit and out/holdout (feature folders), unless written earlier."""
    fit_dir, holdout_dir = out / "fit", out / "holdout"
    if (fit_dir / INDEX_FILE).is_file() and (holdout_dir / INDEX_FILE).is_file():
        return fit_dir, holdout_dir
    index = read_feature_index(features / "train")
    train = FeatureSet(*read_feature_files(features / "train"), encoder=index["encoder"], kind=index["feature"],
                       source=str(features / "train")).sorted_by_key()  # the order the L-BFGS probe splits
    for directory, part in zip((fit_dir, holdout_dir), validation_split(len(train.keys), val_fraction, seed)):
        directory.mkdir(parents=True, exist_ok=True)
        writer = FeatureWriter(directory, rank=0, chunk_size=10_000)
        rows = train.rows(part)
        writer.add(rows.features, rows.keys, rows.labels)
        chunks = writer.close()
        part_index = {**index, "count": len(part), "chunks": [{"file": c["file"], "rows": c["rows"]} for c in chunks],
                      "dtype": "float32", "split_of": str(features / "train"), "skipped": {}}
        (directory / INDEX_FILE).write_text(json.dumps(part_index, indent=2))
    return fit_dir, holdout_dir


def sweep_base_lr(features: Path, lrs: list[float], config: str | Path = DEFAULT_CONFIG, work: Path | None = None,
                  epochs: int | None = None) -> tuple[float, list[dict]]:
    """The MAE-protocol probe of `config` at each base lr, fit on the training features' fit part, measured on
    their held-out part -> (the best base lr, one row per lr in increasing order). Runs done earlier, after the
    features were last exported, are reused."""
    work = work or features / "lr_sweep"
    fit_dir, holdout_dir = write_split(features, work, val_fraction=0.1, seed=0)
    rows = []
    for lr in sorted(lrs):
        out = work / f"lr_{lr:g}"
        metrics_file = out / "metrics.json"
        overrides = [f"optim.base_lr={lr}"] + ([f"train.epochs={epochs}"] if epochs else [])
        done = (written_after(metrics_file, (features / "train" / INDEX_FILE,))
                and (not epochs or json.loads(metrics_file.read_text())["epochs"] == epochs))
        if not done:
            run(f"probe {features.name}, base_lr={lr:g}", finetune_main, [
                "--config", str(config), f"output_dir={out}", "train.overwrite=true", "logging.progress_bar=false",
                f"train_features={fit_dir}", f"val_features={holdout_dir}", *overrides])
        metrics = json.loads(metrics_file.read_text())
        rows.append({"base_lr": lr, "epochs": metrics["epochs"], "top1": metrics["top1"], "top5": metrics["top5"],
                     "final_train_loss": metrics["final_train_loss"], "num_fit": metrics["num_train"],
                     "num_holdout": metrics["num_samples"]})
    best = max(rows, key=lambda row: row["top1"])  # the smaller lr on a tie
    return best["base_lr"], rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--features", required=True, help="a feature export folder with train/")
    parser.add_argument("--lrs", default=",".join(f"{lr:g}" for lr in LRS), help="comma list of optim.base_lr values")
    parser.add_argument("--epochs", type=int, default=None, help="override the probe config's epochs")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--work-dir", default=None, help="default: FEATURES/lr_sweep")
    parser.add_argument("--json", help="also write the figures as JSON to this path")
    args = parser.parse_args()
    features = Path(args.features)
    lrs = [float(value) for value in args.lrs.split(",") if value.strip()]
    best, rows = sweep_base_lr(features, lrs, args.config, Path(args.work_dir) if args.work_dir else None,
                               args.epochs)
    print(f"\nMAE-protocol probe ({Path(args.config).name}) on {features}: fit {rows[0]['num_fit']}, "
          f"held out {rows[0]['num_holdout']} of the training features\n")
    print("| base lr | epochs | held-out top-1 (%) | final train loss |\n|---|---|---|---|")
    for row in rows:
        mark = " (best)" if row["base_lr"] == best else ""
        print(f"| {row['base_lr']:g}{mark} | {row['epochs']} | {row['top1']:.2f} | {row['final_train_loss']:.4f} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"features": str(features), "config": args.config, "rows": rows,
                                               "best_base_lr": best}, indent=2))


if __name__ == "__main__":
    main()
