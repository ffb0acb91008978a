"""DETR object detection on a pretrained ViT / Swin: `python -m finetune --config configs/detr_*.yaml` (task "detr").

    detection shards (data.write_detection_shards: COCO-format source)  ->  DETR (finetune/detr.py)
      -> set loss (finetune/detr_loss.py), AdamW with a lower backbone lr, grad clip, step decay every lr_drop epochs
      -> every eval_every epochs: predictions on all of data.val (each image once across processes, gathered to the
         main process) scored by pycocotools' COCOeval against the shards' own COCO ground truth
      -> metrics.json (AP, AP50, AP75, APs, APm, APl per evaluation), best/ and last/ weights, boxes.png

The backbone comes from the `encoder` section through `pretrain.encoders.build_encoder`, as every head's does. The
weights files carry the model's spec in their metadata, so `detr_from_weights` rebuilds the model without the
backbone checkpoint (`python -m finetune.draw_boxes` uses it).
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from data import STATS_FILE, ShardStream, coco_ground_truth, detection_eval_transform, detection_train_transform
from data import make_loader as make_data_loader
from data import DataError, read_categories
from pretrain.checkpoint import (CheckpointError, load_state_dict_checked, normalisation_metadata, read_weights,
                                 resolve_weights_file)
from pretrain.config import ConfigError, EncoderConfig
from pretrain.encoders import build_encoder, create_timm_model
from pretrain.engine import Schedule, Trainer
from pretrain.evaluation import BEST_DIR, LAST_DIR, METRICS_FILE, Evaluator
from pretrain.run import setup_run

from .config import DetrConfig
from .detr import DETR, Backbone, postprocess
from .detr_loss import HungarianMatcher, SetCriterion
from .pictures import draw_predictions
from .tasks import DetrTask

log = logging.getLogger(__name__)

DETR_OBJECTIVE = "detr"  # the `objective` in the metadata of our DETR weights
SPEC_KEY = "detr"
PICTURE_FILE = "boxes.png"
COCO_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # COCOeval.stats[0:6]


# ------------------------------------------------------------------------------------------------ the model

def build_backbone(cfg: EncoderConfig) -> tuple[Backbone, dict[str, Any], str]:
    """(Backbone, the trunk's spec, a description): the trunk loaded as every head loads it (position embeddings
    fitted to `cfg.image_size`, no head), built with `dynamic_img_size=True` so that it takes any input size (a ViT
    interpolates its position embeddings per input, a Swin pads to its windows)."""
    encoder = build_encoder(cfg, dynamic_img_size=True)
    return Backbone(encoder.model), encoder.spec, encoder.description


def detr_spec(backbone_spec: dict[str, Any], num_classes: int, cfg: DetrConfig) -> dict[str, Any]:
    return {"backbone": backbone_spec, "num_classes": num_classes, "model": asdict(cfg.model)}


def create_detr(spec: dict[str, Any]) -> DETR:
    """An untrained DETR (random backbone too) from its spec: the shape of a model to load weights into."""
    model = spec["model"]
    return DETR(Backbone(create_timm_model(spec["backbone"])), spec["num_classes"], hidden_dim=model["hidden_dim"],
                num_heads=model["num_heads"], encoder_layers=model["encoder_layers"],
                decoder_layers=model["decoder_layers"], ffn_dim=model["ffn_dim"], dropout=model["dropout"],
                num_queries=model["num_queries"], aux_loss=model["aux_loss"])


def detr_from_weights(path: str | Path) -> tuple[DETR, dict[str, Any], Path]:
    """(DETR, spec, weights file) of our detection run (its best/ weights), a best/ or last/ folder, or a weights
    file, rebuilt from the spec in the file's metadata."""
    state_dict, metadata = read_weights(path)
    weights_file = resolve_weights_file(path)
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


def coco_metrics(model: nn.Module, shards: str, ground_truth: Optional[dict[str, Any]], transform, batch_size: int,
                 num_workers: int, accelerator, max_skip_rate: float = 0.5) -> dict[str, Any]:
    """COCO box metrics of `model` on all of `shards` (predictions gathered to the main process, which holds the
    `ground_truth`), the same dict on every process, with the number of images scored."""
    from accelerate.utils import broadcast_object_list, gather_object

    detections, image_ids = predict(model, shards, transform, batch_size, num_workers, accelerator, max_skip_rate)
    if accelerator.num_processes > 1:
        detections, image_ids = gather_object(detections), gather_object(image_ids)
    result = [None]
    if accelerator.is_main_process:
        result = [{**coco_evaluate(ground_truth, detections, image_ids), "num_images": len(set(image_ids))}]
    if accelerator.num_processes > 1:
        broadcast_object_list(result)
    return result[0]


# ------------------------------------------------------------------------------------------------ the run

def run_detr(cfg: DetrConfig) -> dict[str, Any]:
    run = setup_run(cfg)
    accelerator, output_dir = run.accelerator, run.output_dir
    if not (Path(run.val_shards) / STATS_FILE).is_file():
        raise ConfigError(f"'data.val' {cfg.data.val} must be a detection shard directory with its {STATS_FILE} "
                          f"(its COCO ground truth is rebuilt from there)")
    categories = read_categories(run.train_shards)
    val_categories = read_categories(run.val_shards)
    if val_categories != categories:  # a category id must mean the same class in both
        raise DataError(f"the evaluation shards {run.val_shards} have other categories than the training shards "
                        f"{run.train_shards}: {val_categories} vs {categories}")
    largest_id = max(int(c["id"]) for c in categories)
    if cfg.num_classes is not None and cfg.num_classes <= largest_id:
        raise ConfigError(f"'num_classes' is {cfg.num_classes} but the training shards {run.train_shards} have "
                          f"category id {largest_id} (class ids run from 0 to num_classes - 1)")
    num_classes = cfg.num_classes or largest_id + 1

    backbone, backbone_spec, description = build_backbone(cfg.encoder)
    if cfg.backbone_lr == 0:
        backbone.requires_grad_(False)
    spec = detr_spec(backbone_spec, num_classes, cfg)
    m = cfg.model
    model = DETR(backbone, num_classes, hidden_dim=m.hidden_dim, num_heads=m.num_heads, encoder_layers=m.encoder_layers,
                 decoder_layers=m.decoder_layers, ffn_dim=m.ffn_dim, dropout=m.dropout, num_queries=m.num_queries,
                 aux_loss=m.aux_loss)
    backbone_params = sum(p.numel() for p in backbone.parameters())
    log.info("DETR on %s (%s, stride %d, %d channels): %.2f M backbone + %.2f M detector parameters, %d classes "
             "(+ no object), %d queries", description, type(backbone.trunk).__name__, backbone.stride,
             backbone.num_channels, backbone_params / 1e6,
             (sum(p.numel() for p in model.parameters()) - backbone_params) / 1e6, num_classes, m.num_queries)

    loss = cfg.loss
    criterion = SetCriterion(num_classes, HungarianMatcher(loss.class_cost, loss.bbox_cost, loss.giou_cost),
                             ce_weight=loss.ce_weight, bbox_weight=loss.bbox_weight, giou_weight=loss.giou_weight,
                             no_object_weight=loss.no_object_weight)
    augment = cfg.augment
    train_images = detection_train_transform(augment.scales, augment.max_size, augment.crop_scales, augment.crop_size,
                                             cfg.data.mean, cfg.data.std)
    eval_images = detection_eval_transform(augment.eval_size, augment.eval_max_size, cfg.data.mean, cfg.data.std)
    ground_truth = coco_ground_truth(run.val_shards) if accelerator.is_main_process else None

    def measure(evaluated: nn.Module, acc) -> dict[str, Any]:
        return coco_metrics(evaluated, run.val_shards, ground_truth, eval_images, cfg.eval_batch_size,
                            cfg.data.num_workers, acc, cfg.data.max_skip_rate)

    metadata = {"objective": DETR_OBJECTIVE, SPEC_KEY: json.dumps(spec),
                **normalisation_metadata(cfg.data.mean, cfg.data.std)}  # best/ and last/ weights too
    summary = {"model": description, "backbone": type(backbone.trunk).__name__, "backbone_stride": backbone.stride,
               "num_classes": num_classes, "categories": categories, "num_train": run.samples_per_epoch,
               "backbone_lr": cfg.backbone_lr, "lr": cfg.optim.lr}
    evaluator = Evaluator(output_dir, measure, key="AP", every=cfg.eval_every, weights_metadata=metadata,
                          summary=summary, resume=bool(cfg.train.resume))
    trainer = Trainer.from_config(
        cfg, run, model=model, task=DetrTask(criterion), transform=train_images, kind="detection",
        model_metadata=metadata, evaluator=evaluator,
        param_group_fn=backbone_param_groups(cfg.backbone_lr / cfg.optim.lr), make_scheduler=step_decay(cfg.lr_drop),
    )
    result = trainer.fit()
    metrics = evaluator.metrics()
    if cfg.num_pictures and accelerator.is_main_process:
        names = {int(c["id"]): c["name"] for c in categories}
        draw_predictions(trainer.unwrapped_model, run.val_shards, eval_images, output_dir / PICTURE_FILE,
                         names, cfg.data.mean, cfg.data.std, cfg.num_pictures, cfg.picture_threshold)
    accelerator.wait_for_everyone()
    log.info("done: step %d, AP %.3f, AP50 %.3f (best AP %.3f at epoch %s); weights in %s and %s, metrics in %s",
             result["step"], metrics["AP"], metrics["AP50"], metrics["best_AP"], metrics["best_epoch"],
             output_dir / BEST_DIR, output_dir / LAST_DIR, output_dir / METRICS_FILE)
    return metrics
