"""Encoder FLOPs of MAE over Swin at 224x224: UM-MAE's encoder on the compact image of kept patches (a 28x28 token
grid) against the same Swin encoder on the full image (56x56 tokens; what SimMIM's encoder and a finetuning
forward cost), with the decoder / prediction head of each, for Swin-T and Swin-B.

    python benchmarks/swin_mae_flops.py [--sizes swin_t swin_b] [--json PATH]

Counted with torch.utils.flop_counter.FlopCounterMode for one image, forward only (a training step's backward
costs about twice the forward); a multiply-add counts 2, so Swin-T's full forward, "4.5G FLOPs" in the Swin paper,
reads 9.0 here. Attention runs as explicit matmuls while counting (the fused CPU kernel is not counted). The
models live on the meta device (shapes only, nothing computed; `--device cpu` computes for real and counts the
same): about 10 s on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pretrain.models import create_model  # noqa: E402
from pretrain.models.swin_mae import count_flops, encoder_flops  # noqa: E402

SIZES = {"swin_t": ("Swin-T", "ummae_swin_t_patch4", "simmim_swin_t_patch4"),
         "swin_b": ("Swin-B", "ummae_swin_b_patch4", "simmim_swin_b_patch4")}
IMG_SIZE = 224


@torch.no_grad()
def measure(size: str) -> list[dict]:
    label, ummae_name, simmim_name = SIZES[size]
    ummae = create_model(ummae_name, img_size=IMG_SIZE)
    ummae_flops = encoder_flops(ummae)  # also loads the encoder into timm's SwinTransformer: the export fits

    simmim = create_model(simmim_name, img_size=IMG_SIZE).eval()
    imgs = torch.randn(1, 3, IMG_SIZE, IMG_SIZE)
    mask = simmim.random_masking(1, simmim.mask_ratio, imgs.device)
    latent = simmim.forward_encoder(imgs, mask)
    simmim_encoder = count_flops(simmim, lambda: simmim.forward_encoder(imgs, mask))
    simmim_head = count_flops(simmim, lambda: simmim.forward_decoder(latent))

    full = ummae_flops["full_grid_encoder"]
    full_grid = IMG_SIZE // ummae.patch_size
    return [
        dict(size=label, method="UM-MAE", encoder_grid=f"{ummae.encoder_grid_size}x{ummae.encoder_grid_size}",
             encoder_gflops=ummae_flops["ummae_encoder"] / 1e9, decoder_gflops=ummae_flops["ummae_decoder"] / 1e9,
             encoder_vs_full=ummae_flops["ummae_encoder"] / full),
        dict(size=label, method="SimMIM", encoder_grid=f"{full_grid}x{full_grid}",
             encoder_gflops=simmim_encoder / 1e9, decoder_gflops=simmim_head / 1e9,
             encoder_vs_full=simmim_encoder / full),
        dict(size=label, method="full image (timm Swin, finetuning)", encoder_grid=f"{full_grid}x{full_grid}",
             encoder_gflops=full / 1e9, decoder_gflops=0.0, encoder_vs_full=1.0),
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=["swin_t", "swin_b"])
    parser.add_argument("--device", default="meta", help="where the models are built and run (default: meta)")
    parser.add_argument("--json", help="also write the rows as JSON to this path")
    args = parser.parse_args()

    start = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(args.device):
        rows = [row for size in args.sizes for row in measure(size)]
    print(f"Encoder FLOPs per 224x224 image, forward (FlopCounterMode; multiply-add = 2), "
          f"{time.perf_counter() - start:.1f} s\n")
    print("| encoder | pretraining | encoder tokens (stage 1) | encoder GFLOPs | vs full image | "
          "decoder / head GFLOPs | encoder + decoder GFLOPs |")
    print("|---|---|---|---:|---:|---:|---:|")
    for r in rows:
        decoder = f"{r['decoder_gflops']:.2f}" if r["decoder_gflops"] else "-"
        print(f"| {r['size']} | {r['method']} | {r['encoder_grid']} | {r['encoder_gflops']:.2f} | "
              f"{r['encoder_vs_full']:.3f}x | {decoder} | {r['encoder_gflops'] + r['decoder_gflops']:.2f} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"img_size": IMG_SIZE, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
