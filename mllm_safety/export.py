"""``python -m mllm_safety.export --base llava-hf/llava-1.5-7b-hf --trainable RUN/trainable.safetensors --out DIR``

Puts the trainable weights of a run back on the llava-hf checkpoint it started from, folds the LoRA adapters in and
writes a llava-hf folder that transformers' ``LlavaForConditionalGeneration`` / ``AutoProcessor`` and vLLM load.
"""

from __future__ import annotations

from typing import Literal

import torch
from jsonargparse import CLI

from mllm_safety.model.llava_hf import load_llava_hf, load_llava_tokenizer, save_llava_hf
from mllm_safety.model.trainable import load_trainable, read_trainable_metadata
from mllm_safety.model.vision import ImageAspectRatio


def export(
    base: str,
    out: str,
    trainable: str | None = None,
    chat_template: str | None = None,
    image_aspect_ratio: ImageAspectRatio = "pad",
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto",
) -> None:
    """Export a finetuned model as a llava-hf folder.

    Args:
        base: The llava-hf checkpoint training started from (folder or hub name).
        out: Output folder.
        trainable: Trainable-weights file of the run (``trainable.safetensors``); ``None`` re-exports ``base``.
        chat_template: Template written with the tokenizer; default: the one recorded in ``trainable`` (the
            training template), else the base checkpoint's. ``llava_v1`` names LLaVA-1.5's training format.
        image_aspect_ratio: How training prepared images; ``pad`` makes the exported image processor pad too.
        dtype: Weight dtype of the export; ``auto`` keeps the base checkpoint's.
    """
    if chat_template is None and trainable is not None:
        chat_template = read_trainable_metadata(trainable).get("chat_template")
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    model = load_llava_hf(base, dtype=torch_dtype, image_aspect_ratio=image_aspect_ratio)
    if trainable is not None:
        load_trainable(model, trainable, require_every_trainable=False)  # a bare base model, not set up to train
    tokenizer = load_llava_tokenizer(base, chat_template)
    save_llava_hf(model, out, tokenizer)


if __name__ == "__main__":
    CLI(export)
