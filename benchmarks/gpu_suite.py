"""The checks to run the first time this project is lent a GPU (issue 18): one command, one table.

    python benchmarks/gpu_suite.py --json runs/gpu_suite/gpu.json    (one GPU; sized for an H200: under 8 minutes)
    python benchmarks/gpu_suite.py --smoke                            (CPU, tiny stand-ins: checks that it all runs)

Rows of the table (the same figures, and the machine, in --json):

1. Training steps in bf16 autocast of MAE ViT-B/16 and ViT-L/16 (`pretrain.models.create_model`
   `mae_vit_base_patch16` / `mae_vit_large_patch16`, 224 px, 75% masking, norm-pix loss) and CLIP ViT-B/16 (the
   open_clip config our LAION recipe trains, `vitpretrain-ViT-B-16-timm`, built by `pretrain.models.clip.create_clip`,
   captions tokenized by `tokenizer_for`), each eager and torch.compile'd (`pretrain.engine.compile_for_training`,
   what `train.compile: true` runs). A step is the task's loss (`pretrain.tasks.MAETask` / `CLIPTask`, world size
   1) under `torch.autocast(bf16)`, `backward()`, the engine's optimizer (`build_optimizer`: fused AdamW) and
   `zero_grad`, then the task's `after_optimizer_step` (CLIP clamps its temperature); batch 256, random images.
   Each row builds its model afresh. Per row:
   - images/s: batch / the median of `--steps` (20) timed steps, after `--warmup` (3) untimed ones (the compiled
     row's first step compiles: its wall time less a median step is reported as the compile time);
   - MFU: model FLOPs per step / median step time / the GPU's published dense bf16 peak. FLOPs are counted once per
     model with torch.utils.flop_counter.FlopCounterMode over one forward + backward (attention on the math
     backend so that its matmuls count; the optimizer's elementwise work is not counted). The peak comes from
     `PEAK_BF16_DENSE` by `torch.cuda.get_device_name()` (NVIDIA datasheets; they print twice these figures "with
     sparsity"); an unknown device gets no MFU, with a note, unless `--peak-tflops` gives the figure;
   - peak memory: torch.cuda.max_memory_allocated over the row's steps (weights, gradients, AdamW state and
     activations; not measured on CPU).
2. Exact resume under FSDP: configs/accelerate/fsdp_1node_8gpu.yaml adapted to one process (written to the work
   folder; the shipped configs all stay 8 GPUs a node) launches `pretrain.cli.main` (what `python -m pretrain`
   runs) with `accelerate launch` on a tiny MAE (mae_vit_tiny_patch4, 32 px, 64 embedded Fashion-MNIST images,
   batch 8: 8 steps, a checkpoint every 2): an uninterrupted run, the same run again (is this GPU deterministic at
   all?), a run stopped after step 3 (`train.stop_after_steps`, which saves that step) and its continuation
   (`train.resume=latest`). Reported: whether the final weights equal the uninterrupted run's bit for bit (and the
   largest difference), whether every step's loss and lr match, the distributed type accelerate actually used, and
   whether the checkpoint came through the engine's sharded path (optimizer state keyed by parameter name). The
   launched worker (`--engine-worker`: python -m pretrain's main() and nothing else) switches on
   `torch.use_deterministic_algorithms` with CUBLAS_WORKSPACE_CONFIG, since some CUDA kernels (attention's backward
   among them) otherwise add in a varying order; if an op has no deterministic kernel it falls back to warn-only
   and says so. The tiny runs leave out the reconstruction picture and the validation set (`num_pictures=0`,
   `data.val=null`): what is checked is the training state.
   On CPU accelerate makes no FSDP (it enables FSDP only for GPU-class devices; a CPU launch of the FSDP config runs
   as MULTI_CPU): the default there is the same sequence in this process, one process, no sharding, as stated in the
   row (`--fsdp-launch accelerate` launches it anyway).
3. The engine's loop without a device sync per step: the same tiny MAE (`--loop-epochs` 8 epochs: 64 steps of 8,
   bf16 where `auto` picks it) through `pretrain.cli.main` in this process, the host reading each step's non-finite
   and signal flags one step late (`pretrain.engine.checks_read_late`: the default on an accelerator, fused AdamW
   skipping a bad update on the device) against at once (a sync every step): images/s of each (the better of two
   alternating runs, each the median of its logged per-epoch rates after the first epoch) and whether both end with
   the same weights, bit for bit. On the CPU both read at once by default; the row forces the late reading there, to check it runs.
4. What `train.mixed_precision: auto` resolves to here (`pretrain.run.resolve_precision`), and why.

Order: the eager rows, the resume check, then the compiled rows, the longest part (inductor compiles each model for
one to two minutes), each started only while less than `--budget-s` (360 s) has passed, so that the whole command
ends within 8 minutes; a row left out says so. A failed row (out of memory, a compiler error) is reported in the
table and the rest still runs; the exit status is 1 if any row or the resume check failed.

`--smoke` runs every row on the CPU with tiny stand-ins (MAE: mae_vit_tiny_patch4 at 32 px cut to 2 and 4 blocks,
CLIP: vitpretrain-tiny-32), batch 2, 1 warm-up and 2 timed steps, torch.compile with the "eager" backend (dynamo's
graph capture without inductor's C++ build, which takes minutes on a CPU) and the resume check in-process: well
under a minute, for CI (tests/test_gpu_suite.py).
"""
from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import yaml
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pretrain.checkpoint import checkpoint_name, load_train_state, read_weights  # noqa: E402
from pretrain.config import OptimConfig  # noqa: E402
from pretrain.engine import build_optimizer, compile_for_training  # noqa: E402
from pretrain.models import create_model  # noqa: E402
from pretrain.run import cpu_has_fast_bf16, resolve_precision  # noqa: E402
from pretrain.tasks import CLIPTask, MAETask  # noqa: E402
from machine import cpu_model  # noqa: E402

MASK_RATIO = 0.75
FSDP_CONFIG = REPO / "configs" / "accelerate" / "fsdp_1node_8gpu.yaml"
DATASHEETS = ("NVIDIA datasheet, dense BF16 Tensor Core TFLOP/s (the datasheets print twice this, "
              "'with sparsity')")

# Published dense bf16 peaks, TFLOP/s, matched (first match wins) against torch.cuda.get_device_name():
# "NVIDIA H200", "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB", "NVIDIA L40S", ...
PEAK_BF16_DENSE: list[tuple[str, str, float]] = [
    (r"GH200", "GH200 (H100-class GPU)", 989.0),
    (r"H200 NVL", "H200 NVL", 835.0),
    (r"H200", "H200 SXM", 989.0),
    (r"H100.*PCIe", "H100 PCIe", 756.0),
    (r"H100 NVL", "H100 NVL", 835.0),
    (r"H100", "H100 SXM", 989.0),
    (r"B200", "B200 (HGX)", 2250.0),
    (r"A100", "A100 (SXM or PCIe)", 312.0),
    (r"L40S", "L40S", 362.0),
    (r"L40\b", "L40", 181.0),
    (r"\bL4\b", "L4", 121.0),
    (r"\bA10\b", "A10", 125.0),
]


def published_peak(device_name: str) -> Optional[dict[str, Any]]:
    """{"tflops", "gpu", "source"} of the first PEAK_BF16_DENSE entry matching the device name; None if none does."""
    for pattern, gpu, tflops in PEAK_BF16_DENSE:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return {"tflops": tflops, "gpu": gpu, "source": f"{DATASHEETS}: {gpu} {tflops:g}"}
    return None


# ------------------------------------------------------------------------------------------------ models


@dataclass
class ModelSpec:
    key: str  # the row's name in the table and the JSON
    label: str
    kind: str  # "mae" | "clip"
    name: str  # create_model name (MAE) or open_clip config (CLIP)
    image_size: int
    batch_size: int
    overrides: dict = field(default_factory=dict)  # constructor overrides (the smoke stand-ins' depths)

    @property
    def built_from(self) -> str:
        extra = "".join(f", {k}={v}" for k, v in self.overrides.items())
        return f"{self.name} ({self.image_size} px{extra})"


def model_specs(smoke: bool) -> list[ModelSpec]:
    if smoke:
        return [
            ModelSpec("mae_vit_b16", "MAE ViT-B/16 stand-in", "mae", "mae_vit_tiny_patch4", 32, 2,
                      {"depth": 2, "decoder_depth": 1}),
            ModelSpec("mae_vit_l16", "MAE ViT-L/16 stand-in", "mae", "mae_vit_tiny_patch4", 32, 2,
                      {"depth": 4, "decoder_depth": 1}),
            ModelSpec("clip_vit_b16", "CLIP ViT-B/16 stand-in", "clip", "vitpretrain-tiny-32", 32, 2),
        ]
    return [
        ModelSpec("mae_vit_b16", "MAE ViT-B/16", "mae", "mae_vit_base_patch16", 224, 256),
        ModelSpec("mae_vit_l16", "MAE ViT-L/16", "mae", "mae_vit_large_patch16", 224, 256),
        ModelSpec("clip_vit_b16", "CLIP ViT-B/16", "clip", "vitpretrain-ViT-B-16-timm", 224, 256),
    ]


def build(spec: ModelSpec, device: torch.device):
    """(model on the device in training mode, task, batch): the task and the batch as the engine hands them over."""
    torch.manual_seed(0)
    images = torch.randn(spec.batch_size, 3, spec.image_size, spec.image_size, device=device)
    if spec.kind == "mae":
        model = create_model(spec.name, img_size=spec.image_size, mask_ratio=MASK_RATIO, norm_pix_loss=True,
                             **spec.overrides)
        return model.to(device).train(), MAETask(MASK_RATIO), {"image": images}
    from pretrain.models.clip import create_clip, tokenizer_for

    model, name, config = create_clip(spec.name)
    size = config["vision_cfg"]["image_size"]
    if size != spec.image_size:
        raise ValueError(f"{spec.name} takes {size} px images, not {spec.image_size}")
    captions = [f"a photo of object number {i}" for i in range(spec.batch_size)]
    batch = {"image": images, "text": tokenizer_for(name)(captions).to(device)}
    return model.to(device).train(), CLIPTask(local_loss=True, gather_with_grad=True, rank=0, world_size=1), batch


# ------------------------------------------------------------------------------------------------ measuring


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bf16(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16)


def train_step(call, model, task, batch, optimizer, device) -> float:
    """One optimizer step through `call` (the model or its compiled wrapper); its wall-clock seconds."""
    synchronize(device)
    start = time.perf_counter()
    with bf16(device):
        loss = task(call, batch)["loss"]
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    task.after_optimizer_step(model)
    synchronize(device)
    return time.perf_counter() - start


def count_flops(model, task, batch, device) -> int:
    """FLOPs of one forward + backward of the eager model in bf16 autocast, attention on the math backend."""
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel([SDPBackend.MATH]):
        with bf16(device):
            loss = task(model, batch)["loss"]
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def measure(spec: ModelSpec, mode: str, call, model, task, batch, optimizer, flops: int, args, device,
            peak: Optional[dict]) -> dict[str, Any]:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    first = train_step(call, model, task, batch, optimizer, device)
    for _ in range(args.warmup - 1):
        train_step(call, model, task, batch, optimizer, device)
    times = [train_step(call, model, task, batch, optimizer, device) for _ in range(args.steps)]
    median = statistics.median(times)
    achieved = flops / median
    return {
        "key": spec.key, "label": spec.label, "model": spec.built_from, "mode": mode, "batch_size": spec.batch_size,
        "images_per_s": spec.batch_size / median, "step_s_median": median, "step_s_all": times,
        "first_step_s": first, "compile_s": max(0.0, first - median) if mode == "compile" else None,
        "gflop_per_step": flops / 1e9, "achieved_tflop_per_s": achieved / 1e12,
        "mfu": achieved / (peak["tflops"] * 1e12) if peak else None,
        "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "parameters": sum(p.numel() for p in model.parameters()), "status": "ok", "error": None,
    }  # fmt: skip


def short_error(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".strip().splitlines()
    return text[0][:300] if text else type(err).__name__


def compiler(args):
    if args.compile_backend == "inductor":
        return compile_for_training  # what train.compile=true runs
    return lambda model: torch.compile(model, backend=args.compile_backend)


def release(device: torch.device) -> None:
    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def benchmark_row(spec: ModelSpec, mode: str, args, device, peak, flops_of: dict[str, int]) -> dict[str, Any]:
    """One row: a fresh model and optimizer (so that each row's peak memory is its own), eager or compiled. The
    model's FLOPs are counted once, by its first row, into `flops_of`."""
    start = time.perf_counter()
    model = optimizer = call = None
    try:
        model, task, batch = build(spec, device)
        optimizer = build_optimizer(model, OptimConfig(), lr=1e-4)  # the engine's AdamW
        if spec.key not in flops_of:
            flops_of[spec.key] = count_flops(model, task, batch, device)
        call = model if mode == "eager" else compiler(args)(model)
        row = measure(spec, mode, call, model, task, batch, optimizer, flops_of[spec.key], args, device, peak)
    except Exception as err:  # noqa: BLE001 - a failed row (OOM, a compiler error) must not end the suite
        row = other_row(spec, mode, "failed", short_error(err))
    finally:
        del model, optimizer, call
        release(device)
    print(f"{spec.label} {mode}: " + (row_summary(row) if row["status"] == "ok" else f"{row['status']}: "
                                      f"{row['error']}") + f" ({time.perf_counter() - start:.0f} s)", flush=True)
    return row


def other_row(spec: ModelSpec, mode: str, status: str, why: str) -> dict[str, Any]:
    """A row without figures: "failed" (with the error) or "skipped" (with the reason)."""
    return {"key": spec.key, "label": spec.label, "model": spec.built_from, "mode": mode,
            "batch_size": spec.batch_size, "status": status, "error": why}


def row_summary(row: dict[str, Any]) -> str:
    parts = [f"{row['images_per_s']:,.1f} images/s", f"{row['gflop_per_step']:,.1f} GFLOP/step"]
    if row["mfu"] is not None:
        parts.append(f"MFU {row['mfu']:.1%}")
    if row["compile_s"] is not None:
        parts.append(f"compile {row['compile_s']:.1f} s")
    return ", ".join(parts)


# ------------------------------------------------------------------------------------------------ FSDP resume

TINY_IMAGES, TINY_BATCH, TINY_SIZE, STOP_AT, SAVE_EVERY = 64, 8, 32, 3, 2
TOTAL_STEPS = TINY_IMAGES // TINY_BATCH


def fsdp_1gpu_config(path: Path) -> Path:
    """configs/accelerate/fsdp_1node_8gpu.yaml with one process: the same FSDP settings, on one GPU."""
    config = yaml.safe_load(FSDP_CONFIG.read_text())
    config.update(num_processes=1, num_machines=1)
    path.write_text(f"# {FSDP_CONFIG.relative_to(REPO)} adapted to one process by benchmarks/gpu_suite.py\n"
                    + yaml.safe_dump(config, sort_keys=False))
    return path


def write_tiny_shards(folder: Path) -> Path:
    """The first 64 embedded Fashion-MNIST images as 2 training shards."""
    from data import ShardOptions, read_embedded, write_labelled_shards

    class_names, samples = read_embedded()
    write_labelled_shards(list(itertools.islice(iter(samples), TINY_IMAGES)), folder, class_names,
                          options=ShardOptions(shard_size=TINY_IMAGES // 2, progress=False))
    return folder


def tiny_run_overrides(output_dir: Path, shards: Path, precision: str, *extra: str) -> list[str]:
    return [
        "model.name=mae_vit_tiny_patch4", f"data.train={shards}", "data.val=null", f"data.image_size={TINY_SIZE}",
        "data.num_workers=0", "data.shuffle_buffer=16", f"train.batch_size={TINY_BATCH}", "train.epochs=1",
        f"train.save_every={SAVE_EVERY}", "train.log_every=1", f"train.mixed_precision={precision}",
        "logging.wandb=disabled", "logging.progress_bar=false", "num_pictures=0", f"output_dir={output_dir}", *extra,
    ]  # fmt: skip


def accelerate_state_info() -> dict[str, Any]:
    """What accelerate set up for the run that just ended in this process (its state outlives the run)."""
    from accelerate.state import AcceleratorState, PartialState

    shared, partial = AcceleratorState._shared_state, PartialState._shared_state
    kind = shared.get("distributed_type", partial.get("distributed_type"))
    plugin = shared.get("fsdp_plugin")
    return {"distributed_type": getattr(kind, "value", None if kind is None else str(kind)),
            "fsdp_version": getattr(plugin, "fsdp_version", None) if plugin is not None else None,
            "mixed_precision": shared.get("_mixed_precision"), "num_processes": partial.get("num_processes")}


def reset_accelerate_state() -> None:
    """accelerate keeps one process-wide state; the next in-process run starts from none (as its own tests do)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def engine_worker(argv: list[str]) -> int:
    """`accelerate launch ... gpu_suite.py --engine-worker REPORT DETERMINISM key=value ...`: python -m pretrain's
    main() with torch's deterministic algorithms (strict, warn or off); writes what accelerate set up to REPORT."""
    report, determinism, overrides = argv[0], argv[1], argv[2:]
    if determinism != "off":
        torch.use_deterministic_algorithms(True, warn_only=determinism == "warn")
    from pretrain.cli import main as pretrain_main

    code = pretrain_main(overrides)
    if int(os.environ.get("RANK", "0")) == 0:
        Path(report).write_text(json.dumps({"exit_code": code, "deterministic": determinism,
                                            **accelerate_state_info()}) + "\n")
    return code


@dataclass
class TinyRun:
    name: str
    output_dir: Path
    exit_code: int
    info: dict
    log_tail: str = ""


def run_inprocess(name: str, overrides: list[str], output_dir: Path) -> TinyRun:
    from pretrain.cli import main as pretrain_main

    try:
        code = pretrain_main(overrides)
        info = accelerate_state_info()
    finally:
        reset_accelerate_state()
    return TinyRun(name, output_dir, code, info)


def run_launched(name: str, overrides: list[str], output_dir: Path, config: Path, determinism: str,
                 work: Path, timeout: float) -> TinyRun:
    report = work / f"{name}.json"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
               str(Path(__file__).resolve()), "--engine-worker", str(report), determinism, *overrides]
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    if determinism != "off":
        env["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"  # deterministic cuBLAS (torch's rule for deterministic mode)
    try:
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        code, output = result.returncode, result.stdout + result.stderr
    except subprocess.TimeoutExpired as err:
        code, output = 124, f"{err.stdout or ''}{err.stderr or ''}\ntimed out after {timeout:g} s"
        output = output if isinstance(output, str) else str(output)
    (work / f"{name}.log").write_text(output)
    info = json.loads(report.read_text()) if report.is_file() else {}
    return TinyRun(name, output_dir, code, info, output[-3000:])


def compare_weights(a: Path, b: Path) -> dict[str, Any]:
    """Bit-for-bit comparison of two checkpoints' model.safetensors: equal?, largest |difference|, tensors differing."""
    wa, _ = read_weights(a)
    wb, _ = read_weights(b)
    if wa.keys() != wb.keys():
        return {"bit_identical": False, "max_abs_diff": None, "tensors_differing": None,
                "keys_differ": sorted(set(wa) ^ set(wb))[:10]}
    differing = [k for k in wa if not torch.equal(wa[k], wb[k])]
    max_diff = max(((wa[k].double() - wb[k].double()).abs().max().item() for k in differing), default=0.0)
    return {"bit_identical": not differing, "max_abs_diff": max_diff, "tensors_differing": len(differing),
            "tensors": len(wa)}


def logged_steps(output_dir: Path) -> dict[int, tuple[float, float]]:
    """step -> (loss, lr); a resumed run logs again the steps after its checkpoint: the later line counts."""
    records = [json.loads(line) for line in (output_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: (r["loss"], r["lr"]) for r in records}


def fsdp_resume_check(args, device: torch.device, work: Path) -> dict[str, Any]:
    import accelerate

    launch = args.fsdp_launch if args.fsdp_launch != "auto" else ("accelerate" if device.type == "cuda" else
                                                                  "inprocess")
    shards = write_tiny_shards(work / "shards")
    result: dict[str, Any] = {
        "launch": launch, "model": f"mae_vit_tiny_patch4 ({TINY_SIZE} px)", "batch_size": TINY_BATCH,
        "steps": TOTAL_STEPS, "stopped_after_step": STOP_AT, "save_every": SAVE_EVERY, "precision": args.fsdp_precision,
        "accelerate": accelerate.__version__, "error": None, "notes": [],
    }  # fmt: skip
    determinism = args.fsdp_deterministic if launch == "accelerate" else "off"
    config = None
    if launch == "accelerate":
        config = fsdp_1gpu_config(work / "fsdp_1gpu.yaml")
        result["config"] = yaml.safe_load(config.read_text())
        result["command"] = (f"accelerate launch --config_file {config} benchmarks/gpu_suite.py --engine-worker "
                             f"REPORT {determinism} " + " ".join(tiny_run_overrides(Path("OUT"), Path("SHARDS"),
                                                                                  args.fsdp_precision))
                             + " (the worker is python -m pretrain's main() under torch.use_deterministic_algorithms)")
    else:
        result["command"] = "pretrain.cli.main([...]) in this process (= python -m pretrain), one process"

    def run(name: str, *extra: str, folder: Optional[str] = None) -> TinyRun:
        out = work / (folder or name)
        overrides = tiny_run_overrides(out, shards, args.fsdp_precision, *extra)
        start = time.perf_counter()
        if launch == "accelerate":
            done = run_launched(name, overrides, out, config, determinism, work, args.fsdp_timeout)
        else:
            done = run_inprocess(name, overrides, out)
        print(f"resume check: {name} run exited {done.exit_code} ({time.perf_counter() - start:.0f} s)", flush=True)
        return done

    reference = run("uninterrupted")
    if reference.exit_code != 0 and determinism == "strict" and "use_deterministic_algorithms" in reference.log_tail:
        why = next(line for line in reference.log_tail.splitlines() if "use_deterministic_algorithms" in line)
        result["notes"].append("an op has no deterministic kernel under torch.use_deterministic_algorithms(True) "
                               f"({why.strip()[:200]}): reran with warn_only=True (that op may add in a varying order)")
        determinism = "warn"
        reference = run("uninterrupted_warn_only", folder="uninterrupted_warn_only")
    plan = [("uninterrupted_again", ()), ("stopped", (f"train.stop_after_steps={STOP_AT}",)),
            ("resumed", ("train.resume=latest",))]  # the continuation runs in the stopped run's folder
    runs = [reference]
    for name, extra in plan:
        if runs[-1].exit_code != 0:
            break
        runs.append(run(name, *extra, folder="stopped" if name == "resumed" else None))
    result["deterministic_algorithms"] = determinism
    if launch == "accelerate" and (work / f"{reference.name}.log").is_file():
        warned = {line.strip()[:200] for line in (work / f"{reference.name}.log").read_text().splitlines()
                  if "deterministic" in line.lower() and "warn" in line.lower()}
        result["notes"] += [f"warning in the runs: {line}" for line in sorted(warned)[:3]]
    result["exit_codes"] = {r.name: r.exit_code for r in runs}
    result.update({k: reference.info.get(k) for k in ("distributed_type", "fsdp_version", "mixed_precision",
                                                       "num_processes")})
    failed = next((r for r in runs if r.exit_code != 0), None)
    if failed is not None:
        result["error"] = f"the {failed.name} run exited {failed.exit_code}"
        result["log_tail"] = failed.log_tail
        return result

    final = checkpoint_name(TOTAL_STEPS)
    resumed_dir, reference_dir = runs[-1].output_dir, reference.output_dir
    result.update(compare_weights(resumed_dir / "checkpoints" / final, reference_dir / "checkpoints" / final))
    repeat = compare_weights(runs[1].output_dir / "checkpoints" / final, reference_dir / "checkpoints" / final)
    result["repeat_bit_identical"], result["repeat_max_abs_diff"] = repeat["bit_identical"], repeat["max_abs_diff"]
    got, expected = logged_steps(resumed_dir), logged_steps(reference_dir)
    result["losses_identical"] = sorted(got) == list(range(1, TOTAL_STEPS + 1)) and got == expected
    state = load_train_state(resumed_dir / "checkpoints" / final)
    result["optimizer_state_keyed_by_name"] = all(isinstance(k, str) for k in state["optimizer"]["state"])
    if launch == "inprocess":
        result["notes"].append(
            "no FSDP: the runs went through pretrain.cli.main in this process, one process, unsharded (accelerate "
            f"{accelerate.__version__} makes FSDP only on GPU-class devices: on a CPU even --fsdp-launch accelerate "
            "runs the FSDP config as MULTI_CPU)")
    elif result["distributed_type"] != "FSDP":
        result["notes"].append(
            f"FSDP was not engaged: accelerate {accelerate.__version__} ran the FSDP config as "
            f"{result['distributed_type']} ({result['num_processes']} process); it makes FSDP only on GPU-class "
            "devices, so this is the same stop/resume sequence without sharding")
    elif not result["optimizer_state_keyed_by_name"]:
        result["notes"].append("accelerate reports FSDP but the checkpoint's optimizer state is keyed by index: "
                               "the engine's sharded save path (Trainer._full_states) was not taken")
    if not result["bit_identical"] and not result["repeat_bit_identical"]:
        result["notes"].append("two uninterrupted runs already differ: the difference is this machine's "
                               "nondeterminism, not the resume")
    return result


# ------------------------------------------------------------------------------------------------ engine loop


def step_check_loop(args, device: torch.device, work: Path) -> dict[str, Any]:
    """Row 3: the tiny MAE's whole run with the step flags read one step late against at once."""
    import pretrain.engine as engine

    shards = work / "shards" if (work / "shards").is_dir() else write_tiny_shards(work / "shards")
    steps = TOTAL_STEPS * args.loop_epochs
    result: dict[str, Any] = {"model": f"mae_vit_tiny_patch4 ({TINY_SIZE} px)", "batch_size": TINY_BATCH,
                              "steps": steps, "error": None, "images_per_s": {"at_once": [], "late": []}}
    default = engine.checks_read_late
    finals = {}
    try:
        for repeat in range(2):
            for mode, lag in (("at_once", 0), ("late", 1)):
                engine.checks_read_late = lambda device, lag=lag: lag
                out = work / f"loop_{mode}_{repeat}"
                done = run_inprocess(f"loop_{mode}", tiny_run_overrides(
                    out, shards, "auto", f"train.epochs={args.loop_epochs}", f"train.log_every={TOTAL_STEPS}",
                    f"train.save_every={steps}"), out)
                if done.exit_code != 0:
                    result["error"] = f"the {mode} run exited {done.exit_code}"
                    return result
                # a log line per epoch; the first epoch's (start-up, warm-up) is left out where there are more
                records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
                rates = [r["images_per_s"] for r in records[1:] or records]
                result["images_per_s"][mode].append(statistics.median(rates))
                finals.setdefault(mode, out / "checkpoints" / checkpoint_name(steps))
    finally:
        engine.checks_read_late = default
    best = {mode: max(rates) for mode, rates in result["images_per_s"].items()}
    result.update(best_images_per_s=best, late_over_at_once=best["late"] / best["at_once"],
                  **compare_weights(finals["late"], finals["at_once"]))
    print(f"engine loop: flags read late {best['late']:.0f} images/s, at once {best['at_once']:.0f}; "
          f"bit-identical: {result['bit_identical']}", flush=True)
    return result


# ------------------------------------------------------------------------------------------------ precision


def mixed_precision_auto(device: torch.device) -> dict[str, Any]:
    choice = resolve_precision("auto")
    if torch.cuda.is_available():
        supported = torch.cuda.is_bf16_supported()
        rule = (f"a CUDA GPU ({torch.cuda.get_device_name()}): bf16 where torch.cuda.is_bf16_supported() (here "
                f"{supported}), else fp16")
    else:
        rule = (f"no GPU: bf16 on a CPU with bf16 matmul units (avx512_bf16 / amx_bf16 in /proc/cpuinfo: here "
                f"{cpu_has_fast_bf16()}), else no (float32)")
    return {"choice": choice, "rule": f"pretrain.run.resolve_precision: {rule}"}


# ------------------------------------------------------------------------------------------------ report


def machine_info(device: torch.device) -> dict[str, Any]:
    import accelerate
    import open_clip
    import timm

    info = {"device": device.type, "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "timm": timm.__version__, "open_clip": open_clip.__version__,
            "accelerate": accelerate.__version__, "cpu_threads": torch.get_num_threads()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device_name=torch.cuda.get_device_name(device), memory_bytes=props.total_memory,
                    capability=f"{props.major}.{props.minor}", cudnn=torch.backends.cudnn.version())
    else:
        name = cpu_model()
        info["device_name"] = name if name != "unknown" else platform.processor() or platform.machine()
    return info


def fmt(value, spec: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value / scale, spec)


def fsdp_result_text(fsdp: dict[str, Any]) -> str:
    if fsdp.get("error"):
        return f"FAILED: {fsdp['error']}"
    def diff(value) -> str:
        return "n/a: the tensor names differ" if value is None else f"{value:.3g}"

    return (f"bit-identical: {'yes' if fsdp['bit_identical'] else 'NO'} (max abs diff {diff(fsdp['max_abs_diff'])}); "
            f"losses {'identical' if fsdp['losses_identical'] else 'DIFFER'}; uninterrupted twice: "
            + ("identical" if fsdp["repeat_bit_identical"] else f"differ by {diff(fsdp['repeat_max_abs_diff'])}"))


def cell(text: str) -> str:
    """Text for a markdown table cell (a "|" would end the cell)."""
    return str(text).replace("|", "\\|")


def fsdp_mode_text(fsdp: dict[str, Any]) -> str:
    kind = fsdp.get("distributed_type")
    kind = {"FSDP": f"FSDP{fsdp.get('fsdp_version') or ''}", "NO": "no FSDP", "MULTI_CPU": "no FSDP (MULTI_CPU, gloo)",
            None: "?"}.get(kind, f"{kind}, no FSDP")
    how = "accelerate launch" if fsdp["launch"] == "accelerate" else "in-process"
    return f"{kind}, 1 process, {how}"


def table(rows: list[dict], fsdp: Optional[dict], loop: Optional[dict], precision: dict) -> str:
    lines = ["| row | model | mode | batch | images/s | step (ms) | compile (s) | GFLOP/step | TFLOP/s | MFU "
             "| peak memory (GiB) | result |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['label']} | {r['model']} | {r['mode']} | {r['batch_size']} | - | - | - | - | - | - "
                         f"| - | {r['status']}: {cell(r['error'])} |")
            continue
        lines.append(
            f"| {r['label']} | {r['model']} | {r['mode']} | {r['batch_size']} | {r['images_per_s']:,.1f} "
            f"| {r['step_s_median'] * 1e3:,.1f} | {fmt(r['compile_s'], '.1f')} | {r['gflop_per_step']:,.2f} "
            f"| {r['achieved_tflop_per_s']:.3g} | {fmt(r['mfu'], '.1%')} | {fmt(r['peak_memory_bytes'], '.2f', 2**30)} "
            f"| ok |")
    if fsdp is not None:
        lines.append(f"| exact resume | {fsdp['model']} | {fsdp_mode_text(fsdp)} | {fsdp['batch_size']} | - | - | - "
                     f"| - | - | - | - | stopped after step {fsdp['stopped_after_step']}, resumed to "
                     f"{fsdp['steps']}: {cell(fsdp_result_text(fsdp))} |")
    if loop is not None:
        if loop["error"]:
            outcome = f"failed: {cell(loop['error'])}"
        else:
            rates = loop["best_images_per_s"]
            outcome = (f"flags read late / at once: {loop['late_over_at_once']:.3f}x ({rates['late']:,.0f} against "
                       f"{rates['at_once']:,.0f} images/s); same weights: {'yes' if loop['bit_identical'] else 'NO'}")
        lines.append(f"| engine loop | {loop['model']} | whole run, {loop['steps']} steps | {loop['batch_size']} | - | - "
                     f"| - | - | - | - | - | {outcome} |")
    lines.append(f"| train.mixed_precision: auto | - | - | - | - | - | - | - | - | - | - | {precision['choice']} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ main


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="also write the figures, the machine and the settings to this JSON file")
    parser.add_argument("--smoke", action="store_true", help="tiny stand-ins on the CPU (see above): checks it runs")
    parser.add_argument("--device", default="auto", help="auto (cuda if present; cpu with --smoke), cpu, cuda")
    parser.add_argument("--models", help="comma list of mae_vit_b16, mae_vit_l16, clip_vit_b16 (default: all)")
    parser.add_argument("--batch-size", type=int, help="per step, every model (default: 256; --smoke 2)")
    parser.add_argument("--warmup", type=int, help="untimed steps per row, the first compiles (default 3; smoke 1)")
    parser.add_argument("--steps", type=int, help="timed steps per row (default 20; smoke 2)")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile rows")
    parser.add_argument("--compile-backend", help="torch.compile backend (default inductor, the engine's "
                                                  "train.compile; --smoke: eager)")
    parser.add_argument("--budget-s", type=float, help="start no torch.compile row after this many seconds "
                                                       "(default 360: a ViT-L compile then still ends within 8 min; "
                                                       "--smoke: none)")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak, TFLOP/s, for MFU where the "
                                                          "built-in table does not know the device")
    parser.add_argument("--skip-resume", action="store_true", help="leave out the FSDP stop/resume check")
    parser.add_argument("--skip-loop", action="store_true", help="leave out the engine-loop row")
    parser.add_argument("--loop-epochs", type=int, help="epochs of 8 steps per engine-loop run (default 8; smoke 1)")
    parser.add_argument("--fsdp-launch", choices=("auto", "accelerate", "inprocess"), default="auto",
                        help="auto: accelerate launch on a GPU, in this process on CPU")
    parser.add_argument("--fsdp-precision", default="auto", choices=("auto", "no", "bf16", "fp16"),
                        help="train.mixed_precision of the resume check's runs")
    parser.add_argument("--fsdp-deterministic", choices=("strict", "warn", "off"), default="strict",
                        help="torch.use_deterministic_algorithms in the launched runs (strict falls back to warn "
                             "when an op has no deterministic kernel)")
    parser.add_argument("--fsdp-timeout", type=float, default=300, help="seconds per launched run")
    parser.add_argument("--workdir", help="folder for the resume check's and the engine loop's runs (default: a "
                                          "temporary one, removed unless something failed)")
    args = parser.parse_args(argv)
    defaults = dict(warmup=1, steps=2, compile_backend="eager", budget_s=None, loop_epochs=1) if args.smoke else dict(
        warmup=3, steps=20, compile_backend="inductor", budget_s=360.0, loop_epochs=8)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.warmup < 1 or args.steps < 1 or args.loop_epochs < 1 or (args.batch_size is not None and args.batch_size < 1):
        parser.error("--warmup, --steps, --loop-epochs and --batch-size must be >= 1")
    specs = model_specs(args.smoke)
    known = [s.key for s in specs]
    wanted = known if args.models is None else [m.strip() for m in args.models.split(",") if m.strip()]
    if not wanted or any(m not in known for m in wanted):
        parser.error(f"--models: choose from {', '.join(known)}, got {args.models!r}")
    args.specs = [s for s in specs if s.key in wanted]
    for spec in args.specs:
        spec.batch_size = args.batch_size or spec.batch_size
    return args


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--engine-worker"]:
        return engine_worker(argv[1:])
    args = parse_args(argv)
    started = time.perf_counter()
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    else:
        device = torch.device(args.device)
    machine = machine_info(device)
    peak = None
    if args.peak_tflops:
        peak = {"tflops": args.peak_tflops, "gpu": machine["device_name"], "source": "--peak-tflops"}
    elif device.type == "cuda":
        peak = published_peak(machine["device_name"])
    peak_note = (f"MFU against {peak['tflops']:g} TFLOP/s dense bf16 ({peak['source']})" if peak else
                 f"MFU omitted: no published dense bf16 peak known for {machine['device_name']!r}"
                 + (" (a CPU)" if device.type == "cpu" else "") + "; give one with --peak-tflops")
    print(f"{machine['device_name']} ({device.type}), torch {machine['torch']}; {peak_note}", flush=True)

    # eager rows, the resume check, then the compiled rows (the longest and least certain part) while the time lasts
    flops_of: dict[str, int] = {}
    rows = [benchmark_row(spec, "eager", args, device, peak, flops_of) for spec in args.specs]
    fsdp = loop = None
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="gpu_suite_"))
    work.mkdir(parents=True, exist_ok=True)
    if not args.skip_resume:
        try:
            fsdp = fsdp_resume_check(args, device, work)
        except Exception as err:  # noqa: BLE001 - reported in the table, the rest still printed
            fsdp = {"launch": args.fsdp_launch, "model": "mae_vit_tiny_patch4", "batch_size": TINY_BATCH,
                    "steps": TOTAL_STEPS, "stopped_after_step": STOP_AT, "error": short_error(err), "notes": []}
        if fsdp.get("error"):
            fsdp["workdir"] = str(work)
    if not args.skip_loop:
        try:
            loop = step_check_loop(args, device, work)
        except Exception as err:  # noqa: BLE001 - reported in the table, the rest still printed
            loop = {"model": "mae_vit_tiny_patch4", "batch_size": TINY_BATCH, "steps": None, "error": short_error(err)}
    if args.workdir is None and not any(part is not None and part.get("error") for part in (fsdp, loop)):
        shutil.rmtree(work, ignore_errors=True)
    for spec in [] if args.no_compile else args.specs:
        elapsed = time.perf_counter() - started
        if args.budget_s is not None and elapsed > args.budget_s:
            why = f"{elapsed:.0f} s gone, past --budget-s {args.budget_s:g}"
            rows.append(other_row(spec, "compile", "skipped", why))
            print(f"{spec.label} compile: {rows[-1]['status']}: {rows[-1]['error']}", flush=True)
        else:
            rows.append(benchmark_row(spec, "compile", args, device, peak, flops_of))
    order = {spec.key: i for i, spec in enumerate(args.specs)}
    rows.sort(key=lambda r: (order[r["key"]], r["mode"] != "eager"))
    precision = mixed_precision_auto(device)
    if fsdp is not None and fsdp.get("mixed_precision") and args.fsdp_precision == "auto":
        precision["engine_run"] = fsdp["mixed_precision"]  # what the resume check's accelerator was set up with

    print()
    print(table(rows, fsdp, loop, precision))
    print()
    print(f"Steps: bf16 autocast, the engine's fused AdamW; median of {args.steps} timed steps after {args.warmup} "
          f"warm-up; torch.compile backend {args.compile_backend}; FLOPs per step by FlopCounterMode (forward + "
          f"backward, math attention). {peak_note}.")
    if fsdp is not None:
        print(f"Resume check: {fsdp.get('command', '')}")
        for note in fsdp.get("notes", []):
            print(f"  note: {note}")
        if fsdp.get("error"):
            print(f"  its runs are in {fsdp.get('workdir')}; last output:\n{fsdp.get('log_tail', '')[-1500:]}")
    print(f"train.mixed_precision auto -> {precision['choice']}: {precision['rule']}"
          + (f"; the resume check's runs were set up with {precision['engine_run']}" if "engine_run" in precision
             else ""))
    elapsed = time.perf_counter() - started
    print(f"{elapsed:.0f} s in all")

    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        settings = {"smoke": args.smoke, "warmup": args.warmup, "steps": args.steps, "mask_ratio": MASK_RATIO,
                    "compile_backend": args.compile_backend, "autocast": "bf16",
                    "optimizer": "pretrain.engine.build_optimizer (fused AdamW, lr 1e-4, weight decay 0.05)",
                    "flops": "FlopCounterMode, forward + backward, math attention", "budget_s": args.budget_s,
                    "models": {spec.key: spec.built_from for spec in args.specs}}
        path.write_text(json.dumps({
            "machine": machine, "settings": settings, "peak": peak, "peak_note": peak_note, "rows": rows,
            "fsdp_resume": fsdp, "engine_loop": loop, "mixed_precision_auto": precision, "elapsed_s": elapsed,
        }, indent=2, default=str) + "\n")
        print(f"wrote {path}")
    failed = [r for r in rows if r["status"] == "failed"] + [part for part in (fsdp, loop)
                                                              if part is not None and part.get("error")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
