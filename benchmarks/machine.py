"""The machine a benchmark ran on, in figures and in words: the CPU's model, the cores this process may use, its
bf16 units, and how fast it multiplies matrices at the moment, which tells apart CPUs of one model name and one set
of flags that run at different speeds (the AVX512-BF16 AMD EPYCs lent to sessions do, by up to 2x)."""
from __future__ import annotations

import functools
import os
import time
from pathlib import Path

import torch

BF16_UNITS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of the CPUs whose bf16 matmuls are fast


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ('unknown' where there is none)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "unknown"
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown")


def cpu_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def bf16_units() -> list[str]:
    """Which of BF16_UNITS the CPU has."""
    try:
        flags = set(next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                         if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        return []
    return [unit for unit in BF16_UNITS if unit in flags]


def matmul_gflops(dtype: torch.dtype, size: int, repeats: int = 5) -> float:
    """GFLOP/s of a size x size x size matmul on the CPU with torch's threads: the best of `repeats` after one
    warm-up, so a moment of other work on the machine costs little."""
    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best / 1e9


@functools.cache
def describe() -> dict:
    """This machine, measured once a process (~0.2 s): {"cpu", "cores", "bf16_units", "matmul_gflops":
    {"float32", "bfloat16"}}. bf16 is timed only on a CPU with bf16 units (elsewhere it is ~100x slower than
    float32, and timing it would take seconds)."""
    units = bf16_units()
    rates = {"float32": round(matmul_gflops(torch.float32, 1024))}
    if units:
        rates["bfloat16"] = round(matmul_gflops(torch.bfloat16, 1024))
    return {"cpu": cpu_model(), "cores": cpu_cores(), "bf16_units": units, "matmul_gflops": rates}


def kind_in_words(machine: dict) -> str:
    """'AMD EPYC, 2 cores, avx512_bf16': what a machine is, without the figures that vary from run to run."""
    return ", ".join([machine["cpu"], f"{machine['cores']} cores", *machine["bf16_units"]])


def rates_in_words(machines: list[dict]) -> str:
    """The range of the matmul rates `machines` (of one kind) measured: 'bf16 matmul 335-396 GFLOP/s' (float32's
    where a machine has no bf16 units)."""
    dtype = "bfloat16" if all("bfloat16" in m["matmul_gflops"] for m in machines) else "float32"
    rates = sorted(m["matmul_gflops"][dtype] for m in machines)
    span = f"{rates[0]}" if rates[0] == rates[-1] else f"{rates[0]}-{rates[-1]}"
    return f"{'bf16' if dtype == 'bfloat16' else 'float32'} matmul {span} GFLOP/s"
