"""Zero-shot classification with a CLIP model and a prompt ensemble (task `zeroshot`; the classifier and the
accuracy are pretrain/clip_eval.py's). Any labelled shards serve as the evaluation set; the classes are named by a
file or the shards' stats.json. Several sets can be evaluated in one run (`sets`), each with its own classes and
prompts: metrics.json then has a row per set and their mean. With several prompts, each one's own top-1 is measured
on the same pass over the images, to show what the ensemble gains over a single prompt.
"""
from __future__ import annotations

import json
import logging
from dataclasses import replace
from typing import Any, Callable

import torch
from torch import nn

from data import clip_eval_transform
from pretrain.clip_eval import (class_names, ensemble_of_single_templates, ensemble_vs_single_templates,
                                 evaluate_zero_shot, prompt_templates, single_template_weights)
from pretrain.config import ConfigError, DataConfig, to_dict
from pretrain.run import resolve_shards, setup_run
from pretrain.visualize import save_confusion_matrix

from .config import ZeroShotConfig, ZeroShotModelConfig

log = logging.getLogger(__name__)


def load_clip_model(model_cfg: ZeroShotModelConfig, data: DataConfig, device) -> tuple[nn.Module, str, Callable]:
    """(CLIP model in eval mode on `device`, its open_clip config name, its evaluation transform) for the zero-shot
    and retrieval tasks; `data.image_size` must be the size the model takes."""
    from pretrain.models.clip import load_clip

    try:
        model, name = load_clip(model_cfg.checkpoint, model_cfg.open_clip_config)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        raise ConfigError(f"'model.checkpoint' {model_cfg.checkpoint}: {err}") from None
    image_size = model.visual.image_size[0] if hasattr(model.visual, "image_size") else data.image_size
    if image_size != data.image_size:
        raise ConfigError(f"'data.image_size' is {data.image_size} but model {name} takes {image_size}x{image_size}")
    return model.to(device).eval(), name, clip_eval_transform(image_size, mean=data.mean, std=data.std)


def evaluate_set(model: nn.Module, tokenizer, transform, shards: str, names: list[str], prompts: list[str],
                 templates: str, cfg: ZeroShotConfig, accelerator) -> tuple[dict[str, Any], torch.Tensor]:
    """One labelled set: its classifier from the class names x prompts, then (metrics, confusion matrix [C, C]);
    with several prompts the metrics also hold each prompt's own top-1 against the ensemble's."""
    # each prompt's own classifier (compared with the ensemble when there are several); the ensemble is their
    # renormalised mean, so every prompt is encoded once
    per_template = single_template_weights(model, tokenizer, names, prompts, accelerator.device)
    classifier = ensemble_of_single_templates(per_template)
    single_classifiers = per_template if len(prompts) > 1 else None
    metrics = evaluate_zero_shot(model, classifier, shards, transform, cfg.train.batch_size, cfg.data.num_workers,
                                 accelerator, cfg.data.max_skip_rate, confusion=True,
                                 template_classifiers=single_classifiers)
    confusion = metrics.pop("confusion_matrix")
    if single_classifiers is not None:
        metrics.update(ensemble_vs_single_templates(prompts, metrics.pop("single_template_top1"), metrics["top1"]))
    metrics["per_class_top1"] = dict(zip(names, metrics["per_class_top1"]))
    metrics["per_class_samples"] = dict(zip(names, metrics["per_class_samples"]))
    metrics.update(eval_shards=str(shards), num_classes=len(names), num_templates=len(prompts), templates=templates)
    return metrics, confusion


def ensemble_note(metrics: dict[str, Any]) -> str:
    """For the log: the ensemble's top-1 against the mean single prompt's, when the prompts were compared."""
    if "mean_single_template_top1" not in metrics:
        return ""
    return (f" (ensemble {metrics['ensemble_minus_mean_single']:+.2f} points vs the mean single template "
            f"{metrics['mean_single_template_top1']:.2f}%, best {metrics['best_single_template_top1']:.2f}%)")


def run_zero_shot(cfg: ZeroShotConfig) -> dict[str, Any]:
    from pretrain.models.clip import tokenizer_for

    if cfg.sets:  # the sets name their own shards: data.val is not read
        cfg = replace(cfg, data=replace(cfg.data, val=None))
    # only evaluation shards are read: data.val alone ("embedded": the bundled validation split), or the sets'
    run = setup_run(cfg, train_data=False)
    accelerator, output_dir = run.accelerator, run.output_dir
    # every set's class names and prompts are checked before the model is loaded
    if cfg.sets:
        sets = []
        for entry in cfg.sets:
            _, shards = resolve_shards(replace(cfg.data, val=entry.shards), output_dir, accelerator, read_train=False)
            templates = entry.templates or cfg.templates
            sets.append((entry.name, shards, class_names(entry.classes, shards), prompt_templates(templates),
                         templates))
    else:
        sets = [(None, run.val_shards, class_names(cfg.classes, run.val_shards), prompt_templates(cfg.templates),
                 cfg.templates)]
    model, name, transform = load_clip_model(cfg.model, cfg.data, accelerator.device)
    tokenizer = tokenizer_for(name)
    described = dict(model=str(cfg.model.checkpoint), open_clip_config=name)

    if not cfg.sets:
        _, shards, names, prompts, templates = sets[0]
        metrics, confusion = evaluate_set(model, tokenizer, transform, shards, names, prompts, templates, cfg,
                                          accelerator)
        metrics.update(described, config=to_dict(cfg))
        if accelerator.is_main_process:
            (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
            png = save_confusion_matrix(confusion, names, output_dir / "confusion_matrix.png", f"zero-shot, {name}")
            log.info("zero-shot (%s, %d classes x %d prompts): top-1 %.2f%%%s, top-5 %.2f%% on %d images; "
                     "metrics.json, %s in %s", name, len(names), metrics["num_templates"], metrics["top1"],
                     ensemble_note(metrics), metrics["top5"], metrics["num_samples"], png.name, output_dir)
        return metrics

    rows, pngs = {}, []
    for set_name, shards, names, prompts, templates in sets:
        rows[set_name], confusion = evaluate_set(model, tokenizer, transform, shards, names, prompts, templates, cfg,
                                                 accelerator)
        if accelerator.is_main_process:
            pngs.append(save_confusion_matrix(confusion, names, output_dir / f"confusion_matrix_{set_name}.png",
                                              f"zero-shot {set_name}, {name}"))
    # each set counts once, whatever its size (as benchmark suites average their data sets)
    mean_top1 = sum(row["top1"] for row in rows.values()) / len(rows)
    mean_top5 = sum(row["top5"] for row in rows.values()) / len(rows)
    metrics = dict(top1=mean_top1, top5=mean_top5, mean_top1=mean_top1, mean_top5=mean_top5, sets=rows, **described,
                   config=to_dict(cfg))
    if accelerator.is_main_process:
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        per_set = ", ".join(f"{set_name} {row['top1']:.2f}%{ensemble_note(row)}" for set_name, row in rows.items())
        log.info("zero-shot (%s, %d sets): mean top-1 %.2f%%, mean top-5 %.2f%% (top-1: %s); metrics.json, %s in %s",
                 name, len(rows), mean_top1, mean_top5, per_set, ", ".join(png.name for png in pngs), output_dir)
    return metrics
