"""DETR object detection on a pretrained ViT / Swin: `python -m finetune --config configs/detr_*.yaml` (task "detr").

    detection shards (data.write_detection_shards: COCO-format source)  ->  DETR (finetune/detr.py)
      -> set loss (finetune/detr_loss.py), AdamW with a lower backbone lr, grad clip, step decay every lr_drop epochs
      -> every eval_every epochs: predictions on all of data.val (each image once across processes, gathered to the
         main process) scored by pycocotools' COCOeval against the shards' own COCO ground truth
      -> metrics.json (AP, AP50, AP75, APs, APm, APl per evaluation), best/ and last/ weights, boxes.png

The weights files carry the model's spec in their metadata, so `detr_from_weights` rebuilds the model without the
backbone checkpoint (finetune/draw_boxes.py uses it).
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Optional

import torch
from torch import nn

from data import STATS_FILE, DataError, ShardStream, SkipGuard, coco_ground_truth, count_samples, expand_shards
from data import detection_eval_transform, detection_train_transform
from data import make_loader as make_data_loader
from pretrain.checkpoint import CheckpointError, load_model_file, load_state_dict_checked
from pretrain.config import ConfigError, to_dict
from pretrain.datasets import training_loader_factory
from pretrain.engine import Schedule, Trainer, make_accelerator, prepare_output_dir

from .classifiers import BEST_DIR, LAST_DIR, build_classifier, create_classifier
from .classify import METRICS_FILE, save_weights
from .config import DetrBackboneConfig, DetrConfig
from .detr import DETR, Backbone, postprocess
from .detr_loss import HungarianMatcher, SetCriterion
from .encoders import resolve_weights_file

log = logging.getLogger(__name__)

DETR_OBJECTIVE = "detr"  # the `objective` in the metadata of our DETR weights
SPEC_KEY = "detr"
PICTURE_FILE = "boxes.png"
COCO_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # COCOeval.stats[0:6]


# ------------------------------------------------------------------------------------------------ the model

def build_backbone(cfg: DetrBackboneConfig) -> tuple[Backbone, dict[str, Any], str]:
    """(Backbone, the trunk's spec, a description): the trunk loaded as finetuning loads it (position embeddings
    fitted to `cfg.image_size`, the head dropped), then rebuilt with `dynamic_img_size=True` so it takes any input
    size (a ViT interpolates its position embeddings per input, a Swin pads to its windows)."""
    encoder = SimpleNamespace(source=cfg.source, checkpoint=cfg.checkpoint, model_name=cfg.model_name,
                              model_kwargs=cfg.model_kwargs, open_clip_config=cfg.open_clip_config, global_pool=None,
                              drop_path=cfg.drop_path, head_init_std=2.0e-5)
    fixed_size, spec, description = build_classifier(encoder, num_classes=0, image_size=cfg.image_size)
    spec = {**spec, "kwargs": {**spec["kwargs"], "dynamic_img_size": True}}
    trunk = create_classifier(spec, cfg.drop_path)
    trunk.load_state_dict(fixed_size.state_dict())
    return Backbone(trunk), spec, description


def detr_spec(backbone_spec: dict[str, Any], num_classes: int, cfg: DetrConfig) -> dict[str, Any]:
    return {"backbone": backbone_spec, "num_classes": num_classes, "model": asdict(cfg.model)}


def create_detr(spec: dict[str, Any]) -> DETR:
    """An untrained DETR (random backbone too) from its spec: the shape of a model to load weights into."""
    model = spec["model"]
    return DETR(Backbone(create_classifier(spec["backbone"])), spec["num_classes"], hidden_dim=model["hidden_dim"],
                num_heads=model["num_heads"], encoder_layers=model["encoder_layers"],
                decoder_layers=model["decoder_layers"], ffn_dim=model["ffn_dim"], dropout=model["dropout"],
                num_queries=model["num_queries"], aux_loss=model["aux_loss"])


def detr_from_weights(path: str | Path) -> tuple[DETR, dict[str, Any], Path]:
    """(DETR, spec, weights file) of our detection run (its best/ weights), a best/ or last/ folder, or a weights
    file, rebuilt from the spec in the file's metadata."""
    path = Path(path)
    weights_file = path / BEST_DIR / "model.safetensors"
    weights_file = weights_file if weights_file.is_file() else resolve_weights_file(path)
    state_dict, metadata = load_model_file(weights_file)
    if metadata.get("objective") != DETR_OBJECTIVE or SPEC_KEY not in metadata:
        raise CheckpointError(f"{weights_file} is not DETR weights of this project (metadata: {sorted(metadata)})")
    spec = json.loads(metadata[SPEC_KEY])
    model = create_detr(spec)
    load_state_dict_checked(model, state_dict, weights_file)
    return model, spec, weights_file


def backbone_param_groups(backbone_lr_scale: float) -> Callable[[nn.Module], list[dict[str, Any]]]:
    """DETR's two learning rates as timm param groups: the backbone's group scaled by `backbone_lr_scale` (the
    scheduler multiplies its lr by the group's lr_scale), weight decay on every weight as DETR does."""
    def groups(model: nn.Module) -> list[dict[str, Any]]:
        trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        backbone = [p for name, p in trainable if name.startswith("backbone.")]
        rest = [p for name, p in trainable if not name.startswith("backbone.")]
        return [{"params": rest}] + ([{"params": backbone, "lr_scale": backbone_lr_scale}] if backbone else [])
    return groups


def step_decay(lr_drop_epochs: int, rate: float = 0.1) -> Callable[[Any, Schedule], Any]:
    """DETR's StepLR as the engine's scheduler: lr x rate every lr_drop_epochs epochs, a pure function of the
    optimizer step (timm's StepLRScheduler counting updates), after the optional linear warmup."""
    def make(optimizer, schedule: Schedule):
        from timm.scheduler import StepLRScheduler

        return StepLRScheduler(optimizer, decay_t=lr_drop_epochs * schedule.steps_per_epoch, decay_rate=rate,
                               warmup_t=schedule.warmup_steps, warmup_lr_init=0.0, warmup_prefix=True,
                               t_in_epochs=False)
    return make


# ------------------------------------------------------------------------------------------------ the task

def targets_to(targets: list[dict[str, Any]], device: torch.device) -> list[dict[str, torch.Tensor]]:
    """The batch's target dicts (which the engine leaves on the CPU) with their boxes and labels on `device`."""
    return [{"boxes": t["boxes"].to(device), "labels": t["labels"].to(device)} for t in targets]


class DetrTask:
    """The engine's task: DETR's outputs on the padded batch, the set loss against the batch's targets."""

    def __init__(self, criterion: SetCriterion):
        self.criterion = criterion
        self._loss_sum, self._batches = 0.0, 0

    def __call__(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        images = batch["image"]
        outputs = model(images, batch["mask"])
        losses = self.criterion(outputs, targets_to(batch["target"], images.device))
        self._loss_sum += float(losses["loss"].detach())
        self._batches += 1
        return losses

    def pop_mean_loss(self, accelerator) -> Optional[float]:
        """Mean training loss over the batches since the last call, over all processes."""
        totals = torch.tensor([self._loss_sum, float(self._batches)], device=accelerator.device)
        totals = accelerator.reduce(totals, reduction="sum").cpu()
        self._loss_sum, self._batches = 0.0, 0
        return float(totals[0] / totals[1]) if totals[1] > 0 else None


# ------------------------------------------------------------------------------------------------ evaluation

def to_coco_results(image_id: int, result: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    """One image's postprocessed predictions (xyxy pixels) as COCO result entries (bbox x, y, w, h)."""
    x0, y0, x1, y1 = result["boxes"].unbind(1)
    boxes = torch.stack([x0, y0, x1 - x0, y1 - y0], dim=1).tolist()
    return [{"image_id": image_id, "category_id": int(label), "bbox": [round(v, 3) for v in box], "score": float(score)}
            for box, label, score in zip(boxes, result["labels"].tolist(), result["scores"].tolist())]


@torch.no_grad()
def predict(model: nn.Module, shards: str, transform, batch_size: int, num_workers: int, accelerator,
            max_skip_rate: float = 0.5) -> tuple[list[dict[str, Any]], list[int]]:
    """(COCO result entries, image ids) of this process's share of `shards` (every image once over all processes);
    boxes in pixels of the stored images, which the shards' ground truth uses."""
    was_training = model.training
    model.eval()
    detections: list[dict[str, Any]] = []
    image_ids: list[int] = []
    stream = ShardStream(shards, transform, batch_size, train=False, kind="detection", rank=accelerator.process_index,
                         world_size=accelerator.num_processes, max_skip_rate=max_skip_rate)
    for batch in make_data_loader(stream, num_workers):
        with accelerator.autocast():
            outputs = model(batch["image"].to(accelerator.device), batch["mask"].to(accelerator.device))
        sizes = torch.stack([t["orig_size"] for t in batch["target"]])
        for target, result in zip(batch["target"], postprocess(outputs, sizes.to(accelerator.device))):
            image_ids.append(int(target["image_id"]))
            detections.extend(to_coco_results(int(target["image_id"]), {k: v.cpu() for k, v in result.items()}))
    model.train(was_training)
    return detections, image_ids


def coco_evaluate(ground_truth: dict[str, Any], detections: list[dict[str, Any]],
                  image_ids: Optional[list[int]] = None) -> dict[str, float]:
    """pycocotools' box evaluation: {"AP", "AP50", "AP75", "APs", "APm", "APl"} as fractions (COCOeval's -1: no
    ground truth boxes of that size), over `image_ids` (default: every image of the ground truth). No detections
    at all scores 0."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        coco = COCO()
        coco.dataset = {k: list(v) for k, v in ground_truth.items() if k in ("images", "annotations", "categories")}
        coco.createIndex()
        if not detections:
            return {name: 0.0 for name in COCO_METRICS}
        evaluation = COCOeval(coco, coco.loadRes(detections), "bbox")
        if image_ids is not None:
            evaluation.params.imgIds = sorted(set(image_ids))
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return {name: float(value) for name, value in zip(COCO_METRICS, evaluation.stats[:6])}


def category_list(train_shards: str) -> list[dict[str, Any]]:
    """The categories ({"id", "name"}) in the stats.json beside the training shards."""
    stats_file = Path(expand_shards(train_shards)[0]).parent / STATS_FILE
    categories = json.loads(stats_file.read_text()).get("categories") if stats_file.is_file() else None
    if not categories:
        raise DataError(f"no categories in {stats_file}: data.train must be detection shards "
                        f"(data.write_detection_shards / python -m data coco)")
    return categories


# ------------------------------------------------------------------------------------------------ the run

class EpochEnd:
    """The engine's `on_epoch_end`: every `eval_every` epochs (and after the last), COCO metrics on data.val,
    last/ and best/ (by AP) weights, metrics.json rewritten."""

    def __init__(self, cfg: DetrConfig, output_dir: Path, val_dir: str, task: DetrTask, spec: dict[str, Any],
                 summary: dict[str, Any], accelerator):
        self.cfg, self.output_dir, self.val_dir, self.task, self.spec = cfg, output_dir, val_dir, task, spec
        self.summary = summary
        self.transform = detection_eval_transform(cfg.augment.eval_size, cfg.augment.eval_max_size, cfg.data.mean,
                                                  cfg.data.std)
        self.ground_truth = coco_ground_truth(val_dir) if accelerator.is_main_process else None
        self.history: list[dict[str, Any]] = []
        metrics_file = output_dir / METRICS_FILE
        if cfg.train.resume and metrics_file.is_file():
            self.history = json.loads(metrics_file.read_text()).get("history", [])
        self.last_step = None

    def evaluate(self, model: nn.Module, accelerator) -> dict[str, Any]:
        from accelerate.utils import broadcast_object_list, gather_object

        detections, image_ids = predict(model, self.val_dir, self.transform, self.cfg.eval_batch_size,
                                        self.cfg.data.num_workers, accelerator, self.cfg.data.max_skip_rate)
        if accelerator.num_processes > 1:
            detections, image_ids = gather_object(detections), gather_object(image_ids)
        result = [None]
        if accelerator.is_main_process:
            result = [{**coco_evaluate(self.ground_truth, detections, image_ids), "num_images": len(set(image_ids))}]
        if accelerator.num_processes > 1:
            broadcast_object_list(result)
        return result[0]

    def __call__(self, trainer: Trainer, epoch: float) -> None:
        last_epoch = trainer.step >= trainer.schedule.total_steps or trainer.step == trainer.train_cfg.stop_after_steps
        if isinstance(epoch, int) and epoch % self.cfg.eval_every and not last_epoch:
            return
        acc = trainer.accelerator
        record: dict[str, Any] = {"epoch": epoch, "step": trainer.step, "train_loss": self.task.pop_mean_loss(acc)}
        record.update(self.evaluate(trainer.unwrapped_model, acc))
        self.history = [h for h in self.history if h["epoch"] < epoch] + [record]
        self.last_step = trainer.step
        if acc.is_main_process:
            metadata = {"objective": DETR_OBJECTIVE, SPEC_KEY: json.dumps(self.spec), "epoch": str(epoch),
                        "AP": str(record["AP"])}
            save_weights(self.output_dir / LAST_DIR, trainer.unwrapped_model, metadata)
            if record["AP"] >= max(h["AP"] for h in self.history):
                save_weights(self.output_dir / BEST_DIR, trainer.unwrapped_model, metadata)
            (self.output_dir / METRICS_FILE).write_text(json.dumps(self.metrics(), indent=2))
        acc.wait_for_everyone()
        log.info("epoch %s: AP %.3f, AP50 %.3f, AP75 %.3f (APs %.3f, APm %.3f, APl %.3f) on %d images", epoch,
                 *(record[k] for k in COCO_METRICS), record["num_images"])

    def metrics(self) -> dict[str, Any]:
        last, best = self.history[-1], max(self.history, key=lambda h: h["AP"])
        metrics = {k: v for k, v in last.items() if k not in ("epoch", "step", "train_loss")}
        metrics.update(best_AP=best["AP"], best_AP50=best["AP50"], best_epoch=best["epoch"], epochs=last["epoch"],
                       steps=last["step"], **self.summary, history=self.history)
        return metrics


def run_detr(cfg: DetrConfig) -> dict[str, Any]:
    from accelerate.utils import set_seed

    accelerator = make_accelerator(cfg.train)
    output_dir = prepare_output_dir(cfg.output_dir, cfg, cfg.train, accelerator)
    for key, spec in (("data.train", cfg.data.train), ("data.val", cfg.data.val)):
        expand_shards(spec)  # a missing shard or folder fails here, naming it
    if not (Path(cfg.data.val) / STATS_FILE).is_file():
        raise ConfigError(f"'data.val' {cfg.data.val} must be a detection shard directory with its {STATS_FILE} "
                          f"(its COCO ground truth is rebuilt from there)")
    categories = category_list(cfg.data.train)
    num_classes = cfg.num_classes or max(int(c["id"]) for c in categories) + 1
    samples_per_epoch = cfg.data.samples_per_epoch or count_samples(cfg.data.train)

    set_seed(cfg.train.seed)  # the same initial transformer and heads on every process
    backbone, backbone_spec, description = build_backbone(cfg.backbone)
    if cfg.backbone_lr == 0:
        backbone.requires_grad_(False)
    m = cfg.model
    model = DETR(backbone, num_classes, hidden_dim=m.hidden_dim, num_heads=m.num_heads, encoder_layers=m.encoder_layers,
                 decoder_layers=m.decoder_layers, ffn_dim=m.ffn_dim, dropout=m.dropout, num_queries=m.num_queries,
                 aux_loss=m.aux_loss)
    spec = detr_spec(backbone_spec, num_classes, cfg)
    backbone_params = sum(p.numel() for p in backbone.parameters())
    log.info("DETR on %s (%s, stride %d, %d channels): %.2f M backbone + %.2f M detector parameters, %d classes "
             "(+ no object), %d queries", description, type(backbone.trunk).__name__, backbone.stride,
             backbone.num_channels, backbone_params / 1e6,
             (sum(p.numel() for p in model.parameters()) - backbone_params) / 1e6, num_classes, m.num_queries)

    loss = cfg.loss
    criterion = SetCriterion(num_classes, HungarianMatcher(loss.class_cost, loss.bbox_cost, loss.giou_cost),
                             ce_weight=loss.ce_weight, bbox_weight=loss.bbox_weight, giou_weight=loss.giou_weight,
                             no_object_weight=loss.no_object_weight)
    task = DetrTask(criterion)
    augment = cfg.augment
    transform = detection_train_transform(augment.scales, augment.max_size, augment.crop_scales, augment.crop_size,
                                          cfg.data.mean, cfg.data.std)


    summary = {"model": description, "backbone": type(backbone.trunk).__name__, "backbone_stride": backbone.stride,
               "num_classes": num_classes, "categories": categories, "num_train": samples_per_epoch,
               "backbone_lr": cfg.backbone_lr, "lr": cfg.optim.lr}
    epoch_end = EpochEnd(cfg, output_dir, cfg.data.val, task, spec, summary, accelerator)
    trainer = Trainer(
        model=model,
        task=task,
        make_loader=training_loader_factory(cfg.data.train, transform, cfg.data, cfg.train, kind="detection"),
        samples_per_epoch=samples_per_epoch,
        train=cfg.train,
        optim=cfg.optim,
        logging_cfg=cfg.logging,
        output_dir=output_dir,
        run_config=to_dict(cfg),
        model_metadata={"objective": DETR_OBJECTIVE, SPEC_KEY: json.dumps(spec)},
        accelerator=accelerator,
        skip_guard=SkipGuard(cfg.data.max_skip_rate, where=f"training data {cfg.data.train}"),
        on_epoch_end=epoch_end,
        param_group_fn=backbone_param_groups(cfg.backbone_lr / cfg.optim.lr),
        make_scheduler=step_decay(cfg.lr_drop),
    )
    result = trainer.fit()
    if epoch_end.last_step != trainer.step:  # stopped inside an epoch (train.stop_after_steps): evaluate there
        epoch_end(trainer, round(trainer.step / trainer.schedule.steps_per_epoch, 4))
    metrics = epoch_end.metrics()
    if cfg.num_pictures and accelerator.is_main_process:
        from .draw_boxes import draw_predictions

        names = {int(c["id"]): c["name"] for c in categories}
        draw_predictions(trainer.unwrapped_model, cfg.data.val, epoch_end.transform, output_dir / PICTURE_FILE,
                         names, cfg.data.mean, cfg.data.std, cfg.num_pictures, cfg.picture_threshold)
    accelerator.wait_for_everyone()
    log.info("done: step %d, AP %.3f, AP50 %.3f (best AP %.3f at epoch %s); weights in %s and %s, metrics in %s",
             result["step"], metrics["AP"], metrics["AP50"], metrics["best_AP"], metrics["best_epoch"],
             output_dir / BEST_DIR, output_dir / LAST_DIR, output_dir / METRICS_FILE)
    return metrics
