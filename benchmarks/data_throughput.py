"""Data-loading throughput: decoded-and-augmented images per second on this machine's cores, side by side.

    python benchmarks/data_throughput.py --json runs/bench_data/throughput.json
    python benchmarks/data_throughput.py --smoke                      (40 images, one repeat: checks that it runs)

Readers, all with the MAE training augmentation (RandomResizedCrop 224 bicubic, scale 0.2-1, flip, normalise) and
batch 64:
1. ours: `data.ShardStream` (train mode) over shards from `data.write_labelled_shards` (original JPEG bytes kept)
   through `data.make_loader(stream, num_workers=2)`: torchvision.io decodes each JPEG to a uint8 tensor and
   `data.mae_train_transform` crops and resizes it with torch's vectorised uint8 kernels;
2. torchvision `ImageFolder` + `DataLoader(num_workers=2, shuffle=True)` over the same images as JPEG files, with
   the transform as facebookresearch/mae's main_pretrain.py writes it (torchvision.transforms on PIL images:
   RandomResizedCrop(interpolation=3), RandomHorizontalFlip, ToTensor, Normalize);
3. a bare loop in one process, no DataLoader: our decode (`data.samples.open_image`) + our transform on the image
   files, batches stacked. It is the decode-bound limit of one core for our pipeline; "x2 cores" doubles it
   (computed, not measured) as the ideal for two workers.
"ours + draft decode" uses decode_size=224 (PIL's JPEG draft mode for images >= 448 px a side) and is compared
with "bare loop + draft", which decodes the same way.

Inputs (generated once under --work-dir and reused): N synthetic photos, 256-500 px a side, JPEG quality 90: a
Fashion-MNIST item from the embedded set, upsampled and tinted, on a smooth colour background with soft shapes
and sensor-like noise (about 2 bits per pixel, like real photos at this quality), in 10 class folders.

Each reader is timed on the same number of images after a warm-up of 2 batches (worker start-up excluded; the
time to the first batch is reported separately). Readers run interleaved (A, B, C, A, B, C) and the best repeat
counts, since the machine is shared and noisy.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import PIL
import torch
import torchvision
from PIL import Image, ImageChops, ImageDraw, ImageFilter
from torch.utils.data import DataLoader, RandomSampler
from torchvision import transforms
from torchvision.datasets import ImageFolder
from torchvision.transforms import InterpolationMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    FASHION_MNIST_CLASSES,
    STATS_FILE,
    ShardOptions,
    ShardStream,
    mae_train_transform,
    make_loader,
    read_embedded,
    read_image_folder,
    write_labelled_shards,
)
from data.samples import open_image
from machine import cpu_cores, cpu_model

IMAGE_SIZE = 224
JPEG_QUALITY = 90
NOISE_SIGMA = 6.0  # grey levels; gives ~2 bits per pixel at quality 90
GENERATOR_VERSION = 1  # bump when the synthetic photos change, so that caches are rebuilt
TARGET_VS_IMAGEFOLDER = 1.5
TARGET_VS_BARE = 0.9  # "within 10% of the bare loop on all cores"

Batches = Iterator[torch.Tensor]  # FloatTensor[B, 3, IMAGE_SIZE, IMAGE_SIZE]


# ------------------------------------------------------------------------------------------------ inputs


def synthetic_photo(item_png: bytes, rng: np.random.Generator) -> Image.Image:
    """An RGB photo of random size (256-500 px a side): a Fashion-MNIST item, upsampled and tinted, on a smooth
    colour background with a few soft shapes, plus Gaussian noise so that JPEG sizes are photo-like."""
    width, height = (int(v) for v in rng.integers(256, 501, size=2))
    coarse = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 7))):
        x0, x1 = sorted(int(v) for v in rng.integers(0, width, 2))
        y0, y1 = sorted(int(v) for v in rng.integers(0, height, 2))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([x0, y0, x1, y1], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    image = image.filter(ImageFilter.GaussianBlur(radius=1.5))

    # The item's grey levels are both its shape (paste mask) and its shading under a random tint.
    side = int(min(width, height) * rng.uniform(0.5, 0.9))
    with Image.open(io.BytesIO(item_png)) as item:
        mask = item.convert("L").resize((side, side), Image.Resampling.BICUBIC)
    tint = Image.new("RGB", (side, side), tuple(int(c) for c in rng.integers(64, 256, 3)))
    position = int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
    image.paste(ImageChops.multiply(tint, mask.convert("RGB")), position, mask=mask)

    noise = rng.normal(0.0, NOISE_SIGMA, size=(height, width, 3)).astype(np.float32)
    return Image.fromarray(np.clip(np.asarray(image, dtype=np.float32) + noise, 0, 255).astype(np.uint8))


def class_folder_name(label: int) -> str:
    return f"{label}_{FASHION_MNIST_CLASSES[label].replace('/', '-')}"  # sorts by label, no "/" in "T-shirt/top"


def ensure_images(image_dir: Path, count: int, seed: int) -> dict:
    """`image_dir/<class>/<index>.jpg` for `count` synthetic photos; returns their summary (cached in info.json)."""
    info_file = image_dir / "info.json"
    settings = {"images": count, "seed": seed, "version": GENERATOR_VERSION, "jpeg_quality": JPEG_QUALITY}
    if info_file.is_file():
        info = json.loads(info_file.read_text())
        if info["settings"] == settings:
            return info
    print(f"generating {count} JPEG photos in {image_dir} ...", flush=True)
    shutil.rmtree(image_dir, ignore_errors=True)
    items = list(read_embedded().samples)
    rng = np.random.default_rng(seed)
    total_bytes = total_pixels = 0
    for index in range(count):
        item = items[index % len(items)]
        photo = synthetic_photo(item.image_bytes, rng)
        path = image_dir / class_folder_name(item.label) / f"{index:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        photo.save(path, "JPEG", quality=JPEG_QUALITY)
        total_bytes += path.stat().st_size
        total_pixels += photo.width * photo.height
    info = {"settings": settings, "mean_kb": total_bytes / count / 1e3,
            "mean_megapixels": total_pixels / count / 1e6, "bits_per_pixel": 8 * total_bytes / total_pixels}
    info_file.write_text(json.dumps(info, indent=2) + "\n")  # last: marks the folder complete
    return info


def ensure_shards(image_dir: Path, shard_dir: Path, images_info: dict, num_shards: int = 8) -> None:
    """Shards of the image folder, written by our writer with the original JPEG bytes; reused when up to date."""
    stats_file = shard_dir / STATS_FILE
    if stats_file.is_file() and json.loads(stats_file.read_text()).get("bench_images") == images_info["settings"]:
        return
    print(f"writing shards to {shard_dir} ...", flush=True)
    class_names, samples = read_image_folder(image_dir)
    # Several shards per reading slot, as in real use; with fewer shards than slots every slot reads all of them.
    options = ShardOptions(shard_size=math.ceil(len(samples) / num_shards), strict=True, progress=False,
                           overwrite=True)
    write_labelled_shards(samples, shard_dir, class_names, options=options,
                          metadata={"bench_images": images_info["settings"]})


# ------------------------------------------------------------------------------------------------ readers


def read_ours(shard_dir: Path, batch_size: int, workers: int, images: int, **stream_kwargs) -> Batches:
    """ShardStream (train mode: endless, shuffled) through make_loader; `stream_kwargs` e.g. decode_size.
    `images` is unused: the stream never ends."""
    stream = ShardStream(shard_dir, mae_train_transform(IMAGE_SIZE), batch_size, train=True, **stream_kwargs)
    for batch in make_loader(stream, num_workers=workers):
        yield batch["image"]


def imagefolder_transform() -> transforms.Compose:
    """facebookresearch/mae's pretraining transform, as main_pretrain.py builds it (PIL images in)."""
    return transforms.Compose([
        transforms.RandomResizedCrop(IMAGE_SIZE, scale=(0.2, 1.0), interpolation=InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
    ])


def read_image_folder_loader(image_dir: Path, batch_size: int, workers: int, images: int) -> Batches:
    """torchvision ImageFolder + DataLoader, shuffled; the sampler draws `images` indices (several permutations
    when that is more than one epoch), so no epoch boundary falls inside the measurement."""
    dataset = ImageFolder(str(image_dir), transform=imagefolder_transform())
    sampler = RandomSampler(dataset, num_samples=images)  # what shuffle=True builds, with a length of our choosing
    for images_batch, _labels in DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers):
        yield images_batch


def read_bare_loop(image_dir: Path, batch_size: int, workers: int, images: int,
                   decode_size: int | None = None) -> Batches:
    """Our decode (`open_image`) + our transform in this process, one thread, no DataLoader; batches stacked like
    the loaders' are. decode_size: as ShardStream's (PIL's JPEG draft mode for large images)."""
    paths = sorted(image_dir.glob("*/*.jpg"))
    transform = mae_train_transform(IMAGE_SIZE)
    order = np.random.default_rng(0).permutation(len(paths))
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core: the per-core limit
    try:
        batch = []
        for position in range(images):
            if position and position % len(paths) == 0:
                np.random.default_rng(position).shuffle(order)
            image, _ = open_image(paths[order[position % len(paths)]].read_bytes(), decode_size)
            batch.append(transform(image))
            if len(batch) == batch_size:
                yield torch.stack(batch)
                batch = []
    finally:
        torch.set_num_threads(previous_threads)


# ------------------------------------------------------------------------------------------------ timing


def time_reader(batches: Batches, warmup_batches: int, measure_images: int) -> dict:
    """Time to the first batch, then images per second over `measure_images` (rounded up to whole batches)
    after `warmup_batches` batches (the first one included)."""
    start = time.perf_counter()
    try:
        next(batches)
        first_batch_s = time.perf_counter() - start
        for _ in range(warmup_batches - 1):
            next(batches)
        measured, start = 0, time.perf_counter()
        while measured < measure_images:
            measured += next(batches).shape[0]
        seconds = time.perf_counter() - start
    finally:
        batches.close()  # shuts the DataLoader's workers down before the next reader starts
    return {"first_batch_s": first_batch_s, "images": measured, "seconds": seconds, "images_per_s": measured / seconds}


def machine_info() -> dict:
    return {
        "cpu_model": cpu_model(),
        "cores": cpu_cores(),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "pillow": PIL.__version__,
    }


# ------------------------------------------------------------------------------------------------ report


def summarise(runs: dict[str, list[dict]], cores: int) -> list[dict]:
    """Best repeat per reader, the computed "x cores" rows for the bare loops, and the ratios."""
    best = {}
    for name, repeats in runs.items():
        best[name] = {"images_per_s": max(r["images_per_s"] for r in repeats),
                      "first_batch_s": min(r["first_batch_s"] for r in repeats), "measured": True, "runs": repeats}
        if name.startswith("bare loop"):
            best[f"{name} x{cores} cores"] = {"images_per_s": best[name]["images_per_s"] * cores,
                                              "first_batch_s": None, "measured": False}
    imagefolder = best["ImageFolder"]["images_per_s"]
    rows = []
    for name, figures in best.items():
        # Each reader is compared with the bare loop that decodes the same way (full size or draft).
        bare = f"bare loop + draft x{cores} cores" if "draft" in name else f"bare loop x{cores} cores"
        rows.append({"reader": name, **figures, "vs_imagefolder": figures["images_per_s"] / imagefolder,
                     "vs_bare_all_cores": figures["images_per_s"] / best[bare]["images_per_s"],
                     "compared_with": bare})
    return rows


def targets(rows: list[dict]) -> list[dict]:
    by_name = {row["reader"]: row for row in rows}
    checks = []
    for ours in ("ours", "ours + draft decode"):
        if ours not in by_name:
            continue
        row = by_name[ours]
        checks.append({"reader": ours, "target": f">= {TARGET_VS_IMAGEFOLDER}x ImageFolder",
                       "value": row["vs_imagefolder"], "met": row["vs_imagefolder"] >= TARGET_VS_IMAGEFOLDER})
        checks.append({"reader": ours, "target": f">= {TARGET_VS_BARE}x {row['compared_with']}",
                       "value": row["vs_bare_all_cores"], "met": row["vs_bare_all_cores"] >= TARGET_VS_BARE})
    return checks


def markdown_table(rows: list[dict], cores: int) -> str:
    lines = [f"| reader | images/s | first batch (s) | vs ImageFolder | vs bare loop x{cores} cores |",
             "|---|---:|---:|---:|---:|"]
    for row in rows:
        first = f"{row['first_batch_s']:.2f}" if row["first_batch_s"] is not None else "-"
        name = row["reader"] if row["measured"] else f"{row['reader']} (computed, not measured)"
        lines.append(f"| {name} | {row['images_per_s']:.0f} | {first} | {row['vs_imagefolder']:.2f}x | "
                     f"{row['vs_bare_all_cores']:.2f}x |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000, help="synthetic JPEG photos to generate")
    parser.add_argument("--measure", type=int, default=1500, help="images timed per reader and repeat")
    parser.add_argument("--warmup-batches", type=int, default=2, help="batches before the timing starts")
    parser.add_argument("--repeats", type=int, default=4, help="interleaved rounds; the best one counts")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of ours and ImageFolder")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic photos")
    parser.add_argument("--work-dir", default="runs/bench_data", help="cache of the photos and shards")
    parser.add_argument("--json", help="also write the figures and machine info as JSON to this path")
    parser.add_argument("--smoke", action="store_true", help="tiny run to check that it works: 40 images, "
                                                             "1 repeat, 32 measured, batch 8")
    args = parser.parse_args(argv)
    if args.smoke:
        args.images, args.repeats, args.measure, args.batch_size = 40, 1, 32, 8
    if min(args.images, args.measure, args.warmup_batches, args.repeats, args.batch_size) < 1 or args.workers < 0:
        parser.error("--images, --measure, --warmup-batches, --repeats and --batch-size must be >= 1, --workers >= 0")

    work = Path(args.work_dir)
    image_dir, shard_dir = work / f"images_{args.images}", work / f"shards_{args.images}"
    images_info = ensure_images(image_dir, args.images, args.seed)
    ensure_shards(image_dir, shard_dir, images_info)

    # Each reader must deliver the warm-up plus the measured images (whole batches).
    per_run = (args.warmup_batches + math.ceil(args.measure / args.batch_size)) * args.batch_size
    common = {"batch_size": args.batch_size, "workers": args.workers, "images": per_run}
    readers: dict[str, Callable[[], Batches]] = {
        "ours": lambda: read_ours(shard_dir, **common),
        "ours + draft decode": lambda: read_ours(shard_dir, **common, decode_size=IMAGE_SIZE),
        "ImageFolder": lambda: read_image_folder_loader(image_dir, **common),
        "bare loop": lambda: read_bare_loop(image_dir, **common),
        "bare loop + draft": lambda: read_bare_loop(image_dir, **common, decode_size=IMAGE_SIZE),
    }

    machine = machine_info()
    cores = machine["cores"]
    runs: dict[str, list[dict]] = {name: [] for name in readers}
    for repeat in range(args.repeats):
        for name, make_batches in readers.items():
            result = time_reader(make_batches(), args.warmup_batches, args.measure)
            runs[name].append(result)
            print(f"round {repeat + 1}/{args.repeats} {name}: {result['images_per_s']:.0f} images/s, "
                  f"first batch {result['first_batch_s']:.2f} s", flush=True)

    rows = summarise(runs, cores)
    checks = targets(rows)
    print(f"\n{args.images} JPEGs (q{JPEG_QUALITY}, {images_info['mean_megapixels']:.3f} MP, "
          f"{images_info['mean_kb']:.0f} kB, {images_info['bits_per_pixel']:.2f} bits/px on average), "
          f"batch {args.batch_size}, {args.workers} workers, {cores} cores ({machine['cpu_model']}), "
          f"best of {args.repeats}, {rows[0]['runs'][0]['images']} images timed per run\n")
    print(markdown_table(rows, cores))
    print(f"\nBare loop: one process, one thread; x{cores} cores = measured x {cores}, the ideal for {cores} "
          f"workers. Draft rows are compared with the draft bare loop. Best of {args.repeats} interleaved rounds.\n")
    for check in checks:
        print(f"target {check['reader']} {check['target']}: {check['value']:.2f}x -> "
              f"{'met' if check['met'] else 'NOT met'}")

    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        settings = {key: getattr(args, key) for key in ("images", "measure", "warmup_batches", "repeats",
                                                        "batch_size", "workers", "seed")}
        path.write_text(json.dumps({"machine": machine, "settings": settings, "inputs": images_info,
                                    "results": rows, "targets": checks}, indent=2) + "\n")
        print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
