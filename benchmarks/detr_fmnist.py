"""DETR on a synthetic detection set made of Fashion-MNIST items, on CPU, on the finetuned Fashion-MNIST MAE.

Each canvas (black, `--canvas` pixels square) holds 1-4 Fashion-MNIST items, each resized to a random size in
[--min-item, --max-item] pixels and placed at a random position (overlapping another item by at most 0.3 IoU);
a box is the tight box of the item's visible pixels, its category the item's class (ids 1-10). Training canvases use
items of the other benchmarks' 54,000 training images, held-out canvases items of their 6,000 held-out ones
(fmnist_steps.VAL_FRACTION / SPLIT_SEED), so that no backbone pretrained or finetuned on the 54,000 has seen a
held-out item. The set is written as COCO JSON + PNGs, then as detection shards through the data layer
(data.read_coco, data.write_detection_shards).

    python benchmarks/detr_fmnist.py --json runs/bench_detr/detr.json   # ~40 min on 2 CPU cores in bf16
    python benchmarks/detr_fmnist.py --smoke        # minutes: 64 + 16 canvases from the bundled images, 8 steps

Steps (each skipped when done; the DETR run resumes when interrupted and starts over for another recipe or a
backbone written since it began):
1. canvases, COCO JSON, shards (runs/bench_detr/coco, runs/bench_detr/shards/{train,val});
2. `python -m finetune --config configs/detr_vit_tiny_fmnist.yaml` on the config's backbone: the Fashion-MNIST MAE
   finetuned as a classifier, runs/bench_fmnist/finetune_mae (made by benchmarks/finetune_fmnist.py; --backbone
   another run; --smoke trains a tiny MAE for a few steps instead);
3. COCO AP of the held-out canvases (metrics.json) and boxes.png.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data import (  # noqa: E402
    FASHION_MNIST_CLASSES,
    ShardOptions,
    read_coco,
    read_embedded,
    read_idx,
    split_val_indices,
    write_detection_shards,
)
from finetune.cli import main as finetune_main  # noqa: E402
from finetune.config import DetrConfig  # noqa: E402
from pretrain.checkpoint import resolve_weights_file  # noqa: E402
from pretrain.config import load_config  # noqa: E402

# benchmarks/, first on sys.path when run as a script
from fmnist_steps import SPLIT_SEED, VAL_FRACTION, StepSeconds, run, run_or_resume  # noqa: E402

CONFIG = REPO / "configs/detr_vit_tiny_fmnist.yaml"
CATEGORIES = [{"id": index + 1, "name": name} for index, name in enumerate(FASHION_MNIST_CLASSES)]
MAX_OVERLAP = 0.3  # IoU an item may share with one placed before it
SMOKE = ["data.num_workers=0", "data.shuffle_buffer=16", "train.batch_size=8", "train.epochs=1",
         "train.log_every=2", "logging.progress_bar=false", "logging.wandb=disabled", "eval_batch_size=8",
         "num_pictures=4"]


def load_items(fashion_mnist: Path, smoke: bool) -> tuple[np.ndarray, np.ndarray, str]:
    """(images [N, 28, 28] uint8, labels [N], source): the 60,000 training images, or the bundled 3,000."""
    images_file = fashion_mnist / "train-images-idx3-ubyte.gz"
    if not smoke and images_file.is_file():
        source, name = read_idx(images_file, fashion_mnist / "train-labels-idx1-ubyte.gz"), str(fashion_mnist)
    else:
        source, name = read_embedded(), "the bundled 3,000 Fashion-MNIST images"
    import io

    _, samples = source
    images, labels = [], []
    for sample in samples:
        images.append(np.array(Image.open(io.BytesIO(sample.image_bytes)).convert("L")))
        labels.append(sample.label)
    return np.stack(images), np.asarray(labels), name


def _iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    w = max(0, min(ax + aw, bx + bw) - max(ax, bx))
    h = max(0, min(ay + ah, by + bh) - max(ay, by))
    return w * h / (aw * ah + bw * bh - w * h)


def make_canvas(rng: random.Random, images: np.ndarray, labels: np.ndarray, canvas: int, min_item: int,
                max_item: int) -> tuple[np.ndarray, list[tuple[list[float], int]]]:
    """A canvas [canvas, canvas] uint8 and its (tight box [x, y, w, h], category id) list."""
    pixels = np.zeros((canvas, canvas), dtype=np.uint8)
    placed: list[tuple[int, int, int, int]] = []
    objects = []
    for _ in range(rng.randint(1, 4)):
        for _attempt in range(20):
            size = rng.randint(min_item, max_item)
            x, y = rng.randint(0, canvas - size), rng.randint(0, canvas - size)
            if all(_iou((x, y, size, size), other) <= MAX_OVERLAP for other in placed):
                break
        else:
            continue
        index = rng.randrange(len(images))
        item = np.array(Image.fromarray(images[index]).resize((size, size), Image.BILINEAR))
        visible = np.argwhere(item > 10)
        if len(visible) == 0:
            continue
        (top, left), (bottom, right) = visible.min(0), visible.max(0) + 1
        pixels[y:y + size, x:x + size] = np.maximum(pixels[y:y + size, x:x + size], item)
        placed.append((x, y, size, size))
        objects.append(([float(x + left), float(y + top), float(right - left), float(bottom - top)],
                        int(labels[index]) + 1))
    return pixels, objects


def write_coco_split(name: str, count: int, images: np.ndarray, labels: np.ndarray, out: Path, args,
                     seed: int) -> Path:
    """`count` canvases as out/<name>/NNNNNN.png + out/instances_<name>.json (COCO format); the JSON path."""
    rng = random.Random(seed)
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    coco = {"images": [], "annotations": [], "categories": CATEGORIES}
    for image_id in range(1, count + 1):
        pixels, objects = make_canvas(rng, images, labels, args.canvas, args.min_item, args.max_item)
        file_name = f"{image_id:06d}.png"
        Image.fromarray(pixels).convert("RGB").save(folder / file_name)
        coco["images"].append({"id": image_id, "file_name": file_name, "width": args.canvas, "height": args.canvas})
        for box, category in objects:
            coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": image_id,
                                        "category_id": category, "bbox": box, "area": box[2] * box[3], "iscrowd": 0})
    annotations = out / f"instances_{name}.json"
    annotations.write_text(json.dumps(coco))
    return annotations


def make_dataset(work: Path, args) -> dict:
    """The canvases (COCO JSON + PNGs) and their shards, unless written earlier; a description."""
    shards = work / "shards"
    described = work / "coco" / "dataset.json"
    held_out_items = f"data.split_val_indices(val_fraction={VAL_FRACTION}, seed={SPLIT_SEED})"
    if (shards / "val" / "stats.json").is_file() and described.is_file():
        earlier = json.loads(described.read_text())
        if earlier.get("held_out_items") == held_out_items:
            print(f"\n== data: done earlier ({shards})")
            return earlier
        print(f"\n== data: {shards} holds canvases of an earlier item split: writing them again")
    images, labels, source = load_items(Path(args.fashion_mnist), args.smoke)
    # the items the other benchmarks hold out (of the bundled images in a smoke run, the embedded shards' split)
    held_out = np.zeros(len(images), dtype=bool)
    held_out[sorted(split_val_indices(len(images), VAL_FRACTION, SPLIT_SEED))] = True
    coco = work / "coco"
    description = {"items_from": source, "canvas": args.canvas, "item_size": [args.min_item, args.max_item],
                   "objects_per_image": [1, 4], "held_out_items": held_out_items, "splits": {}}
    for name, count, items, seed in (("train", args.train_images, ~held_out, 0),
                                     ("val", args.val_images, held_out, 1)):
        annotations = write_coco_split(name, count, images[items], labels[items], coco, args, seed)
        source_set = read_coco(annotations, coco / name)
        [written] = write_detection_shards(source_set.images, shards / name, source_set.categories,
                                           options=ShardOptions(shard_size=max(1, count // 4), progress=False,
                                                                overwrite=True))
        stats = written.stats
        description["splits"][name] = {"images": count, "boxes": stats["boxes"],
                                       "items": f"{items.sum()} of the {len(images)}"}
    described.write_text(json.dumps(description, indent=2))
    return description


def smoke_mae(work: Path) -> Path:
    """--smoke: a micro MAE trained for a few steps on the bundled images (the real run reuses the finetuned MAE)."""
    from pretrain.cli import main as pretrain_main

    mae = work / "mae"
    if not (mae / "checkpoints").is_dir():
        run("pretrain (smoke)", pretrain_main, [
            "--config", str(REPO / "configs/mae_vit_tiny_fmnist.yaml"), f"output_dir={mae}", f"data.cache_dir={work / 'embedded'}",
            "data.train=embedded", "data.val=embedded", "train.epochs=1", "data.samples_per_epoch=64",
            "train.batch_size=32", "data.num_workers=0", "num_pictures=0", "logging.wandb=disabled",
            "logging.progress_bar=false", "train.overwrite=true", "eval.every_epochs=0"])
    return mae


def train_detr(work: Path, backbone: Path, seconds: StepSeconds, overrides: list[str], smoke: bool = False) -> dict:
    """Run, resume or skip the DETR run into work/detr; its metrics.json. A run of another recipe (its config.yaml
    differs) or begun before the backbone's weights were last written (the finetune run again) starts over; a smoke
    run always does."""
    out = work / "detr"
    recipe = [f"output_dir={out}", f"data.train={work / 'shards/train'}", f"data.val={work / 'shards/val'}",
              f"encoder.checkpoint={backbone}", *(SMOKE + ["encoder.global_pool=null"] if smoke else []), *overrides]
    metrics_file = out / "metrics.json"
    epochs = load_config(DetrConfig, CONFIG, recipe).train.epochs
    run_or_resume("DETR training + evaluation", finetune_main, DetrConfig, CONFIG, out, recipe,
                  lambda: metrics_file.is_file() and json.loads(metrics_file.read_text()).get("epochs") == epochs,
                  seconds, inputs=() if smoke else (resolve_weights_file(backbone),), restart="an earlier smoke run" if smoke else None)
    return json.loads(metrics_file.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fashion-mnist", default=str(REPO.parent / "shared/datasets/fashion-mnist"),
                        help="folder with train-images-idx3-ubyte.gz and train-labels-idx1-ubyte.gz (absent: the bundled 3k)")
    parser.add_argument("--work-dir", default=None, help="default: runs/bench_detr (--smoke: runs/bench_detr_smoke)")
    parser.add_argument("--backbone", default=None,
                        help="the run the backbone comes from (default: the config's encoder.checkpoint)")
    parser.add_argument("--train-images", type=int, default=None, help="training canvases (default 4000; smoke 64)")
    parser.add_argument("--val-images", type=int, default=None, help="held-out canvases (default 500; smoke 16)")
    parser.add_argument("--canvas", type=int, default=64, help="canvas side in pixels")
    parser.add_argument("--min-item", type=int, default=16)
    parser.add_argument("--max-item", type=int, default=32)
    parser.add_argument("--smoke", action="store_true", help="tiny: bundled images, 64 canvases, a few steps")
    parser.add_argument("--json", help="also write the figures as JSON to this path")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="extra config overrides for the DETR run")
    args = parser.parse_args()
    args.train_images = args.train_images or (64 if args.smoke else 4000)
    args.val_images = args.val_images or (16 if args.smoke else 500)

    work = Path(args.work_dir or ("runs/bench_detr_smoke" if args.smoke else "runs/bench_detr"))
    seconds = StepSeconds(work / "seconds" / "detr_fmnist.json")
    dataset = make_dataset(work, args)
    configured = load_config(DetrConfig, CONFIG).encoder.checkpoint  # the config read as every run reads it
    backbone = smoke_mae(work) if args.smoke else Path(args.backbone or REPO / configured)
    metrics = train_detr(work, backbone, seconds, args.overrides, smoke=args.smoke)
    out = work / "detr"

    print(f"\n## DETR on synthetic Fashion-MNIST canvases ({dataset['splits']['train']['images']} train / "
          f"{dataset['splits']['val']['images']} held-out, {args.canvas}x{args.canvas} px)\n")
    print("| epoch | train loss | AP | AP50 | AP75 | APs | APm | APl |")
    print("|---|---|---|---|---|---|---|---|")
    for record in metrics["history"]:
        loss = record["train_loss"]
        print(f"| {record['epoch']} | {loss:.3f} | " if loss is not None else f"| {record['epoch']} | - | ", end="")
        print(" | ".join(f"{100 * record[k]:.1f}" if record[k] >= 0 else "-"
                         for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")) + " |")
    print(f"\nAP x 100 on {metrics['num_images']} held-out canvases (-: no true boxes of that size); "
          f"{sum(seconds.values()):.0f} s here; pictures in {out / 'boxes.png'}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"dataset": dataset, **seconds.timing(), "metrics": metrics,
                                               "summary": summary_rows(metrics)}, indent=2))


TARGETS = {"AP50": 50.0, "AP": 25.0}  # issue 16's targets on the held-out canvases


def summary_rows(metrics: dict) -> list[dict]:
    """The results picture's rows (benchmarks/results_chart.py): the last epoch's AP50 and AP (x 100)."""
    last = metrics["history"][-1]
    return [{"row": f"DETR on the canvases, {key}", "metric": f"{key} (%)", "value": 100 * last[key],
             "target": target, "baselines": {}} for key, target in TARGETS.items()]


if __name__ == "__main__":
    main()
