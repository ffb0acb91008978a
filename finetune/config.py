"""Config schemas of `python -m finetune` (the shared sections come from `pretrain.config`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from pretrain.config import DataConfig, LoggingConfig, OptimConfig, TrainConfig, check


@dataclass
class EncoderConfig:
    # "vit": a ViT encoder; with `checkpoint` set, its weights come from our MAE checkpoint (a run directory, a
    # checkpoint directory or a model.safetensors file), without, it is randomly initialised (a baseline).
    # "pixels": no encoder, the normalised pixels themselves are the features (a baseline).
    kind: Literal["vit", "pixels"] = "vit"
    checkpoint: Optional[str] = None
    model_name: str = "mae_vit_tiny_patch4"  # architecture for random init (ignored when a checkpoint is given)


@dataclass
class LinearProbeConfig:
    """The MAE paper's linear probe: frozen encoder, BatchNorm (no affine) + Linear on the class token, LARS,
    no augmentation. Features are computed once, then the head trains on them."""
    task: Literal["linear_probe"] = "linear_probe"
    output_dir: str = "runs/linprobe_demo"
    data: DataConfig = field(default_factory=DataConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    num_classes: Optional[int] = None  # default: read from the training shards' stats.json
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        name="lars", base_lr=0.1, weight_decay=0.0, momentum=0.9, warmup_epochs=10))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=90, batch_size=256, log_every=50, save_every=10**9))
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    feature_batch_size: int = 256  # batch size of the (no-grad) feature extraction

    def __post_init__(self):
        check(self.data.val is not None, "'data.val' must name the evaluation shards of a linear probe")
        check(self.num_classes is None or self.num_classes >= 2, f"'num_classes' must be >= 2, got {self.num_classes}")
        check(self.feature_batch_size >= 1, f"'feature_batch_size' must be >= 1, got {self.feature_batch_size}")
