"""Image transforms for pretraining and evaluation (PIL image in, normalised [3, H, W] float tensor out).

The training transform is MAE's: a random resized crop (bicubic), a horizontal flip, and nothing else; MAE
relies on masking, not on heavy augmentation. Greyscale or palette images are converted to RGB first.
"""

from __future__ import annotations

from PIL import Image
from torchvision import transforms
from torchvision.transforms import InterpolationMode

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ToRGB:
    """PIL image of any mode -> RGB (a module-level class, so the transform pickles into worker processes)."""

    def __call__(self, image: Image.Image) -> Image.Image:
        return image if image.mode == "RGB" else image.convert("RGB")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def mae_train_transform(image_size: int, scale=(0.2, 1.0), mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """RandomResizedCrop(image_size, scale, bicubic) + RandomHorizontalFlip + ToTensor + Normalize."""
    return transforms.Compose([
        ToRGB(),
        transforms.RandomResizedCrop(image_size, scale=tuple(scale), interpolation=InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])


def eval_transform(image_size: int, crop_fraction: float = 0.875, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """Resize the short side to image_size / crop_fraction (bicubic), CenterCrop(image_size), ToTensor, Normalize.

    crop_fraction=0.875 is the usual 256 -> 224 evaluation protocol; 1.0 resizes straight to image_size.
    """
    if not 0.0 < crop_fraction <= 1.0:
        raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction}")
    return transforms.Compose([
        ToRGB(),
        transforms.Resize(int(round(image_size / crop_fraction)), interpolation=InterpolationMode.BICUBIC),
        transforms.CenterCrop(image_size),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])
