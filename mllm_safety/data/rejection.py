"""The rejection swap: a deterministic fraction of benign samples get their reply replaced by a refusal.

This is the whole method of Wang et al. (CVPR 2025): no harmful data, only benign instructions whose replies are
sometimes "I'm sorry, but I cannot assist with your request".
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

from mllm_safety.data.conversation import IMAGE_PLACEHOLDER, Conversation

PAPER_REJECTION = "I'm sorry, but I cannot assist with your request."


def swap_score(seed: int, sample_id: str) -> float:
    """A uniform number in [0, 1) fixed by (seed, sample id) alone: not by shard order, rank or worker."""
    digest = hashlib.blake2b(f"{seed}\x00{sample_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


@dataclass
class RejectionConfig:
    """How replies are swapped for a rejection (defaults follow the paper)."""

    sentence: str = PAPER_REJECTION
    """The rejection reply."""
    seed: int = 0
    """Chooses which samples are swapped; the swapped set at a smaller ratio is a subset of the one at a larger."""
    keep_one_turn: bool = True
    """Keep only the first human turn of a swapped sample (the paper's choice)."""
    image_first: bool = True
    """Move ``<image>`` to the front of the prompt, followed by a newline (LLaVA's layout)."""
    learn_eos: bool = False
    """Learn the end-of-turn token after a rejection; the paper leaves it out of the loss."""

    def __post_init__(self) -> None:
        if not self.sentence.strip():
            raise ValueError("rejection sentence must not be empty")


class RejectionSwap:
    """Decides which samples are swapped and rewrites them.

    With ``ids`` (every eligible sample id, e.g. from a shard manifest), exactly ``round(ratio * len(ids))``
    samples are swapped: those with the smallest :func:`swap_score`. Without, each sample is swapped when its
    score is below ``ratio``, which matches the fraction in expectation. Both choices are nested across ratios.
    """

    def __init__(self, ratio: float, config: RejectionConfig, ids: Iterable[str] | None = None) -> None:
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"rejection ratio must be in [0, 1], got {ratio}")
        self.ratio = ratio
        self.config = config
        self.chosen: frozenset[str] | None = None
        if ids is not None:
            ranked = sorted(set(ids), key=lambda sample_id: swap_score(config.seed, sample_id))
            self.chosen = frozenset(ranked[: round(ratio * len(ranked))])

    def is_swapped(self, sample_id: str) -> bool:
        if self.chosen is not None:
            return sample_id in self.chosen
        return swap_score(self.config.seed, sample_id) < self.ratio

    def __call__(self, conversation: Conversation) -> Conversation:
        if not self.is_swapped(conversation.id):
            return conversation
        turns = conversation.turns[:1] if self.config.keep_one_turn else conversation.turns
        humans = [human for human, _ in turns]
        if conversation.image is not None and not any(IMAGE_PLACEHOLDER in human for human in humans):
            humans[0] = f"{IMAGE_PLACEHOLDER}\n{humans[0]}"  # the placeholder was in a dropped turn
        if self.config.image_first:
            humans = [
                f"{IMAGE_PLACEHOLDER}\n{human.replace(IMAGE_PLACEHOLDER, '').strip()}"
                if IMAGE_PLACEHOLDER in human
                else human
                for human in humans
            ]
        return conversation.with_turns(
            tuple((human, self.config.sentence) for human in humans),
            is_rejection=True,
            learn_end_marker=self.config.learn_eos,
        )
