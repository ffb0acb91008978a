"""Full finetuning of a pretrained encoder for classification (MAE's / BEiT's recipe through timm), optionally with
DeiT distillation from a frozen teacher.

    python -m finetune --config configs/finetune_mae_tiny_fmnist.yaml

The recipe (MAE main_finetune.py): AdamW with layer-wise lr decay (timm's param_groups_layer_decay through
pretrain.engine.build_optimizer), drop path, RandAugment + random erasing on each image, Mixup / CutMix on each batch
with label smoothing folded into the soft targets (timm Mixup + SoftTargetCrossEntropy), optional weight EMA, and a
new small-init head on global-average-pooled features. The shared engine runs the steps (finetune/tasks.py
FinetuneTask); after every epoch its evaluator scores the model (and its EMA) on all of `data.val` (top-1 / top-5,
every sample once across processes), and the run keeps `best/` and `last/` weights and a `metrics.json` with the
per-epoch history.
"""
from __future__ import annotations

import json
import logging
import random
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn
from torchvision.transforms import InterpolationMode, v2

from data import ShardStream, eval_transform
from data import make_loader as make_data_loader
from data.transforms import ToNormalizedTensor, ToRGB
from pretrain.config import ConfigError, DataConfig, EncoderConfig
from pretrain.checkpoint import WEIGHTS_SUFFIXES, normalisation_metadata
from pretrain.encoders import CLASSIFIER_OBJECTIVE, SPEC_KEY, build_encoder, checkpoint_kind, recorded_image_size
from pretrain.engine import Trainer
from pretrain.evaluation import BEST_DIR, LAST_DIR, METRICS_FILE, Evaluator
from pretrain.metrics import TopKAccuracy, class_count
from pretrain.run import setup_run

from .config import AugmentConfig, DistillationConfig, FinetuneConfig
from .distillation import DistillationLoss, FrozenTeacher
from .tasks import FinetuneTask

log = logging.getLogger(__name__)


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


# ------------------------------------------------------------------------------------------------ evaluation

@torch.no_grad()
def evaluate(model: nn.Module, shards: str, transform, batch_size: int, num_workers: int, accelerator,
             num_classes: int, max_skip_rate: float = 0.5) -> dict[str, Any]:
    """Top-1 / top-5 accuracy (percent) on `shards`, every sample once over all processes. A student with a
    distillation token is scored by its eval output (the mean of its two heads), and each head alone
    (cls_top1, dist_top1)."""
    from timm.models.deit import VisionTransformerDistilled

    was_training = model.training
    model.eval()
    distilled = isinstance(model, VisionTransformerDistilled)
    names = ["", "cls_", "dist_"] if distilled else [""]
    accuracies = [TopKAccuracy(num_classes) for _ in names]
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
        for accuracy, logits in zip(accuracies, outputs):
            accuracy.update(logits, target)
    model.train(was_training)
    metrics: dict[str, Any] = {}
    for name, accuracy in zip(names, accuracies):
        result = accuracy.result(accelerator)
        metrics[f"{name}top1"], metrics[f"{name}top5"] = result["top1"], result["top5"]
        metrics["num_samples"] = result["num_samples"]
    return metrics


# ------------------------------------------------------------------------------------------------ the run

def load_teacher(cfg: DistillationConfig, num_classes: int, image_size: int) -> tuple[FrozenTeacher, str]:
    """The frozen teacher, every weight (classifier included) from its checkpoint through the one encoder road:
    one of our finetuned classifiers (run / checkpoint / weights file; its own input size unless
    `teacher_image_size`), or a timm model (`teacher_model`) with a local weights file."""
    if cfg.teacher_model is None:
        if checkpoint_kind(cfg.teacher) != CLASSIFIER_OBJECTIVE:
            raise ConfigError(f"'distillation.teacher' {cfg.teacher} is not a finetuned classifier of this project "
                              f"(python -m finetune, task finetune); for a timm classifier's weights "
                              f"({', '.join(WEIGHTS_SUFFIXES)}) set distillation.teacher_model to its timm model name")
        source = EncoderConfig(source="mae", checkpoint=cfg.teacher, image_size=cfg.teacher_image_size, drop_path=0.0)
    else:
        source = EncoderConfig(source="timm", checkpoint=cfg.teacher, model_name=cfg.teacher_model,
                               model_kwargs=dict(cfg.teacher_model_kwargs), drop_path=0.0,
                               image_size=cfg.teacher_image_size or image_size)
    teacher = build_encoder(source, num_classes=num_classes, keep_head=True)
    classes = getattr(teacher.model, "num_classes", num_classes)
    if classes != num_classes:
        raise ConfigError(f"the teacher {teacher.description} predicts {classes} classes, the data has {num_classes}")
    teacher_size = source.image_size or recorded_image_size(teacher.spec) or image_size
    if teacher_size == image_size:
        return FrozenTeacher(teacher.model, None), teacher.description
    return (FrozenTeacher(teacher.model, teacher_size),
            f"{teacher.description} at {teacher_size}x{teacher_size} (the students' images resized)")


def run_finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    from timm.models.deit import VisionTransformerDistilled
    from timm.utils import ModelEmaV3

    run = setup_run(cfg)
    accelerator = run.accelerator
    num_classes = class_count(cfg.num_classes, run.train_shards, run.val_shards)
    distilling = cfg.distillation.kind != "none"
    encoder = build_encoder(cfg.encoder, cfg.data.image_size, num_classes=num_classes,
                            distill_token=distilling and cfg.distillation.token)
    # the spec records the input size: a CNN's constructor has none, a teacher or export needs it
    model, spec = encoder.model, {**encoder.spec, "image_size": cfg.data.image_size}
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
    log.info("finetuning %s: %s, %.2f M parameters, %d classes", encoder.description, type(model).__name__,
             sum(p.numel() for p in model.parameters()) / 1e6, num_classes)

    ema = ModelEmaV3(model, decay=cfg.ema_decay, device=accelerator.device) if cfg.ema_decay is not None else None
    task = FinetuneTask(
        DistillationLoss(label_loss_for(cfg.augment), cfg.distillation.kind, cfg.distillation.alpha, cfg.distillation.tau),
        mixup=build_mixup(cfg.augment, num_classes), teacher=teacher, autocast=accelerator.autocast, ema=ema,
    )
    eval_images = eval_transform(cfg.data.image_size, crop_fraction=cfg.data.eval_crop_fraction, mean=cfg.data.mean,
                                 std=cfg.data.std)

    def measure(evaluated: nn.Module, acc) -> dict[str, Any]:
        return evaluate(evaluated, run.val_shards, eval_images, cfg.eval_batch_size, cfg.data.num_workers, acc,
                        num_classes, cfg.data.max_skip_rate)

    metadata = {"objective": CLASSIFIER_OBJECTIVE, SPEC_KEY: json.dumps(spec),
                **normalisation_metadata(cfg.data.mean, cfg.data.std)}  # best/ and last/ weights too
    summary = {"model": encoder.description, "classifier": type(model).__name__, "distillation": cfg.distillation.kind,
               "teacher": teacher_description, "num_classes": num_classes, "num_train": run.samples_per_epoch}
    evaluator = Evaluator(run.output_dir, measure, key="top1", weights_metadata=metadata, summary=summary,
                          extra_models=lambda: {"ema_": ema.module if ema is not None else None},
                          resume=bool(cfg.train.resume))
    trainer = Trainer.from_config(cfg, run, model=model, task=task, transform=finetune_train_transform(cfg.data, cfg.augment),
                                  model_metadata=metadata, layer_decay=cfg.layer_decay, evaluator=evaluator)
    result = trainer.fit()
    metrics = evaluator.metrics()
    log.info("done: step %d, top-1 %.2f%% (best %.2f%% at epoch %s); weights in %s and %s, metrics in %s",
             result["step"], metrics["top1"], metrics["best_top1"], metrics["best_epoch"], run.output_dir / BEST_DIR,
             run.output_dir / LAST_DIR, run.output_dir / METRICS_FILE)
    return metrics
