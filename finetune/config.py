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


# --------------------------------------------------------------------------------------------------------------
# Full finetuning and DeiT distillation (finetune/classify.py)
# --------------------------------------------------------------------------------------------------------------

@dataclass
class FinetuneEncoderConfig:
    """Where the classifier's trunk comes from (finetune/classifiers.py):
    - "mae": our `python -m pretrain` checkpoint of a masked-image model (MAE's ViT; UM-MAE's / SimMIM's Swin): a run
      directory, checkpoint directory or model.safetensors. checkpoint null: `model_name` (pretrain.models) randomly
      initialised, the from-scratch baseline; `model_kwargs` then override its constructor (e.g. depth).
    - "clip": the timm image tower of our CLIP run / checkpoint / open_clip export (with `open_clip_config`: any
      local weights file of that open_clip config).
    - "timm": `model_name` is a timm model, `model_kwargs` go to timm.create_model, `checkpoint` is a local weights
      file (.safetensors, or .pth/.pt/.bin read with torch.load(weights_only=True)); null: random init.
    The old head is dropped and a new one initialised; position embeddings are resampled to `data.image_size`."""
    source: Literal["mae", "clip", "timm"] = "mae"
    checkpoint: Optional[str] = None
    model_name: str = "mae_vit_tiny_patch4"
    model_kwargs: dict = field(default_factory=dict)
    open_clip_config: Optional[str] = None
    # "avg": mean of the patch tokens + a new LayerNorm (fc_norm) in place of the encoder's final norm, as MAE
    # finetunes; "token": the class token; null: the model's default
    global_pool: Optional[str] = "avg"
    drop_path: float = 0.1  # stochastic depth rate (linearly increasing over the blocks, timm's rule)
    head_init_std: float = 2.0e-5  # new head(s): trunc_normal(std), zero bias (MAE)

    def __post_init__(self):
        check(0 <= self.drop_path < 1, f"'encoder.drop_path' must be in [0, 1), got {self.drop_path}")
        check(self.head_init_std > 0, f"'encoder.head_init_std' must be positive, got {self.head_init_std}")
        check(self.source != "clip" or self.checkpoint is not None,
              "'encoder.checkpoint' must name a CLIP run, checkpoint or export when encoder.source=clip")
        check(not (self.source == "mae" and self.checkpoint and self.model_kwargs),
              "'encoder.model_kwargs' must be empty with an MAE checkpoint: the checkpoint fixes the architecture")


@dataclass
class AugmentConfig:
    """MAE's / DeiT's finetuning augmentation (timm): random resized crop (`data.crop_scale`) + flip, RandAugment,
    random erasing, then Mixup / CutMix on the batch with label smoothing folded into the mixed targets."""
    hflip: float = 0.5
    rand_augment: Optional[str] = "rand-m9-mstd0.5-inc1"  # timm's RandAugment config string; null: none
    reprob: float = 0.25  # random erasing probability (timm RandomErasing)
    remode: Literal["pixel", "rand", "const"] = "pixel"
    mixup: float = 0.8  # Mixup alpha (0: off)
    cutmix: float = 1.0  # CutMix alpha (0: off)
    mixup_prob: float = 1.0  # probability of mixing a batch at all
    mixup_switch_prob: float = 0.5  # probability of CutMix rather than Mixup when both are on
    mixup_mode: Literal["batch", "pair", "elem"] = "batch"
    label_smoothing: float = 0.1

    def __post_init__(self):
        for key in ("hflip", "reprob", "mixup_prob", "mixup_switch_prob"):
            value = getattr(self, key)
            check(0 <= value <= 1, f"'augment.{key}' must be in [0, 1], got {value}")
        check(self.mixup >= 0 and self.cutmix >= 0, f"'augment.mixup' / 'augment.cutmix' must be >= 0, got "
                                                    f"{self.mixup} / {self.cutmix}")
        check(0 <= self.label_smoothing < 1, f"'augment.label_smoothing' must be in [0, 1), got {self.label_smoothing}")

    @property
    def mixing(self) -> bool:
        return self.mixup_prob > 0 and (self.mixup > 0 or self.cutmix > 0)


@dataclass
class DistillationConfig:
    """DeiT (finetune/distillation.py). kind "none": plain finetuning. "soft": KL to the teacher's softened outputs
    (x tau^2); "hard": cross-entropy to the teacher's argmax; each mixed with the label loss as
    (1 - alpha) label + alpha distillation. A ViT student gets a distillation token and head (`token`); other
    students distil through their class head."""
    kind: Literal["none", "soft", "hard"] = "none"
    # our finetuning run (its best/ weights), checkpoint directory or weights file; with `teacher_model`: a local
    # weights file of that timm model, classifier included
    teacher: Optional[str] = None
    teacher_model: Optional[str] = None  # a timm model name
    teacher_model_kwargs: dict = field(default_factory=dict)
    teacher_image_size: Optional[int] = None  # the teacher's input size; null: as recorded in our checkpoint, else data.image_size
    alpha: float = 0.5
    tau: float = 1.0
    token: bool = True  # ViT students: a distillation token + head (DeiT); false: distil through the class head

    def __post_init__(self):
        check(self.kind == "none" or self.teacher is not None,
              f"'distillation.teacher' must name the teacher's weights for distillation.kind={self.kind}")
        check(0 <= self.alpha <= 1, f"'distillation.alpha' must be in [0, 1], got {self.alpha}")
        check(self.tau > 0, f"'distillation.tau' must be positive, got {self.tau}")
        check(self.teacher_image_size is None or self.teacher_image_size > 0,
              f"'distillation.teacher_image_size' must be positive, got {self.teacher_image_size}")


@dataclass
class FinetuneConfig:
    """Full finetuning (MAE / BEiT recipe through timm: layer-wise lr decay, drop path, Mixup / CutMix, label
    smoothing, RandAugment, random erasing, optional EMA), evaluated every epoch; optionally DeiT distillation."""
    task: Literal["finetune"] = "finetune"
    output_dir: str = "runs/finetune_demo"
    data: DataConfig = field(default_factory=lambda: DataConfig(crop_scale=(0.08, 1.0)))
    encoder: FinetuneEncoderConfig = field(default_factory=FinetuneEncoderConfig)
    num_classes: Optional[int] = None  # default: read from the training shards' stats.json
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    distillation: DistillationConfig = field(default_factory=DistillationConfig)
    # AdamW, betas (0.9, 0.999) and lr = blr x global batch / 256 as MAE's main_finetune.py
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        base_lr=1e-3, weight_decay=0.05, betas=(0.9, 0.999), warmup_epochs=1, min_lr=1e-6))
    layer_decay: Optional[float] = 0.75  # block i of L gets lr x layer_decay^(L - i) (BEiT/MAE); null: none
    ema_decay: Optional[float] = None  # keep an exponential moving average of the weights (timm ModelEmaV3), evaluated too
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=5, batch_size=128, log_every=20))
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval_batch_size: int = 256

    def __post_init__(self):
        check(self.data.val is not None, "'data.val' must name the evaluation shards of a finetuning run")
        check(self.num_classes is None or self.num_classes >= 2, f"'num_classes' must be >= 2, got {self.num_classes}")
        check(self.layer_decay is None or 0 < self.layer_decay <= 1,
              f"'layer_decay' must be in (0, 1] or null, got {self.layer_decay}")
        check(self.ema_decay is None or 0 < self.ema_decay < 1, f"'ema_decay' must be in (0, 1) or null, got {self.ema_decay}")
        check(self.eval_batch_size >= 1, f"'eval_batch_size' must be >= 1, got {self.eval_batch_size}")
        check(not self.augment.mixing or self.train.batch_size % 2 == 0,
              f"'train.batch_size' must be even with Mixup / CutMix (timm mixes a batch with its reverse), got "
              f"{self.train.batch_size}")
