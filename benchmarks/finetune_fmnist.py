"""Full finetuning and DeiT distillation on Fashion-MNIST (54k train / 6k held-out val), on CPU.

(a) Does MAE pretraining help finetuning? The tiny ViT finetuned from the MAE checkpoint vs the same ViT trained
    from scratch with the same budget (same recipe, epochs and batch; the scratch run has no layer-wise lr decay,
    which only makes sense for pretrained layers).
(b) DeiT: a ResNet-18 trained from scratch on the images upsampled to 64 px is the teacher (DeiT distils from a
    convnet); a smaller ViT (4 blocks, 128-d, 32 px) is trained from scratch with no distillation, soft distillation
    and hard distillation (the last two with a distillation token, the teacher fed the students' images resized),
    same budget.

    python benchmarks/finetune_fmnist.py --fashion-mnist ../shared/datasets/fashion-mnist --json runs/bench_fmnist/finetune.json
    python benchmarks/finetune_fmnist.py --smoke        # minutes: the bundled 3k images, a few steps per run
    python benchmarks/finetune_fmnist.py --part distillation --json runs/bench_fmnist/finetune.json  # (b) only

`--part finetune` / `--part distillation` runs (a) / (b) alone and keeps the other part's figures from the --json
file it updates (the whole script is longer than a working session on 2 cores).

Steps (each skipped when its output exists; an interrupted run resumes from its latest checkpoint):
1. `python -m data idx` writes the 54,000 / 6,000 split as shards (as benchmarks/linear_probe.py; reused).
2. `python -m pretrain` trains MAE (configs/mae_vit_tiny_fmnist.yaml; runs/bench_fmnist/mae is reused).
3. `python -m finetune` finetunes (configs/finetune_mae_tiny_fmnist.yaml) from MAE and from scratch.
4. `python -m finetune` trains the teacher (configs/teacher_cnn_fmnist.yaml), then the students
   (configs/distill_vit_tiny_fmnist.yaml, distillation.kind=none/soft/hard).
A run whose folder holds a run of another recipe (its saved config differs), or one begun before the weights it
reads were last written (a student's teacher, a finetune's MAE), starts over.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from finetune.cli import main as finetune_main  # noqa: E402
from finetune.config import FinetuneConfig  # noqa: E402
from pretrain.checkpoint import find_latest  # noqa: E402

# benchmarks/, first on sys.path when run as a script
from fmnist_steps import (MAE_CONFIG, StepSeconds, image_counts, prepare_shards, pretrain,  # noqa: E402
                          pretrained_weights, run_or_resume)

FINETUNE_CONFIG = REPO / "configs/finetune_mae_tiny_fmnist.yaml"
DISTILL_CONFIG = REPO / "configs/distill_vit_tiny_fmnist.yaml"
TEACHER_CONFIG = REPO / "configs/teacher_cnn_fmnist.yaml"
# --smoke: every run a few steps on the bundled images (2,700 train / 300 val), no worker processes
SMOKE = ["data.samples_per_epoch=256", "train.batch_size=32", "data.num_workers=0", "data.shuffle_buffer=64",
         "train.log_every=4", "logging.progress_bar=false", "logging.wandb=disabled"]


def finetune(step: str, config: Path, out: Path, overrides: list[str], epochs: int, seconds: StepSeconds,
             inputs: tuple[Path, ...] = ()) -> dict:
    """Run (or resume, or skip) one `python -m finetune` run into `out`; its metrics.json. A run that `out` holds
    from another recipe (its config.yaml differs), or that began before the weights it reads (`inputs`: a teacher,
    a pretrained encoder) were written, starts over: a rerun saves to the same step folder when its epochs are
    unchanged, so the path alone cannot tell."""
    metrics_file = out / "metrics.json"
    run_or_resume(step, finetune_main, FinetuneConfig, config, out,
                  [f"output_dir={out}", f"train.epochs={epochs}", *overrides],
                  lambda: metrics_file.is_file() and json.loads(metrics_file.read_text()).get("epochs") == epochs,
                  seconds, inputs=inputs)
    return json.loads(metrics_file.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fashion-mnist", default=str(REPO.parent / "shared/datasets/fashion-mnist"),
                        help="folder with train-images-idx3-ubyte.gz and train-labels-idx1-ubyte.gz")
    parser.add_argument("--work-dir", default=None, help="default: runs/bench_fmnist (--smoke: runs/bench_finetune_smoke)")
    parser.add_argument("--finetune-epochs", type=int, default=None, help="override the finetuning config's epochs")
    parser.add_argument("--distill-epochs", type=int, default=None, help="override the distillation config's epochs")
    parser.add_argument("--part", choices=("all", "finetune", "distillation"), default="all",
                        help="run (a) or (b) alone; the other part's figures are kept from the --json file")
    parser.add_argument("--smoke", action="store_true", help="tiny: bundled images, 1 epoch of 256 images per run")
    parser.add_argument("--json", help="also write the figures as JSON to this path")
    args = parser.parse_args()
    earlier = {}
    if args.part != "all":
        if not (args.json and Path(args.json).is_file()):
            parser.error(f"--part {args.part} keeps the other part's figures from an earlier --json file: "
                         f"{args.json or 'no --json given'} does not exist")
        earlier = json.loads(Path(args.json).read_text())

    work = Path(args.work_dir or ("runs/bench_finetune_smoke" if args.smoke else "runs/bench_fmnist"))
    shards = work / "shards"
    seconds = StepSeconds(work / "seconds" / "finetune_fmnist.json")
    prepare_shards(args.fashion_mnist, shards, args.smoke, seconds)
    common = [f"data.train={shards / 'train'}", f"data.val={shards / 'val'}", *(SMOKE if args.smoke else [])]

    def epochs_of(config: Path, override: int | None) -> int:
        return 1 if args.smoke else override or yaml.safe_load(config.read_text())["train"]["epochs"]

    if args.part == "distillation":
        part_a = earlier["finetune"]
    else:
        part_a = finetune_part(work, common, epochs_of(FINETUNE_CONFIG, args.finetune_epochs), args.smoke, seconds)
    if args.part == "finetune":
        part_b = earlier["distillation"]
    else:
        part_b = distillation_part(work, common, epochs_of(TEACHER_CONFIG, None),
                                   epochs_of(DISTILL_CONFIG, args.distill_epochs), seconds)

    result = {
        "benchmark": "finetuning and DeiT distillation on Fashion-MNIST (54k train / 6k held-out val)"
                     + (" [SMOKE: bundled 2.7k/300 images, 256 images per run]" if args.smoke else ""),
        "finetune": part_a,
        "distillation": part_b,
        "summary": summary_rows(part_a["runs"], part_b["teacher"], part_b["runs"]),
        **seconds.timing(earlier),  # each step's seconds and machines; a --part run keeps the other part's
    }
    runs_a, teacher, runs_b = part_a["runs"], part_b["teacher"], part_b["runs"]
    print(f"\n(a) finetuning, {part_a['epochs']} epoch(s), {image_counts(runs_a)}\n")
    print("| initialisation | top-1 (%) | top-5 (%) | best top-1 (%) (epoch) |\n|---|---|---|---|")
    for name, m in runs_a.items():
        print(f"| {name} | {m['top1']:.2f} | {m['top5']:.2f} | {m['best_top1']:.2f} ({m['best_epoch']}) |")
    print(f"\n(b) DeiT distillation, {part_b['epochs']} epoch(s) of {part_b['training_images_per_epoch']} images; "
          f"teacher: {teacher['model']} trained {teacher['epochs']} epoch(s), last weights, top-1 "
          f"{teacher['top1']:.2f}%\n")
    print("| student distillation | top-1 (%) | top-5 (%) | class head top-1 (%) | distillation head top-1 (%) |"
          "\n|---|---|---|---|---|")
    for kind, m in runs_b.items():
        heads = (f"{m['cls_top1']:.2f} | {m['dist_top1']:.2f}" if "cls_top1" in m else "- | -")
        print(f"| {kind} | {m['top1']:.2f} | {m['top5']:.2f} | {heads} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))


def finetune_part(work: Path, common: list[str], epochs: int, smoke: bool, seconds: StepSeconds) -> dict:
    """(a) MAE -> finetune against the same ViT from scratch, same budget (the MAE pretrained first if needed)."""
    mae_dir = work / "mae"
    pretrain("MAE pretraining", MAE_CONFIG, mae_dir,
             [*common, *(["train.epochs=1", "num_pictures=2", "eval.every_epochs=0"] if smoke else [])], seconds)
    runs = {
        "MAE pretrained": finetune("finetune from MAE", FINETUNE_CONFIG, work / "finetune_mae",
                                   [*common, f"encoder.checkpoint={mae_dir}"], epochs, seconds,
                                   inputs=(pretrained_weights(mae_dir),)),
        "from scratch": finetune("train from scratch", FINETUNE_CONFIG, work / "finetune_scratch",
                                 [*common, "encoder.checkpoint=null", "layer_decay=null"], epochs, seconds),
    }
    return {"config": str(FINETUNE_CONFIG.relative_to(REPO)), "epochs": epochs,
            "runs": {name: summary(m) for name, m in runs.items()}}


def distillation_part(work: Path, common: list[str], teacher_epochs: int, epochs: int, seconds: StepSeconds) -> dict:
    """(b) DeiT: a convnet trained from scratch teaches a smaller ViT trained from scratch, with no, soft and hard
    distillation and the same budget."""
    teacher_dir = work / "teacher_cnn"
    teacher = finetune("train the teacher", TEACHER_CONFIG, teacher_dir, common, teacher_epochs, seconds)
    # the teacher's last checkpoint, not its best/ weights: those were chosen on the validation split the students
    # are measured on
    teacher_weights = find_latest(teacher_dir / "checkpoints")
    runs = {
        kind: finetune(f"student, distillation {kind}", DISTILL_CONFIG, work / f"distill_{kind}",
                       [*common, f"distillation.kind={kind}",
                        f"distillation.teacher={teacher_weights if kind != 'none' else 'null'}"],
                       epochs, seconds, inputs=(teacher_weights,) if kind != "none" else ())
        for kind in ("none", "soft", "hard")
    }
    return {"config": str(DISTILL_CONFIG.relative_to(REPO)), "epochs": epochs,
            "training_images_per_epoch": runs["none"]["num_train"],
            "teacher": {"config": str(TEACHER_CONFIG.relative_to(REPO)), "weights": str(teacher_weights),
                        **summary(teacher)},
            "runs": {kind: summary(m) for kind, m in runs.items()}}


FINETUNE_TARGET = 93.0  # issue 16's target for MAE -> finetune
TEACHER_TARGET = 93.0  # ... for the DeiT teacher
DISTILLATION_GAIN_TARGET = 1.0  # ... and for the hard-distilled student over the same student without


def summary_rows(finetuned: dict[str, dict], teacher: dict, students: dict[str, dict]) -> list[dict]:
    """The results picture's rows (benchmarks/results_chart.py): MAE -> finetune against the same ViT from scratch,
    the DeiT teacher, and the hard-distilled student against no distillation, soft distillation and its teacher
    (last epochs)."""
    return [
        {"row": "MAE tiny ViT -> finetune", "metric": "top-1 (%)", "value": finetuned["MAE pretrained"]["top1"],
         "target": FINETUNE_TARGET, "baselines": {"same ViT from scratch": finetuned["from scratch"]["top1"]}},
        {"row": "DeiT teacher (ResNet-18 from scratch)", "metric": "top-1 (%)", "value": teacher["top1"],
         "target": TEACHER_TARGET, "baselines": {}},
        {"row": "DeiT student, hard distillation", "metric": "top-1 (%)", "value": students["hard"]["top1"],
         "target": students["none"]["top1"] + DISTILLATION_GAIN_TARGET,
         "target_label": f"no distillation + {DISTILLATION_GAIN_TARGET:g}",
         "baselines": {"no distillation": students["none"]["top1"], "soft distillation": students["soft"]["top1"],
                       "teacher": teacher["top1"]}},
    ]


def summary(metrics: dict) -> dict:
    keys = ("top1", "top5", "best_top1", "best_epoch", "cls_top1", "dist_top1", "epochs", "steps", "model",
            "classifier", "num_train", "num_samples")
    return {k: metrics[k] for k in keys if k in metrics} | {"history": [
        {k: h[k] for k in ("epoch", "top1", "train_loss") if k in h} for h in metrics["history"]]}


if __name__ == "__main__":
    main()
