"""Weighted k-NN classification on frozen features (task `knn`), as DINO's eval_knn.py (Caron et al. 2021).

The training features are the bank: L2-normalised, gathered from every process, so each process holds all of
them. Each process classifies its own share of the evaluation features (every image once across processes),
chunk by chunk: a chunk's cosine similarities with the bank [chunk, N_train] are the only large matrix. An image's
k nearest neighbours each vote for their class with weight exp(similarity / T) (T = 0.07); classes are ranked by
their summed votes. A class nobody voted for is never a prediction (DINO's sort would rank such classes in an
arbitrary order after the voted ones). Top-1 / top-5 counts are summed over processes, so one process and many
give the same metrics. confusion_matrix.png draws the top-1 predictions of the largest k.

    python -m finetune --config configs/knn_mae_tiny_demo.yaml      # -> runs/knn_demo/metrics.json

`train_features` / `val_features` read folders written by the `features` task instead of running the encoder.
"""
from __future__ import annotations

import json
import logging
from typing import Any

from pretrain.metrics import knn_accuracy
from pretrain.visualize import save_confusion_matrix

from .config import KNNConfig
from .feature_sets import class_names, load_feature_sets, setup_feature_run

log = logging.getLogger(__name__)


def run_knn(cfg: KNNConfig) -> dict[str, Any]:
    run = setup_feature_run(cfg)
    accelerator = run.accelerator
    # every process holds the whole bank and classifies its share of the evaluation features
    train, val, num_classes = load_feature_sets(cfg, run, cfg.train.batch_size, whole_train=True)

    accuracies = knn_accuracy(val.features, val.labels, train.features, train.labels, cfg.k, cfg.temperature,
                              num_classes, cfg.chunk_size, accelerator.device)
    results = {k: accuracies[k].result(accelerator) for k in cfg.k}
    drawn_k = max(cfg.k)
    confusion = accuracies[drawn_k].confusion_matrix(accelerator)  # every process takes part in the reduction
    metrics: dict[str, Any] = {
        "k": {str(k): {"top1": r["top1"], "top5": r["top5"]} for k, r in results.items()},
        "temperature": cfg.temperature, "num_train": len(train.features), "num_test": results[cfg.k[0]]["num_samples"],
        "num_classes": num_classes, "feature_dim": int(train.features.shape[1]), "encoder": train.encoder,
        "feature": train.kind,
    }
    if accelerator.is_main_process:
        (run.output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        picture = save_confusion_matrix(confusion, class_names(train, num_classes),
                                        run.output_dir / "confusion_matrix.png",
                                        f"k-NN (k={drawn_k}), {train.described}")
        summary = ", ".join(f"k={k} {r['top1']:.2f}% / {r['top5']:.2f}%" for k, r in results.items())
        log.info("k-NN on %s, top-1 / top-5 of %d images against %d: %s; metrics.json, %s in %s",
                 train.described, metrics["num_test"], metrics["num_train"], summary, picture.name,
                 run.output_dir)
    return metrics

