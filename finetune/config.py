"""Config schemas of `python -m finetune` (the shared sections come from `pretrain.config`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from data.transforms import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
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


@dataclass
class ZeroShotModelConfig:
    # our CLIP run / checkpoint directory / model.safetensors, or an open_clip export folder (open_clip_config.json
    # + weights); with `open_clip_config` set, any local weights file for that open_clip model config
    checkpoint: str = "runs/clip_demo"
    open_clip_config: Optional[str] = None  # an open_clip config name or JSON file, for weights of other origins


@dataclass
class ZeroShotConfig:
    """Zero-shot classification of labelled shards (`data.val`) with a prompt ensemble; see finetune/zeroshot.py."""
    task: Literal["zeroshot"] = "zeroshot"
    output_dir: str = "runs/zeroshot_demo"
    data: DataConfig = field(default_factory=lambda: DataConfig(val="embedded", mean=OPENAI_CLIP_MEAN,
                                                                std=OPENAI_CLIP_STD))
    model: ZeroShotModelConfig = field(default_factory=ZeroShotModelConfig)
    classes: str = "stats"  # "stats" (the shards' stats.json), "imagenet" (open_clip's names) or a .txt/.json file
    # "openai" (the CLIP paper's 80), "simple" (open_clip's 7), one template with "{}", or a .txt/.json file
    templates: str = "openai"
    train: TrainConfig = field(default_factory=lambda: TrainConfig(batch_size=256))  # batch size, precision
    logging: LoggingConfig = field(default_factory=lambda: LoggingConfig(wandb="disabled"))

    def __post_init__(self):
        check(self.data.val is not None, "'data.val' must name the labelled evaluation shards of a zero-shot run")
