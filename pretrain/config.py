"""Configs as data: YAML files and `key=value` overrides loaded into typed dataclasses, validated once.

Every entry point (`python -m pretrain`, `python -m finetune`) goes through `load_config`. A typo, a wrong type or a
missing file raises `ConfigError` with one line that names the key (and the closest valid key) or the file; the
entry points print that line and exit with status 2.
"""
from __future__ import annotations

import dataclasses
import difflib
import logging
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, TypeVar, Union

import yaml

from data.embedded import FASHION_MNIST_MEAN, FASHION_MNIST_STD
from data.transforms import IMAGENET_MEAN, IMAGENET_STD


class ConfigError(ValueError):
    """A config file or override that cannot be turned into a valid config."""


T = TypeVar("T")
log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------------
# Loading and validation
# --------------------------------------------------------------------------------------------------------------

def load_config(schema: type[T], path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> T:
    """Build `schema` from the YAML file at `path` (optional) updated by dotted `key=value` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = read_yaml(path)
    for item in overrides:
        set_dotted(raw, *parse_override(item))
    return with_encoder_normalisation(build(schema, raw), raw)


def encoder_checkpoint(config: Any) -> Optional[str]:
    """The checkpoint of ours a run evaluates or finetunes (`encoder.checkpoint`, zero-shot's `model.checkpoint`)."""
    encoder, model = getattr(config, "encoder", None), getattr(config, "model", None)
    if isinstance(encoder, EncoderConfig) and encoder.source in ("mae", "clip"):
        return encoder.checkpoint
    if model is not None and hasattr(model, "checkpoint") and getattr(model, "open_clip_config", None) is None:
        return model.checkpoint
    return None


def with_encoder_normalisation(config: T, raw: dict[str, Any]) -> T:
    """A run over an encoder of ours normalises its images as the encoder was trained (the statistics its weights
    file records), unless the config sets `data.mean` / `data.std` itself; then a difference is warned about."""
    checkpoint = encoder_checkpoint(config)
    if checkpoint is None or not isinstance(getattr(config, "data", None), DataConfig):
        return config
    from .checkpoint import recorded_normalisation

    recorded = recorded_normalisation(checkpoint)
    if recorded is None:
        return config
    data, given = config.data, raw.get("data") or {}
    if "mean" in given or "std" in given:
        if any(abs(a - b) > 1e-3 for a, b in zip((*data.mean, *data.std), (*recorded[0], *recorded[1]))):
            log.warning("data.mean %s / data.std %s differ from the statistics %s was trained with (%s / %s): its "
                        "inputs will not look as they did in training", list(data.mean), list(data.std), checkpoint,
                        list(recorded[0]), list(recorded[1]))
        return config
    return dataclasses.replace(config, data=dataclasses.replace(data, mean=recorded[0], std=recorded[1]))


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"cannot parse YAML in {path}: {err}".replace("\n", " ")) from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(loaded).__name__}")
    return loaded


def parse_override(item: str) -> tuple[str, Any]:
    """`optim.lr=1e-3` -> ("optim.lr", 0.001). Values are read as YAML, so lists and null work too."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{item}' is not of the form key=value")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    return key.strip(), parsed


def set_dotted(tree: dict[str, Any], dotted_key: str, value: Any) -> None:
    node = tree
    parts = dotted_key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set '{dotted_key}': '{'.'.join(parts[: i + 1])}' is not a section")
        node = child
    node[parts[-1]] = value


def build(schema: type[T], raw: Any, prefix: str = "", base: Any = None) -> T:
    """Recursively turn a mapping into the dataclass `schema`, checking every key and type. Keys the mapping leaves
    out take the class defaults, or those of `base` (an instance) when given."""
    where = prefix.rstrip(".") or "the config"
    if not isinstance(raw, dict):
        raise ConfigError(f"'{where}' must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(schema)
    fields = {f.name: f for f in dataclasses.fields(schema) if f.init}
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f" (valid keys: {', '.join(fields)})"
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint}")
    values = {}
    for name in fields:
        if name in raw:
            values[name] = coerce(hints[name], raw[name], f"{prefix}{name}", base=_factory_default(fields[name]))
    if base is not None:
        values = {f.name: getattr(base, f.name) for f in dataclasses.fields(base) if f.init} | values
    try:
        return schema(**values)
    except ConfigError:
        raise
    except TypeError as err:  # a required field without default
        raise ConfigError(f"'{where}': {err}") from None


def _factory_default(spec: dataclasses.Field) -> Any:
    """The default a field's default_factory builds (e.g. CLIP's DataConfig with OpenAI statistics), or None."""
    return spec.default_factory() if spec.default_factory is not dataclasses.MISSING else None


def coerce(annotation: Any, value: Any, key: str, base: Any = None) -> Any:
    """Check `value` against a type annotation, converting where the meaning is unambiguous (int -> float, '1e-3').
    `base`: for a nested config section, the instance whose values stand for keys the section leaves out."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if dataclasses.is_dataclass(annotation):
        return build(annotation, {} if value is None else value, prefix=f"{key}.", base=base)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return coerce(option, value, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"'{key}' has an invalid value {value!r}")
    if origin is Literal:
        if isinstance(value, bool):  # YAML 1.1 reads no/off/yes/on as booleans: `mixed_precision: no`
            value = next((a for a in args if isinstance(a, str) and yaml.safe_load(a) is value), value)
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(f"'{key}' must be one of {choices}, got {value!r}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"'{key}' must be a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"'{key}' must have {len(args)} items, got {len(value)}")
            return tuple(coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item_type = args[0] if args else Any
        items = [coerce(item_type, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if annotation is Any:
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"'{key}' must be true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"'{key}' must be an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e-3` as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"'{key}' must be a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"'{key}' must be a string, got {value!r}")
        return value
    if annotation is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"'{key}' must be a mapping, got {value!r}")
        return dict(value)
    raise ConfigError(f"'{key}': unsupported annotation {annotation!r}")  # a schema bug, not a user error


def to_dict(config: Any) -> dict[str, Any]:
    """A plain, YAML-friendly dict (tuples become lists)."""
    def plain(value):
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value
    return plain(dataclasses.asdict(config))


def save_config(config: Any, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def check(condition: bool, message: str) -> None:
    """Used in `__post_init__` validators: one line naming the key."""
    if not condition:
        raise ConfigError(message)


# --------------------------------------------------------------------------------------------------------------
# Sections shared by every training run (pretraining and finetuning)
# --------------------------------------------------------------------------------------------------------------

@dataclass
class DataConfig:
    train: str = "embedded"  # shards: brace pattern, directory, .txt list, comma list; or "embedded" (bundled data)
    val: Optional[str] = "embedded"  # evaluation / picture shards; "embedded" = the bundled validation split
    cache_dir: Optional[str] = None  # where "embedded" shards are written (default: OUTPUT_DIR/data)
    # finite epochs (false): every sample once per epoch, needs >= processes x workers shards. resampled (true):
    # shards drawn with replacement, needed for `weights`; an epoch is `samples_per_epoch` samples.
    resampled: bool = False
    weights: Optional[list[float]] = None  # one per "::"-separated source in `train` (resampled only)
    samples_per_epoch: Optional[int] = None  # default: the training shards' sample count (stats.json)
    max_skip_rate: float = 0.5  # stop the run when more than this share of samples read so far was unreadable
    decode_size: Optional[int] = None  # decode JPEGs at reduced size (PIL draft) no smaller than this: faster
    image_size: int = 32
    crop_scale: tuple[float, float] = (0.2, 1.0)  # RandomResizedCrop scale range for training
    eval_crop_fraction: float = 1.0  # evaluation: resize to image_size / fraction, centre-crop image_size (0.875 on ImageNet)
    num_workers: int = 2
    shuffle_buffer: int = 1000
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self):
        check(self.image_size > 0, f"'data.image_size' must be positive, got {self.image_size}")
        check(0 < self.crop_scale[0] <= self.crop_scale[1] <= 1, f"'data.crop_scale' must satisfy 0 < min <= max <= 1, got {self.crop_scale}")
        check(0 < self.eval_crop_fraction <= 1, f"'data.eval_crop_fraction' must be in (0, 1], got {self.eval_crop_fraction}")
        check(self.num_workers >= 0, f"'data.num_workers' must be >= 0, got {self.num_workers}")
        check(self.weights is None or self.resampled, "'data.weights' needs data.resampled=true")
        check(self.samples_per_epoch is None or self.samples_per_epoch > 0, f"'data.samples_per_epoch' must be positive, got {self.samples_per_epoch}")
        check(0 <= self.max_skip_rate <= 1, f"'data.max_skip_rate' must be in [0, 1], got {self.max_skip_rate}")
        check(self.shuffle_buffer >= 1, f"'data.shuffle_buffer' must be >= 1, got {self.shuffle_buffer}")
        check(len(self.mean) == 3 and len(self.std) == 3 and min(self.std) > 0,
              f"'data.mean' / 'data.std' must be 3 numbers each (R, G, B; std positive), got {list(self.mean)} / "
              f"{list(self.std)}")


@dataclass
class OptimConfig:
    name: Literal["adamw", "lars", "sgd"] = "adamw"
    base_lr: float = 1.5e-4  # lr = base_lr * global_batch / 256 (the MAE rule) unless `lr` is set
    lr: Optional[float] = None  # absolute learning rate; overrides the scaling rule
    min_lr: float = 0.0
    weight_decay: float = 0.05  # never applied to norms, biases, tokens and position embeddings
    betas: tuple[float, float] = (0.9, 0.95)
    momentum: float = 0.9  # lars / sgd
    warmup_epochs: float = 1.0
    clip_grad: Optional[float] = None  # max global grad norm

    def __post_init__(self):
        check(self.base_lr > 0, f"'optim.base_lr' must be positive, got {self.base_lr}")
        check(self.lr is None or self.lr > 0, f"'optim.lr' must be positive, got {self.lr}")
        check(self.weight_decay >= 0, f"'optim.weight_decay' must be >= 0, got {self.weight_decay}")
        check(self.warmup_epochs >= 0, f"'optim.warmup_epochs' must be >= 0, got {self.warmup_epochs}")
        check(self.clip_grad is None or self.clip_grad > 0, f"'optim.clip_grad' must be positive or null, got {self.clip_grad}")


@dataclass
class TrainConfig:
    epochs: int = 6
    batch_size: int = 128  # per device; global batch = batch_size x processes x grad_accum_steps
    grad_accum_steps: int = 1
    # auto: bf16 where the hardware has fast bf16 matmuls (recent GPUs; CPUs with AVX512-BF16/AMX), else no
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    seed: int = 0
    log_every: int = 10  # optimizer steps between log lines
    save_every: int = 500  # optimizer steps between checkpoints (one is always written at the end)
    keep_last: int = 3  # checkpoints kept on disk
    resume: Optional[str] = None  # "latest" or a checkpoint directory
    overwrite: bool = False  # a fresh run into an output_dir holding an earlier run's checkpoints/log replaces them
    stop_after_steps: Optional[int] = None  # end early (the schedule still spans all epochs): smoke runs, time limits
    # a non-finite loss or gradient stops the run (0), or up to this many such updates are skipped and counted
    # (`nonfinite_skips` in log.jsonl) before it stops
    max_nonfinite_skips: int = 0
    # torch.compile (inductor) the model for training. The first step compiles (ViT-B on 2 CPU cores: ~2 min) and
    # on CPU it gained nothing measurable (docs/benchmarks.md); measure it on a GPU with benchmarks/mae_speed.py.
    # Checkpoints and pictures use the eager module either way.
    compile: bool = False
    # the attention layers' kernel (timm's fused_attn): fused (torch's scaled_dot_product_attention), math (explicit
    # matmuls), auto (a fixed rule: math on a CPU in bf16/fp16, timm's default elsewhere), or timed: each distinct layer is
    # timed with both on the first step's inputs and keeps the faster (logged, recorded in checkpoints; it follows
    # the clock, so two runs on a busy machine can differ). pretrain/attention_kernels.py
    attention: Literal["auto", "fused", "math", "timed"] = "auto"

    def __post_init__(self):
        check(self.epochs >= 1, f"'train.epochs' must be >= 1, got {self.epochs}")
        check(self.batch_size >= 1, f"'train.batch_size' must be >= 1, got {self.batch_size}")
        check(self.grad_accum_steps >= 1, f"'train.grad_accum_steps' must be >= 1, got {self.grad_accum_steps}")
        check(self.log_every >= 1, f"'train.log_every' must be >= 1, got {self.log_every}")
        check(self.save_every >= 1, f"'train.save_every' must be >= 1, got {self.save_every}")
        check(self.keep_last >= 1, f"'train.keep_last' must be >= 1, got {self.keep_last}")
        check(self.max_nonfinite_skips >= 0, f"'train.max_nonfinite_skips' must be >= 0, got {self.max_nonfinite_skips}")


@dataclass
class LoggingConfig:
    wandb: Literal["disabled", "offline", "online"] = "offline"
    project: str = "vitpretrain"
    run_name: Optional[str] = None
    progress_bar: bool = True


@dataclass
class EncoderConfig:
    """Where an encoder comes from, for every head (linear probe, k-NN, finetuning, distillation teacher, DETR
    backbone); `pretrain.encoders.build_encoder` turns it into a timm model.

    - "mae": a checkpoint of this project (`python -m pretrain` MAE's ViT, UM-MAE's / SimMIM's Swin; a CLIP run or
      export; a finetuned classifier): a run directory, checkpoint directory or weights file, its kind read from
      the file's metadata. checkpoint null: `model_name` (pretrain.models) randomly initialised, the baseline;
      `model_kwargs` then override its constructor (e.g. depth).
    - "clip": the timm image tower of our CLIP run / checkpoint / open_clip export; with `open_clip_config`, of any
      local weights file for that open_clip model config.
    - "timm": `model_name` is a timm model, `model_kwargs` go to timm.create_model, `checkpoint` is a local weights
      file (.safetensors, or .pth/.pt/.bin/.ckpt read with torch.load(weights_only=True)); null: random init.
    - "pixels": no encoder: the normalised pixels are the features (the linear probe's baseline).
    Position embeddings are resampled to the size the encoder is built at; a head that needs one gets a new one."""
    source: Literal["mae", "clip", "timm", "pixels"] = "mae"
    checkpoint: Optional[str] = None
    model_name: str = "mae_vit_tiny_patch4"
    model_kwargs: dict = field(default_factory=dict)
    open_clip_config: Optional[str] = None
    # the input size the encoder is built at (its position-embedding grid); null: data.image_size
    image_size: Optional[int] = None
    # "avg": mean of the patch tokens + a new LayerNorm (fc_norm) in place of the encoder's final norm, as MAE
    # finetunes; "token": the class token (MAE's linear probe); null: the model's default
    global_pool: Optional[str] = "avg"
    drop_path: float = 0.1  # stochastic depth rate (linearly increasing over the blocks, timm's rule)
    head_init_std: float = 2.0e-5  # a new head: trunc_normal(std), zero bias (MAE)

    def __post_init__(self):
        check(self.image_size is None or self.image_size > 0, f"'encoder.image_size' must be positive, got {self.image_size}")
        check(0 <= self.drop_path < 1, f"'encoder.drop_path' must be in [0, 1), got {self.drop_path}")
        check(self.head_init_std > 0, f"'encoder.head_init_std' must be positive, got {self.head_init_std}")
        check(self.source != "clip" or self.checkpoint is not None,
              "'encoder.checkpoint' must name a CLIP run, checkpoint or export when encoder.source=clip")
        check(not (self.source == "mae" and self.checkpoint and self.model_kwargs),
              "'encoder.model_kwargs' must be empty with a checkpoint of ours: the checkpoint fixes the architecture")
        check(self.source != "pixels" or self.checkpoint is None,
              "'encoder.checkpoint' must be null with encoder.source=pixels (the pixels are the features)")


@dataclass
class MonitorConfig:
    """Evaluation during pretraining (the `eval` section; pretrain/monitor.py): how researchers tell a good run from
    a bad one before it ends. Every `every_epochs` epochs (or `every_steps` steps) and after the last step, measured
    on bounded sets and written to log.jsonl (keys "eval/..."), wandb, metrics.json and the curves picture.

    - MAE / UM-MAE / SimMIM: DINO's weighted k-NN (k, temperature) of at most `max_images` labelled images of
      `shards` against the features of at most `max_bank_images` of `bank`: knn_top1, knn_top5.
    - CLIP: zero-shot top-1 / top-5 on at most `max_images` of `zeroshot_shards` (labelled; none: skipped), and
      image->text / text->image retrieval R@1 among at most `max_images` pairs of `shards` (image-text; labelled
      shards there, e.g. data.val "embedded", serve zero-shot instead when zeroshot_shards is not set)."""
    every_epochs: int = 0  # 0: off (unless every_steps)
    every_steps: Optional[int] = None  # instead of every_epochs: evaluate every this many optimizer steps
    shards: Optional[str] = None  # the evaluation images; default data.val (MAE: labelled; CLIP: image-text pairs)
    max_images: int = 2000  # the first this many evaluation images (each set), split across processes
    bank: Optional[str] = None  # k-NN: labelled shards whose features are the neighbours; default data.train
    max_bank_images: int = 10000
    k: int = 20
    temperature: float = 0.07
    zeroshot_shards: Optional[str] = None  # CLIP: labelled shards for zero-shot top-1 (data.val holds pairs)
    classes: str = "stats"  # CLIP: the class names, as the zeroshot task's `classes`
    templates: str = "simple"  # CLIP: "simple" (open_clip's 7), "openai" (80), one template with "{}", or a file

    def __post_init__(self):
        check(self.every_epochs >= 0, f"'eval.every_epochs' must be >= 0 (0: off), got {self.every_epochs}")
        check(self.every_steps is None or self.every_steps >= 1,
              f"'eval.every_steps' must be >= 1 or null, got {self.every_steps}")
        check(not (self.every_epochs and self.every_steps),
              "'eval.every_epochs' and 'eval.every_steps' are alternatives: set one of them, the other to 0 / null")
        check(self.max_images >= 1, f"'eval.max_images' must be >= 1, got {self.max_images}")
        check(self.k >= 1, f"'eval.k' must be >= 1, got {self.k}")
        check(self.max_bank_images >= self.k,
              f"'eval.max_bank_images' must be >= eval.k ({self.k}), got {self.max_bank_images}")
        check(self.temperature > 0, f"'eval.temperature' must be positive, got {self.temperature}")

    @property
    def enabled(self) -> bool:
        return self.every_epochs > 0 or self.every_steps is not None


# --------------------------------------------------------------------------------------------------------------
# MAE pretraining
# --------------------------------------------------------------------------------------------------------------

@dataclass
class MAEModelConfig:
    name: str = "mae_vit_tiny_patch4"  # a registered factory, see `pretrain.models.list_models()`
    # initial weights: a masked-image checkpoint of ours (run, checkpoint or weights file; also what
    # `python -m finetune.export from-hf` writes), whose architecture replaces `name`; or an official MAE release
    # (.pth, encoder only or full) for the architecture `name`. Continues pretraining; train.resume continues a run.
    checkpoint: Optional[str] = None
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True
    grad_checkpointing: bool = False

    def __post_init__(self):
        check(0 < self.mask_ratio < 1, f"'model.mask_ratio' must be in (0, 1), got {self.mask_ratio}")


@dataclass
class MAEPretrainConfig:
    objective: Literal["mae"] = "mae"
    output_dir: str = "runs/mae_demo"
    # the demo's embedded Fashion-MNIST, normalised by its own (grey) statistics; set data.mean/std for other data
    data: DataConfig = field(default_factory=lambda: DataConfig(mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD))
    model: MAEModelConfig = field(default_factory=MAEModelConfig)
    # the CPU demo's lr; the paper's 1.5e-4 (configs/mae_vit_base_imagenet.yaml) is for 800-epoch schedules
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(base_lr=1e-3))
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    num_pictures: int = 8  # images in the reconstruction picture written at the end (0 = none)
    eval: MonitorConfig = field(default_factory=MonitorConfig)  # k-NN monitoring (off by default)

    def __post_init__(self):
        check(not self.eval.enabled or (self.eval.shards or self.data.val) is not None,
              "'eval.shards' (or 'data.val') must name the labelled images k-NN monitoring classifies "
              "(eval.every_epochs / eval.every_steps is set)")


# --------------------------------------------------------------------------------------------------------------
# CLIP pretraining
# --------------------------------------------------------------------------------------------------------------

@dataclass
class CLIPModelConfig:
    # an open_clip model config: a name (open_clip's own, e.g. "swin_base_patch4_window7_224", or this package's
    # pretrain/models/open_clip_configs/*.json) or a path to a JSON file in open_clip's format
    open_clip_config: str = "vitpretrain-tiny-32"
    image_tower_checkpoint: Optional[str] = None  # an MAE run/checkpoint initialising a timm ViT image tower
    grad_checkpointing: bool = False
    # open_clip's ClipLoss: features gathered from every process, with gradients (gather_with_grad), each process
    # scoring its own rows against all (local_loss); together the same loss as one process over the global batch
    local_loss: bool = True
    gather_with_grad: bool = True
    # FLIP: the share of the image tower's patch tokens dropped at random in training (not in evaluation), e.g. 0.5
    # (a ViT tower: open_clip's patch_dropout, timm's patch_drop_rate; overrides the model config's)
    patch_dropout: float = 0.0

    def __post_init__(self):
        check(0 <= self.patch_dropout < 1, f"'model.patch_dropout' must be in [0, 1), got {self.patch_dropout}")


@dataclass
class CLIPPretrainConfig:
    objective: Literal["clip"] = "clip"
    output_dir: str = "runs/clip_demo"
    # image-text shards ("embedded": the bundled Fashion-MNIST images with captions made from their labels, normalised
    # by their own grey statistics; OpenAI's for web-scale data, configs/clip_vit_b16_laion.yaml); open_clip's crop
    data: DataConfig = field(default_factory=lambda: DataConfig(crop_scale=(0.9, 1.0), mean=FASHION_MNIST_MEAN,
                                                                std=FASHION_MNIST_STD))
    model: CLIPModelConfig = field(default_factory=CLIPModelConfig)
    # open_clip's AdamW settings (beta2 0.98, wd 0.2, absolute lr rather than the MAE scaling rule)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, weight_decay=0.2, betas=(0.9, 0.98),
                                                                   warmup_epochs=1.0))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=10, batch_size=128))
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    # zero-shot (eval.zeroshot_shards) and retrieval (image-text pairs of eval.shards, default data.val) monitoring
    eval: MonitorConfig = field(default_factory=MonitorConfig)

    def __post_init__(self):
        check(not self.eval.enabled or (self.eval.zeroshot_shards or self.eval.shards or self.data.val) is not None,
              "'eval.zeroshot_shards' (labelled) or 'eval.shards' / 'data.val' (image-text pairs) must name what "
              "CLIP monitoring evaluates (eval.every_epochs / eval.every_steps is set)")
