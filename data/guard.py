"""Stop a run whose data is mostly bad instead of letting it train on scraps, or wait forever for a batch.

    guard = SkipGuard(max_rate=0.5, min_samples=1000, where="training shards data/train/{000..099}.tar")
    for batch in loader:
        guard.update(len(batch["key"]), batch.pop("skipped"))   # raises DataError when too much is skipped

ShardStream keeps one guard per reading slot (see its max_skip_rate), so an all-garbage data set raises even when
no batch is ever complete. (The training loop keeps none of its own: a rank's rate is a weighted mean of its slots'.)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

from .errors import DataError


class SkipGuard:
    """Counts kept and skipped samples; `update` raises DataError once at least `min_samples` have been seen and
    more than `max_rate` of them were skipped. Counts are cumulative: a short bad stretch in a long run passes.

    Counts are of samples: a "bad_tar" (a shard unreadable from some point on) counts the samples lost with it,
    as the stream estimates them. `explain(reason, example)` keeps one example per reason for the message.
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
        self.examples: dict[str, str] = {}

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

    def explain(self, reason: str, example: str) -> None:
        """Keep `example` (e.g. "x.tar is not a readable tar file") as the first one for `reason`."""
        self.examples.setdefault(reason, example)

    def reset(self) -> None:
        self.kept = 0
        self.skipped.clear()
        self.examples.clear()

    def check(self, final: bool = False) -> None:
        """final=True: no more samples will come (an evaluation pass ended), so judge however few were seen."""
        if (final or self.seen >= self.min_samples) and self.rate > self.max_rate:
            raise DataError(self.message())

    def message(self) -> str:
        reasons = ", ".join(f"{reason}: {n}" for reason, n in self.skipped.most_common())
        examples = "; ".join(f"{reason}: {self.examples[reason]}" for reason in self.skipped if reason in self.examples)
        text = (f"{self.where}: {sum(self.skipped.values())} of {self.seen} samples skipped ({reasons}), more than "
                f"the allowed {self.max_rate:.0%}; check the shards")
        if examples:
            text += f" ({examples})"
        if set(self.skipped) & REWRITING_HELPS:
            text += ", e.g. rewrite them with `python -m data`, which checks every image"
        if self.kept:  # with nothing usable, a higher limit would not help
            text += ", or raise the allowed skip rate (data.max_skip_rate)"
        return text


# What `python -m data` repairs by rewriting: it checks every image, label and caption, and writes whole tar files.
# (A missing field usually means shards of another kind, see data.shards.wrong_kind.)
REWRITING_HELPS = {"bad_tar", "undecodable_image", "bad_label", "bad_caption", "bad_target"}
