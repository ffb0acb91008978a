"""Image transforms per objective (RGB uint8 tensor [3, H, W] or PIL image in, normalised float tensor out).

MAE: a random resized crop (bicubic), a horizontal flip, and nothing else; MAE relies on masking, not on heavy
augmentation. CLIP: open_clip's gentle crop and OpenAI's normalisation. Detection: DETR's flip, multi-scale
resize and random crop, applied to the image and its boxes together. All are torchvision.transforms.v2 (MAE's
and CLIP's crop call v2's functions directly, see RandomResizedCropNormalize): the shard streams hand them uint8
tensors (see `data.samples.open_image`), which v2 crops and resizes with torch's vectorised uint8 kernels
(antialiased, within one grey level of PIL's, and about 3x faster than PIL's bicubic); PIL images (an
ImageFolder, a notebook) take PIL's own path. Greyscale images are made RGB first.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode, v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ToRGB:
    """PIL image of any mode, or a [1 or 3, H, W] tensor -> RGB (a module-level class, so the transform pickles
    into worker processes)."""

    def __call__(self, image):
        if isinstance(image, Image.Image):
            return image if image.mode == "RGB" else image.convert("RGB")
        if image.shape[-3] == 1:
            return image.expand(*image.shape[:-3], 3, *image.shape[-2:])
        if image.shape[-3] != 3:
            raise ValueError(f"expected an RGB or grey image tensor [C, H, W], got shape {tuple(image.shape)}")
        return image

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ToNormalizedTensor:
    """PIL RGB image or uint8 tensor [3, H, W] -> contiguous float tensor [3, H, W], (pixel / 255 - mean) / std:
    ToTensor + Normalize in one pass over the pixels (the loaders run it for every sample)."""

    def __init__(self, mean, std):
        self.mean, self.std = tuple(mean), tuple(std)
        self._offset = torch.tensor(self.mean).view(3, 1, 1) * 255
        self._scale = torch.tensor(self.std).view(3, 1, 1) * 255

    def __call__(self, image) -> torch.Tensor:
        if isinstance(image, Image.Image):
            image = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)
        elif image.dtype != torch.uint8:
            raise TypeError(f"expected a PIL image or a uint8 tensor, got a {image.dtype} tensor")
        pixels = image.to(torch.float32, memory_format=torch.contiguous_format)
        return pixels.sub_(self._offset).div_(self._scale)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mean={self.mean}, std={self.std})"


class RandomResizedCropNormalize:
    """ToRGB, v2.RandomResizedCrop (bicubic, antialiased), optionally v2.RandomHorizontalFlip, ToNormalizedTensor:
    the same pixels from the same random draws as that v2.Compose, without its per-transform dispatch (flattening
    the inputs, checking their types), which costs more than the crop itself for small images (~40 us an image
    here, a sixth of the data path of the 32-px demo). The draws are v2's own: its `make_params`, then
    `torch.rand(1) < p` for the flip."""

    def __init__(self, image_size: int, scale, mean, std, flip: bool):
        self.crop = v2.RandomResizedCrop(image_size, scale=tuple(scale), interpolation=InterpolationMode.BICUBIC,
                                         antialias=True)
        self.to_rgb, self.flip, self.normalize = ToRGB(), flip, ToNormalizedTensor(mean, std)

    def __call__(self, image) -> torch.Tensor:
        image = self.to_rgb(image)
        crop = self.crop
        image = v2.functional.resized_crop(image, **crop.make_params([image]), size=crop.size,
                                           interpolation=crop.interpolation, antialias=crop.antialias)
        if self.flip and torch.rand(1) < 0.5:
            image = v2.functional.horizontal_flip(image)
        return self.normalize(image)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(size={self.crop.size}, scale={self.crop.scale}, flip={self.flip}, "
                f"mean={self.normalize.mean}, std={self.normalize.std})")


def mae_train_transform(image_size: int, scale=(0.2, 1.0), mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """RandomResizedCrop(image_size, scale, bicubic) + RandomHorizontalFlip + ToNormalizedTensor."""
    return RandomResizedCropNormalize(image_size, scale, mean, std, flip=True)


def eval_transform(image_size: int, crop_fraction: float = 0.875, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """Resize the short side to image_size / crop_fraction (bicubic), CenterCrop(image_size), ToNormalizedTensor.

    crop_fraction=0.875 is the usual 256 -> 224 evaluation protocol; 1.0 resizes straight to image_size.
    """
    if not 0.0 < crop_fraction <= 1.0:
        raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction}")
    return v2.Compose([
        ToRGB(),
        v2.Resize(int(round(image_size / crop_fraction)), interpolation=InterpolationMode.BICUBIC, antialias=True),
        v2.CenterCrop(image_size),
        ToNormalizedTensor(mean, std),
    ])


# ------------------------------------------------------------------------------------------------ CLIP

# open_clip.OPENAI_DATASET_MEAN / _STD (the statistics CLIP was trained with), kept here so that the data layer
# does not import open_clip; tests check that they agree.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_train_transform(image_size: int, scale=(0.9, 1.0), mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD):
    """open_clip's training transform: RandomResizedCrop(image_size, scale, bicubic) + ToNormalizedTensor.

    CLIP crops gently (90-100% of the image) and does not flip: a caption may say "left" or "right".
    """
    return RandomResizedCropNormalize(image_size, scale, mean, std, flip=False)


def clip_eval_transform(image_size: int, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD):
    """Resize the short side to image_size (bicubic) + CenterCrop(image_size) + ToNormalizedTensor."""
    return eval_transform(image_size, crop_fraction=1.0, mean=mean, std=std)


# ------------------------------------------------------------------------------------------------ detection
#
# Detection transforms take and return (image, target): the image a PIL image (then a tv_tensors.Image), the
# target {"boxes": tv_tensors.BoundingBoxes in pixels, "labels": LongTensor[n]}. torchvision.transforms.v2 moves
# the boxes with the image; SanitizeBoundingBoxes drops boxes (and their labels) that a crop left empty.
# `data.samples.DetectionSamples` builds the target from a shard and turns the boxes into normalised cx, cy, w, h.

DETR_SCALES = tuple(range(480, 801, 32))  # shorter-side sizes of DETR's multi-scale training


class RandomSizeCrop(v2.Transform):
    """Crop a random region whose width and height are drawn uniformly from [min_size, max_size] (each capped by
    the image's own size), at a random position; boxes follow through torchvision's crop kernel."""

    def __init__(self, min_size: int, max_size: int):
        super().__init__()
        if not 0 < min_size <= max_size:
            raise ValueError(f"need 0 < min_size <= max_size, got {min_size}, {max_size}")
        self.min_size, self.max_size = min_size, max_size

    def make_params(self, flat_inputs: list) -> dict:
        image = next(item for item in flat_inputs if isinstance(item, tv_tensors.Image))
        height, width = v2.functional.get_size(image)

        def draw(limit: int) -> int:
            low, high = min(self.min_size, limit), min(self.max_size, limit)
            return int(torch.randint(low, high + 1, ()))

        crop_height, crop_width = draw(height), draw(width)
        top = int(torch.randint(0, height - crop_height + 1, ()))
        left = int(torch.randint(0, width - crop_width + 1, ()))
        return {"top": top, "left": left, "height": crop_height, "width": crop_width}

    def transform(self, inpt, params: dict):
        return v2.functional.crop(inpt, **params)


def _detection_output(mean, std) -> list:
    return [
        v2.ClampBoundingBoxes(),
        v2.SanitizeBoundingBoxes(min_size=1.0),  # drops boxes a crop emptied, with their labels
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean, std),
    ]


def detection_train_transform(scales=DETR_SCALES, max_size: int = 1333, crop_scales=(400, 500, 600),
                              crop_size=(384, 600), mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """DETR's training augmentation on (image, target): horizontal flip; then either a multi-scale resize (shorter
    side drawn from `scales`, longer side at most `max_size`), or a resize to one of `crop_scales`, a random crop of
    `crop_size` = (min, max) pixels per side, and the multi-scale resize. Normalised float image out."""
    resize = v2.RandomShortestSize(list(scales), max_size=max_size, antialias=True)
    return v2.Compose([
        v2.ToImage(),
        v2.RandomHorizontalFlip(),
        v2.RandomChoice([
            resize,
            v2.Compose([v2.RandomShortestSize(list(crop_scales), antialias=True), RandomSizeCrop(*crop_size), resize]),
        ]),
        *_detection_output(mean, std),
    ])


def detection_eval_transform(size: int = 800, max_size: int = 1333, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """Resize the shorter side to `size` (the longer one at most `max_size`), boxes alike; normalised float out."""
    return v2.Compose([
        v2.ToImage(),
        v2.Resize(size, max_size=max_size, antialias=True),
        *_detection_output(mean, std),
    ])
