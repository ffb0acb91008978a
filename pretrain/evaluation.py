"""The one evaluator of training runs: the engine calls it every `every` epochs (or `every_steps` steps) and after
the run's last step (a partial epoch too); it measures the model (and any extra models, e.g. a weight EMA), keeps
`last/` and `best/` weights (unless told not to), and rewrites `metrics.json` with the history. The engine writes
each record's metrics to log.jsonl and wandb too.

What is measured is the head's business: `measure(model, accelerator) -> {name: value}` (classification: top-1 /
top-5 on data.val, finetune/classify.py; detection: COCO AP, finetune/detection.py; monitoring during pretraining:
k-NN, zero-shot, retrieval, pretrain/monitor.py). Every process calls it (it may run collectives); the record must
come back the same on every process.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable, Optional

from torch import nn

from .checkpoint import BEST_DIR, LAST_DIR, MODEL_FILE, save_weights

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
LOG_PREFIX = "eval/"  # an evaluation's metrics in the log line of its step (log.jsonl, wandb): eval/top1 ...

Measure = Callable[[nn.Module, Any], dict[str, Any]]


class Evaluator:
    """Evaluate, keep weights, write metrics.json.

    key: the metric that decides `best/` (higher is better), e.g. "top1" or "AP". extra_models(): models evaluated
    beside the trained one, by prefix: {"ema_": ema_module} gives ema_top1 ... and ema_last/, ema_best/.
    weights_metadata: stored in every weights file written (e.g. the spec that rebuilds the model). summary: fixed
    entries of metrics.json (the model's description, class count, ...). resume: keep the history of metrics.json
    from before the resume point. every_steps: evaluate every this many steps instead of every `every` epochs.
    keep_weights=False: no last/ and best/ weights (monitoring a pretraining run, whose checkpoints hold them)."""

    def __init__(self, output_dir: str | Path, measure: Measure, *, key: str, every: int = 1,
                 every_steps: Optional[int] = None, keep_weights: bool = True,
                 weights_metadata: Optional[dict[str, str]] = None, summary: Optional[dict[str, Any]] = None,
                 extra_models: Callable[[], dict[str, Optional[nn.Module]]] = dict, resume: bool = False):
        self.output_dir, self.measure, self.key, self.every = Path(output_dir), measure, key, every
        self.every_steps, self.keep_weights = every_steps, keep_weights
        self.weights_metadata, self.summary = dict(weights_metadata or {}), dict(summary or {})
        self.extra_models = extra_models
        self.history: list[dict[str, Any]] = []
        metrics_file = self.output_dir / METRICS_FILE
        if resume and metrics_file.is_file():  # epochs before the resume point stay in the history
            self.history = json.loads(metrics_file.read_text()).get("history", [])
        self.last_step: Optional[int] = None  # the step last evaluated in this process's run

    def due(self, step: int, steps_per_epoch: int) -> bool:
        """Whether the run evaluates after `step` (the run's last step is evaluated whatever this says)."""
        if self.every_steps is not None:
            return step % self.every_steps == 0
        epoch, into_epoch = divmod(step, steps_per_epoch)
        return into_epoch == 0 and epoch % self.every == 0

    def __call__(self, model: nn.Module, accelerator, *, epoch: float, step: int,
                 train_loss: Optional[float]) -> dict[str, Any]:
        record: dict[str, Any] = {"epoch": epoch, "step": step, "train_loss": train_loss}
        record.update(self.measure(model, accelerator))
        models = {prefix: extra for prefix, extra in self.extra_models().items() if extra is not None}
        for prefix, extra in models.items():
            record.update({f"{prefix}{k}": v for k, v in self.measure(extra, accelerator).items()
                           if not k.startswith("num_")})
        self.history = [h for h in self.history if h["epoch"] < epoch] + [record]
        self.last_step = step
        if accelerator.is_main_process:
            metadata = {**self.weights_metadata, "epoch": str(epoch)}
            for prefix, weights in ({"": model, **models} if self.keep_weights else {}).items():
                value = record[f"{prefix}{self.key}"]
                file_metadata = {**metadata, self.key: str(value)}
                save_weights(self.output_dir / f"{prefix}{LAST_DIR}" / MODEL_FILE, weights.state_dict(), file_metadata)
                if value >= max(h.get(f"{prefix}{self.key}", float("-inf")) for h in self.history):
                    save_weights(self.output_dir / f"{prefix}{BEST_DIR}" / MODEL_FILE, weights.state_dict(),
                                 file_metadata)
            (self.output_dir / METRICS_FILE).write_text(json.dumps(self.metrics(), indent=2))
        accelerator.wait_for_everyone()
        best = self.best()
        shown = ", ".join(f"{k} {v:.4g}" for k, v in record.items()
                          if isinstance(v, float) and k not in ("epoch", "train_loss"))
        log.info("epoch %s: %s (best %s %.4g at epoch %s)", epoch, shown, self.key, best[self.key], best["epoch"])
        return record

    def best(self, prefix: str = "") -> dict[str, Any]:
        return max(self.history, key=lambda h: h.get(f"{prefix}{self.key}", float("-inf")))

    def metrics(self) -> dict[str, Any]:
        """metrics.json: the last evaluation's metrics, the best `key` and its epoch (per prefix), the summary and
        the per-evaluation history."""
        last = self.history[-1]
        metrics = {k: v for k, v in last.items() if k not in ("epoch", "step", "train_loss")}
        prefixes = [""] + [p for p in self.extra_models() if any(f"{p}{self.key}" in h for h in self.history)]
        for prefix in prefixes:
            best = self.best(prefix)
            metrics[f"{prefix}best_{self.key}"] = best[f"{prefix}{self.key}"]
            metrics[f"{prefix}best_epoch"] = best["epoch"]
        metrics.update(epochs=last["epoch"], steps=last["step"], **self.summary, history=self.history)
        return metrics
