"""Labelled images as WebDataset shards: write them from IDX files, folders or manifests, stream them back.

Writing:   sources (read_idx, read_image_folder, read_manifest) -> write_labelled_shards / write_split
Reading:   expand_shards, count_samples -> ShardStream (+ mae_train_transform / eval_transform) -> make_loader
Offline:   ensure_embedded_shards (3000 Fashion-MNIST images shipped with the package)
"""

from .embedded import EMBEDDED_DIR, FASHION_MNIST_CLASSES, ensure_embedded_shards, read_embedded
from .errors import DataError
from .shards import count_samples, expand_shards
from .sources import IMAGE_EXTENSIONS, LabelledImage, LabelledSource, read_idx, read_image_folder, read_manifest
from .stream import ShardStream, make_loader
from .transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform, mae_train_transform
from .writer import STATS_FILE, ShardWriter, write_labelled_shards, write_split

__all__ = [
    "DataError",
    "EMBEDDED_DIR",
    "FASHION_MNIST_CLASSES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "LabelledImage",
    "LabelledSource",
    "STATS_FILE",
    "ShardStream",
    "ShardWriter",
    "count_samples",
    "ensure_embedded_shards",
    "eval_transform",
    "expand_shards",
    "mae_train_transform",
    "make_loader",
    "read_embedded",
    "read_idx",
    "read_image_folder",
    "read_manifest",
    "write_labelled_shards",
    "write_split",
]
