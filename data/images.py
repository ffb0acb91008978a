"""Check an encoded image on its way into a shard, and optionally re-encode it (shrink + JPEG).

By default the original bytes are stored unchanged; `ImageOptions(resize_shorter=N, jpeg_quality=Q)` decodes,
shrinks the shorter side to N pixels (never enlarges) and stores a JPEG. `encode_for_shard` returns the scale
factors so that pixel coordinates (detection boxes) can follow the resize. `decode_image` turns a stored raw
sample's image back into a PIL image.

16-bit images become 8-bit by keeping the high byte (value >> 8), everywhere: PIL does so itself for 16-bit RGB
and libpng's strip_16 too, and `eight_bit` does it for 16-bit greyscale, which PIL's convert() would clip at 255
(almost white). data.samples.open_image scales torchvision's 16-bit decodes the same way.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .errors import DataError
from .sources import IMAGE_EXTENSIONS

DEFAULT_JPEG_QUALITY = 90  # used when only resize_shorter is given

# PIL format name -> extension, used when a file's own extension is not an image extension we know.
_EXT_FOR_PIL_FORMAT = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp", "PPM": "ppm", "BMP": "bmp", "GIF": "gif",
                       "TIFF": "tif"}


# 16-bit greyscale as PIL opens it: I;16* from PNG and TIFF, I from 16-bit PGM (PIL scales those to 0..65535).
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class SampleSkipped(Exception):
    """Raised while preparing one sample: it is left out of the shards and counted under `reason`."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason, self.message = reason, message


@dataclass(frozen=True)
class ImageOptions:
    """How images are stored: original bytes (the default), or re-encoded as JPEG, optionally shrunk.

    resize_shorter: shrink so that the shorter side is this many pixels (smaller images keep their size).
    jpeg_quality: JPEG quality 1..95 of the re-encoded image.
    """

    resize_shorter: int | None = None
    jpeg_quality: int | None = None

    def __post_init__(self):
        if self.resize_shorter is not None and self.resize_shorter < 1:
            raise ValueError(f"resize_shorter must be >= 1, got {self.resize_shorter}")
        if self.jpeg_quality is not None and not 1 <= self.jpeg_quality <= 95:
            raise ValueError(f"jpeg_quality must be in 1..95, got {self.jpeg_quality}")

    @property
    def reencode(self) -> bool:
        return self.resize_shorter is not None or self.jpeg_quality is not None


def decode_checked(image_bytes: bytes | None, ext: str, error: str = "") -> tuple[Image.Image, str]:
    """Decode the image fully; returns (image, extension to store) or raises SampleSkipped.

    image_bytes None means the file could not be read (`error` says why).
    """
    if image_bytes is None:
        raise SampleSkipped("unreadable_file", error or "cannot read file")
    try:
        image = Image.open(io.BytesIO(image_bytes))
        image.load()  # verify() misses truncated pixel data; a full decode does not
    except Image.UnidentifiedImageError:  # its message holds a memory address: different on every run
        raise SampleSkipped("undecodable_image", "not an image format PIL recognises") from None
    except Exception as failure:  # PIL raises many types for bad data
        raise SampleSkipped("undecodable_image", f"{type(failure).__name__}: {failure}") from None
    ext = ext.lower()
    if ext not in IMAGE_EXTENSIONS:  # e.g. a manifest entry "img.dat" that is really a PNG
        ext = _EXT_FOR_PIL_FORMAT.get(image.format)
        if ext is None:
            raise SampleSkipped("unsupported_format", f"image format {image.format} has no supported extension")
    return image, ext


def eight_bit(image: Image.Image) -> Image.Image:
    """A 16-bit greyscale image as 8-bit "L" (value >> 8); any other image unchanged.

    Mode "I" is taken as 16-bit too: values beyond 0..65535 (a 32-bit TIFF) saturate.
    """
    if image.mode not in SIXTEEN_BIT_MODES:
        return image
    pixels = np.asarray(image).astype(np.int32)  # I;16B arrives big-endian, I as int32
    return Image.fromarray((np.clip(pixels, 0, 65535) >> 8).astype(np.uint8))


def shrunk_size(width: int, height: int, shorter: int | None) -> tuple[int, int]:
    """(width, height) after shrinking the shorter side to `shorter` pixels, keeping the aspect ratio."""
    if shorter is None or min(width, height) <= shorter:
        return width, height
    scale = shorter / min(width, height)
    return (shorter, max(1, round(height * scale))) if width <= height else (max(1, round(width * scale)), shorter)


def encode_for_shard(image: Image.Image, image_bytes: bytes, ext: str,
                     options: ImageOptions) -> tuple[bytes, str, tuple[float, float]]:
    """The bytes and extension to store, and the (x, y) scale applied to pixel coordinates."""
    if not options.reencode:
        return image_bytes, ext, (1.0, 1.0)
    width, height = image.size
    new_width, new_height = shrunk_size(width, height, options.resize_shorter)
    image = eight_bit(image)
    if image.mode not in ("RGB", "L"):  # JPEG stores only these (alpha, palettes, CMYK, 16-bit RGB go to RGB)
        image = image.convert("RGB")
    if (new_width, new_height) != (width, height):
        image = image.resize((new_width, new_height), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=options.jpeg_quality or DEFAULT_JPEG_QUALITY)
    return buffer.getvalue(), "jpg", (new_width / width, new_height / height)


PIXEL_STATS_SIDE = 64  # pixel statistics are taken from a copy no larger than this: the same figures, far cheaper


def statistics_copy(image: Image.Image, mode: str) -> Image.Image:
    """An 8-bit copy of the image in `mode` ("RGB", "L"), shrunk to at most PIXEL_STATS_SIDE pixels a side, for
    figures measured on its pixels (the caller's image is left as it was)."""
    image = eight_bit(image).convert(mode)  # convert() returns a new image, even to the same mode
    if max(image.size) > PIXEL_STATS_SIDE:
        image.thumbnail((PIXEL_STATS_SIDE, PIXEL_STATS_SIDE), Image.Resampling.BOX)
    return image


def pixel_moments(image: Image.Image) -> tuple[list[float], list[float]]:
    """Per-channel mean and mean square (0..1 scale) of the image as readers see it (8-bit RGB), for the
    normalisation statistics stats.json records (`pixel_mean`, `pixel_std`). Each image counts once, whatever its
    size, as it does when training resizes every image to one size."""
    pixels = np.asarray(statistics_copy(image, "RGB"), dtype=np.float64).reshape(-1, 3) / 255.0
    return pixels.mean(axis=0).tolist(), (pixels ** 2).mean(axis=0).tolist()


# ------------------------------------------------------------------------------------------------ reading back


def image_field(sample: dict) -> str:
    """The name of a raw sample's image field ("jpg", "png", ...); DataError naming the sample if none."""
    for name in sample:
        if name.lower() in IMAGE_EXTENSIONS:
            return name
    raise DataError(f"sample {sample.get('__key__')!r} in {sample.get('__url__', '?')} has no image field "
                    f"(fields: {', '.join(k for k in sample if not k.startswith('__'))})")


def decode_image(sample: dict) -> Image.Image:
    """A raw sample's image as an RGB PIL image (what webdataset's "pil" decoder gives)."""
    with Image.open(io.BytesIO(sample[image_field(sample)])) as image:
        return eight_bit(image).convert("RGB")
