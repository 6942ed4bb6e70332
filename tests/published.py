"""The published processor files of hub checkpoints (tests/fixtures/published, see its README.md), put into the
folders of the tiny test checkpoints, and a sample with a COCO-sized image."""

from __future__ import annotations

import shutil
from pathlib import Path

from PIL import Image

from mllm_safety.data.conversation import Conversation, parse_llava_record

FIXTURES = Path(__file__).parent / "fixtures" / "published"
COCO_SIZES = [(640, 480), (640, 427), (480, 640), (500, 375), (800, 600)]
"""COCO (landscape and portrait), Visual Genome / GQA sizes of the LLaVA mix665k images."""


def use_published_processor(folder: str | Path, checkpoint: str) -> None:
    """Replace the processor files of a checkpoint folder with ``checkpoint``'s published ones, in its layout (a
    ``preprocessor_config.json`` beside the processor's own attributes, not today's nested ``processor_config.json``);
    the tokenizer and chat template stay."""
    folder = Path(folder)
    (folder / "processor_config.json").unlink(missing_ok=True)
    for path in (FIXTURES / checkpoint.replace("/", "--")).glob("*.json"):
        shutil.copy(path, folder / path.name)


def coco_sample(size: tuple[int, int] = (640, 480)) -> Conversation:
    """A one-turn LLaVA sample with a ``size`` (width, height) photo-sized image."""
    record = {
        "id": f"coco-{size[0]}x{size[1]}",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is the man holding, and why?"},
            {"from": "gpt", "value": "He is holding an umbrella to keep the rain off while he waits for the bus."},
        ],
    }
    return parse_llava_record(record, Image.new("RGB", size, "gray"))
