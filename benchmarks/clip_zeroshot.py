"""Zero-shot quality of a small CLIP trained on CPU: Fashion-MNIST images with captions written from their labels,
evaluated on held-out images with a prompt ensemble (the CLIP paper's 80 templates, none of them a caption
phrasing) against single prompt templates; and image<->text retrieval (recall@1/5/10) on the held-out images with
captions written the same way.

    python benchmarks/clip_zeroshot.py --fashion-mnist ../shared/datasets/fashion-mnist --json runs/bench_clip/zeroshot.json

Steps (each skipped when its output already exists, so an interrupted benchmark continues):
1. `python -m data idx` writes 54,000 training / 6,000 held-out validation images as labelled shards (the split of
   benchmarks/linear_probe.py: the same --work-dir reuses them).
2. `python -m data captions` turns the training shards into image-text shards (data/captions.py), and the
   validation shards into held-out pairs (WORK/clip_pairs_val).
3. `python -m pretrain` trains CLIP (configs/clip_vit_tiny_fmnist.yaml) on the pairs.
4. `python -m finetune` evaluates zero-shot on the validation shards, once per prompt set, and retrieval on the
   held-out pairs (every one of the 6,000 a candidate); the tables are printed.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data.__main__ import main as data_main  # noqa: E402
from finetune.cli import main as finetune_main  # noqa: E402
from pretrain.cli import main as pretrain_main  # noqa: E402

from fmnist_steps import run, write_split  # noqa: E402  (benchmarks/, first on sys.path when run as a script)

# prompt set name -> `templates` setting of the zero-shot config
PROMPT_SETS = {
    "ensemble: 80 OpenAI templates": "openai",
    "ensemble: 7 open_clip 'simple' templates": "simple",
    "single template 'a photo of a {}.'": "a photo of a {}.",
    "single template '{}'": "{}",
}


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
    seconds: dict[str, float] = {}
    write_split(args.fashion_mnist, shards, seconds)
    for split, out in (("train", pairs), ("val", val_pairs)):
        if not (out / "stats.json").is_file():
            seconds[f"caption shards ({split})"] = run(f"captions ({split})", data_main, [
                "captions", "--shards", str(shards / split), "--out", str(out), "--shard-size", "5000",
                "--no-progress", "--overwrite"])
    pretrain_argv = ["--config", str(REPO / "configs/clip_vit_tiny_fmnist.yaml"), f"output_dir={clip_dir}",
                     f"data.train={pairs}", f"data.val={val_pairs}", f"eval.zeroshot_shards={shards / 'val'}"]
    if args.epochs:
        pretrain_argv.append(f"train.epochs={args.epochs}")
    if not (clip_dir / "open_clip" / "open_clip_model.safetensors").is_file():
        # an interrupted run continues from its latest checkpoint; one that wrote none starts over
        started = (clip_dir / "checkpoints").is_dir() and any((clip_dir / "checkpoints").glob("step_*"))
        pretrain_argv.append("train.resume=latest" if started else "train.overwrite=true")
        seconds["CLIP pretraining"] = run("pretrain", pretrain_main, pretrain_argv)

    rows = []
    for name, templates in PROMPT_SETS.items():
        out = work / ("zeroshot_" + "".join(c if c.isalnum() else "_" for c in templates)[:30])
        argv = ["--config", str(REPO / "configs/zeroshot_clip_tiny_demo.yaml"), f"output_dir={out}",
                "train.overwrite=true", f"model.checkpoint={clip_dir}", f"data.val={shards / 'val'}",
                f"templates={json.dumps(templates)}"]  # quoted: a bare {} would read as an empty YAML mapping
        seconds[f"zero-shot: {name}"] = run(f"zero-shot {name}", finetune_main, argv)
        metrics = json.loads((out / "metrics.json").read_text())
        rows.append({"prompts": name, "templates": metrics["num_templates"], "top1": metrics["top1"],
                     "top5": metrics["top5"], "val_images": metrics["num_samples"],
                     "per_class_top1": metrics["per_class_top1"]})

    retrieval_dir = work / "retrieval"
    seconds["retrieval"] = run("retrieval", finetune_main, [
        "--config", str(REPO / "configs/retrieval_clip_tiny_demo.yaml"), f"output_dir={retrieval_dir}",
        "train.overwrite=true", f"model.checkpoint={clip_dir}", f"data.val={val_pairs}"])
    retrieval = json.loads((retrieval_dir / "metrics.json").read_text())
    retrieval.pop("config")

    log = [json.loads(line) for line in (clip_dir / "log.jsonl").read_text().splitlines()]
    print(f"\nCLIP: {log[-1]['step']} steps, final loss {log[-1]['loss']:.3f}, logit scale {log[-1]['logit_scale']:.1f}, "
          f"in-batch image->text accuracy {log[-1]['image_to_text_acc']:.3f}\n")
    print("| prompts | templates | top-1 (%) | top-5 (%) |\n|---|---:|---:|---:|")
    for row in rows:
        print(f"| {row['prompts']} | {row['templates']} | {row['top1']:.2f} | {row['top5']:.2f} |")
    best = rows[0]["per_class_top1"]
    print("\nper class (80-template ensemble): " + ", ".join(f"{c} {a:.0f}" for c, a in best.items()))
    print(f"\nretrieval among {retrieval['num_pairs']} held-out pairs (captions name only the class, so R@1 is "
          f"bounded well below 100)")
    print("| direction | R@1 (%) | R@5 (%) | R@10 (%) | median rank |\n|---|---:|---:|---:|---:|")
    for direction in ("image_to_text", "text_to_image"):
        recalls = " | ".join(f"{retrieval[f'{direction}_R@{k}']:.2f}" for k in (1, 5, 10))
        print(f"| {direction.replace('_to_', ' -> ')} | {recalls} | {retrieval[f'{direction}_median_rank']:g} |")
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"rows": rows, "retrieval": retrieval, "clip_final_log": log[-1],
                                    "seconds": seconds}, indent=2) + "\n")
        print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
