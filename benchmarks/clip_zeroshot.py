"""Zero-shot quality of a small CLIP trained on CPU: Fashion-MNIST images with captions written from their labels,
evaluated on held-out images with prompt ensembles (10 product-photo templates, the CLIP paper's 80, open_clip's
7; none of them a caption phrasing), each against its own templates used one at a time, with everyday class names
and with the data set's label names; and image<->text retrieval (recall@1/5/10) on the held-out images with
captions written the same way, with the monitor's R@1 after every epoch (the budget's effect).

    python benchmarks/clip_zeroshot.py --fashion-mnist ../shared/datasets/fashion-mnist --json runs/bench_clip/zeroshot.json

Steps (each skipped when its output already exists, so an interrupted benchmark continues):
1. `python -m data idx` writes 54,000 training / 6,000 held-out validation images as labelled shards (the split of
   benchmarks/linear_probe.py: the same --work-dir reuses them).
2. `python -m data captions` turns the training shards into image-text shards (data/captions.py), and the
   validation shards into held-out pairs (WORK/clip_pairs_val); pairs of an older caption recipe are written again.
3. `python -m pretrain` trains CLIP (configs/clip_vit_tiny_fmnist.yaml) on the pairs; when the config starts the
   image tower from an MAE (`model.image_tower_checkpoint`), that is the benchmarks' Fashion-MNIST MAE (WORK/mae,
   configs/mae_vit_tiny_fmnist.yaml), pretrained first if need be. A CLIP run of another recipe, or begun before
   the MAE or the caption shards were last written, starts over.
4. `python -m finetune` evaluates zero-shot on the validation shards, once per prompt set, and retrieval on the
   held-out pairs (every one of the 6,000 a candidate); the tables are printed.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data.__main__ import main as data_main  # noqa: E402
from data.captions import CAPTION_RECIPE  # noqa: E402
from finetune.cli import main as finetune_main  # noqa: E402
from pretrain.cli import main as pretrain_main  # noqa: E402
from pretrain.config import CLIPPretrainConfig  # noqa: E402

# benchmarks/, first on sys.path when run as a script
from fmnist_steps import (MAE_CONFIG, StepSeconds, pretrain, pretrained_weights, run, run_or_resume,  # noqa: E402
                          write_split)

CLIP_CONFIG = REPO / "configs/clip_vit_tiny_fmnist.yaml"

CLASS_NAMES = REPO / "configs/fashion_mnist_classnames.txt"  # everyday words ("t-shirt", "trousers", ...)
TEMPLATES = REPO / "configs/fashion_mnist_templates.txt"  # 10 templates for grey product photos
# prompt set name -> (`templates`, `classes`) of the zero-shot config; an ensemble's metrics also hold each of its
# templates' own top-1, measured on the same pass (whether the ensemble beats its single prompts)
PROMPT_SETS = {
    "ensemble: 10 product-photo templates (configs/fashion_mnist_templates.txt)": (str(TEMPLATES), str(CLASS_NAMES)),
    "ensemble: the CLIP paper's 80 templates": ("openai", str(CLASS_NAMES)),
    "ensemble: open_clip's 7 'simple' templates": ("simple", str(CLASS_NAMES)),
    "single template 'a photo of a {}.'": ("a photo of a {}.", str(CLASS_NAMES)),
    "the 80 templates with the data set's own label names ('T-shirt/top', 'Trouser', ...)": ("openai", "stats"),
}
CHANCE = 10.0  # 10 classes
ENSEMBLE_GAIN_TARGET = 1.0  # issue 16: the ensemble >= 1 point above the mean of its templates used one at a time
ZERO_SHOT_TARGET = 88.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fashion-mnist", default=str(REPO.parent / "shared/datasets/fashion-mnist"),
                        help="folder with train-images-idx3-ubyte.gz and train-labels-idx1-ubyte.gz")
    parser.add_argument("--work-dir", default="runs/bench_fmnist")
    parser.add_argument("--epochs", type=int, default=None, help="override the CLIP config's epochs")
    parser.add_argument("--json", help="also write the figures as JSON to this path")
    args = parser.parse_args()

    work = Path(args.work_dir)
    shards, pairs, val_pairs, clip_dir = work / "shards", work / "clip_pairs", work / "clip_pairs_val", work / "clip"
    seconds = StepSeconds(work / "seconds" / "clip_zeroshot.json")
    write_split(args.fashion_mnist, shards, seconds)
    for split, out in (("train", pairs), ("val", val_pairs)):
        stats = out / "stats.json"
        if not stats.is_file() or json.loads(stats.read_text()).get("captions") != CAPTION_RECIPE:
            seconds.record(f"caption shards ({split})", run(f"captions ({split})", data_main, [
                "captions", "--shards", str(shards / split), "--out", str(out), "--shard-size", "5000",
                "--no-progress", "--overwrite"]))
    train_clip(work, clip_dir, args.epochs, seconds)

    rows = []
    for index, (name, (templates, classes)) in enumerate(PROMPT_SETS.items()):
        out = work / f"zeroshot_{index}"
        argv = ["--config", str(REPO / "configs/zeroshot_clip_tiny_demo.yaml"), f"output_dir={out}",
                "train.overwrite=true", f"model.checkpoint={clip_dir}", f"data.val={shards / 'val'}",
                f"classes={classes}",
                f"templates={json.dumps(templates)}"]  # quoted: a bare {} would read as an empty YAML mapping
        seconds.record(f"zero-shot: {name}", run(f"zero-shot {name}", finetune_main, argv))
        metrics = json.loads((out / "metrics.json").read_text())
        rows.append({"prompts": name, "templates": metrics["num_templates"], "top1": metrics["top1"],
                     "top5": metrics["top5"], "val_images": metrics["num_samples"],
                     "per_class_top1": metrics["per_class_top1"],
                     **{key: metrics[key] for key in ("mean_single_template_top1", "best_single_template_top1",
                                                      "ensemble_minus_mean_single", "per_template_top1")
                        if key in metrics}})

    retrieval_dir = work / "retrieval"
    seconds.record("retrieval", run("retrieval", finetune_main, [
        "--config", str(REPO / "configs/retrieval_clip_tiny_demo.yaml"), f"output_dir={retrieval_dir}",
        "train.overwrite=true", f"model.checkpoint={clip_dir}", f"data.val={val_pairs}"]))
    retrieval = json.loads((retrieval_dir / "metrics.json").read_text())
    retrieval.pop("config")

    log = [json.loads(line) for line in (clip_dir / "log.jsonl").read_text().splitlines()]
    # the monitor's figures after every epoch (its first 1,000 validation images and pairs): the budget's effect
    history = json.loads((clip_dir / "metrics.json").read_text())["history"]
    print(f"\nCLIP: {log[-1]['step']} steps, final loss {log[-1]['loss']:.3f}, logit scale {log[-1]['logit_scale']:.1f}, "
          f"in-batch image->text accuracy {log[-1]['image_to_text_acc']:.3f}\n")
    print("| prompts | templates | top-1 (%) | top-5 (%) | mean single template (%) | ensemble - mean single |"
          "\n|---|---:|---:|---:|---:|---:|")
    for row in rows:
        single = (f"{row['mean_single_template_top1']:.2f} | {row['ensemble_minus_mean_single']:+.2f}"
                  if "mean_single_template_top1" in row else "- | -")
        print(f"| {row['prompts']} | {row['templates']} | {row['top1']:.2f} | {row['top5']:.2f} | {single} |")
    best = rows[0]["per_class_top1"]
    print(f"\nper class ({rows[0]['prompts']}): " + ", ".join(f"{c} {a:.0f}" for c, a in best.items()))
    print("\nthe monitor after each epoch (1,000 validation images / held-out pairs):\n")
    print("| epoch | zero-shot top-1 (%) | image->text R@1 (%) | text->image R@1 (%) |\n|---:|---:|---:|---:|")
    for record in history:
        print(f"| {record['epoch']} | {record['zeroshot_top1']:.1f} | {record['image_to_text_R@1']:.2f} | "
              f"{record['text_to_image_R@1']:.2f} |")
    print(f"\nretrieval among {retrieval['num_pairs']} held-out pairs (captions name the class and one or two visual "
          f"words, which many images share, so R@1 is bounded well below 100)")
    print("| direction | R@1 (%) | R@5 (%) | R@10 (%) | median rank |\n|---|---:|---:|---:|---:|")
    for direction in ("image_to_text", "text_to_image"):
        recalls = " | ".join(f"{retrieval[f'{direction}_R@{k}']:.2f}" for k in (1, 5, 10))
        print(f"| {direction.replace('_to_', ' -> ')} | {recalls} | {retrieval[f'{direction}_median_rank']:g} |")
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"rows": rows, "retrieval": retrieval, "monitor_history": history,
                                    "clip_final_log": log[-1], "summary": summary_rows(rows, retrieval),
                                    **seconds.timing()}, indent=2) + "\n")
        print(f"\nwrote {path}")


def train_clip(work: Path, clip_dir: Path, epochs: int | None, seconds: StepSeconds,
               config: Path = CLIP_CONFIG) -> None:
    """Train (or resume, or keep) the CLIP of `config` in `clip_dir` on WORK's pairs."""
    shards, pairs, val_pairs = work / "shards", work / "clip_pairs", work / "clip_pairs_val"
    overrides = [f"output_dir={clip_dir}", f"data.train={pairs}", f"data.val={val_pairs}",
                 f"eval.zeroshot_shards={shards / 'val'}"]
    inputs: tuple[Path, ...] = (pairs / "stats.json",)  # captions rewritten since: start over
    if yaml.safe_load(config.read_text())["model"].get("image_tower_checkpoint"):
        # the image tower starts from the benchmarks' Fashion-MNIST MAE, pretrained first if need be
        mae_dir = work / "mae"
        pretrain("MAE pretraining", MAE_CONFIG, mae_dir, [f"data.train={shards / 'train'}",
                                                          f"data.val={shards / 'val'}"], seconds)
        overrides.append(f"model.image_tower_checkpoint={mae_dir}")
        inputs += (pretrained_weights(mae_dir),)
    if epochs:
        overrides.append(f"train.epochs={epochs}")
    run_or_resume("CLIP pretraining", pretrain_main, CLIPPretrainConfig, config, clip_dir, overrides,
                  lambda: (clip_dir / "open_clip" / "open_clip_model.safetensors").is_file(), seconds, inputs=inputs)


def summary_rows(rows: list[dict], retrieval: dict) -> list[dict]:
    """The results picture's rows (benchmarks/results_chart.py): the product-photo ensemble's zero-shot top-1
    against chance, the same figure against its own templates used one at a time (its target: their mean + 1), and
    retrieval R@1 both ways."""
    ensemble = rows[0]
    mean_single = ensemble["mean_single_template_top1"]
    return [
        {"row": "CLIP zero-shot, prompt ensemble", "metric": "top-1 (%)", "value": ensemble["top1"],
         "target": ZERO_SHOT_TARGET, "baselines": {"chance": CHANCE}},
        {"row": "CLIP ensemble vs its templates", "metric": "top-1 (%)", "value": ensemble["top1"],
         "target": mean_single + ENSEMBLE_GAIN_TARGET, "target_label": "mean single + 1",
         "baselines": {"mean single template": mean_single,
                       "best single template": ensemble["best_single_template_top1"]}},
        {"row": "CLIP retrieval, image->text R@1", "metric": "R@1 (%)", "value": retrieval["image_to_text_R@1"],
         "target": None, "baselines": {"text->image R@1": retrieval["text_to_image_R@1"],
                                       "chance": 100.0 / retrieval["num_pairs"]}},
    ]


if __name__ == "__main__":
    main()
