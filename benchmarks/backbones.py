"""The survey's backbones (pretrain/models/backbones) against their papers and against timm's Swin: parameters and
FLOPs at 224x224, and the images/s of a training step side by side with the timm Swin of the same size.

    python benchmarks/backbones.py [--models crossformer_tiny dat_tiny ...] [--batch-size 8] [--repeats 3]
                                   [--no-speed] [--json PATH]

FLOPs: torch.utils.flop_counter.FlopCounterMode, one image, forward, attention through SDPA's math backend (so its
matmuls are counted); a multiply-add counts 2. The papers count a multiply-add once (CrossFormer's "2.9G", DAT's
"4.6G", Swin's "4.5G"), except the attention-augmentation paper, which counts both (ResNet-50: "8.2G"): the
`paper GMACs` column puts every paper figure in multiply-adds. Operations FlopCounterMode has no formula for
(grid_sample, pooling, norms) are not counted, here or, as far as their code shows, in the papers.

Speed: a float32 training step (forward, cross-entropy, backward, AdamW) at batch `--batch-size`, each model
against timm's `swin_tiny_patch4_window7_224` (or the Swin of the size in REFERENCE) in the same run, alternating,
median of `--repeats` timed steps after one warm-up, on all the torch threads. The ratio is the figure to read
(the machine is shared); about 5 minutes on 2 CPU cores with the default models.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import timm  # noqa: E402

import pretrain.models  # noqa: E402,F401  (registers the backbones with timm)

# name -> (paper, paper parameters in M, paper GMACs at 224 (None: not published), the timm Swin of the same size)
PAPERS: dict[str, tuple[str, Optional[float], Optional[float], str]] = {
    "crossformer_tiny": ("CrossFormer-T (ICLR 2022)", 27.8, 2.9, "swin_tiny_patch4_window7_224"),
    "crossformer_small": ("CrossFormer-S (ICLR 2022)", 30.7, 4.9, "swin_tiny_patch4_window7_224"),
    "crossformer_base": ("CrossFormer-B (ICLR 2022)", 52.0, 9.2, "swin_small_patch4_window7_224"),
    "crossformer_large": ("CrossFormer-L (ICLR 2022)", 92.0, 16.1, "swin_base_patch4_window7_224"),
    "dat_tiny": ("DAT-T (CVPR 2022)", 28.3, 4.6, "swin_tiny_patch4_window7_224"),
    "dat_small": ("DAT-S (CVPR 2022)", 50.0, 9.0, "swin_small_patch4_window7_224"),
    "dat_base": ("DAT-B (CVPR 2022)", 88.0, 15.8, "swin_base_patch4_window7_224"),
    "mswin_tiny": ("MSwin-T (ours; V2X-ViT's block)", None, None, "swin_tiny_patch4_window7_224"),
    "aa_resnet26": ("AA-ResNet-26 (ICCV 2019)", 10.3, None, "swin_tiny_patch4_window7_224"),
    "aa_resnet50": ("AA-ResNet-50 (ICCV 2019)", 25.8, 8.3 / 2, "swin_tiny_patch4_window7_224"),
    "swin_tiny_patch4_window7_224": ("Swin-T (ICCV 2021)", 28.3, 4.5, "swin_tiny_patch4_window7_224"),
}
DEFAULT_MODELS = ["crossformer_tiny", "dat_tiny", "mswin_tiny", "aa_resnet50", "swin_tiny_patch4_window7_224"]
IMG_SIZE = 224


def figure(value: Optional[float], digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def count_gflops(model: torch.nn.Module) -> float:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        model(torch.randn(1, 3, IMG_SIZE, IMG_SIZE))
    return counter.get_total_flops() / 1e9


def size_row(name: str) -> dict:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=1000).eval()
    paper, paper_params, paper_gmacs, _ = PAPERS[name]
    params = sum(p.numel() for p in model.parameters()) / 1e6
    gflops = count_gflops(model)
    return dict(model=name, paper=paper, params_m=params, paper_params_m=paper_params, gflops=gflops,
                gmacs=gflops / 2, paper_gmacs=paper_gmacs)


def step_seconds(model: torch.nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor,
                 labels: torch.Tensor) -> float:
    start = time.perf_counter()
    loss = F.cross_entropy(model(images), labels)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def speed_row(name: str, batch_size: int, repeats: int, img_size: int = IMG_SIZE) -> dict:
    """images/s of `name` and of its Swin, timed alternately in this process."""
    reference = PAPERS[name][3]
    torch.manual_seed(0)
    models = {which: timm.create_model(which, num_classes=1000, img_size=img_size).train()
              for which in dict.fromkeys((name, reference))}
    optimizers = {which: torch.optim.AdamW(m.parameters(), lr=1e-4) for which, m in models.items()}
    images, labels = torch.randn(batch_size, 3, img_size, img_size), torch.randint(0, 1000, (batch_size,))
    times: dict[str, list[float]] = {which: [] for which in models}
    for which in models:  # warm-up
        step_seconds(models[which], optimizers[which], images, labels)
    for _ in range(repeats):
        for which in models:
            times[which].append(step_seconds(models[which], optimizers[which], images, labels))
    ours, swin = (batch_size / statistics.median(times[which]) for which in (name, reference))
    return dict(model=name, reference=reference, batch_size=batch_size, images_per_s=ours,
                reference_images_per_s=swin, ratio=ours / swin)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(PAPERS), default=DEFAULT_MODELS)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-speed", action="store_true", help="parameters and FLOPs only")
    parser.add_argument("--json", help="also write the figures as JSON to this path")
    args = parser.parse_args()

    sizes = [size_row(name) for name in args.models]
    print(f"Parameters (1,000 classes) and forward FLOPs of one {IMG_SIZE}x{IMG_SIZE} image, against the papers "
          f"(torch {torch.__version__}, {torch.get_num_threads()} threads)\n")
    print("| model | paper | params (M) | paper (M) | GMACs | paper GMACs | GFLOPs (2 per MAC) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in sizes:
        print(f"| {r['model']} | {r['paper']} | {r['params_m']:.2f} | {figure(r['paper_params_m'], 1)} | "
              f"{r['gmacs']:.2f} | {figure(r['paper_gmacs'], 2)} | {r['gflops']:.2f} |")
    speeds = []
    if not args.no_speed:
        speeds = [speed_row(name, args.batch_size, args.repeats) for name in args.models
                  if name != PAPERS[name][3]]
        print(f"\nTraining step, float32, batch {args.batch_size}, median of {args.repeats} (alternating with the "
              f"reference in one run)\n")
        print("| model | images/s | reference | reference images/s | ratio |")
        print("|---|---:|---|---:|---:|")
        for r in speeds:
            print(f"| {r['model']} | {r['images_per_s']:.2f} | {r['reference']} | "
                  f"{r['reference_images_per_s']:.2f} | {r['ratio']:.2f}x |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"img_size": IMG_SIZE, "sizes": sizes, "speed": speeds}, indent=2))


if __name__ == "__main__":
    main()
