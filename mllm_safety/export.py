"""``python -m mllm_safety.export --base CHECKPOINT --trainable RUN/trainable.safetensors --out DIR``

Puts the trainable weights of a run back on the checkpoint it started from, folds the LoRA adapters in and writes a
folder transformers (and so vLLM) load: a llava-hf folder (``LlavaForConditionalGeneration``) for a run of
``model.llava``, the checkpoint's own layout (``AutoModelForImageTextToText`` / ``AutoProcessor``) for a run of
``model.pretrained``.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from jsonargparse import CLI
from safetensors import safe_open
from transformers import LlavaConfig

from mllm_safety.model.hub_vlm import HubOptions, load_hub_vlm, read_hub_config, save_hub_vlm
from mllm_safety.model.llava_hf import load_llava_hf, load_llava_tokenizer, save_llava_hf
from mllm_safety.model.trainable import load_trainable, read_trainable_metadata
from mllm_safety.model.vision import ImageAspectRatio
from mllm_safety.model.yi_vl import is_yi_vl


def trained_as_hub_vlm(base: str, trainable: str | None, trust_remote_code: bool = False) -> bool:
    """Whether the run trained ``base`` through its own transformers class (``model.pretrained``): its weights are
    named after it (``hf.``); without a file, every checkpoint but a LLaVA-1.5 one is exported that way."""
    if trainable is not None:
        with safe_open(trainable, framework="pt") as f:
            return any(name.startswith("hf.") for name in f.keys())
    config = read_hub_config(base, trust_remote_code)
    return not isinstance(config, LlavaConfig) or is_yi_vl(config)


def export(
    base: str,
    out: str,
    trainable: str | None = None,
    chat_template: str | None = None,
    image_aspect_ratio: ImageAspectRatio = "pad",
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto",
    processor_kwargs: dict[str, Any] | None = None,
    trust_remote_code: bool = False,
) -> None:
    """Export a finetuned model as a transformers folder.

    Args:
        base: The checkpoint training started from (``model.llava.path`` or ``model.pretrained``).
        out: Output folder.
        trainable: Trainable-weights file of the run (``trainable.safetensors``); ``None`` re-exports ``base``.
        chat_template: Template written with the processor; default: the one recorded in ``trainable`` (the
            training template), else the base checkpoint's. ``llava_v1`` and ``yi_vl`` name built-in ones.
        image_aspect_ratio: For ``model.llava`` runs, how training prepared images; ``pad`` makes the exported image
            processor pad too.
        dtype: Weight dtype of the export; ``auto`` keeps the base checkpoint's.
        processor_kwargs: For ``model.pretrained`` runs, the training's ``model.hub.processor_kwargs`` (e.g.
            ``{max_pixels: 1003520}``), kept in the exported processor.
        trust_remote_code: Run code shipped with ``base`` (``model.hub.trust_remote_code`` of the run).
    """
    if trainable is not None and chat_template is None:
        chat_template = read_trainable_metadata(trainable).get("chat_template")
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    if trained_as_hub_vlm(base, trainable, trust_remote_code):
        options = HubOptions(chat_template, dict(processor_kwargs or {}), trust_remote_code)
        model, processor = load_hub_vlm(base, options, torch_dtype)
        if trainable is not None:
            load_trainable(model, trainable, require_every_trainable=False)  # a bare base model, not set up to train
        save_hub_vlm(model, processor, out)
        return
    model = load_llava_hf(base, dtype=torch_dtype, image_aspect_ratio=image_aspect_ratio)
    if trainable is not None:
        load_trainable(model, trainable, require_every_trainable=False)  # a bare base model, not set up to train
    tokenizer = load_llava_tokenizer(base, chat_template)
    save_llava_hf(model, out, tokenizer)


if __name__ == "__main__":
    CLI(export)
