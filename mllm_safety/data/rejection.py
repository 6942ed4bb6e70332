"""The rejection swap: a deterministic fraction of benign samples get their reply replaced by a refusal.

This is the whole method of Wang et al. (CVPR 2025): no harmful data, only benign instructions whose replies are
sometimes "I'm sorry, but I cannot assist with your request". The options reproduce the paper's comparison
experiments (reply variants, image ablations, swapping within one source only); the defaults are the paper's choice.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal, get_args

from mllm_safety.constants import IMAGE_PLACEHOLDER
from mllm_safety.data.ablation import ImageAblation, ImageMode
from mllm_safety.data.conversation import Conversation
from mllm_safety.data.selection import stable_uniform
from mllm_safety.data.turns import TurnChoice, turn_index

PAPER_REJECTION = "I'm sorry, but I cannot assist with your request"
"""The paper's sentence, without a final period: the default ``--reply`` of its ``utils/mix_rejection_data.py``."""
REFUSAL_POOL = (
    PAPER_REJECTION,
    "I'm sorry, but I can't help with that.",
    "Sorry, I cannot help with this request.",
    "I apologize, but I am unable to assist with that.",
    "I'm afraid I can't help with that request.",
)
REFUSAL_REASONS = (
    "It could be used to cause harm.",
    "It may go against safety guidelines.",
    "Helping with it could put people at risk.",
    "It is not something I can responsibly help with.",
)


def swap_score(seed: int, sample_id: str) -> float:
    """A uniform number in [0, 1) fixed by (seed, sample id) alone: not by shard order, rank or worker."""
    return stable_uniform(seed, sample_id)


@dataclass
class RejectionConfig:
    """How replies are swapped for a rejection (defaults follow the paper)."""

    sentence: str = PAPER_REJECTION
    """The rejection reply (``reply: fixed``), or its first sentence (``reply: reason``)."""
    seed: int = 0
    """Chooses which samples are swapped (and their pool sentence, reason, replacement image)."""
    keep_one_turn: bool = True
    """Keep only one human turn of a swapped sample (the paper's choice)."""
    kept_turn: TurnChoice = "first"
    """The turn ``keep_one_turn`` keeps: the ``first``, or a ``random`` one (fixed by seed and id) that is not a
    "what about" follow-up, as the paper's ``--random_choose`` does."""
    image_first: bool = True
    """Move ``<image>`` to the front of the prompt, followed by a newline (LLaVA's layout)."""
    learn_eos: bool = False
    """Learn the end-of-turn token after a rejection; the paper leaves it out of the loss."""
    reply: Literal["fixed", "pool", "reason"] = "fixed"
    """``fixed``: always ``sentence``; ``pool``: one sentence of ``pool`` per sample; ``reason``: ``sentence``
    followed by one short reason of ``reasons`` per sample."""
    pool: list[str] = field(default_factory=lambda: list(REFUSAL_POOL))
    """Rejection sentences for ``reply: pool``."""
    reasons: list[str] = field(default_factory=lambda: list(REFUSAL_REASONS))
    """Short reasons appended for ``reply: reason``."""
    image: ImageMode = "keep"
    """What a swapped sample with an image shows: ``keep`` its image, a ``blank`` (white) one, uniform ``noise``,
    an ``other`` sample's image, or none (``drop``: the sample becomes text-only)."""
    sources: list[str] | None = None
    """Swap only samples of these sources (names given at conversion); ``null``: any sample."""

    def __post_init__(self) -> None:
        if not self.sentence.strip():
            raise ValueError("rejection sentence must not be empty")
        for name, texts in (("pool", self.pool), ("reasons", self.reasons)):
            if not texts or not all(text.strip() for text in texts):
                raise ValueError(f"rejection.{name} must hold at least one non-empty text, got {texts!r}")
        if self.kept_turn not in get_args(TurnChoice):
            raise ValueError(f"rejection.kept_turn {self.kept_turn!r} is not one of {list(get_args(TurnChoice))}")
        if self.sources is not None and not self.sources:
            raise ValueError("rejection.sources is empty: nothing could be swapped; use null for any source")

    def reply_for(self, sample_id: str) -> str:
        """The rejection reply of one sample."""
        if self.reply == "fixed":
            return self.sentence
        choices = self.pool if self.reply == "pool" else self.reasons
        choice = choices[int(stable_uniform("reply", self.seed, sample_id) * len(choices))]
        if self.reply == "pool":
            return choice
        # the paper's sentence has no final period; a reason after it starts a new sentence
        return f"{self.sentence} {choice}" if self.sentence.rstrip()[-1] in ".!?" else f"{self.sentence}. {choice}"


class RejectionSwap:
    """Decides which samples are swapped and rewrites them.

    With ``ids`` (every eligible sample id, from a shard manifest), exactly ``round(ratio * len(ids))`` samples
    are swapped: those with the smallest :func:`swap_score`. Without, each sample (of ``config.sources``, if set)
    is swapped when its score is below ``ratio``, which matches the fraction in expectation. Both choices are nested
    across ratios. ``donors`` are ``(id, encoded image)`` pairs for ``config.image: other``.
    """

    def __init__(
        self,
        ratio: float,
        config: RejectionConfig,
        ids: Iterable[str] | None = None,
        donors: list[tuple[str, bytes]] | None = None,
    ) -> None:
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"rejection ratio must be in [0, 1], got {ratio}")
        self.ratio = ratio
        self.config = config
        self.chosen: frozenset[str] | None = None
        if ids is not None:
            ranked = sorted(set(ids), key=lambda sample_id: swap_score(config.seed, sample_id))
            self.chosen = frozenset(ranked[: round(ratio * len(ranked))])
        self.ablation = ImageAblation(config.image, config.seed, donors) if ratio > 0 else None

    def is_swapped(self, sample_id: str, source: str | None = None) -> bool:
        if self.chosen is not None:
            return sample_id in self.chosen
        if self.config.sources is not None and source not in self.config.sources:
            return False
        return swap_score(self.config.seed, sample_id) < self.ratio

    def __call__(self, conversation: Conversation) -> Conversation:
        if not self.is_swapped(conversation.id, conversation.source):
            return conversation
        turns = conversation.turns
        if self.config.keep_one_turn:
            index = turn_index(turns, self.config.kept_turn, self.config.seed, conversation.id)
            turns = turns[index : index + 1]
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
        reply = self.config.reply_for(conversation.id)
        swapped = conversation.with_turns(
            tuple((human, reply) for human in humans),
            is_rejection=True,
            learn_end_marker=self.config.learn_eos,
        )
        return self.ablation(swapped)
