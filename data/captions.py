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

from .pairs import ImageTextPair

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


def labelled_shard_samples(shards: Sequence[str]) -> Iterator[tuple[str, str, bytes, int]]:
    """(key, image extension, image bytes, label) of every sample of labelled shards, in order."""
    import webdataset as wds

    from .sources import IMAGE_EXTENSIONS

    # every shard, on whichever process calls this (e.g. the main one while writing the embedded pairs)
    whole = dict(shardshuffle=False, empty_check=False, nodesplitter=None, workersplitter=None)
    for sample in wds.WebDataset(list(shards), **whole):
        ext = next((k for k in sample if k.lower() in IMAGE_EXTENSIONS), None)
        if ext is None or "cls" not in sample:
            continue  # counted by the pair writer's stats as missing: there is no pair to write
        yield sample["__key__"], ext, sample[ext], int(sample["cls"].decode().strip())


def captioned_pairs(shards: Sequence[str], class_names: Sequence[str], seed: int = 0) -> Iterator[ImageTextPair]:
    """Image-text pairs from labelled shards: each image with one caption for its class (reproducible by seed)."""
    rng = random.Random(seed)
    for key, ext, image_bytes, label in labelled_shard_samples(shards):
        yield ImageTextPair(key=key, image_path=Path(f"{key}.{ext}"), caption=caption_for(class_names[label], rng),
                            source=f"{key} (class {class_names[label]})", image_bytes=image_bytes)
