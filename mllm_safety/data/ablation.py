"""Image transforms for the paper's comparison experiments on rejection samples: what if the image is blank, noise,
another sample's, or absent? Every choice is fixed by (seed, sample id), so runs are reproducible on any layout."""

from __future__ import annotations

import io
from dataclasses import replace
from typing import Literal

import numpy as np
from PIL import Image

from mllm_safety.constants import IMAGE_PLACEHOLDER
from mllm_safety.data.conversation import Conversation
from mllm_safety.data.selection import stable_uniform

ImageMode = Literal["keep", "blank", "noise", "other", "drop"]
BLANK_COLOUR = (255, 255, 255)


class ImageAblation:
    """Replaces or removes the image of a conversation; samples without an image are left as they are.

    ``donors`` are ``(sample id, encoded image)`` pairs for mode ``other``: each sample gets the donor at a fixed
    position given by (seed, id), skipping its own image.
    """

    def __init__(self, mode: ImageMode, seed: int, donors: list[tuple[str, bytes]] | None = None) -> None:
        if mode == "other" and len(donors or []) < 2:
            raise ValueError("image mode 'other' needs at least two donor images from the data; found fewer")
        self.mode = mode
        self.seed = seed
        self.donors = donors or []
        self._decoded: dict[int, Image.Image] = {}

    def __call__(self, conversation: Conversation) -> Conversation:
        image = conversation.image
        if self.mode == "keep" or image is None:
            return conversation
        if self.mode == "drop":
            turns = tuple((_without_placeholder(human), reply) for human, reply in conversation.turns)
            return replace(conversation, turns=turns, image=None)
        if self.mode == "blank":
            return replace(conversation, image=Image.new("RGB", image.size, BLANK_COLOUR))
        if self.mode == "noise":
            rng = np.random.default_rng(int(stable_uniform("noise", self.seed, conversation.id) * 2**63))
            pixels = rng.integers(0, 256, size=(image.size[1], image.size[0], 3), dtype=np.uint8)
            return replace(conversation, image=Image.fromarray(pixels, "RGB"))
        return replace(conversation, image=self._donor(conversation.id))

    def _donor(self, sample_id: str) -> Image.Image:
        index = int(stable_uniform("donor", self.seed, sample_id) * len(self.donors))
        if self.donors[index][0] == sample_id:
            index = (index + 1) % len(self.donors)
        if index not in self._decoded:
            with Image.open(io.BytesIO(self.donors[index][1])) as donor:
                self._decoded[index] = donor.convert("RGB")
        return self._decoded[index]


def _without_placeholder(human: str) -> str:
    return human.replace(f"{IMAGE_PLACEHOLDER}\n", "").replace(IMAGE_PLACEHOLDER, "").strip()
