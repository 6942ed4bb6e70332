"""Skipped samples: counted where they are skipped, summed over workers and ranks, and never allowed to grow silently.

A DataLoader worker keeps a :class:`SkipTally` of the samples it read and skipped since its previous batch, with
one example of each reason, and hands it over with that batch (``Batch.stats``, ``Batch.skip_examples``). The
trainer's process adds the batches of all its workers into a :class:`SkipShareGuard`, which sums them over ranks
and stops the run when one reason passes ``data.max_skipped_share`` of the samples seen: checked at the first batch
by which :data:`MIN_SAMPLES` samples were seen (over all ranks), then at the last batch of every epoch. Every rank
reduces and checks at the same batches and reaches the same verdict, so the ranks stop together.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from mllm_safety.data.conversation import SKIP_REASONS

MIN_SAMPLES = 200
"""Samples seen (over all ranks) before the share is judged. At the default 1% a share needs room for a few skips to
tell a systematic loss from a stray bad file: 200 samples allow 2, and a clean set with 0.1% bad files would pass
with probability 0.999 (Poisson, mean 0.2). A worker gathers 16 batches of usable samples (``data.group_buffer``)
before its first batch, reading on past every skipped one, so a run that drops most of its data is judged at its
first step."""

SEEN = "seen"
"""``Batch.stats`` key of the samples read (kept or skipped, and those lost to a damaged shard)."""

SKIP_FIXES: dict[str, str] = {
    "bad_json": "rewrite the shards from the source records with `python -m mllm_safety.data.convert`",
    "bad_conversation": "fix the records' turns (alternating human/gpt with string values) and convert them again",
    "bad_record": "fix the records to their source's layout (VLGuard: its train.json keys) and convert them again",
    "no_reply": "leave the records without an assistant turn out of the source, or give them a reply",
    "bad_image": "check the source images (unreadable files, or an <image> placeholder without exactly one image) "
    "and convert them again",
    "missing_image": "point convert's --image_root at the folder holding the records' images",
    "too_long": "raise model.max_length or bound the image size: model.hub.processor_kwargs, e.g. {max_pixels: "
    "589824} for Qwen2.5-VL or {size: {longest_edge: 728}} for Idefics3 (LLaVA-NeXT's anyres image takes up to "
    "2928 tokens whatever its size: raise max_length); `python benchmarks/image_tokens.py` gives each "
    "family's image tokens",
    "template": "choose a chat template that renders each turn alone: model.hub.chat_template (a named template or "
    "a Jinja template)",
    "corrupt_tar": "copy the damaged shards again or rewrite them with `python -m mllm_safety.data.convert`",
}
"""What to change when too many samples are skipped for a reason; one entry per :data:`SKIP_REASONS` key."""


class SkippedShareError(RuntimeError):
    """Too many samples were skipped for one reason: the run would train on a different data set than configured."""


@dataclass
class SkipTally:
    """What one worker read and skipped since its previous batch, with the first example of each reason."""

    seen: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)

    def skip(self, reason: str, example: str, count: int = 1) -> None:
        self.skipped[reason] += count
        self.examples.setdefault(reason, example)

    def drain(self) -> tuple[dict[str, int], dict[str, str]]:
        """The counts as ``Batch.stats`` (the same keys on every rank: ``seen`` and ``skipped_<reason>`` for every
        reason) and the examples, and start counting afresh."""
        stats = {SEEN: self.seen, **{f"skipped_{reason}": self.skipped.pop(reason, 0) for reason in SKIP_REASONS}}
        examples, self.examples, self.seen = self.examples, {}, 0
        return stats, examples


def gather_objects(value: object) -> list[object]:
    """``value`` of every rank (just this one's outside a distributed run)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [value]
    values: list[object] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(values, value)
    return values


Reduce = Callable[[torch.Tensor], torch.Tensor]
"""Sums a tensor over ranks (``trainer.strategy.reduce(t, reduce_op="sum")``); the identity on one process."""


class SkipShareGuard:
    """Sums the skip counts of every batch on this rank and judges them, summed over ranks, against ``max_share``."""

    def __init__(self, max_share: float, min_samples: int = MIN_SAMPLES) -> None:
        if not 0.0 <= max_share <= 1.0:
            raise ValueError(f"max_skipped_share must be in [0, 1] (a share of the samples seen), got {max_share}")
        self.max_share = max_share
        self.min_samples = min_samples
        self.counts: Counter[str] = Counter()
        """Since the run started, on this rank: ``seen`` and ``skipped_<reason>``."""
        self.examples: dict[str, str] = {}
        self.judged_early = False

    def add(self, stats: dict[str, int], examples: dict[str, str]) -> None:
        self.counts.update(
            {name: count for name, count in stats.items() if name == SEEN or name.startswith("skipped_")}
        )
        for reason, example in examples.items():
            self.examples.setdefault(reason, example)

    def due(self, epoch_ends: bool) -> bool:
        """Whether this batch is judged: every batch until the first judgement, then the last of each epoch. The same
        answer on every rank (ranks run the same batches and share the totals that end the early phase)."""
        return epoch_ends or not self.judged_early

    def check(self, reduce: Reduce, device: torch.device | str = "cpu") -> None:
        """Sum the counts over ranks and raise :class:`SkippedShareError` on every rank when a reason is over the
        share. A collective: every rank must call it at the same batch."""
        reasons = list(SKIP_REASONS)
        local = [self.counts[SEEN], *(self.counts[f"skipped_{reason}"] for reason in reasons)]
        seen, *skipped = reduce(torch.tensor(local, dtype=torch.long, device=device)).tolist()
        if seen < self.min_samples:
            return
        self.judged_early = True
        over = [
            (count, reason) for count, reason in zip(skipped, reasons, strict=True) if count > self.max_share * seen
        ]
        if not over:
            return
        count, reason = max(over)
        example = next((e[reason] for e in gather_objects(self.examples) if reason in e), None)  # type: ignore[index]
        raise SkippedShareError(self.message(reason, count, seen, example))

    def message(self, reason: str, count: int, seen: int, example: str | None) -> str:
        return (
            f"{count} of the first {seen} samples seen ({count / seen:.1%}) were skipped as {reason} "
            f"({SKIP_REASONS[reason]}), more than data.max_skipped_share={self.max_share:g} allows: training on would "
            f"silently learn from a different data set. Example: {example or 'none recorded'}. "
            f"Fix: {SKIP_FIXES[reason]}; or raise data.max_skipped_share to accept the loss."
        )
