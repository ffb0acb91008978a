"""Which kernel each attention layer runs (train.attention): a fixed rule by default, or timed on the run's shapes.

timm's attention layers (ViT's `Attention`, Swin's `WindowAttention`, ...) compute softmax(QK^T/sqrt(d))V either
with torch's fused `scaled_dot_product_attention` or as explicit matmuls; their `fused_attn` attribute picks. Which
is faster depends on the device, the precision and the shape: on 2 cores of an AVX512-BF16 AMD EPYC, MAE ViT-B's
bf16 training step runs 7% faster with the explicit matmuls (3.32 against 3.54 s; the CPU flash kernel's bf16
backward is slow, while bf16 matmuls run at 2-2.7x float32's rate), and ~8% slower in float32 (docs/benchmarks.md,
"bf16 on a CPU with bf16 units").

`train.attention` (pretrain.config.TrainConfig):
- "auto" (the default): a fixed rule, so that a run is a function of its config, seed and device alone: explicit
  matmuls on a CPU in reduced precision (bf16, fp16), where they won every timing we made (the tiny ViTs' layers
  2.6-3.4x, DETR's 257-token trunk 1.8x, ViT-B 7% on a whole step); everywhere else (GPUs; float32, where the
  matmuls are ~8% slower on the CPU) each layer keeps timm's default: torch's fused kernel for ViT's `Attention`,
  explicit matmuls where timm marks the fused path experimental (Swin's `WindowAttention`);
- "fused" / "math": every layer runs that kernel;
- "timed": the first training step records each attention layer's inputs; each distinct layer (type, weights'
  shapes, inputs' shapes) is then timed forward and backward with both kernels on those inputs, and every layer
  keeps the faster one for the rest of the run (as `torch.backends.cudnn.benchmark`: for hardware the rule does not
  know). The choice is logged and recorded in the checkpoints, so a resumed run computes exactly what the
  uninterrupted one did; but it follows the clock, and on a busy machine the clock can pick the other kernel
  (DETR's trunk, 2 cores shared with another job: fused 192 against math 228 ms; idle, 36 against 20), so two
  runs of one config can differ. Under FSDP (whose sharded layers cannot run alone) or `train.compile` (one traced
  graph) it falls back to the "auto" rule.
"""
from __future__ import annotations

import time
from contextlib import AbstractContextManager
from typing import Any, Callable, Optional

import torch
from torch import nn

KERNELS = ("fused", "math")
ROUNDS = 5  # timed calls of each kernel per layer shape, alternating; the fastest call counts


def times_kernels(attention: str, sharded: bool = False, compiled: bool = False) -> bool:
    """Whether `train.attention` `attention` chooses each layer's kernel by timing: "timed", neither sharded by FSDP
    nor compiled."""
    return attention == "timed" and not sharded and not compiled


def rule_kernel(attention: str, device_type: str, mixed_precision: str) -> Optional[str]:
    """The one kernel every layer runs when none is timed: "fused" / "math" as named; otherwise (auto, or timed where
    it cannot time) explicit matmuls on a CPU in reduced precision (accelerate's `mixed_precision` "bf16" / "fp16"),
    and None everywhere else: each layer keeps timm's default."""
    if attention in KERNELS:
        return attention
    return "math" if device_type == "cpu" and mixed_precision in ("bf16", "fp16") else None


def attention_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers whose kernel can be chosen (timm's `fused_attn` switch), by qualified name."""
    return {name: module for name, module in model.named_modules() if isinstance(getattr(module, "fused_attn", None), bool)}


def set_kernels(model: nn.Module, kernels: Optional[str | dict[str, str]]) -> None:
    """Set every attention layer to one kernel ("fused" / "math"), or each named layer to its own (None: leave all
    as they are)."""
    if kernels is None:
        return
    for name, layer in attention_layers(model).items():
        kernel = kernels if isinstance(kernels, str) else kernels.get(name)
        if kernel is not None:
            layer.fused_attn = kernel == "fused"


class FirstCallInputs:
    """Records each attention layer's first inputs (detached copies) while it is attached; detach with `close()`.
    Attached for a run's first step, it sees the shapes and values the run trains on, at no extra cost."""

    def __init__(self, layers: dict[str, nn.Module]):
        self.inputs: dict[str, tuple[tuple, dict]] = {}
        self._handles = {name: layer.register_forward_pre_hook(self._hook(name), with_kwargs=True)
                         for name, layer in layers.items()}

    def _hook(self, name: str) -> Callable:
        def record(module, args, kwargs):
            if name not in self.inputs:
                self.inputs[name] = (_detached(args), _detached(kwargs))
                self._handles.pop(name).remove()
        return record

    def close(self) -> None:
        for handle in self._handles.values():
            handle.remove()
        self._handles.clear()


def choose_kernels(layers: dict[str, nn.Module], inputs: dict[str, tuple[tuple, dict]],
                   autocast: Callable[[], AbstractContextManager]) -> tuple[dict[str, str], list[str]]:
    """Time both kernels on each distinct layer's recorded inputs, forward and backward under `autocast()`; set each
    layer to the faster one. Returns ({layer name: kernel}, one log line per distinct layer). The weights' gradients
    and the random number generators are left as they were."""
    groups: dict[tuple, list[str]] = {}
    for name, (args, kwargs) in inputs.items():
        groups.setdefault(_signature(layers[name], args, kwargs), []).append(name)
    chosen: dict[str, str] = {}
    lines = []
    for names in groups.values():
        layer = layers[names[0]]
        args, kwargs = inputs[names[0]]
        seconds = _time_kernels(layer, args, kwargs, autocast)
        kernel = min(seconds, key=seconds.get)
        for name in names:
            chosen[name] = kernel
            layers[name].fused_attn = kernel == "fused"
        shape = "x".join(map(str, args[0].shape)) if args and torch.is_tensor(args[0]) else "?"
        where = names[0] if len(names) == 1 else f"{names[0]} and {len(names) - 1} like it"
        lines.append(f"{where} [{shape}]: " + ", ".join(f"{k} {s * 1e3:.2f} ms" for k, s in seconds.items())
                     + f" -> {kernel}")
    return chosen, lines


def _time_kernels(layer: nn.Module, args: tuple, kwargs: dict,
                  autocast: Callable[[], AbstractContextManager]) -> dict[str, float]:
    was_fused = layer.fused_attn
    device = next((a.device for a in args if torch.is_tensor(a)), torch.device("cpu"))
    best = {kernel: float("inf") for kernel in KERNELS}
    rng_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices):  # dropout in a layer draws numbers the run must not lose
        for round_ in range(ROUNDS + 1):  # round 0 warms both kernels up
            for kernel in KERNELS:
                layer.fused_attn = kernel == "fused"
                x = args[0].clone().requires_grad_(True)
                _synchronize(device)
                start = time.perf_counter()
                with autocast():
                    out = layer(x, *args[1:], **kwargs)
                torch.autograd.grad(out, x, grad_outputs=torch.ones_like(out))  # the inputs' gradient only
                _synchronize(device)
                if round_:
                    best[kernel] = min(best[kernel], time.perf_counter() - start)
    layer.fused_attn = was_fused
    return best


def _signature(layer: nn.Module, args: tuple, kwargs: dict) -> tuple:
    def shapes(values):
        return tuple((tuple(v.shape), v.dtype) if torch.is_tensor(v) else v for v in values)

    weights = tuple(tuple(p.shape) for p in layer.parameters())
    return (type(layer).__qualname__, weights, getattr(layer, "num_heads", None), shapes(args),
            tuple(sorted((k, shapes([v])) for k, v in kwargs.items())))


def _detached(value: Any) -> Any:
    if torch.is_tensor(value):
        return value.detach().clone()
    if isinstance(value, tuple):
        return tuple(_detached(v) for v in value)
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    return value


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
