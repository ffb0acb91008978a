"""Helpers shared by the streaming tests (test_data.py, test_stream.py)."""
from __future__ import annotations

from collections import Counter

import torch

from data import ShardStream, make_loader


class KeepPixels:
    """The stream's decoded uint8 [3, H, W] image as it is (contiguous, so that batches stack)."""

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return image.contiguous()


def as_uint8_tensor() -> KeepPixels:
    """A deterministic transform that keeps pixels exact: the decoded RGB uint8 [3, H, W] tensor."""
    return KeepPixels()


def collect(stream: ShardStream, num_workers: int, max_batches: int | None = None) -> list[dict]:
    """The stream's batches through a real DataLoader with `num_workers` worker processes."""
    batches = []
    for batch in make_loader(stream, num_workers):
        batches.append(batch)
        if max_batches is not None and len(batches) == max_batches:
            break
    return batches


def keys_of(batches) -> list[str]:
    return [key for batch in batches for key in batch["key"]]


def total_skipped(batches) -> dict:
    return dict(sum((Counter(batch["skipped"]) for batch in batches), Counter()))
