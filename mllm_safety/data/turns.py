"""Keeping some turns of a conversation: the first, or the paper's random turn that is not a "what about" follow-up.

The paper's ``utils/mix_rejection_data.py --random_choose`` keeps one random human/assistant turn, drawing again while
the prompt contains "what about" (a follow-up that needs the turns before it), and puts ``<image>\\n`` in front.
Here the draw is fixed by (seed, sample id), so it is the same on any rank or worker.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Literal

from mllm_safety.constants import IMAGE_PLACEHOLDER
from mllm_safety.data.conversation import Conversation
from mllm_safety.data.selection import stable_uniform

TurnChoice = Literal["first", "random"]
FOLLOW_UP = "what about"
"""A prompt containing this (any case) is a follow-up the paper's random choice never keeps."""


def turn_index(turns: Sequence[tuple[str, str]], choice: TurnChoice, seed: int, sample_id: str) -> int:
    """The turn to keep: the first, or a random one that is not a follow-up (any turn when all of them are)."""
    if choice == "first":
        return 0
    eligible = [k for k, (human, _) in enumerate(turns) if FOLLOW_UP not in human.lower()] or list(range(len(turns)))
    return eligible[int(stable_uniform("turn", seed, sample_id) * len(eligible))]


def keep_turns(conversation: Conversation, indices: Sequence[int]) -> Conversation:
    """The turns at ``indices`` (ascending) with their kinds; a sample with an image gets ``<image>\\n`` leading its
    first kept prompt, wherever the placeholder was (LLaVA's layout; the paper's one-turn samples have it)."""
    if not indices:
        raise ValueError(f"sample {conversation.id!r}: no turn left to keep")
    turns = [conversation.turns[k] for k in indices]
    if conversation.image is not None:
        turns = [(human.replace(IMAGE_PLACEHOLDER, "").strip(), reply) for human, reply in turns]
        turns[0] = (f"{IMAGE_PLACEHOLDER}\n{turns[0][0]}", turns[0][1])
    kinds = None if conversation.kinds is None else tuple(conversation.kinds[k] for k in indices)
    return replace(conversation, turns=tuple(turns), kinds=kinds)
