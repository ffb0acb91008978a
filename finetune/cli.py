"""Command line of `python -m finetune`."""
from __future__ import annotations

from typing import Sequence

from pretrain.cli import dispatch, parse_args, run_entry_point

from .config import DetrConfig, FinetuneConfig, LinearProbeConfig, ZeroShotConfig
from .config import FeatureExportConfig, KNNConfig, RetrievalConfig

# task name -> (config schema, run function path)
TASKS: dict[str, tuple[type, str]] = {
    "linear_probe": (LinearProbeConfig, "finetune.linear_probe:run_linear_probe"),
    "zeroshot": (ZeroShotConfig, "finetune.zeroshot:run_zero_shot"),
    "retrieval": (RetrievalConfig, "finetune.retrieval:run_retrieval"),  # CLIP image<->text recall@k
    "finetune": (FinetuneConfig, "finetune.classify:run_finetune"),  # full finetuning, DeiT distillation
    "detr": (DetrConfig, "finetune.detection:run_detr"),  # DETR object detection, COCO evaluation
    "knn": (KNNConfig, "finetune.knn:run_knn"),  # DINO's weighted k-NN on frozen features
    "features": (FeatureExportConfig, "finetune.feature_export:run_feature_export"),  # features to safetensors files
}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args("python -m finetune", "Evaluate pretrained encoders (linear probe, k-NN, feature export, zero-shot, retrieval, finetuning, distillation, DETR detection).", argv)
    return run_entry_point(lambda: dispatch(args, "task", "linear_probe", TASKS))
