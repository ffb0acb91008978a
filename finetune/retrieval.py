"""Image-text retrieval with a CLIP model (task `retrieval`): over the pairs of image-text shards (`data.val`), each
image searches all the captions for its own (image->text) and each caption all the images (text->image); recall@1,
5, 10 and the mean and median rank, as open_clip's evaluation reports them (pretrain/clip_eval.py's
`retrieval_metrics`). Every pair read, by every process, is a candidate: the figures depend on the pool's size, so
metrics.json records `num_pairs`.
"""
from __future__ import annotations

import json
import logging
from typing import Any

from pretrain.clip_eval import retrieval_metrics
from pretrain.config import to_dict
from pretrain.run import setup_run

from .config import RetrievalConfig
from .zeroshot import load_clip_model

log = logging.getLogger(__name__)


def run_retrieval(cfg: RetrievalConfig) -> dict[str, Any]:
    from pretrain.models.clip import tokenizer_for

    run = setup_run(cfg, train_data=False)  # only the evaluation pairs (data.val) are read
    accelerator, output_dir = run.accelerator, run.output_dir
    model, name, transform = load_clip_model(cfg.model, cfg.data, accelerator.device)
    metrics = retrieval_metrics(model, run.val_shards, transform, tokenizer_for(name), cfg.train.batch_size,
                                cfg.data.num_workers, accelerator, cfg.data.max_skip_rate, cfg.max_samples,
                                progress=cfg.logging.progress_bar)
    metrics.update(model=str(cfg.model.checkpoint), open_clip_config=name, eval_shards=str(run.val_shards),
                   config=to_dict(cfg))
    if accelerator.is_main_process:
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        recalls = {direction: "/".join(f"{metrics[f'{direction}_R@{k}']:.1f}" for k in (1, 5, 10))
                   for direction in ("image_to_text", "text_to_image")}
        log.info("retrieval (%s, %d pairs): image->text R@1/5/10 %s%%, text->image R@1/5/10 %s%% (median rank %g / "
                 "%g); metrics in %s", name, metrics["num_pairs"], recalls["image_to_text"], recalls["text_to_image"],
                 metrics["image_to_text_median_rank"], metrics["text_to_image_median_rank"],
                 output_dir / "metrics.json")
    return metrics
