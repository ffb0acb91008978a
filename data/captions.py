"""Image-text pairs from a labelled data set: captions written from the class names, in varied natural phrasings.

This is how a small CLIP can be trained on a classification data set (Fashion-MNIST here) and then evaluated
zero-shot with prompts it never saw: the captions below avoid the "a photo of a {}" family of OpenAI's templates,
and name each class with a few everyday nouns ("tee", "jumper", "trainers") rather than only its label.

    python -m data captions --shards shards/fmnist/train --out shards/fmnist_pairs
"""
from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from pathlib import Path

from webdataset.tariterators import group_by_keys, tar_file_expander

from .errors import DataError
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

ADJECTIVES = ("grey", "dark", "light", "plain", "simple", "classic", "worn", "casual", "new", "old")

# No "photo of", "picture of", "rendering of"...: those phrasings are kept for the zero-shot prompts.
CAPTION_PHRASINGS = (
    "{a} {noun}",
    "{a} {adj} {noun}",
    "{a} {noun} on a plain background",
    "{a} {adj} {noun}, seen from the front",
    "product shot: {a} {noun}",
    "{a} {noun} for sale",
    "my {adj} {noun}",
    "close-up of {a} {noun}",
    "{a} {noun} from a clothing catalogue",
    "{a} {adj} {noun} lying flat",
    "someone's {noun}",
    "this {noun} is {adj}",
)


def _with_article(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


def caption_for(class_name: str, rng: random.Random) -> str:
    """One caption for an image of `class_name`, drawn from the phrasings, nouns and adjectives above."""
    noun = rng.choice(CLASS_NOUNS.get(class_name, (class_name.lower(),)))
    adjective = rng.choice(ADJECTIVES)
    phrasing = rng.choice(CAPTION_PHRASINGS)
    # "{a} {adj} {noun}" -> the article agrees with the word that follows it
    following = f"{adjective} {noun}" if "{a} {adj}" in phrasing else noun
    text = phrasing.replace("{a} {adj} {noun}", _with_article(following)).replace("{a} {noun}", _with_article(noun))
    text = text.format(adj=adjective, noun=noun)
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
        yield ImageTextPair(key=key, image_path=Path(f"{key}.{ext}"), caption=caption_for(class_names[label], rng),
                            source=f"{key} (class {class_names[label]})", image_bytes=raw[ext])
