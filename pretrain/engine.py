"""The one training loop every objective uses: backward, step, schedule, log, checkpoint, resume.

What is trained is decided elsewhere: a *task* (`pretrain.tasks.Task`: `task(model, batch) -> {"loss": tensor,
...}`, the other entries scalars to log; or, for an objective that spans a step's micro-batches such as CLIP's,
`task.step_micro_batches`) and an optional *evaluator* (`pretrain.evaluation.Evaluator`, called every
few epochs or steps and after the last step; its metrics join that step's log line as "eval/<name>"), so the same
loop runs MAE, CLIP, finetuning, distillation, DETR and linear probes. accelerate places the model, wraps it for DDP and applies mixed precision; the data stream splits itself
across processes, and the loop only tells it how many batches it already consumed (`start_batch`) so a resumed run
continues the stream. `Trainer.from_config(cfg, run, ...)` builds the loop from a run's config sections.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np
import torch
from torch import nn

from . import attention_kernels
from .checkpoint import (
    checkpoint_name,
    find_latest,
    load_state_dict_checked,
    load_train_state,
    normalisation_metadata,
    read_weights,
    resolve_resume,
    save_checkpoint,
)
from .config import ConfigError, LoggingConfig, OptimConfig, TrainConfig, to_dict
from .evaluation import LOG_PREFIX, Evaluator
from .run import Run, make_accelerator, training_loader_factory
from .tasks import Task

log = logging.getLogger(__name__)

LoaderFactory = Callable[[int, int, int], Iterable[dict[str, Any]]]  # (start_batch, rank, world_size) -> batches


class NonFiniteLossError(RuntimeError):
    """The run diverged: a non-finite loss or gradient (beyond `train.max_nonfinite_skips` skipped steps)."""


class TrainingInterrupted(Exception):
    """The run stopped on SIGTERM or SIGINT (pre-emption, Ctrl-C) after checkpointing the step it had finished.
    `exit_code` is 128 + the signal number (143 for SIGTERM, 130 for SIGINT), what a shell reports for a process
    ended by that signal: schedulers and scripts see an unfinished run, and `train.resume=latest` continues it."""

    def __init__(self, signum: int, step: int, checkpoint: Path):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_code = 128 + signum
        super().__init__(f"{signal.Signals(signum).name} received: stopped after step {step} and saved {checkpoint}; "
                         f"continue with train.resume=latest")


class _StopOnSignal:
    """SIGTERM/SIGINT handlers for the length of a run. The first signal is only noted (`signum`): the loop finishes
    its step, saves a checkpoint and raises TrainingInterrupted. The handlers then fall back to the default action,
    so a second signal ends the process at once, even inside a long kernel or a save (checkpoints are atomic).
    Installed from the main thread only (Python's rule), the previous handlers restored afterwards. The DataLoader
    workers ignore the first signal too (`_workers_outlive_first_signal`), so that a signal sent to the whole process
    group (Ctrl-C, SLURM) leaves them serving the step being finished."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum = 0
        self._pid = os.getpid()
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        for other in self.SIGNALS:
            signal.signal(other, signal.SIG_DFL)
        if os.getpid() == self._pid:  # not in a forked data worker
            self.signum = signum

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


def _default_after_first_signal(signum, frame) -> None:
    for other in _StopOnSignal.SIGNALS:
        signal.signal(other, signal.SIG_DFL)


def _ignore_first_signal(worker_id: int, init_fn: Optional[Callable[[int], None]] = None) -> None:
    for signum in _StopOnSignal.SIGNALS:
        signal.signal(signum, _default_after_first_signal)
    if init_fn is not None:
        init_fn(worker_id)


def _workers_outlive_first_signal(loader: Iterable) -> Iterable:
    """A scheduler's SIGTERM (or Ctrl-C's SIGINT) reaches the DataLoader workers too, and torch's workers die of
    SIGTERM (their own handler): the main process would then fail to fetch the batches of the step it finishes
    before saving. The workers ignore the first signal instead and die of the second, like the main process."""
    from torch.utils.data import DataLoader

    if isinstance(loader, DataLoader) and loader.num_workers > 0:
        loader.worker_init_fn = partial(_ignore_first_signal, init_fn=loader.worker_init_fn)
    return loader


def stop_reading(batches: Iterable) -> None:
    """Close a batch iterator that may not be exhausted: make_loader's stops its worker processes (data.ShardLoader),
    a generator runs its `finally` blocks; other iterators have nothing to stop."""
    close = getattr(batches, "close", None)
    if close is not None:
        close()


@dataclass
class Schedule:
    """The run's length in optimizer steps, derived once from the data size and the batch settings."""
    samples_per_epoch: int
    global_batch: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    lr: float

    @classmethod
    def derive(cls, samples_per_epoch: int, train: TrainConfig, optim: OptimConfig, world_size: int) -> "Schedule":
        global_batch = train.batch_size * world_size * train.grad_accum_steps
        steps_per_epoch = samples_per_epoch // global_batch
        if samples_per_epoch == 0:
            raise ConfigError("the training shards hold no samples; check data.train")
        if steps_per_epoch == 0:
            raise ConfigError(
                f"the training data has {samples_per_epoch} samples, fewer than one global batch of {global_batch} "
                f"(train.batch_size={train.batch_size} x {world_size} processes x "
                f"train.grad_accum_steps={train.grad_accum_steps}); lower train.batch_size"
            )
        lr = optim.lr if optim.lr is not None else optim.base_lr * global_batch / 256
        return cls(
            samples_per_epoch=samples_per_epoch,
            global_batch=global_batch,
            steps_per_epoch=steps_per_epoch,
            total_steps=steps_per_epoch * train.epochs,
            warmup_steps=round(optim.warmup_epochs * steps_per_epoch),
            lr=lr,
        )


def build_optimizer(model: nn.Module, optim: OptimConfig, lr: float, layer_decay: Optional[float] = None,
                    param_group_fn: Optional[Callable[[nn.Module], list[dict[str, Any]]]] = None):
    """timm's optimizer factory: weight decay skips 1-D params (norms, biases) and `model.no_weight_decay()`.
    `param_group_fn(model)`: the parameter groups instead (timm's hook; a group's "lr_scale" scales its lr under
    the scheduler, e.g. DETR's lower backbone lr; groups without "weight_decay" get optim.weight_decay).
    LARS adapts weight matrices by the trust ratio as MAE's does (`lars_param_groups`).
    AdamW is torch's fused kernel: one pass over each parameter, where torch's default on CPU loops over the tensors
    op by op (ViT-B on 2 cores: 0.10 instead of 0.45 s an update; docs/benchmarks.md, "MAE training speed")."""
    from timm.optim import create_optimizer_v2

    kwargs: dict[str, Any] = {}
    if optim.name == "adamw":
        kwargs["betas"] = tuple(optim.betas)
        kwargs["fused"] = True
    else:
        kwargs["momentum"] = optim.momentum
    if optim.name == "lars" and param_group_fn is None and layer_decay is None:
        param_group_fn = partial(lars_param_groups, weight_decay=optim.weight_decay)
    return create_optimizer_v2(
        model, opt=optim.name, lr=lr, weight_decay=optim.weight_decay, layer_decay=layer_decay,
        param_group_fn=param_group_fn, **kwargs
    )


def lars_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """LARS as MAE's util/lars.py (the linear probe's optimizer): weight matrices (ndim > 1) get weight decay and the
    layer-wise trust ratio (update scaled by trust_coeff x ||w|| / ||grad||) even when weight decay is 0; biases,
    norms and `no_weight_decay()` parameters neither, a plain SGD step. timm's Lars adapts only when weight decay is
    set (or `always_adapt`), so with MAE's weight decay 0 it would be SGD with momentum."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    adapted = [p for name, p in trained if p.ndim > 1 and name not in skip]
    plain = [p for name, p in trained if not (p.ndim > 1 and name not in skip)]
    groups = [{"params": adapted, "weight_decay": weight_decay, "always_adapt": True},
              {"params": plain, "weight_decay": 0.0, "always_adapt": False}]
    return [group for group in groups if group["params"]]


def checks_read_late(device: torch.device) -> int:
    """How many steps after a step the host reads its flags when the optimizer skips non-finite updates itself: on
    an accelerator one, so that the host queues the next step while the device runs this one; on the CPU the flags
    are ready as soon as computed, so at once."""
    return 0 if device.type == "cpu" else 1


def compile_for_training(model: nn.Module) -> nn.Module:
    """`train.compile`: torch.compile (inductor) of the whole model. Returns the compiled wrapper, which shares the
    module's parameters; the module itself stays eager (its state_dict keys are unchanged)."""
    return torch.compile(model)


def build_scheduler(optimizer, schedule: Schedule, min_lr: float):
    """Per-step linear warmup then cosine decay to `min_lr` (timm's scheduler, driven by the update count)."""
    from timm.scheduler import CosineLRScheduler

    return CosineLRScheduler(
        optimizer,
        t_initial=max(1, schedule.total_steps - schedule.warmup_steps),
        lr_min=min_lr,
        warmup_t=schedule.warmup_steps,
        warmup_lr_init=0.0,
        warmup_prefix=True,
        t_in_epochs=False,
    )


def micro_step(accelerator, model: nn.Module,
               forward: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One micro-batch: `forward()` -> {"loss": ..., ...}, then backward of loss / train.grad_accum_steps, both inside
    accelerate's `accumulate` (DDP decides in the forward whether the backward reduces the gradients across
    processes: only in the step's last micro-batch). Returns forward's outputs."""
    with accelerator.accumulate(model):
        outputs = forward()
        accelerator.backward(outputs["loss"])
    return outputs


def step_seed(seed: int, rank: int, step: int) -> int:
    """Each optimizer step reseeds torch from (seed, rank, step): masking noise and dropout are then a function of
    the step alone, so a resumed run draws exactly what the uninterrupted run would have drawn."""
    return (seed * 1_000_003 + rank * 7_919 + step) % (2**63 - 1)


class Trainer:
    def __init__(
        self,
        *,
        model: nn.Module,
        task: Task,
        make_loader: LoaderFactory,
        samples_per_epoch: int,
        train: TrainConfig,
        optim: OptimConfig,
        logging_cfg: LoggingConfig,
        output_dir: str | Path,
        run_config: dict[str, Any],
        model_metadata: dict[str, str],
        accelerator=None,
        layer_decay: Optional[float] = None,
        evaluator: Optional[Evaluator] = None,
        param_group_fn: Optional[Callable[[nn.Module], list[dict[str, Any]]]] = None,
        make_scheduler: Optional[Callable[[Any, Schedule], Any]] = None,
    ):
        """`evaluator`: called on every process after each step it is due for (`evaluator.due(step,
        steps_per_epoch)`; before that step's checkpoint) and after the run's last step, epoch complete or not; the
        loop puts the model back in training mode afterwards. Each evaluation step gets a log line (log.jsonl, wandb)
        whose "eval/<name>" entries are the evaluation's scalar metrics. `param_group_fn`: see build_optimizer.
        `make_scheduler(optimizer, schedule)`: a timm scheduler (`step_update(step)`) in place of warmup + cosine,
        e.g. DETR's step decay."""
        self.train_cfg, self.optim_cfg, self.logging_cfg = train, optim, logging_cfg
        self.output_dir = Path(output_dir)
        self.checkpoints_dir = self.output_dir / "checkpoints"
        self.task = task
        self.evaluator = evaluator
        self.make_loader = make_loader
        self.run_config = run_config
        self.model_metadata = model_metadata
        self.accelerator = accelerator or make_accelerator(train)
        acc = self.accelerator
        self.schedule = Schedule.derive(samples_per_epoch, train, optim, acc.num_processes)
        optimizer = build_optimizer(model, optim, self.schedule.lr, layer_decay=layer_decay, param_group_fn=param_group_fn)
        self.scheduler = (make_scheduler(optimizer, self.schedule) if make_scheduler is not None
                          else build_scheduler(optimizer, self.schedule, optim.min_lr))
        # the attention layers' kernels: set here by rule, or chosen by timing after the first step (train.attention
        # timed: recorded in checkpoints)
        self.attention_kernels: dict[str, str] = {}
        if not attention_kernels.times_kernels(train.attention, self._sharded(), train.compile):
            attention_kernels.set_kernels(
                model, attention_kernels.rule_kernel(train.attention, acc.device.type, acc.mixed_precision))
        if train.compile:
            model = compile_for_training(model)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self.step = 0
        self.nonfinite_skips = 0  # updates skipped for a non-finite loss or gradient (train.max_nonfinite_skips)
        # Each step's update is skipped on any process's non-finite loss or gradient. A fused optimizer (AdamW) skips
        # it on the device (its found_inf input, as under a grad scaler), so the host need not wait for the device:
        # on an accelerator it reads each step's flags (skip counts, signals) one step later, or at once before a
        # log line or a checkpoint. Otherwise (LARS/SGD, fp16's scaler, a task hook that must not see a skipped
        # update such as an EMA) the host reads the flags every step and decides.
        self._skips_on_device = (getattr(self._torch_optimizer, "_step_supports_amp_scaling", False)
                                 and getattr(acc, "scaler", None) is None and not task.after_step_needs_applied_update)
        self._check_lag = checks_read_late(acc.device) if self._skips_on_device else 0
        self._pending_checks: deque[_StepCheck] = deque()
        self._agreed_signum = 0  # a SIGTERM/SIGINT that some process received, as the step checks read so far say
        # this process's sum and count of step losses since the last evaluation (the train_loss it records), kept
        # on the device so that adding a step's loss never waits for the device
        sum_dtype = torch.float32 if acc.device.type == "mps" else torch.float64
        self._loss_since_eval = torch.zeros(2, dtype=sum_dtype, device=acc.device)

    @classmethod
    def from_config(cls, cfg: Any, run: Run, *, model: nn.Module, task: Task, model_metadata: dict[str, str],
                    transform=None, kind: str = "labelled", tokenizer=None, make_loader: Optional[LoaderFactory] = None,
                    samples_per_epoch: Optional[int] = None, **options) -> "Trainer":
        """The loop for a run config (`data`, `train`, `optim`, `logging` sections) and its `setup_run` result:
        the training stream of `run.train_shards` through `transform` (batches of `kind`; `tokenizer` for
        image-text; each reading slot guards itself against unreadable data, data.max_skip_rate), unless `make_loader`
        is given (e.g. in-memory features).
        `options`: the remaining Trainer arguments (evaluator, layer_decay, param_group_fn, make_scheduler)."""
        if make_loader is None:
            make_loader = training_loader_factory(run.train_shards, transform, cfg.data, cfg.train, kind, tokenizer)
        return cls(model=model, task=task, make_loader=make_loader,
                   samples_per_epoch=samples_per_epoch or run.samples_per_epoch, train=cfg.train, optim=cfg.optim,
                   logging_cfg=cfg.logging, output_dir=run.output_dir, run_config=to_dict(cfg),
                   model_metadata={**model_metadata, **normalisation_metadata(cfg.data.mean, cfg.data.std)},
                   accelerator=run.accelerator, **options)

    # ------------------------------------------------------------------------------------------------------------
    @property
    def unwrapped_model(self) -> nn.Module:
        """The eager module (no DDP, no torch.compile wrapper): checkpoints, resume, pictures."""
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)

    def current_lr(self) -> float:
        return max(group["lr"] for group in self.optimizer.param_groups)

    def fit(self) -> dict[str, Any]:
        """Train to the end of the schedule (or `train.stop_after_steps`). On SIGTERM/SIGINT: finish the step, save
        and raise TrainingInterrupted; on a non-finite loss or gradient: skip the step within
        `train.max_nonfinite_skips`, else raise NonFiniteLossError."""
        with _StopOnSignal() as stop_signal:  # the previous handlers come back however the run ends
            return self._fit(stop_signal)

    def _fit(self, stop_signal: "_StopOnSignal") -> dict[str, Any]:
        acc, cfg, sched = self.accelerator, self.train_cfg, self.schedule
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            log.info(
                "global batch %d = %d per device x %d processes x %d accumulation; lr %.3g; %d steps/epoch, %d steps",
                sched.global_batch, cfg.batch_size, acc.num_processes, cfg.grad_accum_steps, sched.lr,
                sched.steps_per_epoch, sched.total_steps,
            )
        if cfg.resume:
            self._resume(cfg.resume)
        last_step = sched.total_steps if cfg.stop_after_steps is None else min(sched.total_steps, cfg.stop_after_steps)
        wandb_run = self._init_wandb()
        first_step_inputs = self._record_attention_inputs()
        loader = self.make_loader(self.step * cfg.grad_accum_steps, acc.process_index, acc.num_processes)
        batches = iter(_workers_outlive_first_signal(loader))
        try:
            progress = self._progress_bar(last_step)
            window = _Window()
            last_record: dict[str, Any] = {}
            self.model.train()
            while self.step < last_step:
                torch.manual_seed(step_seed(cfg.seed, acc.process_index, self.step))
                self.scheduler.step_update(self.step)
                if self.task.takes_whole_step:  # e.g. CLIP: its negatives span the step's micro-batches
                    micro_batches = [self._next_batch(batches, window) for _ in range(cfg.grad_accum_steps)]
                    step_totals = self.task.step_micro_batches(self.model, micro_batches,
                                                              partial(micro_step, acc, self.model))
                    if not acc.sync_gradients:  # the optimizer would silently skip the step
                        raise RuntimeError(f"{type(self.task).__name__}.step_micro_batches must call micro_step "
                                           f"once per micro-batch ({cfg.grad_accum_steps})")
                else:
                    step_totals = {}
                    for _ in range(cfg.grad_accum_steps):
                        batch = self._next_batch(batches, window)
                        outputs = micro_step(acc, self.model, partial(self.task, self.model, batch))
                        for name, value in outputs.items():
                            step_totals[name] = step_totals.get(name, 0) + value.detach().float() / cfg.grad_accum_steps
                # the norm tells a diverging gradient from a diverging loss, before the update could spread NaNs into
                # the weights (clip_grad=None: no clipping; one read of the gradients, ViT-B: ~0.06 s on one CPU core)
                max_norm = self.optim_cfg.clip_grad if self.optim_cfg.clip_grad is not None else float("inf")
                grad_norm = acc.clip_grad_norm_(self.model.parameters(), max_norm)
                if grad_norm is not None:
                    step_totals["grad_norm"] = grad_norm.detach().float()
                flags = self._step_flags(step_totals["loss"], grad_norm, stop_signal.signum)
                self._queue_check(flags, step_totals["loss"], grad_norm)
                applied, run_hook = self._update(flags)
                self.optimizer.zero_grad(set_to_none=True)
                if run_hook:  # e.g. CLIP clamps its temperature, finetuning updates its EMA
                    self.task.after_optimizer_step(self.unwrapped_model)
                loss = step_totals["loss"].to(self._loss_since_eval.dtype)
                self._loss_since_eval += torch.stack([torch.where(applied, loss, 0), applied.to(loss.dtype)])
                self.step += 1
                if first_step_inputs is not None:
                    self._choose_attention_kernels(first_step_inputs)
                    first_step_inputs = None
                window.add_step(step_totals, sched.global_batch, applied=applied)
                progress.update(1)

                evaluate = self.evaluator is not None and (
                    self.step == last_step or self.evaluator.due(self.step, sched.steps_per_epoch))
                if evaluate or self.step % cfg.log_every == 0 or self.step == last_step:
                    self._settle_checks()  # the line counts every skipped update so far
                    record = self._window_record(window)  # timed before the evaluation, which is not training
                    if evaluate:
                        if self.step == last_step:
                            stop_reading(batches)  # the last evaluation has the CPUs to itself
                        record.update(self._evaluate())
                    last_record = self._write_log(record, wandb_run, progress)
                    window = _Window()
                saved = self.step % cfg.save_every == 0 or self.step == last_step
                if saved:
                    self.save()
                # pre-emption: the processes agreed on the signal through the step checks (read at the same steps on
                # every process), so they all stop after the same step
                signum = self._agreed_signum if acc.num_processes > 1 else stop_signal.signum
                if signum and self.step < last_step:
                    if acc.is_main_process:
                        log.warning("%s received: saving step %d and stopping (a second signal stops at once, unsaved)",
                                    signal.Signals(signum).name, self.step)
                    if not saved:
                        self.save()
                    progress.close()
                    if wandb_run is not None:
                        wandb_run.finish()
                    raise TrainingInterrupted(signum, self.step, self.checkpoints_dir / checkpoint_name(self.step))
            self._settle_checks()
            stop_reading(batches)
            progress.close()
            if self.evaluator is not None and self.evaluator.last_step != self.step:  # resumed at the last step
                self._evaluate()
            if wandb_run is not None:
                wandb_run.finish()
            acc.wait_for_everyone()
            return {"step": self.step, "total_steps": sched.total_steps, **last_record}
        finally:  # a run that stops early (an error, a signal) stops its data workers now, not at exit
            stop_reading(batches)
            if first_step_inputs is not None:  # it failed within its first step: no recording hooks left behind
                first_step_inputs.close()

    def _record_attention_inputs(self) -> Optional[attention_kernels.FirstCallInputs]:
        """train.attention timed, with no choice restored from a checkpoint: record the attention layers' inputs
        during this run's first step, to time their kernels on (`_choose_attention_kernels`)."""
        layers = attention_kernels.attention_layers(self.unwrapped_model)
        if self.attention_kernels or not layers or not attention_kernels.times_kernels(
                self.train_cfg.attention, self._sharded(), self.train_cfg.compile):
            return None
        return attention_kernels.FirstCallInputs(layers)

    def _choose_attention_kernels(self, first_step_inputs: attention_kernels.FirstCallInputs) -> None:
        """Time both kernels of each distinct attention layer on its first-step inputs and keep the faster; every
        process takes the main process's choice, so that they compute alike."""
        from accelerate.utils import broadcast_object_list

        first_step_inputs.close()
        layers = attention_kernels.attention_layers(self.unwrapped_model)
        chosen, lines = attention_kernels.choose_kernels(layers, first_step_inputs.inputs, self.accelerator.autocast)
        if self.accelerator.num_processes > 1:
            shared = [chosen]
            broadcast_object_list(shared)
            chosen = shared[0]
            attention_kernels.set_kernels(self.unwrapped_model, chosen)
        self.attention_kernels = chosen
        if self.accelerator.is_main_process:
            log.info("attention kernels (%s, timed on the first step's inputs, forward + backward): %s",
                     self.accelerator.mixed_precision, "; ".join(lines))

    def _next_batch(self, batches: Iterator[dict[str, Any]], window: "_Window") -> dict[str, Any]:
        """The next micro-batch, on the device; its count of unreadable samples goes to the log window."""
        batch = next(batches)
        window.add_skipped(batch.pop("skipped", None))
        return {k: v.to(self.accelerator.device, non_blocking=True) if torch.is_tensor(v) else v
                for k, v in batch.items()}

    def _evaluate(self) -> dict[str, Any]:
        """Run the evaluator at the current step with the mean training loss since its last call (over processes).
        Returns its scalar metrics for the log line, as {"eval/<name>": value} (counts such as num_samples and the
        record's epoch, step and train_loss left out: the log line has its own)."""
        acc = self.accelerator
        totals = self._loss_since_eval.clone()
        if acc.num_processes > 1:
            totals = acc.reduce(totals, reduction="sum")
        loss_sum, steps = totals.cpu().tolist()
        self._loss_since_eval.zero_()
        full, partial = divmod(self.step, self.schedule.steps_per_epoch)
        epoch = full if partial == 0 else round(self.step / self.schedule.steps_per_epoch, 4)
        record = self.evaluator(self.unwrapped_model, acc, epoch=epoch, step=self.step,
                                train_loss=loss_sum / steps if steps else None)
        self.model.train()
        return {f"{LOG_PREFIX}{name}": value for name, value in record.items()
                if name not in ("epoch", "step", "train_loss") and not name.startswith("num_")
                and isinstance(value, (int, float)) and not isinstance(value, bool)}

    # ------------------------------------------------------------------------------------------------------------
    @property
    def _torch_optimizer(self) -> torch.optim.Optimizer:
        """torch's optimizer inside accelerate's wrapper."""
        return getattr(self.optimizer, "optimizer", self.optimizer)

    def _step_flags(self, loss: torch.Tensor, grad_norm: Optional[torch.Tensor], signum: int) -> torch.Tensor:
        """[non-finite loss, non-finite gradient, signal received] on any process, on the device: one tiny all-reduce
        (max) when there are several, so that all stop, skip or save together instead of hanging in a collective.
        With fp16's grad scaler, infinite gradients are routine (the scaler skips the step and lowers its scale): not
        checked."""
        check_grad = grad_norm is not None and getattr(self.accelerator, "scaler", None) is None
        flags = torch.stack([
            (~torch.isfinite(loss)).float().reshape(()),
            (~torch.isfinite(grad_norm)).float().reshape(()) if check_grad else loss.new_zeros(()).float(),
            torch.tensor(float(signum), device=loss.device),
        ])
        if self.accelerator.num_processes > 1:
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        return flags

    def _update(self, flags: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """The optimizer step, unless the step's flags say a loss or gradient was non-finite on some process; may
        raise NonFiniteLossError (train.max_nonfinite_skips spent). Returns whether the update was applied (a 0-d
        bool tensor on the device) and whether the task's after-step hook runs."""
        if self._skips_on_device:
            skip = (flags[:2].amax() > 0).float()
            self._torch_optimizer.found_inf = skip  # fused AdamW then leaves weights and moments as they were
            self.optimizer.step()
            self._settle_checks(keep=self._check_lag)
            return skip == 0, True  # the hook is harmless after a skipped update (Task.after_step_needs_applied_update)
        finite = self._settle_checks()  # the host decides, reading this step's flags now
        if finite:
            self.optimizer.step()
        return torch.tensor(finite, device=self.accelerator.device), finite

    def _queue_check(self, flags: torch.Tensor, loss: torch.Tensor, grad_norm: Optional[torch.Tensor]) -> None:
        """Queue the flags of the step being computed for the host; on an accelerator whose host reads them later,
        start copying them now, so that reading them then waits for that copy only, not for the steps queued since."""
        ready = None
        if self._check_lag and flags.device.type != "cpu":
            flags = flags.to("cpu", non_blocking=True)  # into pinned memory, in stream order
            ready = torch.Event(device=self.accelerator.device)
            ready.record()
        self._pending_checks.append(_StepCheck(self.step + 1, flags, ready, loss, grad_norm))

    def _settle_checks(self, keep: int = 0) -> bool:
        """Read the queued step checks, all but the newest `keep`: count each skipped update within
        `train.max_nonfinite_skips` (beyond it, raise NonFiniteLossError) and note an agreed signal. Returns whether
        the last step read had a finite loss and gradient (True when none was read)."""
        finite = True
        while len(self._pending_checks) > keep:
            check = self._pending_checks.popleft()
            loss_bad, grad_bad, signum = check.read()
            self._agreed_signum = max(self._agreed_signum, signum)
            finite = not (loss_bad or grad_bad)
            if not finite:
                self._skip_nonfinite(check, loss_bad)
        return finite

    def _skip_nonfinite(self, check: "_StepCheck", loss_bad: bool) -> None:
        """Count a skipped update within `train.max_nonfinite_skips`; beyond it, stop naming the step and cause."""
        where = f"at step {check.step} (epoch {check.step / self.schedule.steps_per_epoch:.2f})"
        if loss_bad:
            value = check.loss.item()
            cause = f"non-finite loss ({value if not math.isfinite(value) else 'on another process'})"
        else:
            cause = (f"non-finite gradient (grad norm {check.grad_norm.item()}; the loss {check.loss.item():.6g} was "
                     f"finite)")
        budget = self.train_cfg.max_nonfinite_skips
        if self.nonfinite_skips < budget:
            self.nonfinite_skips += 1
            if self.accelerator.is_main_process:
                log.warning("%s %s: update skipped (%d of train.max_nonfinite_skips=%d)",
                            cause, where, self.nonfinite_skips, budget)
            return
        spent = f"; train.max_nonfinite_skips={budget} already spent on earlier steps" if budget else ""
        raise NonFiniteLossError(
            f"{cause} {where}{spent}; stopping. {self._latest_checkpoint_text()} "
            f"Lower the learning rate or enable optim.clip_grad."
        )

    def _latest_checkpoint_text(self) -> str:
        latest = find_latest(self.checkpoints_dir)
        return f"The last good checkpoint is {latest}." if latest else "No checkpoint was written yet."

    def _window_record(self, window: "_Window") -> dict[str, Any]:
        """The log line of the steps since the last one: their mean values (over processes), lr, throughput."""
        acc = self.accelerator
        steps = float(window.steps)
        values = {name: total / steps for name, total in window.totals.items()}
        if not steps:  # every update of the window was skipped (non-finite)
            values = {"loss": torch.tensor(float("nan"))}
        if acc.num_processes > 1:
            values = {k: acc.reduce(v.to(acc.device), reduction="mean") for k, v in values.items()}
        elapsed = time.perf_counter() - window.start
        record = {
            "step": self.step,
            "epoch": round(self.step / self.schedule.steps_per_epoch, 4),
            **{k: float(v) for k, v in values.items()},
            "lr": self.current_lr(),
            "images_per_s": window.samples / elapsed if elapsed > 0 else 0.0,
            "nonfinite_skips": self.nonfinite_skips,  # skipped updates so far in the run
            **window.skipped_counts(acc),
        }
        return record

    def _write_log(self, record: dict[str, Any], wandb_run, progress) -> dict[str, Any]:
        if self.accelerator.is_main_process:
            with open(self.output_dir / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", img_s=f"{record['images_per_s']:.0f}")
            if wandb_run is not None:
                wandb_run.log(record, step=self.step)
        return record

    def _progress_bar(self, last_step: int):
        from tqdm.auto import tqdm

        enabled = self.accelerator.is_main_process and self.logging_cfg.progress_bar
        return tqdm(total=last_step, initial=self.step, desc="train", unit="step", disable=not enabled, dynamic_ncols=True)

    def _init_wandb(self):
        if self.logging_cfg.wandb == "disabled" or not self.accelerator.is_main_process:
            return None
        import wandb

        return wandb.init(
            project=self.logging_cfg.project,
            name=self.logging_cfg.run_name,
            dir=str(self.output_dir),
            mode=self.logging_cfg.wandb,
            config=self.run_config,
            resume="allow",
            settings=wandb.Settings(silent=True),
        )

    # ------------------------------------------------------------------------------------------------------------
    def save(self) -> Optional[Path]:
        """Write a checkpoint of the current step (main process only)."""
        self._settle_checks()  # a checkpoint after a non-finite step beyond the skip budget is never written
        acc = self.accelerator
        acc.wait_for_everyone()
        model_state, optimizer_state = self._full_states()
        # the losses every process summed since the last evaluation, kept whole by the main process's checkpoint
        loss_since_eval = self._loss_since_eval.clone()
        if acc.num_processes > 1:
            loss_since_eval = acc.reduce(loss_since_eval, reduction="sum")
        path = None
        if acc.is_main_process:
            scaler = getattr(acc, "scaler", None)
            train_state = {
                "step": self.step,
                "optimizer": optimizer_state,
                "scheduler": self.scheduler.state_dict(),  # the lr is a function of the step; kept for inspection
                "scaler": scaler.state_dict() if scaler is not None else None,
                "rng": _rng_state(),
                "data": {
                    "batches_consumed_per_process": self.step * self.train_cfg.grad_accum_steps,
                    "samples_seen": self.step * self.schedule.global_batch,
                },
                "world_size": acc.num_processes,
                "global_batch": self.schedule.global_batch,
                "nonfinite_skips": self.nonfinite_skips,
                "task": self.task.state_dict(),  # e.g. the finetuning EMA
                "loss_since_eval": loss_since_eval.cpu(),
                "attention_kernels": self.attention_kernels,  # train.attention timed's choice, kept on resume
            }
            # the precision the run trained in ("auto" resolved), for the model card
            meta = {"epoch": self.step / self.schedule.steps_per_epoch, "total_steps": self.schedule.total_steps,
                    "mixed_precision": acc.mixed_precision}
            path = save_checkpoint(
                self.checkpoints_dir, self.step, model_state, train_state, meta,
                model_metadata=self.model_metadata, keep_last=self.train_cfg.keep_last,
            )
        acc.wait_for_everyone()
        return path

    def _sharded(self) -> bool:
        from accelerate.utils import DistributedType

        return self.accelerator.distributed_type == DistributedType.FSDP

    def _full_states(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(model state, optimizer state) of the whole model. Under FSDP each process holds a shard: the full
        tensors are gathered onto the CPU (a collective, so every process calls this), the optimizer state keyed by
        parameter name (torch.distributed.checkpoint's format); the checkpoint stays one safetensors file."""
        if not self._sharded():
            return self.unwrapped_model.state_dict(), self.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return (get_model_state_dict(self.model, options=options),
                get_optimizer_state_dict(self.model, self._torch_optimizer, options=options))

    def _load_full_states(self, model_state: dict[str, torch.Tensor], optimizer_state: dict[str, Any], path) -> None:
        if not self._sharded():
            load_state_dict_checked(self.unwrapped_model, model_state, path)
            self.optimizer.load_state_dict(optimizer_state)
            return
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.model, model_state, options=options)
        set_optimizer_state_dict(self.model, self._torch_optimizer, optimizer_state, options=options)

    def _resume(self, resume: str) -> None:
        path = resolve_resume(resume, self.checkpoints_dir)
        if path is None:
            log.info("resume=latest: no checkpoint in %s yet, starting from scratch", self.checkpoints_dir)
            return
        state_dict, _ = read_weights(path, verify=False)  # resolve_resume verified the checkpoint's sha256
        state = load_train_state(path)
        self._load_full_states(state_dict, state["optimizer"], path)
        if state["global_batch"] != self.schedule.global_batch or state["world_size"] != self.accelerator.num_processes:
            log.warning(
                "resuming with global batch %d over %d processes; the checkpoint used %d over %d: the data order will differ",
                self.schedule.global_batch, self.accelerator.num_processes, state["global_batch"], state["world_size"],
            )
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
        self.step = int(state["step"])
        self.nonfinite_skips = int(state.get("nonfinite_skips", 0))
        self.task.load_state_dict(state.get("task", {}))
        # a timed choice (also one recorded by a run from before auto became a fixed rule: auto used to time)
        if self.train_cfg.attention in ("auto", "timed") and state.get("attention_kernels"):
            self.attention_kernels = dict(state["attention_kernels"])
            attention_kernels.set_kernels(self.unwrapped_model, self.attention_kernels)
        if self.accelerator.is_main_process and "loss_since_eval" in state:  # the others start their sums afresh
            self._loss_since_eval.copy_(state["loss_since_eval"])
        self.scheduler.step_update(self.step)
        if self.accelerator.is_main_process:
            log.info("resumed from %s at step %d", path, self.step)


@dataclass
class _StepCheck:
    """What the host learns of a step after the fact: its flags (`Trainer._step_flags`; on an accelerator a copy
    to the host that is done once `ready` is), with its number, loss and gradient norm for the messages."""
    step: int
    flags: torch.Tensor
    ready: Optional[torch.Event]
    loss: torch.Tensor
    grad_norm: Optional[torch.Tensor]

    def read(self) -> tuple[bool, bool, int]:
        """(non-finite loss, non-finite gradient, signal number or 0), over all processes."""
        if self.ready is not None:
            self.ready.synchronize()
        loss_bad, grad_bad, signum = self.flags.tolist()
        return loss_bad > 0, grad_bad > 0, int(signum)


class _Window:
    """Running sums between two log lines, on the device (read once, for the line)."""

    def __init__(self):
        self.start = time.perf_counter()
        self.totals: dict[str, torch.Tensor] = {}
        self.steps: Any = 0  # applied updates: a device tensor after the first step
        self.samples = 0
        self.skipped: dict[str, int] = {}

    def add_step(self, values: dict[str, torch.Tensor], global_batch: int, applied: torch.Tensor) -> None:
        """`applied` (a 0-d bool tensor) false: a skipped update (non-finite), whose samples count but whose values
        would poison the means."""
        for name, value in values.items():
            self.totals[name] = self.totals.get(name, 0) + torch.where(applied, value, 0)
        self.steps = self.steps + applied.long()
        self.samples += global_batch

    def add_skipped(self, counts: Optional[dict[str, int]]) -> None:
        for reason, n in (counts or {}).items():
            self.skipped[reason] = self.skipped.get(reason, 0) + int(n)

    def skipped_counts(self, acc) -> dict[str, Any]:
        """{"skipped_samples": total over all processes, "skipped": {reason: count}} since the last log line."""
        counts = [self.skipped]
        if acc.num_processes > 1:
            from accelerate.utils import gather_object

            counts = gather_object([self.skipped])
        merged: dict[str, int] = {}
        for part in counts:
            for reason, n in part.items():
                merged[reason] = merged.get(reason, 0) + n
        return {"skipped_samples": sum(merged.values()), "skipped": merged}


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value
