"""Constants every layer shares (data, model, evaluation, train), so that none has to import another for them."""

from __future__ import annotations

import os
from pathlib import Path

IGNORE_INDEX = -100
"""Label of positions that carry no loss: prompts, image tokens, padding."""

IMAGE_TOKEN_ID = -200
"""Input id of each image position of the assembled model (LLaVA's ``IMAGE_TOKEN_INDEX``): outside every
vocabulary, so no embedding row is added to the LLM; the positions are filled with projected image features before
the LLM sees them."""

WORD_SLOT_ID = -201
"""Input id of each image-slot position that a word fills instead of an image (the ``img2text`` probe,
``mllm_safety.data.image_slot``): outside every vocabulary like ``IMAGE_TOKEN_ID``; the model's splice replaces it by
the word's own id before embedding."""

IMAGE_PLACEHOLDER = "<image>"
"""Where the image goes in a conversation's text (LLaVA's layout)."""


def cache_dir() -> Path:
    """Where converted models and generated data are kept (``$MLLM_SAFETY_CACHE``, default
    ``~/.cache/mllm_safety``)."""
    return Path(os.environ.get("MLLM_SAFETY_CACHE", Path.home() / ".cache" / "mllm_safety"))
