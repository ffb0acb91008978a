"""MAE training speed: one full training step (forward, backward, optimizer) of our MaskedAutoencoderViT against
Hugging Face transformers' ViTMAEForPreTraining with the same sizes, side by side in one process.

    python benchmarks/mae_speed.py --json runs/bench_mae_speed/vit_b.json      (ViT-B/16, 224 px, batch 16)
    python benchmarks/mae_speed.py --model mae_vit_small_patch16 --repeats 3   (quicker)
    python benchmarks/mae_speed.py --smoke                                     (tiny model, eager: checks that it runs)

Rows, per precision (float32; bf16 autocast), chosen with --rows:
- ours: `pretrain.models.create_model(--model)` trained the way our Trainer trains it by default: the engine's
  optimizer, torch.compile only if `TrainConfig().compile` (override with --compile on/off);
- ours_fused_attention: ours with torch's fused scaled_dot_product_attention in every layer (train.attention=fused);
  ours runs `--attention` (default the Trainer's auto: explicit matmuls on a CPU in bf16; `timed` times both
  kernels per layer after the first step and keeps the faster, as the Trainer does; pretrain/attention_kernels.py),
  so this row shows what that choice buys;
- ours_compile: the same with the other torch.compile setting ("ours, torch.compile" while the default is eager);
  not in the default rows on CPU, where compiling ViT-B takes minutes and gained nothing measurable;
- ours_loop_adamw: ours with the AdamW our engine built before it asked for torch's fused kernel (timm's factory
  with torch's default implementation: a per-tensor loop on CPU): what the fused optimizer buys;
- hf: `transformers.ViTMAEForPreTraining(ViTMAEConfig(...))` with the same sizes (hidden, depth, heads, MLP 4x,
  decoder, LayerNorm eps 1e-6, mask ratio, norm-pix loss), built from the config (no download), eager, with the
  attention implementation transformers picks by default (recorded: "sdpa" in transformers 5);
- full_grid: ours with the encoder over all patches and a mask token in place of each dropped one
  (`encoder_mask_tokens=True`, the MAE paper's "encoder w/ [M]"): what skipping the mask tokens saves (the
  paper: 3.3x fewer FLOPs, 2.8x less wall-clock for ViT-L with an 8-block decoder).

Every row but ours_loop_adamw gets the same optimizer, our engine's (`pretrain.engine.build_optimizer`: AdamW with
weight decay 0.05 on >= 2-D parameters, torch's fused kernel, which is also what transformers' Trainer picks by
default with torch >= 2.8), and the same input batch; a step is `loss.backward(); optimizer.step();
optimizer.zero_grad(set_to_none=True)` with the forward under `torch.autocast` for bf16, as accelerate runs it.
After `--warmup` steps each (torch.compile compiles in the first), the rows are timed interleaved (A, B, C, A, B,
C, ...), one step each per round, `--repeats` rounds; images/s come from the median step time.

FLOPs per step are counted once per model with torch.utils.flop_counter.FlopCounterMode over forward + backward
(the optimizer's elementwise work is not counted), with attention on the math backend so that its matmuls count.
The reference matmul rate is measured in the same precision on the model's two largest GEMM shapes (the encoder's
and the decoder's MLP: [tokens, D] x [D, 4D]); the faster one is the reference, so "of matmul" is the achieved
FLOP rate as a share of what this machine's matmul does on the model's own shapes.

Peak memory is persistent + transient: the bytes of the row's parameters, buffers and optimizer state (counted
exactly), plus the most memory a training step holds on top of them. On CUDA the transient part is
torch.cuda.max_memory_allocated during one step minus the allocation before it. On CPU it is the peak resident set
size during one step (sampled every 0.5 ms from /proc/self/statm by a thread) minus the RSS before it, measured
after all the timing of every precision (it slows later steps down) with glibc told to return every block of
256 kB or more to the system when freed (mallopt), so that the RSS follows the live tensors. (ru_maxrss of a subprocess per row would count torch.compile's own memory
and the process's start-up instead.)

On a CPU without bf16 matmul units (`pretrain.run.cpu_has_fast_bf16()` False, e.g. AVX2-only) bf16 runs ~100x
slower than float32, so its rows are skipped unless asked for with `--precisions bf16`; the measured bf16 matmul
rate is printed as the reason.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import platform
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pretrain import attention_kernels  # noqa: E402
from pretrain.config import OptimConfig, TrainConfig  # noqa: E402
from pretrain.engine import build_optimizer, compile_for_training  # noqa: E402
from pretrain.run import cpu_has_fast_bf16  # noqa: E402
from pretrain.models import create_model  # noqa: E402
from machine import cpu_cores, cpu_model  # noqa: E402

# issue 18: in bf16 our step >= 1.5x HF's and >= 35% of the bf16 matmul rate; in float32 it stays >= HF's
TARGET_VS_HF = {"fp32": 1.0, "bf16": 1.5}
TARGET_SHARE_OF_MATMUL_BF16 = 0.35
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}
ROWS = ("ours", "ours_fused_attention", "ours_compile", "ours_loop_adamw", "hf", "full_grid")


def row_label(name: str, compile_default: bool) -> str:
    return {
        "ours": "ours" + (" (torch.compile)" if compile_default else ""),
        "ours_fused_attention": "ours, fused attention in every layer (train.attention=fused)",
        "ours_compile": "ours, eager" if compile_default else "ours, torch.compile",
        "ours_loop_adamw": "ours, per-tensor AdamW loop (the engine's before)",
        "hf": "HF ViTMAEForPreTraining",
        "full_grid": "ours, full grid (mask tokens in the encoder)",
    }[name]


# ------------------------------------------------------------------------------------------------ models


def build_ours(args, full_grid: bool = False) -> nn.Module:
    return create_model(args.model, img_size=args.image_size, norm_pix_loss=True, mask_ratio=args.mask_ratio,
                        encoder_mask_tokens=full_grid)


def hf_config_like(ours: nn.Module, args):
    """A ViTMAEConfig with our model's sizes: the same layers, widths, heads, MLP, LayerNorm eps and loss."""
    from transformers import ViTMAEConfig

    cfg = ours.config
    return ViTMAEConfig(
        hidden_size=cfg["embed_dim"], num_hidden_layers=cfg["depth"], num_attention_heads=cfg["num_heads"],
        intermediate_size=int(cfg["embed_dim"] * cfg["mlp_ratio"]), hidden_act="gelu",
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, layer_norm_eps=1e-6,
        image_size=cfg["img_size"], patch_size=cfg["patch_size"], num_channels=cfg["in_chans"], qkv_bias=True,
        decoder_hidden_size=cfg["decoder_embed_dim"], decoder_num_hidden_layers=cfg["decoder_depth"],
        decoder_num_attention_heads=cfg["decoder_num_heads"],
        decoder_intermediate_size=int(cfg["decoder_embed_dim"] * cfg["mlp_ratio"]),
        mask_ratio=args.mask_ratio, norm_pix_loss=True,
    )  # fmt: skip


def build_hf(ours: nn.Module, args) -> nn.Module:
    from transformers import ViTMAEForPreTraining

    return ViTMAEForPreTraining(hf_config_like(ours, args))


@dataclass
class Row:
    name: str
    label: str
    model: nn.Module  # the eager module (parameters, FLOP counting)
    loss_fn: Callable[[torch.Tensor], torch.Tensor]  # images -> loss, through the compiled call where compiled
    optimizer: torch.optim.Optimizer
    compiled: bool
    times: list[float] = field(default_factory=list)
    # train.attention timed, as the Trainer does it: the first step's attention inputs, then the kernels chosen on them
    attention_inputs: Optional[attention_kernels.FirstCallInputs] = None
    attention_choice: list[str] = field(default_factory=list)
    first_step_s: float = 0.0
    flops: int = 0
    memory: dict = field(default_factory=dict)


def loop_adamw(model: nn.Module, optim: OptimConfig, lr: float) -> torch.optim.Optimizer:
    """What build_optimizer returned before it asked for the fused kernel: the same groups, torch's default
    implementation (a per-tensor loop on CPU, foreach on CUDA)."""
    from timm.optim import create_optimizer_v2

    return create_optimizer_v2(model, opt="adamw", lr=lr, weight_decay=optim.weight_decay, betas=tuple(optim.betas))


def make_row(name: str, args, device: torch.device, compile_default: bool, ours_template: nn.Module,
             precision: str) -> Row:
    torch.manual_seed(0)
    if name == "hf":
        model = build_hf(ours_template, args)
    else:
        model = build_ours(args, full_grid=name == "full_grid")
    model = model.to(device).train()
    compiled = (not compile_default) if name == "ours_compile" else compile_default and name != "hf"
    optim = OptimConfig()
    make_optimizer = loop_adamw if name == "ours_loop_adamw" else build_optimizer
    optimizer = make_optimizer(model, optim, lr=1e-4)  # the engine's AdamW, the same for every row but one
    attention_inputs = None
    attention = "fused" if name == "ours_fused_attention" else args.attention
    mixed_precision = "no" if precision == "fp32" else precision  # accelerate's name
    attention_choice = []
    if name != "hf" and attention_kernels.times_kernels(attention, compiled=compiled):
        # as the Trainer's train.attention timed: record the first step's inputs, choose after it (train_step)
        attention_inputs = attention_kernels.FirstCallInputs(attention_kernels.attention_layers(model))
    elif name != "hf":
        kernel = attention_kernels.rule_kernel(attention, device.type, mixed_precision)
        attention_kernels.set_kernels(model, kernel)
        attention_choice = [f"every layer: {kernel or 'timm default'} (train.attention {attention})"]
    call = compile_for_training(model) if compiled else model
    if name == "hf":
        def loss_fn(images):
            return call(pixel_values=images).loss
    else:
        def loss_fn(images):
            return call(images)[0]
    return Row(name, row_label(name, compile_default), model, loss_fn, optimizer, compiled,
               attention_inputs=attention_inputs, attention_choice=attention_choice)


# ------------------------------------------------------------------------------------------------ measuring


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=PRECISIONS[precision])


def train_step(row: Row, images: torch.Tensor, device: torch.device, precision: str) -> float:
    """One optimizer step; returns its wall-clock seconds."""
    synchronize(device)
    start = time.perf_counter()
    with autocast(device, precision):
        loss = row.loss_fn(images)
    loss.backward()
    row.optimizer.step()
    row.optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    seconds = time.perf_counter() - start
    if row.attention_inputs is not None:  # after the first step, untimed: as the Trainer does
        row.attention_inputs.close()
        _, row.attention_choice = attention_kernels.choose_kernels(
            attention_kernels.attention_layers(row.model), row.attention_inputs.inputs,
            lambda: autocast(device, precision))
        row.attention_inputs = None
        print(f"{precision} {row.label}: attention kernels " + "; ".join(row.attention_choice), flush=True)
    return seconds


def count_flops(row: Row, images: torch.Tensor, device: torch.device, precision: str) -> int:
    """FLOPs of one forward + backward of the eager module (attention on the math backend, so that it counts)."""
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel([SDPBackend.MATH]):
        with autocast(device, precision):
            loss = eager_loss(row, images)
        loss.backward()
    row.model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def eager_loss(row: Row, images: torch.Tensor) -> torch.Tensor:
    if row.name == "hf":
        return row.model(pixel_values=images).loss
    return row.model(images)[0]


def matmul_rate(m: int, k: int, n: int, dtype: torch.dtype, device: torch.device, min_seconds: float = 0.3,
                repeats: int = 5) -> float:
    """FLOP/s of [m, k] x [k, n] in `dtype`, best of `repeats` timings of a loop lasting about `min_seconds`."""
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)
    torch.mm(a, b)  # warm-up: library and thread-pool start-up
    synchronize(device)
    start = time.perf_counter()
    torch.mm(a, b)
    synchronize(device)
    once = time.perf_counter() - start
    iterations = max(1, int(min_seconds / max(once, 1e-6)))
    best = float("inf")
    for _ in range(repeats if once < min_seconds else 1):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(iterations):
            torch.mm(a, b)
        synchronize(device)
        best = min(best, (time.perf_counter() - start) / iterations)
    return 2 * m * k * n / best


def gemm_shapes(ours: nn.Module, batch_size: int) -> dict[str, tuple[int, int, int]]:
    """The model's two largest GEMMs: the encoder MLP over the visible tokens, the decoder MLP over all of them."""
    cfg = ours.config
    visible = 1 + round(ours.num_patches * (1 - cfg["mask_ratio"]))
    return {
        "encoder_mlp": (batch_size * visible, cfg["embed_dim"], int(cfg["embed_dim"] * cfg["mlp_ratio"])),
        "decoder_mlp": (batch_size * (1 + ours.num_patches), cfg["decoder_embed_dim"],
                        int(cfg["decoder_embed_dim"] * cfg["mlp_ratio"])),
    }


# ---------------------------------------------------------------------------------------------- memory


def persistent_bytes(row: Row) -> int:
    """Parameters, buffers and optimizer state of a row (what stays allocated between steps)."""
    tensors = list(row.model.parameters()) + list(row.model.buffers())
    for state in row.optimizer.state.values():
        tensors += [v for v in state.values() if torch.is_tensor(v)]
    return sum(t.numel() * t.element_size() for t in tensors)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def release_freed_memory_promptly() -> bool:
    """glibc: blocks of 256 kB or more come from mmap and go back to the system when freed (no dynamic threshold),
    and free heap memory is trimmed; the RSS then follows the live tensors. False where that is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(-3, 256 * 1024) == 1 and libc.mallopt(-1, 256 * 1024) == 1  # M_MMAP_THRESHOLD, M_TRIM
        libc.malloc_trim(0)
        return ok
    except (OSError, AttributeError):
        return False


def transient_peak_bytes(row: Row, images: torch.Tensor, device: torch.device, precision: str) -> int:
    """The most memory one training step holds beyond what was allocated before it."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        train_step(row, images, device, precision)
        return torch.cuda.max_memory_allocated(device) - before
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = peak = _rss_bytes()
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss_bytes())
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        train_step(row, images, device, precision)
    finally:
        done.set()
        sampler.join()
    return max(0, peak - before)


# ------------------------------------------------------------------------------------------------ report


def machine_info(device: torch.device) -> dict:
    info = {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "cpu_model": cpu_model(),
        "cores": cpu_cores(),
        "torch_threads": torch.get_num_threads(),
        "cpu_has_fast_bf16": cpu_has_fast_bf16(),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    with contextlib.suppress(ImportError):
        import timm
        import transformers

        info.update(timm=timm.__version__, transformers=transformers.__version__)
    return info


def summarise(rows: list[Row], precision: str, reference_rate: float, batch_size: int) -> list[dict]:
    by_name = {row.name: row for row in rows}
    hf = by_name.get("hf")
    hf_median = statistics.median(hf.times) if hf else None
    ours_median = statistics.median(by_name["ours"].times) if "ours" in by_name else None
    results = []
    for row in rows:
        median, best = statistics.median(row.times), min(row.times)
        achieved = row.flops / median
        results.append({
            "precision": precision,
            "row": row.name,
            "label": row.label,
            "compiled": row.compiled,
            "step_s_median": median,
            "step_s_best": best,
            "step_s_all": row.times,
            "first_step_s": row.first_step_s,
            "images_per_s": batch_size / median,
            "vs_hf": hf_median / median if hf_median else None,
            "vs_ours": median / ours_median if ours_median else None,
            "gflop_per_step": row.flops / 1e9,
            "achieved_gflop_per_s": achieved / 1e9,
            "share_of_matmul": achieved / reference_rate,
            "parameters": sum(p.numel() for p in row.model.parameters()),
            "attention_kernels": row.attention_choice,
            **row.memory,
        })
    return results


def targets(results: list[dict]) -> list[dict]:
    checks = []
    for result in results:
        if result["row"] != "ours":
            continue
        if result["vs_hf"] is not None:
            target = TARGET_VS_HF[result["precision"]]
            checks.append({"precision": result["precision"], "target": f">= {target}x HF",
                           "value": result["vs_hf"], "met": result["vs_hf"] >= target})
        if result["precision"] == "bf16":
            checks.append({"precision": "bf16", "value": result["share_of_matmul"],
                           "target": f">= {TARGET_SHARE_OF_MATMUL_BF16:.0%} of the bf16 matmul rate",
                           "met": result["share_of_matmul"] >= TARGET_SHARE_OF_MATMUL_BF16})
    return checks


def markdown_table(results: list[dict]) -> str:
    lines = ["| precision | model | step (s) | images/s | vs HF | step time vs ours | GFLOP/step | GFLOP/s | of matmul "
             "| peak memory (MiB) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        vs_hf = f"{r['vs_hf']:.2f}x" if r["vs_hf"] is not None else "-"
        memory = f"{r['peak_memory_bytes'] / 2**20:,.0f}" if "peak_memory_bytes" in r else "-"
        vs_ours = f"{r['vs_ours']:.2f}x" if r["vs_ours"] is not None else "-"
        lines.append(f"| {r['precision']} | {r['label']} | {r['step_s_median']:.3f} | {r['images_per_s']:.2f} | "
                     f"{vs_hf} | {vs_ours} | {r['gflop_per_step']:.1f} | {r['achieved_gflop_per_s']:.1f} | "
                     f"{r['share_of_matmul']:.0%} | {memory} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ main


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mae_vit_base_patch16", help="a registered MAE ViT (create_model name)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--mask-ratio", type=float, default=0.75)
    parser.add_argument("--precisions", help="comma list of fp32, bf16 (default: both; bf16 only where it is fast, "
                                             "see the module docstring)")
    parser.add_argument("--rows", help=f"comma list of {', '.join(ROWS)} (default: all; on CPU all but "
                                       "ours_compile)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per row (the first one compiles)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timed rounds, one step per row each")
    parser.add_argument("--compile", choices=("default", "on", "off"), default="default",
                        help="torch.compile 'ours' and 'full grid': default = what TrainConfig().compile says")
    parser.add_argument("--attention", choices=("auto", "fused", "math", "timed"), default=TrainConfig().attention,
                        help="train.attention of the ours rows but ours_fused_attention (default: the Trainer's)")
    parser.add_argument("--device", default="auto", help="auto (cuda if present, else cpu), cpu, cuda, cuda:1")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's, one per core)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory step")
    parser.add_argument("--json", help="also write the figures and machine info as JSON to this path")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny run that checks that it works: mae_vit_tiny_patch4 at 32 px, batch 2, 1 warm-up "
                             "step, 1 round, eager (compiling takes longer than the whole smoke run), CPU memory "
                             "without the allocator tuning (approximate)")
    args = parser.parse_args(argv)
    args.matmul_seconds = 0.3  # per timing of the reference GEMM
    if args.smoke:
        args.model, args.image_size, args.batch_size, args.warmup, args.repeats = "mae_vit_tiny_patch4", 32, 2, 1, 1
        args.matmul_seconds = 0.05
        if args.compile == "default":
            args.compile = "off"
    if args.rows is not None:
        args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
        unknown = [r for r in args.rows if r not in ROWS]
        if unknown or not args.rows:
            parser.error(f"--rows: unknown {unknown}; choose from {', '.join(ROWS)}")
    if args.precisions is not None:
        args.precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
        if not args.precisions or any(p not in PRECISIONS for p in args.precisions):
            parser.error(f"--precisions must be a comma list of {', '.join(PRECISIONS)}, got {args.precisions}")
    if min(args.batch_size, args.repeats, args.image_size) < 1 or args.warmup < 0:
        parser.error("--batch-size, --repeats and --image-size must be >= 1, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if "hf" in (args.rows or ROWS):
        try:
            import transformers  # noqa: F401
        except ImportError:
            sys.exit("the HF row needs transformers: pip install -e '.[bench]' (or leave it out with --rows)")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    machine = machine_info(device)
    compile_default = TrainConfig().compile if args.compile == "default" else args.compile == "on"
    rows_wanted = args.rows or [r for r in ROWS if r != "ours_compile" or device.type != "cpu"]

    ours_template = build_ours(args)  # sizes for the HF config and the GEMM shapes
    shapes = gemm_shapes(ours_template, args.batch_size)

    precisions, skipped = args.precisions, {}
    if precisions is None:
        precisions = ["fp32", "bf16"]
        if device.type == "cpu" and not cpu_has_fast_bf16():
            m, k, n = shapes["encoder_mlp"]
            rate = matmul_rate(min(m, 128), k, n, torch.bfloat16, device, min_seconds=0.0, repeats=1)
            skipped["bf16"] = (f"skipped: this CPU has no bf16 matmul units (bf16 matmul {rate / 1e9:.1f} GFLOP/s "
                               f"on [{min(m, 128)}, {k}] x [{k}, {n}]); force with --precisions bf16")
            precisions = ["fp32"]
            print(f"bf16 {skipped['bf16']}", flush=True)

    torch.manual_seed(0)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    results, rates, hf_attention = [], {}, None
    timed: dict[str, tuple[list[Row], float]] = {}  # precision -> (its rows, its reference matmul rate)
    for precision in precisions:
        rates[precision] = {name: matmul_rate(*shape, PRECISIONS[precision], device, args.matmul_seconds)
                            for name, shape in shapes.items()}
        reference_rate = max(rates[precision].values())
        print(f"{precision} matmul: " + ", ".join(f"{name} {shapes[name]} {rate / 1e9:.1f} GFLOP/s"
                                                  for name, rate in rates[precision].items()), flush=True)

        rows = []
        for name in rows_wanted:
            row = make_row(name, args, device, compile_default, ours_template, precision)
            row.flops = count_flops(row, images, device, precision)
            if name == "hf":
                hf_attention = row.model.config._attn_implementation
            for step in range(args.warmup):
                seconds = train_step(row, images, device, precision)
                if step == 0:
                    row.first_step_s = seconds
            print(f"{precision} {row.label}: {row.flops / 1e9:.1f} GFLOP/step, first step "
                  f"{row.first_step_s:.1f} s" + (" (compiles)" if row.compiled else ""), flush=True)
            rows.append(row)

        for repeat in range(args.repeats):
            for row in rows:
                row.times.append(train_step(row, images, device, precision))
            print(f"{precision} round {repeat + 1}/{args.repeats}: "
                  + ", ".join(f"{row.name} {row.times[-1]:.3f} s" for row in rows), flush=True)

        timed[precision] = (rows, reference_rate)

    # memory after every timing: the allocator settings it needs (mallopt) slow later steps down
    if not args.no_memory and (device.type == "cuda" or Path("/proc/self/statm").is_file()):
        # (not in the smoke run, which tests import and call in their own process)
        exact = device.type == "cuda" or (not args.smoke and release_freed_memory_promptly())
        for precision, (rows, _) in timed.items():
            for row in rows:
                transient = transient_peak_bytes(row, images, device, precision)
                persistent = persistent_bytes(row)
                row.memory = {"peak_memory_bytes": persistent + transient, "persistent_bytes": persistent,
                              "transient_peak_bytes": transient, "memory_method": (
                                  "cuda max_memory_allocated" if device.type == "cuda" else
                                  "sampled RSS" + ("" if exact else " (allocator not tuned: approximate)"))}
    for precision, (rows, reference_rate) in timed.items():
        results += summarise(rows, precision, reference_rate, args.batch_size)
    del timed
    gc.collect()

    checks = targets(results)
    settings = {key: getattr(args, key) for key in ("model", "image_size", "batch_size", "mask_ratio", "warmup",
                                                    "repeats", "rows")}
    settings.update(compile=compile_default, precisions=precisions, optimizer="pretrain.engine.build_optimizer "
                    "(timm AdamW, weight decay 0.05 on >= 2-D parameters, lr 1e-4)", hf_attention=hf_attention)
    print(f"\n{args.model} at {args.image_size} px, batch {args.batch_size}, mask ratio {args.mask_ratio}, "
          f"norm-pix loss; {machine['device_name']}, {machine['torch_threads']} threads; median of {args.repeats} "
          f"interleaved rounds after {args.warmup} warm-up steps; HF attention: {hf_attention}\n")
    print(markdown_table(results))
    for precision in precisions:
        print(f"\n{precision} reference matmul rate: {max(rates[precision].values()) / 1e9:.1f} GFLOP/s "
              f"(best of " + ", ".join(f"{name} {list(shapes[name])}" for name in shapes) + ")")
    for precision, reason in skipped.items():
        print(f"{precision}: {reason}")
    for r in results:
        if r["row"] == "full_grid" and r["vs_ours"]:
            ours = next(o for o in results if o["row"] == "ours" and o["precision"] == r["precision"])
            print(f"{r['precision']} full grid (mask tokens in the encoder) vs ours: {r['vs_ours']:.2f}x the step "
                  f"time, {r['gflop_per_step'] / ours['gflop_per_step']:.2f}x the FLOPs (MAE paper, ViT-L: 2.8x "
                  f"the time, 3.3x the FLOPs)")
    for check in checks:
        print(f"target {check['precision']} {check['target']}: {check['value']:.2f} -> "
              f"{'met' if check['met'] else 'NOT met'}")

    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({
            "machine": machine, "settings": settings, "gemm_shapes": shapes,
            "matmul_gflop_per_s": {p: {k: v / 1e9 for k, v in r.items()} for p, r in rates.items()},
            "skipped": skipped, "results": results, "targets": checks,
        }, indent=2) + "\n")
        print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
