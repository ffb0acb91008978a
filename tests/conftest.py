"""Fixtures shared by the config and engine tests: a micro MAE, tiny shards, and overrides for a fast run."""

from __future__ import annotations

import itertools
from functools import partial
from pathlib import Path

import pytest
import torch

MICRO_MODEL = "mae_test_micro"  # registered for the tests only: 16x16 images, 16 patches, one block each side
TRAIN_IMAGES = 64  # 8 steps per epoch at global batch 8


@pytest.fixture(scope="module")
def single_thread():
    """One torch thread. The micro model gains nothing from intra-op threads, and on a busy 2-core machine
    OpenMP threads waiting on each other make each step ~100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps one process-wide state and refuses a second Accelerator with another mixed precision;
    reset it after every test (as accelerate's own test cases do), so tests stay independent of their order (e.g.
    "auto" resolving to bf16 on a CPU with bf16 units and a later test asking for "no": on an AVX512-BF16 machine a
    test that trained with "auto" and did not ask for this reset broke every later CLIP test of the module)."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(scope="session")
def micro_model() -> str:
    from pretrain.models import MODEL_REGISTRY, MaskedAutoencoderViT, register_model

    if MICRO_MODEL not in MODEL_REGISTRY:
        register_model(MICRO_MODEL, partial(
            MaskedAutoencoderViT, img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2,
            decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, mlp_ratio=2.0,
        ))  # fmt: skip
    return MICRO_MODEL


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> tuple[Path, Path]:
    """(train dir, val dir): the first 64 embedded Fashion-MNIST images in 2 shards, the next 16 as val."""
    from data import ShardOptions, read_embedded, write_labelled_shards

    root = tmp_path_factory.mktemp("tiny_shards")
    class_names, samples = read_embedded()
    first = list(itertools.islice(iter(samples), TRAIN_IMAGES + 16))
    write_labelled_shards(first[:TRAIN_IMAGES], root / "train", class_names,
                          options=ShardOptions(shard_size=32, progress=False))
    write_labelled_shards(first[TRAIN_IMAGES:], root / "val", class_names, prefix="val",
                          options=ShardOptions(progress=False))
    return root / "train", root / "val"


@pytest.fixture(scope="session")
def tiny_pair_shards(tmp_path_factory, tiny_shards) -> Path:
    """The tiny labelled training shards as image-text pairs with generated captions."""
    from data import FASHION_MNIST_CLASSES, ShardOptions, captioned_pairs, expand_shards, write_pair_shards

    out = tmp_path_factory.mktemp("pairs")
    write_pair_shards(captioned_pairs(expand_shards(tiny_shards[0]), FASHION_MNIST_CLASSES), out,
                      options=ShardOptions(shard_size=32, progress=False))
    return out


@pytest.fixture(scope="session")
def embedded_cache(tmp_path_factory) -> Path:
    """The bundled data set written once per session, for `data.cache_dir=` in runs of the real demo config."""
    from data import ensure_embedded_shards

    cache = tmp_path_factory.mktemp("embedded")
    ensure_embedded_shards(cache)
    return cache


@pytest.fixture
def tiny_args(micro_model, tiny_shards):
    """tiny_args(output_dir, "key=value", ...) -> the argv of a ~1 s float32 run: micro model, 64 train images,
    batch 8 (8 steps per epoch), one epoch, no worker processes, no wandb, no progress bar."""
    train_dir, val_dir = tiny_shards

    def make(output_dir, *overrides: str) -> list[str]:
        return [
            f"model.name={micro_model}",
            f"data.train={train_dir}",
            f"data.val={val_dir}",
            "data.image_size=16",
            "data.num_workers=0",
            "data.shuffle_buffer=16",
            "train.batch_size=8",
            "train.epochs=1",
            "train.mixed_precision=no",
            "logging.wandb=disabled",
            "logging.progress_bar=false",
            "num_pictures=4",
            f"output_dir={output_dir}",
            *overrides,
        ]

    return make
