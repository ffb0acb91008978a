"""Does masked-image pretraining help the small Swin's finetuning? Fashion-MNIST (54k train / 6k held-out val), on CPU.

The small Swin (3 stages 48/96/192-d, window 4: the encoder of both ummae_swin_tiny_cpu and simmim_swin_tiny_cpu) is
pretrained by UM-MAE and by SimMIM, then finetuned from each checkpoint and from scratch with one recipe and budget
(configs/finetune_swin_tiny_fmnist.yaml; the scratch run has no layer-wise lr decay, which only makes sense for
pretrained layers). The bar: each pretrained Swin finishes above the one trained from scratch.

    python benchmarks/swin_fmnist.py --fashion-mnist ../shared/datasets/fashion-mnist --json runs/bench_fmnist/swin.json
    python benchmarks/swin_fmnist.py --smoke        # minutes: the bundled 3k images, a few steps per run
    python benchmarks/swin_fmnist.py --part SimMIM --json docs/results/swin.json   # SimMIM's runs only

`--part UM-MAE` / `--part SimMIM` reruns that method's pretraining and finetuning alone and keeps the other
method's and the from-scratch run's figures from the --json file it updates.

Steps (each skipped when its output exists; an interrupted run resumes from its latest checkpoint):
1. `python -m data idx` writes the 54,000 / 6,000 split as shards (as benchmarks/linear_probe.py; reused).
2. `python -m pretrain` trains UM-MAE (configs/ummae_swin_tiny_fmnist.yaml) and SimMIM
   (configs/simmim_swin_tiny_fmnist.yaml); a run is done once its reconstructions.png is written (a run of another
   recipe starts over).
3. `python -m finetune` finetunes (configs/finetune_swin_tiny_fmnist.yaml) from UM-MAE, from SimMIM and from scratch.
4. The table of the three, and the pretraining runs' final loss and k-NN monitor (top-1 by step).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# benchmarks/, first on sys.path when run as a script
from finetune_fmnist import SMOKE, finetune, summary  # noqa: E402
from fmnist_steps import StepSeconds, image_counts, prepare_shards, pretrain, pretrained_weights  # noqa: E402

PRETRAIN_CONFIGS = {"UM-MAE": REPO / "configs/ummae_swin_tiny_fmnist.yaml",
                    "SimMIM": REPO / "configs/simmim_swin_tiny_fmnist.yaml"}
PRETRAIN_DIRS = {"UM-MAE": "ummae_swin", "SimMIM": "simmim_swin"}
FINETUNE_CONFIG = REPO / "configs/finetune_swin_tiny_fmnist.yaml"
SCRATCH = "from scratch"
# --smoke pretraining: a small picture, and the k-NN monitor on a few of the bundled images
SMOKE_PRETRAIN = ["num_pictures=2", "eval.max_images=100", "eval.max_bank_images=256"]


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fashion-mnist", default=str(REPO.parent / "shared/datasets/fashion-mnist"),
                        help="folder with train-images-idx3-ubyte.gz and train-labels-idx1-ubyte.gz")
    parser.add_argument("--work-dir", default=None, help="default: runs/bench_fmnist (--smoke: runs/bench_swin_smoke)")
    parser.add_argument("--pretrain-epochs", type=positive, default=None,
                        help="override the pretraining configs' epochs (a finished pretraining run is kept)")
    parser.add_argument("--finetune-epochs", type=positive, default=None,
                        help="override the finetuning config's epochs")
    parser.add_argument("--part", choices=("all", *PRETRAIN_CONFIGS), default="all",
                        help="one method's runs alone; the other runs' figures are kept from the --json file")
    parser.add_argument("--smoke", action="store_true", help="tiny: bundled images, 1 epoch of 256 images per run")
    parser.add_argument("--json", help="also write the figures as JSON to this path")
    args = parser.parse_args()
    earlier = {"pretraining": {}, "rows": []}
    if args.part != "all":
        if not (args.json and Path(args.json).is_file()):
            parser.error(f"--part {args.part} keeps the other runs' figures from an earlier --json file: "
                         f"{args.json or 'no --json given'} does not exist")
        earlier = json.loads(Path(args.json).read_text())
    rerun = set(PRETRAIN_CONFIGS) if args.part == "all" else {args.part}
    earlier_runs = {row["initialisation"]: row for row in earlier["rows"]}

    work = Path(args.work_dir or ("runs/bench_swin_smoke" if args.smoke else "runs/bench_fmnist"))
    shards = work / "shards"
    seconds = StepSeconds(work / "seconds" / "swin_fmnist.json")
    prepare_shards(args.fashion_mnist, shards, args.smoke, seconds)
    common = [f"data.train={shards / 'train'}", f"data.val={shards / 'val'}", *(SMOKE if args.smoke else [])]

    def epochs_of(config: Path, override: int | None) -> int:
        return 1 if args.smoke else override or yaml.safe_load(config.read_text())["train"]["epochs"]

    pretrained = {
        method: {"config": str(config.relative_to(REPO)), "epochs": epochs_of(config, args.pretrain_epochs),
                 **pretrain(f"{method} pretraining", config, work / PRETRAIN_DIRS[method],
                            [f"train.epochs={epochs_of(config, args.pretrain_epochs)}", *common,
                             *(SMOKE_PRETRAIN if args.smoke else [])], seconds)}
        if method in rerun else earlier["pretraining"][method]
        for method, config in PRETRAIN_CONFIGS.items()
    }

    finetune_epochs = epochs_of(FINETUNE_CONFIG, args.finetune_epochs)
    runs = {
        f"{method} pretrained": finetune(f"finetune from {method}", FINETUNE_CONFIG, work / f"finetune_{folder}",
                                         [*common, f"encoder.checkpoint={work / folder}"], finetune_epochs, seconds,
                                         inputs=(pretrained_weights(work / folder),))
        if method in rerun else earlier_runs[f"{method} pretrained"]
        for method, folder in PRETRAIN_DIRS.items()
    }
    runs[SCRATCH] = (finetune("train from scratch", FINETUNE_CONFIG, work / "finetune_scratch_swin",
                              [*common, "encoder.checkpoint=null", "layer_decay=null"], finetune_epochs, seconds)
                     if args.part == "all" else earlier_runs[SCRATCH])

    result = {
        "benchmark": "small Swin finetuning on Fashion-MNIST (54k train / 6k held-out val), UM-MAE / SimMIM vs scratch"
                     + (" [SMOKE: bundled 2.7k/300 images, 256 images per run]" if args.smoke else ""),
        "pretraining": pretrained,
        "finetune": {"config": str(FINETUNE_CONFIG.relative_to(REPO)), "epochs": finetune_epochs},
        "rows": [{"initialisation": name, **summary(m)} for name, m in runs.items()],
        "summary": summary_rows(runs),
        **seconds.timing(earlier),  # each step's seconds and machines; a --part run keeps the other part's
    }
    print(f"\nSwin finetuning, {finetune_epochs} epoch(s), {image_counts(runs)}\n")
    print("| initialisation | top-1 (%) | top-5 (%) | best top-1 (%) (epoch) |\n|---|---|---|---|")
    for name, m in runs.items():
        print(f"| {name} | {m['top1']:.2f} | {m['top5']:.2f} | {m['best_top1']:.2f} ({m['best_epoch']}) |")
    print()
    for method, p in pretrained.items():
        knn = ", ".join(f"{step}: {top1:.2f}" for step, top1 in p["knn_top1"]) or "none"
        print(f"{method}: {p['steps']} steps, final loss {p['final_loss']:.4f}; k-NN monitor (top-1 %, by step): {knn}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))


def summary_rows(finetuned: dict[str, dict]) -> list[dict]:
    """The results picture's rows (benchmarks/results_chart.py): each pretrained Swin finetuned against the same Swin
    trained from scratch with the same budget (last epochs); the issue's bar is the scratch top-1 itself."""
    scratch = finetuned[SCRATCH]["top1"]
    return [{"row": f"{method} Swin -> finetune", "metric": "top-1 (%)",
             "value": finetuned[f"{method} pretrained"]["top1"], "target": scratch,
             "target_label": "from scratch", "baselines": {"same Swin from scratch": scratch}}
            for method in PRETRAIN_CONFIGS]


if __name__ == "__main__":
    main()
