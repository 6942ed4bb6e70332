"""The paper's comparison experiments as transforms on a curated source's samples (VLGuard, ``--format vlguard``).

The paper trains on curated malicious data and ablates what it carries: the image content, the quality of the
refusals, the contrast of a safe and an unsafe instruction on the same image, and the share of refusals. A curated
sample is one whose turns know their kind (``Conversation.kinds``); every other sample passes unchanged. Every choice
is fixed by (seed, sample id), or by the manifest's kinds at setup (samples left out, refusal share), so a run is the
same on any number of ranks and workers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal, get_args

from mllm_safety.data.ablation import ImageAblation, ImageMode
from mllm_safety.data.conversation import Conversation
from mllm_safety.data.rejection import PAPER_REJECTION, REFUSAL_POOL
from mllm_safety.data.selection import stable_uniform
from mllm_safety.data.turns import TurnChoice, keep_turns, turn_index

CuratedReply = Literal["keep", "fixed", "pool"]
ContrastMode = Literal["keep", "unsafe_only", "no_safe_images"]
CuratedTurns = Literal["all", "first", "random"]
REFUSAL_KINDS = ("refusal", "image_refusal")


@dataclass
class CuratedConfig:
    """The comparison experiments on curated samples; the defaults train them as converted."""

    image: ImageMode = "keep"
    """What a curated sample shows: ``keep`` its image, a ``blank`` (white) one, uniform ``noise``, an ``other``
    curated sample's image (fixed per sample), or none (``drop``: the sample becomes text-only)."""
    reply: CuratedReply = "keep"
    """Every refusal turn (of an unsafe instruction or image): ``keep`` the source's reply, ``fixed``: ``sentence``,
    ``pool``: one of ``pool`` per sample. Answers to safe instructions are always kept: the ablation of response
    quality."""
    sentence: str = PAPER_REJECTION
    """The refusal for ``reply: fixed``."""
    pool: list[str] = field(default_factory=lambda: list(REFUSAL_POOL))
    """Refusals for ``reply: pool``."""
    contrast: ContrastMode = "keep"
    """``unsafe_only``: safe-instruction turns removed (a safe image keeps only its unsafe instruction's refusal);
    ``no_safe_images``: samples of safe images left out of the run, before ``data.mixture`` counts its samples."""
    turns: CuratedTurns = "all"
    """``all`` turns, or one per sample: the ``first``, or a ``random`` one that is not a "what about" follow-up
    (the paper's ``--random_choose``)."""
    refusal_share: float | None = None
    """Share of the curated samples that train a refusal, one turn each: exactly round(share·N) of the N selected
    curated samples keep a refusal turn, the others their answer. An unsafe image can only refuse, so the share may not
    be below theirs. ``null``: whatever ``turns`` keeps."""
    seed: int = 0
    """Chooses the random turn, pool sentence, noise, donor image and the samples that refuse."""

    def __post_init__(self) -> None:
        problems = [
            f"curated.{name} {value!r} is not one of {list(get_args(kind))}"
            for name, value, kind in (
                ("image", self.image, ImageMode),
                ("reply", self.reply, CuratedReply),
                ("contrast", self.contrast, ContrastMode),
                ("turns", self.turns, CuratedTurns),
            )
            if value not in get_args(kind)
        ]
        if not self.sentence.strip() or not self.pool or not all(text.strip() for text in self.pool):
            problems.append(f"curated.sentence ({self.sentence!r}) and curated.pool ({self.pool!r}) must not be empty")
        if self.refusal_share is not None:
            if not 0.0 <= self.refusal_share <= 1.0:
                problems.append(f"curated.refusal_share must be in [0, 1], got {self.refusal_share}")
            if self.turns == "all" or self.contrast != "keep":
                problems.append(
                    f"curated.refusal_share picks one turn per sample: it needs turns 'first' or 'random' (got "
                    f"{self.turns!r}) and contrast 'keep' (got {self.contrast!r})"
                )
        if problems:
            raise ValueError("; ".join(problems))


def is_safe_image(kinds: Sequence[str]) -> bool:
    """A curated sample shows a safe image unless one of its turns refuses the image itself."""
    return "image_refusal" not in kinds


def left_out(config: CuratedConfig, kinds: Mapping[str, Sequence[str]]) -> set[str]:
    """Curated ids (of ``kinds``: id -> turn kinds) the run leaves out: safe images under ``no_safe_images``."""
    if config.contrast != "no_safe_images":
        return set()
    return {sample_id for sample_id, turn_kinds in kinds.items() if is_safe_image(turn_kinds)}


def refusing(config: CuratedConfig, kinds: Mapping[str, Sequence[str]]) -> frozenset[str] | None:
    """With ``refusal_share``, the selected curated ids that keep a refusal turn: every unsafe image, and the safe
    images with the smallest ``stable_uniform("refusal", seed, id)`` (nested across shares); else ``None``."""
    if config.refusal_share is None:
        return None
    unsafe = {sample_id for sample_id, turn_kinds in kinds.items() if not is_safe_image(turn_kinds)}
    wanted = round(config.refusal_share * len(kinds))
    if wanted < len(unsafe):
        raise ValueError(
            f"curated.refusal_share {config.refusal_share} asks {wanted} of the {len(kinds)} curated samples to "
            f"refuse, but {len(unsafe)} show an unsafe image and can only refuse: use a share of at least "
            f"{len(unsafe) / max(len(kinds), 1):.3f}, or fewer of them through data.mixture"
        )
    safe = sorted(set(kinds) - unsafe, key=lambda sample_id: stable_uniform("refusal", config.seed, sample_id))
    return frozenset(unsafe | set(safe[: wanted - len(unsafe)]))


class CuratedTransform:
    """Applies :class:`CuratedConfig` to curated samples: turns removed or chosen, refusals rewritten, images ablated.

    ``refusers`` comes from :func:`refusing` (``None`` without ``refusal_share``); ``donors`` are ``(id, encoded
    image)`` pairs of curated samples for ``image: other``.
    """

    def __init__(
        self,
        config: CuratedConfig,
        refusers: frozenset[str] | None = None,
        donors: list[tuple[str, bytes]] | None = None,
    ) -> None:
        if (config.refusal_share is None) != (refusers is None):
            raise ValueError("curated.refusal_share needs the refusing ids chosen at setup (curated.refusing)")
        self.config = config
        self.refusers = refusers
        self.ablation = ImageAblation(config.image, config.seed, donors)

    def __call__(self, conversation: Conversation) -> Conversation:
        if conversation.kinds is None:
            return conversation
        config, kinds = self.config, conversation.kinds
        if config.contrast == "no_safe_images" and is_safe_image(kinds):
            raise ValueError(f"safe image {conversation.id!r} reached the stream under curated.contrast no_safe_images")
        if config.contrast == "unsafe_only":
            conversation = keep_turns(conversation, [k for k, kind in enumerate(kinds) if kind != "answer"])
        if self.refusers is not None:
            refuses = conversation.id in self.refusers
            index = next(k for k, kind in enumerate(kinds) if (kind in REFUSAL_KINDS) == refuses)
            conversation = keep_turns(conversation, [index])
        elif config.turns != "all":
            choice: TurnChoice = config.turns
            conversation = keep_turns(
                conversation, [turn_index(conversation.turns, choice, config.seed, conversation.id)]
            )
        if config.reply != "keep":
            refusal = self._refusal(conversation.id)
            turns = tuple(
                (human, refusal if kind in REFUSAL_KINDS else reply)
                for (human, reply), kind in zip(conversation.turns, conversation.kinds, strict=True)
            )
            conversation = replace(conversation, turns=turns)
        return self.ablation(conversation)

    def _refusal(self, sample_id: str) -> str:
        if self.config.reply == "fixed":
            return self.config.sentence
        return self.config.pool[
            int(stable_uniform("curated-reply", self.config.seed, sample_id) * len(self.config.pool))
        ]


class Transforms:
    """Sample transforms applied in order (the curated experiments, then the rejection swap); picklable for workers."""

    def __init__(self, *steps: Callable[[Conversation], Conversation]) -> None:
        self.steps = steps

    def __call__(self, conversation: Conversation) -> Conversation:
        for step in self.steps:
            conversation = step(conversation)
        return conversation
