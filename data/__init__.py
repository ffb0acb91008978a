"""Images as WebDataset shards: write them (labelled, image-text pairs, COCO detection), stream them back.

Writing:   sources (read_idx, read_image_folder, read_manifest) -> write_labelled_shards
           image-text pairs (read_pair_manifest, read_pair_folder) -> write_pair_shards; decode_pair
           COCO detection (read_coco) -> write_detection_shards; decode_detection, coco_ground_truth
           every writer takes ShardOptions (sizes, strict, workers, ImageOptions: keep bytes or shrink + JPEG) and
           val_fraction/seed (split_val_indices: which items that puts in val/), writes sizes.json/shards.txt/
           stats.json, returns a WrittenShards per directory
Reading:   expand_shards / expand_sources ("a::b" mixes sources), count_samples -> ShardStream (kind "labelled",
           "image-text", "detection" or "images"; evaluation, finite epochs or resampled) -> make_loader; SkipGuard
           read_shard_stats, read_class_names (read_matching_class_names: train vs val), read_categories:
           the stats.json beside the shards
           transforms per objective: mae_train_transform, eval_transform, clip_*_transform, detection_*_transform
Offline:   ensure_embedded_shards (3000 Fashion-MNIST images shipped with the package), ensure_embedded_pair_shards
           (the same with captions written from the labels, data.captions)
"""

from .detection import CocoImage, CocoSource, coco_ground_truth, decode_detection, read_coco, write_detection_shards
from .captions import caption_for, captioned_pairs
from .embedded import (
    EMBEDDED_DIR,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    ensure_embedded_pair_shards,
    ensure_embedded_shards,
    read_embedded,
)
from .errors import DataError
from .guard import SkipGuard
from .images import ImageOptions
from .pairs import ImageTextPair, decode_pair, read_pair_folder, read_pair_manifest, write_pair_shards
from .samples import DetectionSamples, ImageTextSamples, LabelledSamples
from .shards import (
    count_samples,
    expand_shards,
    expand_sources,
    read_categories,
    read_class_names,
    read_matching_class_names,
    read_shard_stats,
)
from .sources import IMAGE_EXTENSIONS, LabelledImage, LabelledSource, read_idx, read_image_folder, read_manifest
from .stream import ShardStream, make_loader
from .transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    clip_eval_transform,
    clip_train_transform,
    detection_eval_transform,
    detection_train_transform,
    eval_transform,
    mae_train_transform,
)
from .writer import (
    SHARD_LIST_FILE,
    SIZES_FILE,
    STATS_FILE,
    ShardOptions,
    ShardWriter,
    WrittenShards,
    split_val_indices,
    write_labelled_shards,
)

__all__ = [
    "CocoImage",
    "CocoSource",
    "DataError",
    "DetectionSamples",
    "EMBEDDED_DIR",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "ImageOptions",
    "ImageTextPair",
    "ImageTextSamples",
    "LabelledImage",
    "LabelledSamples",
    "LabelledSource",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "SHARD_LIST_FILE",
    "SIZES_FILE",
    "STATS_FILE",
    "ShardOptions",
    "ShardStream",
    "ShardWriter",
    "SkipGuard",
    "WrittenShards",
    "clip_eval_transform",
    "clip_train_transform",
    "coco_ground_truth",
    "count_samples",
    "decode_detection",
    "decode_pair",
    "detection_eval_transform",
    "detection_train_transform",
    "caption_for",
    "captioned_pairs",
    "ensure_embedded_pair_shards",
    "ensure_embedded_shards",
    "eval_transform",
    "expand_shards",
    "expand_sources",
    "mae_train_transform",
    "make_loader",
    "read_coco",
    "read_embedded",
    "read_idx",
    "read_image_folder",
    "read_categories",
    "read_class_names",
    "read_matching_class_names",
    "read_manifest",
    "read_pair_folder",
    "read_pair_manifest",
    "split_val_indices",
    "read_shard_stats",
    "write_detection_shards",
    "write_labelled_shards",
    "write_pair_shards",
]
