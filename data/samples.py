"""What a ShardStream makes of one raw shard sample, and how it batches them: one small class per kind of data.

A kind has two methods:

    prepare(raw, transform) -> item dict      decode + transform one sample; raises SampleSkipped(reason, ...)
                                              for a sample to drop and count (missing_field, undecodable_image...)
    collate(items) -> batch dict              stack a list of items into a batch

    LabelledSamples()          {"image": [B, 3, H, W], "label": LongTensor[B], "key": list[str]}
    ImageTextSamples(tokenizer) {"image": [B, 3, H, W], "text": LongTensor[B, context], "caption": list[str], "key"}
    DetectionSamples()         {"image": [B, 3, Hmax, Wmax] zero-padded, "mask": BoolTensor[B, Hmax, Wmax] (True on
                                padding), "target": list of B dicts, "key"}, see DetectionSamples

The stream seeds torch's RNG before every `prepare`, so random transforms are reproducible per sample.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from typing import Protocol

import numpy as np
import torch
from PIL import Image
from torch.utils.data import default_collate
from torchvision import tv_tensors
from torchvision.transforms import v2

from .images import SampleSkipped, eight_bit
from .sources import IMAGE_EXTENSIONS

JPEG_MAGIC = b"\xff\xd8"

try:  # torchvision 0.29 deprecates its image decoders (for TorchCodec); where they are gone, PIL decodes
    from torchvision.io import ImageReadMode, decode_image
except ImportError:  # pragma: no cover - depends on the torchvision release
    decode_image = None


class SampleKind(Protocol):
    name: str

    def prepare(self, raw: dict, transform: Callable) -> dict: ...

    def collate(self, items: list[dict]) -> dict: ...


def _field(raw: dict, name: str) -> bytes:
    if name not in raw:
        raise SampleSkipped("missing_field", f"no {name} field")
    return raw[name]


def _image_bytes(raw: dict) -> bytes:
    name = next((key for key in raw if key.lower() in IMAGE_EXTENSIONS), None)
    if name is None:
        raise SampleSkipped("missing_field", "no image field")
    return raw[name]


def open_image(data: bytes, decode_size: int | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
    """Encoded bytes -> (RGB uint8 tensor [3, H, W], stored (width, height)).

    JPEG, PNG, GIF and WebP decode through torchvision.io (libjpeg-turbo, libpng; about 1.5x faster than PIL for
    JPEGs) straight into a tensor, which the transforms then crop and resize with torch's vectorised uint8
    kernels. Other formats (BMP, TIFF, PPM...), and every format once torchvision drops its deprecated decoders,
    go through PIL.

    decode_size: for JPEGs, let the decoder shrink by a power of two (PIL draft mode) while both sides stay at
    least decode_size pixels: much faster for large photos that are cropped to a small size anyway.

    16-bit images (PNG, TIFF, PGM) become 8-bit by keeping the high byte (value >> 8), on both decoding paths.
    """
    if not data:
        raise SampleSkipped("undecodable_image", "empty image field")
    if decode_size is not None and data[:2] == JPEG_MAGIC:
        draft = _open_draft(data, decode_size)
        if draft is not None:
            return draft
    if decode_image is not None:
        try:
            image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
            if image.dtype == torch.uint16:  # a 16-bit PNG: keep the high byte, as data.images.eight_bit does
                image = (image.to(torch.int32) >> 8).to(torch.uint8)
            if image.dtype == torch.uint8:
                return image, (image.shape[-1], image.shape[-2])
        except RuntimeError:
            pass  # a format torchvision does not decode, or bad data: PIL decides, and names the problem
    try:
        with Image.open(io.BytesIO(data)) as image:
            return _pil_to_tensor(eight_bit(image).convert("RGB")), image.size
    except Exception as error:  # PIL raises many types for bad data
        raise SampleSkipped("undecodable_image", f"{type(error).__name__}: {error}") from None


def _open_draft(data: bytes, decode_size: int) -> tuple[torch.Tensor, tuple[int, int]] | None:
    """A JPEG decoded at 1/2, 1/4 or 1/8 scale (both sides >= decode_size); None when no reduction applies."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if min(width, height) < 2 * decode_size:
                return None
            image.draft("RGB", (decode_size, decode_size))
            return _pil_to_tensor(image.convert("RGB")), (width, height)
    except Exception as error:
        raise SampleSkipped("undecodable_image", f"{type(error).__name__}: {error}") from None


def _pil_to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)


def stack_images(images: list[torch.Tensor]) -> torch.Tensor:
    """torch.stack, straight into shared memory inside a DataLoader worker (as torch's default_collate does): the
    batch then crosses to the training process without another copy of its pixels."""
    return default_collate(images)


class ImageSamples:
    """The image alone, whatever else a sample holds: unlabelled shards, or any kind read for its images only
    (e.g. to export features). {"image", "key"}"""

    name = "images"

    def __init__(self, decode_size: int | None = None):
        self.decode_size = decode_size

    def prepare(self, raw: dict, transform: Callable) -> dict:
        image, _ = open_image(_image_bytes(raw), self.decode_size)
        return {"image": transform(image), "key": raw["__key__"]}

    def collate(self, items: list[dict]) -> dict:
        return {"image": stack_images([item["image"] for item in items]), "key": [item["key"] for item in items]}


class LabelledSamples:
    """Image + integer class ("cls" field)."""

    name = "labelled"

    def __init__(self, decode_size: int | None = None):
        self.decode_size = decode_size

    def prepare(self, raw: dict, transform: Callable) -> dict:
        image_bytes, label_bytes = _image_bytes(raw), _field(raw, "cls")
        try:
            label = int(label_bytes.decode().strip())
        except (UnicodeDecodeError, ValueError):
            raise SampleSkipped("bad_label", f"cls is {label_bytes[:20]!r}") from None
        image, _ = open_image(image_bytes, self.decode_size)
        return {"image": transform(image), "label": label, "key": raw["__key__"]}

    def collate(self, items: list[dict]) -> dict:
        return {
            "image": stack_images([item["image"] for item in items]),
            "label": torch.tensor([item["label"] for item in items], dtype=torch.long),
            "key": [item["key"] for item in items],
        }


class ImageTextSamples:
    """Image + caption ("txt" field); captions become tokens with `tokenizer(list[str]) -> LongTensor[B, context]`
    (e.g. `open_clip.get_tokenizer("ViT-B-32")`), once per batch. Without a tokenizer only "caption" is given."""

    name = "image-text"

    def __init__(self, tokenizer: Callable | None = None, decode_size: int | None = None):
        self.tokenizer, self.decode_size = tokenizer, decode_size

    def prepare(self, raw: dict, transform: Callable) -> dict:
        image_bytes, text_bytes = _image_bytes(raw), _field(raw, "txt")
        try:
            caption = text_bytes.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise SampleSkipped("bad_caption", "txt is not UTF-8") from None
        if not caption:
            raise SampleSkipped("bad_caption", "empty caption")
        image, _ = open_image(image_bytes, self.decode_size)
        return {"image": transform(image), "caption": caption, "key": raw["__key__"]}

    def collate(self, items: list[dict]) -> dict:
        captions = [item["caption"] for item in items]
        batch = {"image": stack_images([item["image"] for item in items]), "caption": captions,
                 "key": [item["key"] for item in items]}
        if self.tokenizer is not None:
            batch["text"] = torch.as_tensor(self.tokenizer(captions), dtype=torch.long)
        return batch


class DetectionSamples:
    """Image + COCO-style target ("json" field, as `write_detection_shards` stores it), DETR's batch format.

    The transform takes and returns (image, {"boxes": tv_tensors.BoundingBoxes, "labels": LongTensor[n]}), see
    `detection_train_transform`. Each target in the batch is

        {"boxes": FloatTensor[n, 4] (cx, cy, w, h) as fractions of the transformed, unpadded image,
         "labels": LongTensor[n] (the category ids), "image_id": int, "orig_size": LongTensor[2] (h, w stored),
         "size": LongTensor[2] (h, w after the transform)}

    Crowd annotations are left out, as DETR does.
    """

    name = "detection"

    def __init__(self, decode_size: int | None = None):
        self.decode_size = decode_size

    def prepare(self, raw: dict, transform: Callable) -> dict:
        image_bytes, target_bytes = _image_bytes(raw), _field(raw, "json")
        try:
            stored = json.loads(target_bytes)
            boxes = torch.tensor(stored["boxes"], dtype=torch.float32).reshape(-1, 4)
            labels = torch.tensor(stored["category_ids"], dtype=torch.long)
            crowd = torch.tensor(stored.get("iscrowd", [0] * len(labels)), dtype=torch.bool)
            image_id = int(stored["image_id"])
            if not len(boxes) == len(labels) == len(crowd):
                raise ValueError(f"{len(boxes)} boxes, {len(labels)} category_ids, {len(crowd)} iscrowd")
        except (ValueError, KeyError, TypeError, RuntimeError) as error:
            raise SampleSkipped("bad_target", f"{type(error).__name__}: {error}") from None
        image, (stored_width, stored_height) = open_image(image_bytes, self.decode_size)
        height, width = image.shape[-2:]
        boxes = boxes[~crowd] * torch.tensor([width / stored_width, height / stored_height] * 2)  # draft-mode scale
        target = {"boxes": tv_tensors.BoundingBoxes(boxes, format="XYWH", canvas_size=(height, width)),
                  "labels": labels[~crowd]}
        image, target = transform(image, target)
        new_height, new_width = image.shape[-2:]
        centred = v2.functional.convert_bounding_box_format(target["boxes"], new_format="CXCYWH")
        return {
            "image": image.as_subclass(torch.Tensor),
            "target": {
                "boxes": centred.as_subclass(torch.Tensor) / torch.tensor([new_width, new_height] * 2),
                "labels": target["labels"],
                "image_id": image_id,
                "orig_size": torch.tensor([stored_height, stored_width]),
                "size": torch.tensor([new_height, new_width]),
            },
            "key": raw["__key__"],
        }

    def collate(self, items: list[dict]) -> dict:
        images = [item["image"] for item in items]
        height, width = max(i.shape[-2] for i in images), max(i.shape[-1] for i in images)
        padded = images[0].new_zeros(len(images), images[0].shape[0], height, width)
        mask = torch.ones(len(images), height, width, dtype=torch.bool)
        for index, image in enumerate(images):
            padded[index, :, : image.shape[-2], : image.shape[-1]] = image
            mask[index, : image.shape[-2], : image.shape[-1]] = False
        return {"image": padded, "mask": mask, "target": [item["target"] for item in items],
                "key": [item["key"] for item in items]}


KINDS = {"labelled": LabelledSamples, "image-text": ImageTextSamples, "detection": DetectionSamples,
         "images": ImageSamples}


def make_kind(kind: str | SampleKind, tokenizer: Callable | None = None, decode_size: int | None = None) -> SampleKind:
    """A kind object from its name ("labelled", "image-text", "detection", "images"), or the given object unchanged."""
    if not isinstance(kind, str):
        if tokenizer is not None or decode_size is not None:
            raise ValueError("pass tokenizer and decode_size to the kind object itself")
        return kind
    if kind not in KINDS:
        raise ValueError(f"unknown sample kind {kind!r}; choose one of {', '.join(KINDS)}")
    if tokenizer is not None and kind != "image-text":
        raise ValueError(f"a tokenizer is for image-text samples, not {kind!r} ones")
    if kind == "image-text":
        return ImageTextSamples(tokenizer, decode_size)
    return KINDS[kind](decode_size)
