"""Yi-VL in the llava-hf layout, with its LayerNorm projector as LLaMA-Factory loads it.

Yi-VL's converted checkpoints (e.g. ``BUAADreamer/Yi-VL-6B-hf``) are ``LlavaForConditionalGeneration`` folders whose
``config.json`` sets ``is_yi_vl_derived_model: true`` and whose projector is Linear -> LayerNorm -> GELU -> Linear ->
LayerNorm (weights ``linear_1`` .. ``linear_4``). LLaMA-Factory (which the paper used for Yi-VL) swaps transformers'
projector class for ``LlavaMultiModalProjectorForYiVL``; here a subclass does the same without patching transformers.

The published folders predate transformers 5: their weights are named as ``LlavaForConditionalGeneration`` named them
then (``language_model.model.*``, ``language_model.lm_head.*``, ``vision_tower.vision_model.*``,
``multi_modal_projector.*`` at the top). transformers renames those for its own classes only, so the subclass
registers llava's renaming under its class name. A folder this class writes is a ``LlavaForConditionalGeneration``
folder with ``is_yi_vl_derived_model: true`` (:func:`save_as_llava_config`).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlavaConfig, LlavaForConditionalGeneration
from transformers.activations import ACT2FN
from transformers.conversion_mapping import (
    get_checkpoint_conversion_mapping,
    register_checkpoint_conversion_mapping,
)

YI_VL_FLAG = "is_yi_vl_derived_model"
"""The config key that marks Yi-VL's LayerNorm projector (LLaMA-Factory's ``llava`` loader reads it)."""


def is_yi_vl(config) -> bool:
    return bool(getattr(config, YI_VL_FLAG, False))


class YiVLProjector(nn.Module):
    """Linear -> LayerNorm -> activation -> Linear -> LayerNorm, LLaMA-Factory's ``LlavaMultiModalProjectorForYiVL``."""

    def __init__(self, config: LlavaConfig) -> None:
        super().__init__()
        vision, text = config.vision_config.hidden_size, config.text_config.hidden_size
        self.linear_1 = nn.Linear(vision, text, bias=True)
        self.linear_2 = nn.LayerNorm(text, bias=True)
        self.linear_3 = nn.Linear(text, text, bias=True)
        self.linear_4 = nn.LayerNorm(text, bias=True)
        self.act = ACT2FN[config.projector_hidden_act]

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        hidden = self.act(self.linear_2(self.linear_1(image_features)))
        return self.linear_4(self.linear_3(hidden))


class YiVLForConditionalGeneration(LlavaForConditionalGeneration):
    """``LlavaForConditionalGeneration`` with Yi-VL's projector; loads and saves Yi-VL's llava-hf folders."""

    def __init__(self, config: LlavaConfig) -> None:
        super().__init__(config)
        self.model.multi_modal_projector = YiVLProjector(config)


def save_as_llava_config(config: LlavaConfig, path) -> None:
    """Write ``config.json`` naming ``LlavaForConditionalGeneration``, as the published Yi-VL folders do, with the
    ``is_yi_vl_derived_model`` flag: transformers and vLLM know that class, and LLaMA-Factory (its transformers and
    its vLLM engine alike) swaps in Yi-VL's projector on the flag. The class name this module defines is known to
    no loader."""
    if not is_yi_vl(config):
        raise ValueError(f"a Yi-VL config has {YI_VL_FLAG}: true; this one does not")
    config.architectures = [LlavaForConditionalGeneration.__name__]
    config.save_pretrained(path)


# transformers skips its key renaming for classes defined outside it unless the class name is registered.
register_checkpoint_conversion_mapping(
    YiVLForConditionalGeneration.__name__, get_checkpoint_conversion_mapping("llava"), overwrite=True
)
