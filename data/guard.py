"""Stop a run whose data is mostly bad instead of letting it train on scraps, or wait forever for a batch.

    guard = SkipGuard(max_rate=0.5, min_samples=1000, where="training shards data/train/{000..099}.tar")
    for batch in loader:
        guard.update(len(batch["key"]), batch.pop("skipped"))   # raises DataError when too much is skipped

ShardStream keeps one guard per reading slot (see its max_skip_rate), so an all-garbage data set raises even when
no batch is ever complete; the engine may keep a second one over the batches it receives.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

from .errors import DataError


class SkipGuard:
    """Counts kept and skipped samples; `update` raises DataError once at least `min_samples` have been seen and
    more than `max_rate` of them were skipped. Counts are cumulative: a short bad stretch in a long run passes.

    Every skip event counts as one sample, including a "bad_tar" (the unread rest of a shard).
    max_rate=1.0 never raises.
    """

    def __init__(self, max_rate: float = 0.5, min_samples: int = 100, where: str = "data"):
        if not 0.0 <= max_rate <= 1.0:
            raise ValueError(f"max_rate must be in [0, 1], got {max_rate}")
        if min_samples < 1:
            raise ValueError(f"min_samples must be >= 1, got {min_samples}")
        self.max_rate, self.min_samples, self.where = max_rate, min_samples, where
        self.kept = 0
        self.skipped: Counter = Counter()

    @property
    def seen(self) -> int:
        return self.kept + sum(self.skipped.values())

    @property
    def rate(self) -> float:
        """Fraction of the samples seen so far that were skipped (0.0 before any)."""
        return sum(self.skipped.values()) / self.seen if self.seen else 0.0

    def update(self, kept: int, skipped: Mapping[str, int] | None = None) -> None:
        """Add `kept` good samples and the `skipped` counts by reason, then check the rate."""
        self.kept += kept
        self.skipped.update({reason: int(n) for reason, n in (skipped or {}).items() if n})
        self.check()

    def reset(self) -> None:
        self.kept = 0
        self.skipped.clear()

    def check(self) -> None:
        if self.seen >= self.min_samples and self.rate > self.max_rate:
            raise DataError(self.message())

    def message(self) -> str:
        reasons = ", ".join(f"{reason}: {n}" for reason, n in self.skipped.most_common())
        return (f"{self.where}: {sum(self.skipped.values())} of {self.seen} samples skipped ({reasons}), more than "
                f"the allowed {self.max_rate:.0%}; check the shards (e.g. rewrite them with `python -m data`, which "
                f"checks every image) or raise the allowed skip rate")
