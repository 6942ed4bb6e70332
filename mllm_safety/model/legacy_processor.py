"""Processor settings that LLaVA-style folders written before transformers 4.47 lack, taken from the model.

Before 4.47 the model expanded the ``<image>`` token itself; since then the processor does, and needs ``patch_size``,
``vision_feature_select_strategy`` and ``num_additional_image_tokens`` (processor_config.json). Folders uploaded
earlier and never updated (``BUAADreamer/Yi-VL-6B-hf``, which the paper's Yi-VL runs start from) have none of them,
and transformers then fails on the first image, inside a data worker. LLaMA-Factory sets the first two on the processor
from the model config (``patch_processor``); here the third comes from the vision tower itself (one extra token when
it has a class embedding, as CLIP does; none for SigLIP). What cannot be derived stops the load with its name.
"""

from __future__ import annotations

import logging

from transformers import PreTrainedModel

log = logging.getLogger(__name__)

LEGACY_SETTINGS = ("patch_size", "vision_feature_select_strategy", "num_additional_image_tokens")


def complete_legacy_processor(processor, model: PreTrainedModel, path: str) -> dict[str, object]:
    """Fill the settings a pre-4.47 LLaVA-style ``processor`` lacks (recognised by ``patch_size`` unset; the three were
    added together) from ``model``; returns what was filled. Other processors are left alone."""
    if not all(hasattr(processor, name) for name in LEGACY_SETTINGS) or processor.patch_size is not None:
        return {}
    config = model.config
    filled = {
        "patch_size": getattr(getattr(config, "vision_config", None), "patch_size", None),
        "vision_feature_select_strategy": processor.vision_feature_select_strategy
        or getattr(config, "vision_feature_select_strategy", None),
        "num_additional_image_tokens": _extra_vision_tokens(model),
    }
    for name, value in filled.items():
        if value is None:
            raise ValueError(
                f"{path!r}: the processor predates transformers 4.47 and has no {name}, and the model config does not "
                f"give it; add {name} to the folder's processor_config.json"
            )
        setattr(processor, name, value)
    log.info("%s: processor settings taken from the model (pre-4.47 processor): %s", path, filled)
    return filled


def _extra_vision_tokens(model: PreTrainedModel) -> int | None:
    """Tokens the vision tower puts before its patch tokens: 1 with a class embedding (CLIP), else 0 (SigLIP)."""
    try:
        tower = model.get_submodule("model.vision_tower")
    except AttributeError:
        return None
    embeddings = getattr(tower, "embeddings", None) or getattr(getattr(tower, "vision_model", None), "embeddings", None)
    if embeddings is None:
        return None
    return 1 if getattr(embeddings, "class_embedding", None) is not None else 0
