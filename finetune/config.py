"""Config schemas of `python -m finetune` (the shared sections, `encoder` included, come from `pretrain.config`)."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal, Optional

from data.transforms import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from pretrain.config import DataConfig, EncoderConfig, LoggingConfig, OptimConfig, TrainConfig, check


@dataclass
class LBFGSProbeConfig:
    """The CLIP paper's linear probe (`protocol: lbfgs`, finetune/logistic.py): multinomial logistic regression on
    standardised features, fit full-batch with L-BFGS. C is scikit-learn's LogisticRegression(C=...): the loss is
    the sum of the per-sample cross-entropies + ||W||^2 / (2C), bias unpenalised. The C of the best top-1 on a
    seeded `val_fraction` of the training features (never data.val) wins; the probe is then refit on all of them."""
    Cs: list[float] = field(default_factory=lambda: [10.0 ** e for e in range(-6, 4)])  # the grid, 1e-6 .. 1e3
    refine: int = 2  # rounds of bisection in log C around the best (2 fits each): 10x grid steps -> 10^(1/4)
    patience: Optional[int] = None  # stop going up the grid once this many C past the best did not beat it
    val_fraction: float = 0.1  # of the training features, carved off to choose C
    seed: int = 0  # of the validation split
    max_iter: int = 1000  # L-BFGS iterations per fit (the CLIP paper's scikit-learn runs: 1000)
    tol: float = 1e-4  # stop when the mean loss's largest gradient entry is at most this (scikit-learn's tol)
    dtype: Literal["float64", "float32"] = "float64"  # float64 matches scikit-learn; float32 is about twice as fast

    def __post_init__(self):
        check(len(self.Cs) > 0 and min(self.Cs) > 0, f"'lbfgs.Cs' must be a non-empty list of positive numbers, "
                                                     f"got {self.Cs}")
        check(self.refine >= 0, f"'lbfgs.refine' must be >= 0, got {self.refine}")
        check(self.patience is None or self.patience >= 1,
              f"'lbfgs.patience' must be >= 1 or null, got {self.patience}")
        check(0 < self.val_fraction < 1, f"'lbfgs.val_fraction' must be in (0, 1), got {self.val_fraction}")
        check(self.max_iter >= 1, f"'lbfgs.max_iter' must be >= 1, got {self.max_iter}")
        check(self.tol > 0, f"'lbfgs.tol' must be positive, got {self.tol}")


@dataclass
class LinearProbeConfig:
    """A linear probe of frozen features (finetune/linear_probe.py), no augmentation, the features computed once.
    protocol "mae": the MAE paper's, BatchNorm (no affine) + Linear trained with LARS (`optim`, `train`).
    protocol "lbfgs": the CLIP paper's, L-BFGS logistic regression with a swept L2 penalty (`lbfgs`).
    `train_features` / `val_features`: folders written by the `features` task, read instead of extracting."""
    task: Literal["linear_probe"] = "linear_probe"
    output_dir: str = "runs/linprobe_demo"
    protocol: Literal["mae", "lbfgs"] = "mae"
    data: DataConfig = field(default_factory=DataConfig)
    # the encoder's pooled features: a ViT's class token after the final norm, a Swin's average (its defaults);
    # encoder.source=pixels, or no checkpoint, give the raw-pixel and random-init baselines
    encoder: EncoderConfig = field(default_factory=lambda: EncoderConfig(global_pool=None, drop_path=0.0))
    feature: FeatureConfig = field(default_factory=lambda: FeatureConfig())  # which of the encoder's features
    num_classes: Optional[int] = None  # default: read from the training shards' stats.json (or feature files)
    # protocol mae
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        name="lars", base_lr=0.1, weight_decay=0.0, momentum=0.9, warmup_epochs=10))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=90, batch_size=256, log_every=50, save_every=10**9))
    # protocol lbfgs
    lbfgs: LBFGSProbeConfig = field(default_factory=LBFGSProbeConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    feature_batch_size: int = 256  # batch size of the (no-grad) feature extraction
    train_features: Optional[str] = None  # a `features` export folder (e.g. runs/features_demo/train)
    val_features: Optional[str] = None

    def __post_init__(self):
        check(self.data.val is not None or self.val_features is not None,
              "'data.val' (or 'val_features') must name the evaluation data of a linear probe")
        check(self.num_classes is None or self.num_classes >= 2, f"'num_classes' must be >= 2, got {self.num_classes}")
        check(self.feature_batch_size >= 1, f"'feature_batch_size' must be >= 1, got {self.feature_batch_size}")


@dataclass
class ZeroShotModelConfig:
    # our CLIP run / checkpoint directory / model.safetensors, or an open_clip export folder (open_clip_config.json
    # + weights); with `open_clip_config` set, any local weights file for that open_clip model config
    checkpoint: str = "runs/clip_demo"
    open_clip_config: Optional[str] = None  # an open_clip config name or JSON file, for weights of other origins


@dataclass
class ZeroShotSetConfig:
    """One labelled evaluation set of a zero-shot run (an entry of `sets`)."""
    name: str  # its row in metrics.json and its confusion_matrix_<name>.png
    shards: str  # labelled shards, or "embedded" (the bundled validation split)
    classes: str = "stats"  # as the top-level `classes`
    templates: Optional[str] = None  # as the top-level `templates`; null: the top-level templates

    def __post_init__(self):
        check(re.fullmatch(r"[\w.-]+", self.name) is not None,
              f"'sets' name {self.name!r} must be letters, digits, '_', '.' or '-' (it names a file)")


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
    # several labelled sets in one run, each with its own classifier (data.val is then not read); empty: data.val
    # with the classes and templates above
    sets: list[ZeroShotSetConfig] = field(default_factory=list)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(batch_size=256))  # batch size, precision
    logging: LoggingConfig = field(default_factory=lambda: LoggingConfig(wandb="disabled"))

    def __post_init__(self):
        check(self.data.val is not None or bool(self.sets),
              "'data.val' must name the labelled evaluation shards of a zero-shot run")
        names = [s.name for s in self.sets]
        repeated = sorted({n for n in names if names.count(n) > 1})
        check(not repeated, f"'sets' names must be unique, got {', '.join(repeated)} more than once")


@dataclass
class RetrievalConfig:
    """Image->text and text->image recall@k of a CLIP model over the pairs of image-text shards (`data.val`), every
    pair read being a candidate; see finetune/retrieval.py."""
    task: Literal["retrieval"] = "retrieval"
    output_dir: str = "runs/retrieval_demo"
    data: DataConfig = field(default_factory=lambda: DataConfig(val=None, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD))
    model: ZeroShotModelConfig = field(default_factory=ZeroShotModelConfig)
    # the first pairs only (null: all); they are also the whole candidate pool, so recall rises as it shrinks
    max_samples: Optional[int] = None
    train: TrainConfig = field(default_factory=lambda: TrainConfig(batch_size=256))  # batch size, precision
    logging: LoggingConfig = field(default_factory=lambda: LoggingConfig(wandb="disabled"))

    def __post_init__(self):
        check(self.data.val is not None and self.data.val != "embedded",
              "'data.val' must name image-text shards (python -m data captions|pairs); the embedded validation "
              "split is labelled")
        check(self.max_samples is None or self.max_samples >= 1, f"'max_samples' must be >= 1, got {self.max_samples}")


# --------------------------------------------------------------------------------------------------------------
# Full finetuning and DeiT distillation (finetune/classify.py)
# --------------------------------------------------------------------------------------------------------------

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
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
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


# --------------------------------------------------------------------------------------------------------------
# DETR detection (finetune/detection.py, finetune/detr.py)
# --------------------------------------------------------------------------------------------------------------

@dataclass
class DetrModelConfig:
    """DETR's transformer and heads (the paper's defaults)."""
    hidden_dim: int = 256
    num_heads: int = 8
    encoder_layers: int = 6
    decoder_layers: int = 6
    ffn_dim: int = 2048
    dropout: float = 0.1
    num_queries: int = 100
    aux_loss: bool = True  # the loss on every decoder layer's outputs, not only the last

    def __post_init__(self):
        check(self.hidden_dim % 2 == 0 and self.hidden_dim % self.num_heads == 0,
              f"'model.hidden_dim' must be even and a multiple of model.num_heads, got {self.hidden_dim} / {self.num_heads}")
        check(self.encoder_layers >= 0, f"'model.encoder_layers' must be >= 0, got {self.encoder_layers}")
        check(self.decoder_layers >= 1, f"'model.decoder_layers' must be >= 1, got {self.decoder_layers}")
        check(self.num_queries >= 1, f"'model.num_queries' must be >= 1, got {self.num_queries}")
        check(0 <= self.dropout < 1, f"'model.dropout' must be in [0, 1), got {self.dropout}")


@dataclass
class DetrLossConfig:
    """Matching costs and loss weights (DETR: class 1, L1 5, GIoU 2 for both; no-object class weight 0.1)."""
    class_cost: float = 1.0
    bbox_cost: float = 5.0
    giou_cost: float = 2.0
    ce_weight: float = 1.0
    bbox_weight: float = 5.0
    giou_weight: float = 2.0
    no_object_weight: float = 0.1

    def __post_init__(self):
        for key in ("class_cost", "bbox_cost", "giou_cost", "ce_weight", "bbox_weight", "giou_weight", "no_object_weight"):
            check(getattr(self, key) >= 0, f"'loss.{key}' must be >= 0, got {getattr(self, key)}")


@dataclass
class DetrAugmentConfig:
    """DETR's augmentation (data.transforms.detection_train_transform): flip, then a multi-scale resize (shorter side
    from `scales`, longer side at most `max_size`), or a resize to one of `crop_scales` + a random crop of
    `crop_size` (min, max) pixels a side + the multi-scale resize. Evaluation: shorter side `eval_size`."""
    scales: list[int] = field(default_factory=lambda: list(range(480, 801, 32)))
    max_size: int = 1333
    crop_scales: list[int] = field(default_factory=lambda: [400, 500, 600])
    crop_size: tuple[int, int] = (384, 600)
    eval_size: int = 800
    eval_max_size: int = 1333

    def __post_init__(self):
        check(len(self.scales) > 0 and min(self.scales) > 0, f"'augment.scales' must be positive sizes, got {self.scales}")
        check(len(self.crop_scales) > 0 and min(self.crop_scales) > 0,
              f"'augment.crop_scales' must be positive sizes, got {self.crop_scales}")
        check(0 < self.crop_size[0] <= self.crop_size[1], f"'augment.crop_size' must be 0 < min <= max, got {self.crop_size}")
        check(0 < self.eval_size < self.eval_max_size,  # torchvision's Resize refuses max_size <= size
              f"'augment.eval_size' must be positive and below augment.eval_max_size ({self.eval_max_size}), got "
              f"{self.eval_size}")
        check(max(self.scales) <= self.max_size, f"'augment.scales' must not exceed augment.max_size ({self.max_size})")


@dataclass
class DetrConfig:
    """DETR on a pretrained ViT / Swin, trained on detection shards (`python -m data coco` or
    data.write_detection_shards) and evaluated with pycocotools' COCOeval on `data.val` (a shard directory). The
    data section's image_size / crop_scale / eval_crop_fraction are not used: `augment` sets the sizes.

    The backbone is the `encoder` section, as for every head: a ViT gives its last-layer patch tokens (stride =
    patch size), a Swin its last stage (stride 32); both take any input size. `encoder.image_size` is the size the
    trunk is built at (its position embeddings' grid, e.g. its pretraining size); a ViT interpolates them to each
    input's grid."""
    task: Literal["detr"] = "detr"
    output_dir: str = "runs/detr_demo"
    data: DataConfig = field(default_factory=lambda: DataConfig(val=None))  # data.train and data.val: required
    encoder: EncoderConfig = field(default_factory=lambda: EncoderConfig(image_size=224, global_pool=None,
                                                                         drop_path=0.0))
    model: DetrModelConfig = field(default_factory=DetrModelConfig)
    loss: DetrLossConfig = field(default_factory=DetrLossConfig)
    augment: DetrAugmentConfig = field(default_factory=DetrAugmentConfig)
    num_classes: Optional[int] = None  # class ids 0..num_classes-1; default: the largest category id + 1 (COCO: 91)
    # DETR: AdamW, lr 1e-4 (absolute, not scaled by the batch), weight decay 1e-4 on every weight, grad clip 0.1
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        lr=1e-4, weight_decay=1e-4, betas=(0.9, 0.999), warmup_epochs=0.0, clip_grad=0.1))
    backbone_lr: float = 1e-5  # the trunk's (encoder's) lr; 0 freezes it
    lr_drop: int = 200  # epochs: every lr is multiplied by 0.1 every lr_drop epochs (DETR's StepLR)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=300, batch_size=4, log_every=50))
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval_every: int = 1  # epochs between COCO evaluations (the last epoch is always evaluated)
    eval_batch_size: int = 8
    num_pictures: int = 8  # validation images drawn with predicted and true boxes at the end (boxes.png); 0: none
    picture_threshold: float = 0.5  # predictions drawn: score at least this

    def __post_init__(self):
        check(self.data.train != "embedded", "'data.train' must name detection shards (python -m data coco); the "
                                             "embedded data set has no boxes (benchmarks/detr_fmnist.py makes a "
                                             "detection set from it)")
        check(self.data.val is not None and self.data.val != "embedded",
              "'data.val' must name a detection shard directory (with its stats.json) for COCO evaluation")
        check(self.encoder.source != "pixels", "'encoder.source' pixels has no feature map for DETR")
        check(self.optim.lr is not None, "'optim.lr' must be set: DETR's learning rates are absolute")
        check(self.backbone_lr >= 0, f"'backbone_lr' must be >= 0 (0 freezes the backbone), got {self.backbone_lr}")
        check(self.lr_drop >= 1, f"'lr_drop' must be >= 1 epoch, got {self.lr_drop}")
        check(self.num_classes is None or self.num_classes >= 1, f"'num_classes' must be >= 1, got {self.num_classes}")
        check(self.eval_every >= 1, f"'eval_every' must be >= 1, got {self.eval_every}")
        check(self.eval_batch_size >= 1, f"'eval_batch_size' must be >= 1, got {self.eval_batch_size}")
        check(self.num_pictures >= 0, f"'num_pictures' must be >= 0, got {self.num_pictures}")
        check(0 <= self.picture_threshold <= 1, f"'picture_threshold' must be in [0, 1], got {self.picture_threshold}")


# --------------------------------------------------------------------------------------------------------------
# Frozen features: which ones (finetune/features.py), k-NN (finetune/knn.py), export (finetune/feature_export.py)
# --------------------------------------------------------------------------------------------------------------

@dataclass
class FeatureConfig:
    """Which frozen features of an encoder (the `feature` section; table in finetune/features.py).
    pool: "cls" the class token after the final norm (a model without one, e.g. a Swin: its average-pooled last
    stage); "avg" the average patch token after the final norm; "cls+avg" both, concatenated (ViTs); null: the
    encoder's own pooled output, as the linear probe has always used (a ViT's class token with
    encoder.global_pool=null). blocks N > 1: DINOv2's linear-eval feature, the class tokens of the last N blocks,
    each after the final norm (pool cls), plus the last block's average patch token (pool cls+avg); ViTs only."""
    pool: Optional[Literal["cls", "avg", "cls+avg"]] = None
    blocks: int = 1

    def __post_init__(self):
        check(self.blocks >= 1, f"'feature.blocks' must be >= 1, got {self.blocks}")
        check(self.blocks == 1 or self.pool in ("cls", "cls+avg"),
              f"'feature.blocks' {self.blocks} concatenates the class tokens of the last blocks: it needs "
              f"feature.pool=cls or cls+avg, got {self.pool}")


@dataclass
class KNNConfig:
    """DINO's weighted k-NN classifier on frozen features (finetune/knn.py): the L2-normalised features of
    `data.train` are the bank, each image of `data.val` is classified by its k nearest neighbours (cosine), each
    voting for its class with weight exp(similarity / temperature). `train_features` / `val_features`: folders
    written by the `features` task, read instead of extracting."""
    task: Literal["knn"] = "knn"
    output_dir: str = "runs/knn_demo"
    data: DataConfig = field(default_factory=DataConfig)  # labelled shards: train the bank, val the classified
    encoder: EncoderConfig = field(default_factory=lambda: EncoderConfig(global_pool=None, drop_path=0.0))
    feature: FeatureConfig = field(default_factory=FeatureConfig)
    num_classes: Optional[int] = None  # default: the training shards' (or feature files') class list
    k: list[int] = field(default_factory=lambda: [10, 20, 100, 200])
    temperature: float = 0.07
    chunk_size: int = 256  # evaluation features compared with the bank at once: similarities [chunk_size, N_train]
    train_features: Optional[str] = None  # a `features` export folder (e.g. runs/features_demo/train)
    val_features: Optional[str] = None
    train: TrainConfig = field(default_factory=lambda: TrainConfig(batch_size=256))  # extraction batch, precision
    logging: LoggingConfig = field(default_factory=lambda: LoggingConfig(wandb="disabled"))

    def __post_init__(self):
        check(len(self.k) > 0 and min(self.k) >= 1, f"'k' must be a non-empty list of positive integers, got {self.k}")
        check(self.temperature > 0, f"'temperature' must be positive, got {self.temperature}")
        check(self.chunk_size >= 1, f"'chunk_size' must be >= 1, got {self.chunk_size}")
        check(self.num_classes is None or self.num_classes >= 2, f"'num_classes' must be >= 2, got {self.num_classes}")
        check(self.data.val is not None or self.val_features is not None,
              "'data.val' (or 'val_features') must name the labelled images a k-NN run classifies")


@dataclass
class FeatureExportConfig:
    """Write the frozen features of any encoder (or the raw pixels) for shards to safetensors files
    (finetune/feature_export.py): `data.train` to OUTPUT_DIR/train, `data.val` to OUTPUT_DIR/val (`splits`)."""
    task: Literal["features"] = "features"
    output_dir: str = "runs/features_demo"
    data: DataConfig = field(default_factory=DataConfig)
    splits: list[Literal["train", "val"]] = field(default_factory=lambda: ["train", "val"])
    # "labelled": labels stored; "image-text": captions stored with the keys; "images": any shards, images only
    kind: Literal["labelled", "image-text", "images"] = "labelled"
    encoder: EncoderConfig = field(default_factory=lambda: EncoderConfig(global_pool=None, drop_path=0.0))
    feature: FeatureConfig = field(default_factory=FeatureConfig)
    dtype: Literal["float32", "float16"] = "float32"  # of the stored features
    chunk_size: int = 8192  # rows per file
    train: TrainConfig = field(default_factory=lambda: TrainConfig(batch_size=256))  # extraction batch, precision
    logging: LoggingConfig = field(default_factory=lambda: LoggingConfig(wandb="disabled"))

    def __post_init__(self):
        check(len(self.splits) > 0 and len(set(self.splits)) == len(self.splits),
              f"'splits' must name train and/or val once each, got {self.splits}")
        check("val" not in self.splits or self.data.val is not None,
              "'data.val' must name shards when splits includes val")
        check(self.chunk_size >= 1, f"'chunk_size' must be >= 1, got {self.chunk_size}")
