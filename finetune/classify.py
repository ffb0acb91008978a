"""Full finetuning of a pretrained encoder for classification (MAE's / BEiT's recipe through timm), optionally with
DeiT distillation from a frozen teacher.

    python -m finetune --config configs/finetune_mae_tiny_fmnist.yaml

The recipe (MAE main_finetune.py): AdamW with layer-wise lr decay (timm's param_groups_layer_decay through
pretrain.engine.build_optimizer), drop path, RandAugment + random erasing on each image, Mixup / CutMix on each batch
with label smoothing folded into the soft targets (timm Mixup + SoftTargetCrossEntropy), optional weight EMA, and a
new small-init head on global-average-pooled features. The shared engine runs the steps; after every epoch the
model (and its EMA) is evaluated on all of `data.val` (top-1 / top-5, every sample once across processes), and the
run keeps `best/` and `last/` weights and a `metrics.json` with the per-epoch history.
"""
from __future__ import annotations

import json
import logging
import os
import random
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn
from torchvision.transforms import InterpolationMode, v2

from data import ShardStream, SkipGuard, count_samples, eval_transform
from data import make_loader as make_data_loader
from data.transforms import ToNormalizedTensor, ToRGB
from pretrain.config import ConfigError, DataConfig, to_dict
from pretrain.datasets import read_class_names, resolve_shards, training_loader_factory
from pretrain.engine import Trainer, make_accelerator, prepare_output_dir

from .classifiers import BEST_DIR, FINETUNE_OBJECTIVE, LAST_DIR, SPEC_KEY, build_classifier, classifier_from_checkpoint
from .classifiers import timm_classifier_with_weights
from .config import AugmentConfig, DistillationConfig, FinetuneConfig
from .distillation import DistillationLoss, FrozenTeacher

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"


# ------------------------------------------------------------------------------------------------ augmentation

@contextmanager
def python_and_numpy_random_from_torch():
    """Seed python's `random` and numpy's global RNG from torch's generator for the block, then restore them.
    timm's RandAugment and RandomErasing draw from those; the stream seeds torch per sample, so their draws become
    a function of the sample's position too (reproducible, and the same after a resume)."""
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    python_state, numpy_state = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed)
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def posterize(image, bits_to_keep: int, **_):
    """timm's posterize op, with older Pillow's meaning of 0 bits kept (a black image): at the top magnitude timm's
    increasing posterize keeps 0 bits, which newer Pillow refuses."""
    from PIL import Image, ImageOps

    if bits_to_keep >= 8:
        return image
    if bits_to_keep <= 0:
        return Image.new(image.mode, image.size)
    return ImageOps.posterize(image, bits_to_keep)


class RandAugment:
    """timm's RandAugment (`rand_augment_transform`, e.g. MAE's "rand-m9-mstd0.5-inc1") on an RGB uint8 tensor
    [3, H, W] (the stream's images) or a PIL image. timm's ops are PIL operations, so the tensor goes through PIL."""

    def __init__(self, config_str: str, image_size: int, mean):
        from timm.data.auto_augment import rand_augment_transform
        from timm.data.transforms import str_to_pil_interp

        hparams = dict(translate_const=int(image_size * 0.45), img_mean=tuple(min(255, round(255 * m)) for m in mean),
                       interpolation=str_to_pil_interp("bicubic"))  # as timm's create_transform sets them
        self.config_str = config_str
        self.augment = rand_augment_transform(config_str, hparams)
        for op in self.augment.ops:
            if op.name.startswith("Posterize"):
                op.aug_fn = posterize


    def __call__(self, image):
        is_tensor = isinstance(image, torch.Tensor)
        picture = v2.functional.to_pil_image(image) if is_tensor else image
        with python_and_numpy_random_from_torch():
            picture = self.augment(picture)
        return v2.functional.pil_to_tensor(picture) if is_tensor else picture

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config_str!r})"


class RandomErasing:
    """timm's RandomErasing on a normalised tensor [3, H, W] (pixel mode: erased with per-pixel normal noise)."""

    def __init__(self, probability: float, mode: str):
        from timm.data.random_erasing import RandomErasing as TimmRandomErasing

        self.erase = TimmRandomErasing(probability=probability, mode=mode, max_count=1, device="cpu")

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        with python_and_numpy_random_from_torch():
            return self.erase(image)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.erase.probability}, mode={self.erase.mode!r})"


def finetune_train_transform(data: DataConfig, augment: AugmentConfig) -> v2.Compose:
    """RandomResizedCrop (bicubic, `data.crop_scale`) + flip + RandAugment + normalise + random erasing: timm's
    create_transform(is_training=True) as MAE's finetuning calls it, on the stream's uint8 tensors."""
    steps: list[Any] = [
        ToRGB(),
        v2.RandomResizedCrop(data.image_size, scale=tuple(data.crop_scale), interpolation=InterpolationMode.BICUBIC,
                             antialias=True),
    ]
    if augment.hflip > 0:
        steps.append(v2.RandomHorizontalFlip(augment.hflip))
    if augment.rand_augment:
        steps.append(RandAugment(augment.rand_augment, data.image_size, data.mean))
    steps.append(ToNormalizedTensor(data.mean, data.std))
    if augment.reprob > 0:
        steps.append(RandomErasing(augment.reprob, augment.remode))
    return v2.Compose(steps)


def label_loss_for(augment: AugmentConfig) -> nn.Module:
    """Soft-target cross-entropy under Mixup / CutMix (their targets carry the smoothing), else label smoothing, else
    plain cross-entropy: MAE's main_finetune.py."""
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if augment.mixing:
        return SoftTargetCrossEntropy()
    if augment.label_smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=augment.label_smoothing)
    return nn.CrossEntropyLoss()


def build_mixup(augment: AugmentConfig, num_classes: int):
    from timm.data import Mixup

    if not augment.mixing:
        return None
    return Mixup(mixup_alpha=augment.mixup, cutmix_alpha=augment.cutmix, prob=augment.mixup_prob,
                 switch_prob=augment.mixup_switch_prob, mode=augment.mixup_mode,
                 label_smoothing=augment.label_smoothing, num_classes=num_classes)


# ------------------------------------------------------------------------------------------------ the task

class FinetuneTask:
    """Mix the batch, run the student (and the frozen teacher on the same images), return the (distillation) loss.
    Keeps the weight EMA (`ema`, set by the run) and the epoch's mean training loss."""

    def __init__(self, criterion: DistillationLoss, mixup=None, teacher: Optional[FrozenTeacher] = None,
                 autocast=None, ema_decay: Optional[float] = None):
        self.criterion, self.mixup, self.teacher = criterion, mixup, teacher
        self.autocast = autocast  # the accelerator's autocast: the teacher is not wrapped by accelerate
        self.ema_decay, self.ema = ema_decay, None
        self.updates = 0
        self._loss_sum, self._batches = 0.0, 0

    def __call__(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        images, labels = batch["image"], batch["label"]
        targets = labels
        if self.mixup is not None:
            images, targets = self.mixup(images, labels)
        outputs = model(images)
        teacher_logits = None
        if self.teacher is not None:
            if self.autocast is not None:
                with self.autocast():
                    teacher_logits = self.teacher(images)
            else:
                teacher_logits = self.teacher(images)
        losses = self.criterion(outputs, targets, teacher_logits)
        if self.mixup is None:  # with mixed images the hard label is not the answer
            class_logits = outputs[0] if isinstance(outputs, tuple) else outputs
            losses["accuracy"] = (class_logits.argmax(dim=1) == labels).float().mean()
        self._loss_sum += losses["loss"].detach()
        self._batches += 1
        return losses

    def after_optimizer_step(self, model: nn.Module) -> None:
        self.updates += 1
        if self.ema_decay is None:
            return
        if self.ema is None:  # made after the first step, so a resumed run averages from the resumed weights
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(model, decay=self.ema_decay)
        else:
            self.ema.update(model, step=self.updates)

    def pop_mean_loss(self, accelerator) -> Optional[float]:
        """Mean training loss over the batches since the last call, over all processes."""
        totals = torch.tensor([float(self._loss_sum), float(self._batches)], device=accelerator.device)
        totals = accelerator.reduce(totals, reduction="sum").cpu()
        self._loss_sum, self._batches = 0.0, 0
        return float(totals[0] / totals[1]) if totals[1] > 0 else None


# ------------------------------------------------------------------------------------------------ evaluation

def topk_correct(logits: torch.Tensor, target: torch.Tensor) -> tuple[int, int]:
    top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
    return int((top5[:, 0] == target).sum()), int((top5 == target[:, None]).any(dim=1).sum())


@torch.no_grad()
def evaluate(model: nn.Module, shards: str, transform, batch_size: int, num_workers: int, accelerator,
             max_skip_rate: float = 0.5) -> dict[str, float]:
    """Top-1 / top-5 accuracy (percent) on `shards`, every sample once over all processes. A student with a
    distillation token is scored by its eval output (the mean of its two heads), and each head alone
    (cls_top1, dist_top1)."""
    from timm.models.deit import VisionTransformerDistilled

    was_training = model.training
    model.eval()
    distilled = isinstance(model, VisionTransformerDistilled)
    names = ["", "cls_", "dist_"] if distilled else [""]
    counts = torch.zeros(2 * len(names) + 1, dtype=torch.float64)  # correct@1, correct@5 per output, samples
    stream = ShardStream(shards, transform, batch_size, train=False, rank=accelerator.process_index,
                         world_size=accelerator.num_processes, max_skip_rate=max_skip_rate)
    for batch in make_data_loader(stream, num_workers):
        images, target = batch["image"].to(accelerator.device), batch["label"]
        with accelerator.autocast():
            if distilled:
                tokens = model.forward_features(images)
                outputs = [model.forward_head(tokens), model.head(tokens[:, 0]), model.head_dist(tokens[:, 1])]
            else:
                outputs = [model(images)]
        for i, logits in enumerate(outputs):
            top1, top5 = topk_correct(logits.float().cpu(), target)
            counts[2 * i] += top1
            counts[2 * i + 1] += top5
        counts[-1] += len(target)
    model.train(was_training)
    counts = accelerator.reduce(counts.to(accelerator.device), reduction="sum").cpu()
    total = max(float(counts[-1]), 1.0)
    metrics: dict[str, float] = {}
    for i, name in enumerate(names):
        metrics[f"{name}top1"] = 100.0 * float(counts[2 * i]) / total
        metrics[f"{name}top5"] = 100.0 * float(counts[2 * i + 1]) / total
    metrics["num_samples"] = int(counts[-1])
    return metrics


# ------------------------------------------------------------------------------------------------ the run

def save_weights(directory: Path, model: nn.Module, metadata: dict[str, str]) -> Path:
    """Write directory/model.safetensors atomically (temporary file + rename)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "model.safetensors"
    tmp = directory / f".tmp-model-{os.getpid()}.safetensors"
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


class EpochEnd:
    """The engine's `on_epoch_end`: evaluate the model (and its EMA), record the epoch, keep best/ and last/ weights
    (ema_best/, ema_last/ with EMA), rewrite metrics.json."""

    def __init__(self, cfg: FinetuneConfig, output_dir: Path, val_shards: str, task: FinetuneTask,
                 spec: dict[str, Any], summary: dict[str, Any]):
        self.cfg, self.output_dir, self.val_shards, self.task = cfg, output_dir, val_shards, task
        self.spec, self.summary = spec, summary
        self.transform = eval_transform(cfg.data.image_size, crop_fraction=cfg.data.eval_crop_fraction,
                                        mean=cfg.data.mean, std=cfg.data.std)
        self.history: list[dict[str, Any]] = []
        metrics_file = output_dir / METRICS_FILE
        if cfg.train.resume and metrics_file.is_file():  # epochs before the resume point stay in the history
            self.history = json.loads(metrics_file.read_text()).get("history", [])
        self.last_step = None

    def evaluate(self, model: nn.Module, accelerator) -> dict[str, float]:
        return evaluate(model, self.val_shards, self.transform, self.cfg.eval_batch_size, self.cfg.data.num_workers,
                        accelerator, self.cfg.data.max_skip_rate)

    def __call__(self, trainer: Trainer, epoch: float) -> None:
        acc = trainer.accelerator
        record: dict[str, Any] = {"epoch": epoch, "step": trainer.step, "train_loss": self.task.pop_mean_loss(acc)}
        record.update(self.evaluate(trainer.unwrapped_model, acc))
        ema = self.task.ema
        if ema is not None:
            record.update({f"ema_{k}": v for k, v in self.evaluate(ema.module, acc).items() if k != "num_samples"})
        self.history = [h for h in self.history if h["epoch"] < epoch] + [record]
        self.last_step = trainer.step
        if acc.is_main_process:
            metadata = {"objective": FINETUNE_OBJECTIVE, SPEC_KEY: json.dumps(self.spec), "epoch": str(epoch)}
            for prefix, model in (("", trainer.unwrapped_model), ("ema_", ema.module if ema is not None else None)):
                if model is None:
                    continue
                top1 = record[f"{prefix}top1"]
                save_weights(self.output_dir / f"{prefix}{LAST_DIR}", model, {**metadata, "top1": str(top1)})
                if top1 >= max(h.get(f"{prefix}top1", -1.0) for h in self.history):
                    save_weights(self.output_dir / f"{prefix}{BEST_DIR}", model, {**metadata, "top1": str(top1)})
            (self.output_dir / METRICS_FILE).write_text(json.dumps(self.metrics(), indent=2))
        acc.wait_for_everyone()
        best = max(self.history, key=lambda h: h["top1"])
        log.info("epoch %s: top-1 %.2f%%, top-5 %.2f%%%s (best top-1 %.2f%% at epoch %s)", epoch, record["top1"],
                 record["top5"], f", EMA top-1 {record['ema_top1']:.2f}%" if ema is not None else "", best["top1"],
                 best["epoch"])

    def metrics(self) -> dict[str, Any]:
        last, best = self.history[-1], max(self.history, key=lambda h: h["top1"])
        metrics = {k: v for k, v in last.items() if k not in ("epoch", "step", "train_loss")}
        metrics.update(best_top1=best["top1"], best_epoch=best["epoch"], epochs=last["epoch"], steps=last["step"],
                       **self.summary, history=self.history)
        if self.task.ema is not None:
            ema_best = max(self.history, key=lambda h: h.get("ema_top1", -1.0))
            metrics.update(ema_best_top1=ema_best["ema_top1"], ema_best_epoch=ema_best["epoch"])
        return metrics


def load_teacher(cfg: DistillationConfig, num_classes: int, image_size: int) -> tuple[FrozenTeacher, str]:
    """The frozen teacher: one of our finetuned classifiers (run / checkpoint / weights file), or a timm model
    (`teacher_model`) with a local weights file holding every weight, classifier included."""
    if cfg.teacher_model is None:
        model, spec, weights_file = classifier_from_checkpoint(cfg.teacher)
        teacher_size = cfg.teacher_image_size or spec.get("kwargs", {}).get("img_size") or image_size
        description = f"{weights_file}"
    else:
        model = timm_classifier_with_weights(cfg.teacher_model, cfg.teacher, num_classes, cfg.teacher_model_kwargs)
        teacher_size = cfg.teacher_image_size or image_size
        description = f"timm {cfg.teacher_model} + {cfg.teacher}"
    classes = getattr(model, "num_classes", num_classes)
    if classes != num_classes:
        raise ConfigError(f"the teacher {description} predicts {classes} classes, the data has {num_classes}")
    return FrozenTeacher(model, teacher_size if teacher_size != image_size else None), description


def run_finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    from accelerate.utils import set_seed
    from timm.models.deit import VisionTransformerDistilled

    accelerator = make_accelerator(cfg.train)
    output_dir = prepare_output_dir(cfg.output_dir, cfg, cfg.train, accelerator)
    train_shards, val_shards = resolve_shards(cfg.data, output_dir, accelerator)
    num_classes = cfg.num_classes or len(read_class_names(train_shards))
    samples_per_epoch = cfg.data.samples_per_epoch or count_samples(train_shards)

    set_seed(cfg.train.seed)  # the same initial head (and from-scratch weights) on every process
    distilling = cfg.distillation.kind != "none"
    model, spec, description = build_classifier(cfg.encoder, num_classes, cfg.data.image_size,
                                                 distill_token=distilling and cfg.distillation.token)
    distill_token = isinstance(model, VisionTransformerDistilled)
    if distill_token:
        model.set_distilled_training(True)  # training returns (class head, distillation head)
    teacher, teacher_description = None, None
    if distilling:
        teacher, teacher_description = load_teacher(cfg.distillation, num_classes, cfg.data.image_size)
        teacher.to(accelerator.device)
        log.info("distillation (%s, alpha %.2f, tau %.2f) from %s through the student's %s", cfg.distillation.kind,
                 cfg.distillation.alpha, cfg.distillation.tau, teacher_description,
                 "distillation token" if distill_token else "class head")
    log.info("finetuning %s: %s, %.2f M parameters, %d classes", description, type(model).__name__,
             sum(p.numel() for p in model.parameters()) / 1e6, num_classes)

    task = FinetuneTask(
        DistillationLoss(label_loss_for(cfg.augment), cfg.distillation.kind, cfg.distillation.alpha, cfg.distillation.tau),
        mixup=build_mixup(cfg.augment, num_classes), teacher=teacher, autocast=accelerator.autocast,
        ema_decay=cfg.ema_decay,
    )
    transform = finetune_train_transform(cfg.data, cfg.augment)


    summary = {"model": description, "classifier": type(model).__name__, "distillation": cfg.distillation.kind,
               "teacher": teacher_description, "num_classes": num_classes, "num_train": samples_per_epoch}
    epoch_end = EpochEnd(cfg, output_dir, val_shards, task, spec, summary)
    trainer = Trainer(
        model=model,
        task=task,
        make_loader=training_loader_factory(train_shards, transform, cfg.data, cfg.train),
        samples_per_epoch=samples_per_epoch,
        train=cfg.train,
        optim=cfg.optim,
        logging_cfg=cfg.logging,
        output_dir=output_dir,
        run_config=to_dict(cfg),
        model_metadata={"objective": FINETUNE_OBJECTIVE, SPEC_KEY: json.dumps(spec)},
        accelerator=accelerator,
        layer_decay=cfg.layer_decay,
        skip_guard=SkipGuard(cfg.data.max_skip_rate, where=f"training data {train_shards}"),
        on_epoch_end=epoch_end,
    )
    result = trainer.fit()
    if epoch_end.last_step != trainer.step:  # stopped inside an epoch (train.stop_after_steps): evaluate there
        epoch_end(trainer, round(trainer.step / trainer.schedule.steps_per_epoch, 4))
    metrics = epoch_end.metrics()
    log.info("done: step %d, top-1 %.2f%% (best %.2f%% at epoch %s); weights in %s and %s, metrics in %s",
             result["step"], metrics["top1"], metrics["best_top1"], metrics["best_epoch"], output_dir / BEST_DIR,
             output_dir / LAST_DIR, output_dir / METRICS_FILE)
    return metrics
