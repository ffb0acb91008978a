"""Image-text pairs from a labelled data set: captions written from the class names, in varied natural phrasings,
with words that are true of each image (how much of the frame the item fills, its shade, its texture).

This is how a small CLIP can be trained on a classification data set (Fashion-MNIST here) and then evaluated
zero-shot with prompts it never saw: the captions below avoid the "a photo of a {}" family of OpenAI's templates,
and name each class with a few everyday nouns ("tee", "jumper", "trainers") rather than only its label
("A small dark open sandal for sale", "This jumper is bright and patterned").

    python -m data captions --shards shards/fmnist/train --out shards/fmnist_pairs
"""
from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from webdataset.tariterators import group_by_keys, tar_file_expander

from .errors import DataError
from .images import decode_image, statistics_copy
from .pairs import ImageTextPair
from .sources import IMAGE_EXTENSIONS

# Everyday nouns per Fashion-MNIST class; other data sets fall back to the lower-cased class name.
CLASS_NOUNS: dict[str, tuple[str, ...]] = {
    "T-shirt/top": ("t-shirt", "tee", "top", "short-sleeved top"),
    "Trouser": ("trousers", "pair of trousers", "pair of pants", "pair of jeans"),
    "Pullover": ("pullover", "sweater", "jumper", "knitted pullover"),
    "Dress": ("dress", "summer dress", "long dress", "sleeveless dress"),
    "Coat": ("coat", "jacket", "winter coat", "overcoat"),
    "Sandal": ("sandal", "open sandal", "strappy sandal", "summer sandal"),
    "Shirt": ("shirt", "button-up shirt", "long-sleeved shirt", "blouse"),
    "Sneaker": ("sneaker", "trainer", "running shoe", "canvas sneaker"),
    "Bag": ("bag", "handbag", "tote bag", "shoulder bag"),
    "Ankle boot": ("ankle boot", "short boot", "leather ankle boot", "heeled ankle boot"),
}

# What stats.json records of pair shards written here ("captions"), so that shards of an older caption recipe are
# rewritten rather than reused (the embedded demo's pairs, benchmarks/clip_zeroshot.py).
CAPTION_RECIPE = "class nouns with the image's size, shade and texture words"

# Words that are true of the image as seen, so that the text tower learns them (CLIP's templates use such words:
# "a dark photo of the {}", "a photo of a small {}"): random adjectives taught it to ignore every word but the noun,
# so every prompt template of a class gave the same embedding and a template ensemble had nothing to average out.
# The thresholds split Fashion-MNIST's training images into rough thirds (shade) and quarters (size, texture).
SHADE_WORDS = ((0.56, "dark"), (0.72, "grey"), (float("inf"), "bright"))  # mean grey level of the item's pixels
SMALL_FILL, LARGE_FILL = 0.33, 0.575  # share of the frame the item covers
PLAIN_TEXTURE, PATTERNED_TEXTURE = 0.085, 0.13  # mean step between neighbouring item pixels
FOREGROUND_STEP = 0.1  # a pixel this far from the background's grey level (the border's median) is the item's

# Each phrasing names the class noun; {adj} takes one or two of the image's attribute words (an image without any
# gets one of PHRASINGS_WITHOUT_ATTRIBUTES). No "photo of", "picture of", "rendering of"...: those phrasings are kept
# for the zero-shot prompts.
CAPTION_PHRASINGS = (
    "{a} {adj} {noun}",
    "{a} {adj} {noun} on an empty background",
    "{a} {adj} {noun}, seen from the front",
    "product shot: {a} {adj} {noun}",
    "{a} {adj} {noun} for sale",
    "my {adj} {noun}",
    "close-up of {a} {adj} {noun}",
    "{a} {adj} {noun} from a clothing catalogue",
    "{a} {adj} {noun} lying flat",
    "someone's {adj} {noun}",
    "this {noun} is {adj}",
)
PHRASINGS_WITHOUT_ATTRIBUTES = ("{a} {noun}", "{a} {noun} for sale", "product shot: {a} {noun}", "someone's {noun}")


def visual_attributes(image: Image.Image) -> tuple[str, ...]:
    """Words true of the item as it appears: its size in the frame ("small", "large"), its shade ("dark", "grey",
    "bright") and texture ("plain", "patterned"), in English adjective order; () for an image with no item
    (a blank frame). Items are told from a plain background, as in catalogue photos."""
    pixels = np.asarray(statistics_copy(image, "L"), dtype=np.float32) / 255.0  # large images: a 64-px copy
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    item = np.abs(pixels - np.median(border)) > FOREGROUND_STEP
    if not item.any():
        return ()
    words = []
    fill = float(item.mean())
    if fill < SMALL_FILL:
        words.append("small")
    elif fill > LARGE_FILL:
        words.append("large")
    shade = float(pixels[item].mean())
    words.append(next(word for limit, word in SHADE_WORDS if shade < limit))
    steps = [np.abs(np.diff(pixels, axis=axis))[item_pair] for axis, item_pair in
             ((0, item[1:] & item[:-1]), (1, item[:, 1:] & item[:, :-1]))]
    steps = np.concatenate(steps)
    if steps.size:
        texture = float(steps.mean())
        if texture < PLAIN_TEXTURE:
            words.append("plain")
        elif texture > PATTERNED_TEXTURE:
            words.append("patterned")
    return tuple(words)


def _with_article(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


def caption_for(class_name: str, rng: random.Random, attributes: Sequence[str] = ()) -> str:
    """One caption for an image of `class_name` with these `visual_attributes`: a phrasing and an everyday noun
    drawn at random, with one or two of the attributes (in their order)."""
    noun = rng.choice(CLASS_NOUNS.get(class_name, (class_name.lower(),)))
    if not attributes:
        phrasing = rng.choice(PHRASINGS_WITHOUT_ATTRIBUTES)
        return _finish(phrasing.replace("{a} {noun}", _with_article(noun)).format(noun=noun))
    phrasing = rng.choice(CAPTION_PHRASINGS)
    chosen = sorted(rng.sample(range(len(attributes)), k=min(len(attributes), rng.choice((1, 2)))))
    words = [attributes[i] for i in chosen]
    if phrasing.endswith("is {adj}"):
        return _finish(phrasing.format(noun=noun, adj=" and ".join(words)))
    described = " ".join(words + [noun])
    return _finish(phrasing.replace("{a} {adj} {noun}", _with_article(described)).format(adj=" ".join(words),
                                                                                           noun=noun))


def _finish(text: str) -> str:
    return text[0].upper() + text[1:]


def _raw_samples(shards: Sequence[str]) -> Iterator[tuple[str, dict]]:
    """(shard, raw sample) for every sample of the shards, in order, on whichever process calls this (e.g. the main
    one while writing the embedded pairs). A shard that cannot be read (missing, truncated, not a tar) is a
    DataError naming it: how many samples it lost is unknown."""
    for shard in shards:
        try:
            with open(shard, "rb") as stream:
                for raw in group_by_keys(tar_file_expander([{"url": shard, "stream": stream}])):
                    yield shard, raw
        except Exception as error:  # tarfile, gzip and OS errors (a consumer that stops early raises GeneratorExit)
            detail = getattr(error, "strerror", None) or (error.args[0] if error.args else "")
            raise DataError(f"{shard}: cannot read this labelled shard ({type(error).__name__}: {detail})") from None


def _class_of(raw: dict, class_names: Sequence[str]) -> tuple[int | None, tuple[str, str] | None]:
    """(label, None), or (None, (reason, message)) for a sample that cannot be captioned."""
    if "cls" not in raw:
        return None, ("missing_field", "no cls field")
    try:
        label = int(raw["cls"].decode().strip())
    except (UnicodeDecodeError, ValueError):
        return None, ("bad_label", f"cls is {raw['cls'][:20]!r}")
    if not 0 <= label < len(class_names):
        return None, ("bad_label", f"label {label} outside the {len(class_names)} classes of the shards' stats.json")
    return label, None


def captioned_pairs(shards: Sequence[str], class_names: Sequence[str], seed: int = 0) -> Iterator[ImageTextPair]:
    """Image-text pairs from labelled shards: each image with one caption for its class (reproducible by seed).

    A sample without an image or a valid class becomes a pair the writer skips and counts (by `problem`).
    """
    rng = random.Random(seed)
    for shard, raw in _raw_samples(shards):
        key = raw["__key__"]
        ext = next((k for k in raw if k.lower() in IMAGE_EXTENSIONS), None)
        label, problem = _class_of(raw, class_names)
        if ext is None:
            problem = ("missing_field", "no image field")
        if problem is not None:
            yield ImageTextPair(key=key, image_path=Path(key), caption=None, source=f"{key} in {shard}",
                                problem=problem)
            continue
        try:
            attributes = visual_attributes(decode_image(raw))
        except Exception:  # PIL raises many types for bad data; the pair writer skips and counts the image
            attributes = ()
        yield ImageTextPair(key=key, image_path=Path(f"{key}.{ext}"),
                            caption=caption_for(class_names[label], rng, attributes),
                            source=f"{key} (class {class_names[label]})", image_bytes=raw[ext])
