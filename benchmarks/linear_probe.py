"""Frozen-feature quality on Fashion-MNIST: MAE-pretrained encoder vs the same encoder randomly initialised vs raw
pixels, each under the MAE paper's linear probe (BatchNorm + Linear, LARS), the CLIP paper's (L-BFGS logistic
regression, C swept on a validation part of the training set) and DINO's k-NN (k=20); for the MAE encoder also
the feature choice (class token, average patch token, both) under the L-BFGS probe and k-NN; for raw pixels also
scikit-learn's LogisticRegression with the same C and the same standardisation, as a check of our L-BFGS.

    python benchmarks/linear_probe.py --fashion-mnist ../shared/datasets/fashion-mnist --json runs/bench/probe.json
    python benchmarks/linear_probe.py --encoders pixels --skip-pretrain     # the raw-pixel rows only
    python benchmarks/linear_probe.py --encoders mae --keep-rows --json docs/results/probe.json
        # a new MAE's rows; the raw-pixel and random-init rows (which do not depend on it) kept from the --json file

Steps (each skipped when its output already exists and is newer than what it reads, so an interrupted benchmark
continues and a retrained MAE is exported and probed again; delete a folder to redo its step):
1. `python -m data idx` writes 54,000 training / 6,000 held-out validation images as shards.
2. `python -m pretrain` trains MAE (configs/mae_vit_tiny_fmnist.yaml) on the training split (an interrupted run
   resumes); with --skip-pretrain an unfinished WORK_DIR/mae is left alone and the MAE rows are skipped.
3. `python -m finetune task=features` writes each encoder's features once (WORK_DIR/features/NAME/{train,val}).
4. `python -m finetune` probes them from those folders: configs/linprobe_fmnist.yaml (protocol mae; its base lr
   the best of a sweep on a 10% split of the training features, benchmarks/probe_lr.py),
   configs/linprobe_lbfgs_fmnist.yaml (protocol lbfgs), configs/knn_fmnist.yaml (k=20), each into
   WORK_DIR/<probe>_<features>/ (its metrics.json is reused on a rerun); then scikit-learn on the raw pixels.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data import FASHION_MNIST_MEAN, FASHION_MNIST_STD  # noqa: E402
from finetune.cli import main as finetune_main  # noqa: E402
# benchmarks/, first on sys.path when run as a script
from fmnist_steps import (MAE_CONFIG, StepSeconds, pretrain, pretrained_weights, pretraining_summary,  # noqa: E402
                          run, write_split, written_after)
from probe_lr import LRS, sweep_base_lr  # noqa: E402

ENCODERS = ("mae", "random", "pixels")  # the feature extractors, in the order of the rows
# the probes: (name, config, overrides) -- each reads the features of one export below
PROBES = [
    ("MAE protocol (LARS)", "mae", REPO / "configs/linprobe_fmnist.yaml", []),
    ("L-BFGS protocol", "lbfgs", REPO / "configs/linprobe_lbfgs_fmnist.yaml", []),
    ("k-NN (k=20)", "knn", REPO / "configs/knn_fmnist.yaml", ["k=[20]"]),
]


def export(name: str, features_dir: Path, data: list[str], encoder: list[str], seconds: StepSeconds,
           inputs: tuple[Path, ...] = ()) -> Path:
    """`python -m finetune task=features` for both splits into features_dir/name, unless done after the weights it
    reads (`inputs`) were written."""
    out = features_dir / name
    if written_after(out / "train" / "index.json", inputs) and written_after(out / "val" / "index.json", inputs):
        print(f"\n== features {name}: done earlier ({out})")
    else:
        argv = ["task=features", f"output_dir={out}", "train.overwrite=true", "logging.wandb=disabled",
                "logging.progress_bar=false", "train.batch_size=512", *data, *encoder]
        seconds.record(f"features: {name}", run(f"features {name}", finetune_main, argv))
    return out


def probe(step: str, config: Path, out: Path, features: Path, overrides: list[str], expect: dict,
          seconds: StepSeconds) -> dict:
    """One `python -m finetune` probe of the feature folders `features`/{train,val} into `out`, or its earlier
    metrics.json when that has the `expect`ed values."""
    metrics_file = out / "metrics.json"
    exported = (features / "train" / "index.json", features / "val" / "index.json")
    if written_after(metrics_file, exported) and all(json.loads(metrics_file.read_text()).get(key) == value
                                                    for key, value in expect.items()):
        print(f"\n== {step}: done earlier ({metrics_file})")
    else:
        argv = ["--config", str(config), f"output_dir={out}", "train.overwrite=true", "logging.progress_bar=false",
                f"train_features={features / 'train'}", f"val_features={features / 'val'}", *overrides]
        seconds.record(step, run(step, finetune_main, argv))
    return json.loads(metrics_file.read_text())


def scikit_learn_probe(features: Path, C: float, out: Path, seconds: StepSeconds) -> dict:
    """scikit-learn's LogisticRegression(C) (lbfgs, max_iter and tol as our L-BFGS probe's config) on the same
    standardised features (finetune.logistic.Standardiser, the training features' statistics), or its earlier
    metrics.json."""
    metrics_file = out / "metrics.json"
    if metrics_file.is_file() and json.loads(metrics_file.read_text())["C"] == C:
        print(f"\n== scikit-learn: done earlier ({metrics_file})")
        return json.loads(metrics_file.read_text())
    try:
        from sklearn.linear_model import LogisticRegression
    except ImportError:
        raise SystemExit("the scikit-learn row needs scikit-learn: pip install -e '.[bench]'") from None
    import yaml

    from finetune.feature_export import read_feature_files
    from finetune.logistic import Standardiser

    settings = yaml.safe_load((REPO / "configs/linprobe_lbfgs_fmnist.yaml").read_text()).get("lbfgs", {})
    max_iter, tol = settings.get("max_iter", 1000), float(settings.get("tol", 1e-4))
    print(f"\n== scikit-learn LogisticRegression(C={C:.4g}, max_iter={max_iter}, tol={tol}) on {features}", flush=True)
    train, train_labels, _ = read_feature_files(features / "train")
    val, val_labels, _ = read_feature_files(features / "val")
    standardise = Standardiser.of(train.double())
    start = time.perf_counter()
    model = LogisticRegression(C=C, max_iter=max_iter, tol=tol).fit(standardise(train.double()).numpy(),
                                                                     train_labels.numpy())
    seconds.record("scikit-learn", time.perf_counter() - start)
    predictions = model.predict(standardise(val.double()).numpy())
    metrics = {"C": C, "top1": 100.0 * float((predictions == val_labels.numpy()).mean()),
               "iterations": int(model.n_iter_.max()), "max_iter": max_iter, "tol": tol,
               "num_train": len(train), "num_samples": len(val), "seconds": seconds["scikit-learn"]}
    out.mkdir(parents=True, exist_ok=True)
    metrics_file.write_text(json.dumps(metrics, indent=2))
    return metrics


def mae_model_name() -> str:
    """The architecture the MAE config pretrains (the random-init row's ViT)."""
    import yaml

    return yaml.safe_load(MAE_CONFIG.read_text())["model"]["name"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fashion-mnist", default=str(REPO.parent / "shared/datasets/fashion-mnist"),
                        help="folder with train-images-idx3-ubyte.gz and train-labels-idx1-ubyte.gz")
    parser.add_argument("--work-dir", default="runs/bench_fmnist")
    parser.add_argument("--encoders", default="mae,random,pixels",
                        help="comma list of the encoders to probe: mae, random, pixels")
    parser.add_argument("--skip-pretrain", action="store_true",
                        help="never train MAE here: without a finished WORK_DIR/mae, skip the MAE rows")
    parser.add_argument("--pretrain-epochs", type=int, default=None, help="override the MAE config's epochs")
    parser.add_argument("--probe-epochs", type=int, default=None, help="override the MAE-protocol probe's epochs")
    parser.add_argument("--keep-rows", action="store_true",
                        help="keep the rows of the encoders not in --encoders from the --json file")
    parser.add_argument("--json", help="also write the figures as JSON to this path")
    args = parser.parse_args()
    encoders = [name.strip() for name in args.encoders.split(",") if name.strip()]
    unknown = set(encoders) - set(ENCODERS)
    if unknown:
        parser.error(f"--encoders: unknown {', '.join(sorted(unknown))} (choose from {', '.join(ENCODERS)})")
    earlier = {}
    if args.keep_rows:
        if not (args.json and Path(args.json).is_file()):
            parser.error(f"--keep-rows keeps the other encoders' rows from an earlier --json file: "
                         f"{args.json or 'no --json given'} does not exist")
        earlier = json.loads(Path(args.json).read_text())

    work = Path(args.work_dir)
    shards = work / "shards"
    seconds = StepSeconds(work / "seconds" / "linear_probe.json")
    write_split(args.fashion_mnist, shards, seconds)
    data = [f"data.train={shards / 'train'}", f"data.val={shards / 'val'}"]
    # the exports see the images as the probe configs' data sections do (32 px, no crop, Fashion-MNIST's statistics)
    export_data = [*data, "data.image_size=32", "data.eval_crop_fraction=1.0",
                   f"data.mean={list(FASHION_MNIST_MEAN)}", f"data.std={list(FASHION_MNIST_STD)}"]
    mae_dir, mae_config = work / "mae", MAE_CONFIG
    mae = None
    if "mae" in encoders:
        if args.skip_pretrain and not (mae_dir / "reconstructions.png").is_file():  # written when pretraining ends
            print(f"\n== MAE rows skipped: {mae_dir} holds no finished pretraining run (--skip-pretrain)")
            encoders.remove("mae")
        elif args.skip_pretrain:
            print(f"\n== MAE pretraining: kept as it is ({mae_dir}, --skip-pretrain)")
            mae = {"config": str(mae_config.relative_to(REPO)), **pretraining_summary(mae_dir)}
        else:
            mae = {"config": str(mae_config.relative_to(REPO)),
                   **pretrain("MAE pretraining", mae_config, mae_dir,
                              [*data, *([f"train.epochs={args.pretrain_epochs}"] if args.pretrain_epochs else [])],
                              seconds)}

    # (row label, export name, encoder overrides, probes): the MAE encoder's class token is the pooled feature
    # the MAE paper probes; its average patch token and both together under the L-BFGS probe and k-NN
    mae_encoder = ["encoder.source=mae", f"encoder.checkpoint={mae_dir}"]
    feature_sets = {
        "mae": [("MAE pretrained, cls", "mae_cls", [*mae_encoder, "feature.pool=cls"], PROBES),
                ("MAE pretrained, avg", "mae_avg", [*mae_encoder, "feature.pool=avg"], PROBES[1:]),
                ("MAE pretrained, cls+avg", "mae_cls+avg", [*mae_encoder, "feature.pool=cls+avg"], PROBES[1:])],
        "random": [("random init (same ViT), cls", "random_cls", ["encoder.source=mae", "encoder.checkpoint=null",
                                                                  f"encoder.model_name={mae_model_name()}",
                                                                  "feature.pool=cls"], PROBES)],
        "pixels": [("raw pixels", "pixels", ["encoder.source=pixels", "encoder.checkpoint=null"], PROBES)],
    }
    rows_of = {}  # encoder -> its rows
    for encoder in encoders:
        rows = rows_of[encoder] = []
        for label, name, encoder_args, probes in feature_sets[encoder]:
            features = export(name, work / "features", export_data, encoder_args, seconds,
                              inputs=(pretrained_weights(mae_dir),) if encoder == "mae" else ())
            for probe_label, kind, config, overrides in probes:
                expect, lr_sweep = {}, None
                if kind == "mae":  # its base lr: the best of a sweep on a split of the training features
                    base_lr, lr_sweep = sweep_base_lr(features, LRS, config, epochs=args.probe_epochs)
                    expect = {"base_lr": base_lr}
                    overrides = [*overrides, f"optim.base_lr={base_lr}"]
                    if args.probe_epochs:
                        expect["epochs"] = args.probe_epochs
                        overrides.append(f"train.epochs={args.probe_epochs}")
                metrics = probe(f"{probe_label}: {label}", config, work / f"{kind}_{name}", features, overrides,
                                expect, seconds)
                result = metrics["k"]["20"] if kind == "knn" else metrics
                rows.append({"features": label, "probe": probe_label, "dim": metrics["feature_dim"],
                             "top1": result["top1"], "top5": result["top5"], "C": metrics.get("C"),
                             "base_lr": metrics.get("base_lr"), "lr_sweep": lr_sweep,
                             "val_images": metrics.get("num_samples", metrics.get("num_test")),
                             "train_images": metrics["num_train"]})
            if encoder == "pixels":
                ours = next(row for row in rows if row["features"] == label and row["C"] is not None)  # L-BFGS
                reference = scikit_learn_probe(features, ours["C"], work / "sklearn_pixels", seconds)
                rows.append({"features": label, "probe": "scikit-learn LogisticRegression (same C, same "
                             "standardisation)", "dim": ours["dim"], "top1": reference["top1"], "top5": None,
                             "C": reference["C"], "val_images": reference["num_samples"],
                             "train_images": reference["num_train"],
                             "top1_minus_ours": reference["top1"] - ours["top1"]})

    kept = [encoder for encoder in ENCODERS if encoder not in rows_of] if args.keep_rows else []
    rows = with_kept_rows(rows_of, earlier.get("rows", []), kept,
                          {encoder: [entry[0] for entry in feature_sets[encoder]] for encoder in ENCODERS})
    result = {
        "benchmark": "frozen features on Fashion-MNIST (54k train / 6k held-out val from the 60k training set)",
        "mae": earlier.get("mae") if "mae" in kept else mae,
        "rows": rows,
        "kept_from_earlier": kept,  # encoders whose rows were read from the --json file, not measured by this run
        "summary": summary_rows(rows),
        **seconds.timing(earlier),  # each step's seconds and machines; kept rows keep their steps'
    }
    print("\n| features | probe | dim | top-1 (%) | top-5 (%) |\n|---|---|---|---|---|")
    for row in rows:
        probe_label = row["probe"] + (f", C={row['C']:.3g}" if row["C"] is not None else "") + \
            (f", base lr {row['base_lr']:g}" if row.get("base_lr") is not None else "")
        top5 = "" if row["top5"] is None else f"{row['top5']:.2f}"
        difference = f" ({row['top1_minus_ours']:+.2f} vs ours)" if "top1_minus_ours" in row else ""
        print(f"| {row['features']} | {probe_label} | {row['dim']} | {row['top1']:.2f}{difference} | {top5} |")
    sweeps = [row for row in rows if row.get("lr_sweep")]  # the MAE-protocol rows (not the scikit-learn one)
    if sweeps:
        print("\nMAE-protocol base lr, held-out top-1 (%) on a 10% split of the training features "
              "(benchmarks/probe_lr.py):\n")
        print("| features | " + " | ".join(f"{entry['base_lr']:g}" for entry in sweeps[0]["lr_sweep"]) + " |")
        print("|---|" + "---|" * len(sweeps[0]["lr_sweep"]))
        for row in sweeps:
            print(f"| {row['features']} | " + " | ".join(f"{entry['top1']:.2f}" for entry in row["lr_sweep"]) + " |")
    if result["mae"]:
        knn = result["mae"]["knn_top1"]
        print(f"\nMAE: {result['mae']['steps']} steps, final loss {result['mae']['final_loss']:.4f}; k-NN monitor "
              f"(top-1 %, by step): {', '.join(f'{step}: {top1:.2f}' for step, top1 in knn)}")
    if rows:
        print(f"validation images: {rows[0]['val_images']}, training images: {rows[0]['train_images']}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))


def with_kept_rows(rows_of: dict[str, list[dict]], earlier_rows: list[dict], kept: list[str],
                   labels_of: dict[str, list[str]]) -> list[dict]:
    """All rows in the encoders' order: those measured now, and for each encoder in `kept` its rows (by feature
    label) from an earlier run's JSON."""
    rows = []
    for encoder in ENCODERS:
        if encoder in kept:
            rows += [row for row in earlier_rows if row["features"] in labels_of[encoder]]
        else:
            rows += rows_of.get(encoder, [])
    return rows


LINEAR = ("MAE protocol (LARS)", "L-BFGS protocol")
TARGETS = {"linear": 88.0, "knn": 85.0}  # issue 16's targets for the MAE tiny ViT


def summary_rows(rows: list[dict]) -> list[dict]:
    """The results picture's rows (benchmarks/results_chart.py): the MAE encoder's best linear probe and best k-NN
    over its feature choices, each against the same probe of raw pixels and of the random-init ViT."""
    def best(features: str, probes) -> float | None:
        scores = [row["top1"] for row in rows if row["features"].startswith(features) and row["probe"] in probes]
        return max(scores) if scores else None

    summary = []
    for kind, probes, label in (("linear", LINEAR, "linear probe"), ("knn", ("k-NN (k=20)",), "k-NN (k=20)")):
        value = best("MAE pretrained", probes)
        if value is None:
            continue
        baselines = {name: best(features, probes) for name, features in (("raw pixels", "raw pixels"),
                                                                         ("random init", "random init"))}
        summary.append({"row": f"MAE tiny ViT, {label}", "metric": "top-1 (%)", "value": value,
                        "target": TARGETS[kind],
                        "baselines": {name: score for name, score in baselines.items() if score is not None}})
    return summary


if __name__ == "__main__":
    main()
