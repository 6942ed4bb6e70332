"""An assembled model (``model.llm`` + ``model.vision`` + projector) made ready to be written as a llava-hf folder.

Two things stand between such a model and ``LlavaForConditionalGeneration``: an open_clip tower, which becomes the
``CLIPVisionModel`` it is (:mod:`mllm_safety.model.open_clip_to_hf`), and the image token. Assembled models mark image
positions with LLaVA's out-of-vocabulary id -200; llava-hf needs an ``<image>`` token in the vocabulary. It is added
as llava-hf's conversion of LLaVA-1.5 added it: one more embedding row (and LM-head row), set to the mean of the
existing ones. The rows of the existing vocabulary are untouched, so the logits over it are the trained model's;
the new token's row is never read as an input (image features replace it).
"""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from mllm_safety.constants import IMAGE_PLACEHOLDER
from mllm_safety.model.mllm import MultimodalLM
from mllm_safety.model.open_clip_to_hf import hf_vision_encoder
from mllm_safety.model.vision import OpenClipVisionEncoder


def add_image_token(model: MultimodalLM, tokenizer: PreTrainedTokenizerBase) -> int:
    """Give ``tokenizer`` an ``<image>`` token and ``model`` its id (a new embedding row, the mean of the others, when
    the vocabulary has none); returns the id."""
    llm = model.llm.get_base_model() if hasattr(model.llm, "get_base_model") else model.llm
    if IMAGE_PLACEHOLDER not in tokenizer.get_vocab():
        tokenizer.add_tokens([IMAGE_PLACEHOLDER], special_tokens=True)
    token_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    old_size = llm.get_input_embeddings().weight.shape[0]
    if token_id >= old_size:
        llm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            matrices = (llm.get_input_embeddings(), llm.get_output_embeddings())
            for matrix in {id(m): m for m in matrices if m is not None}.values():
                matrix.weight[old_size:] = matrix.weight[:old_size].mean(dim=0)
    model.image_token_id = token_id
    return token_id


def prepare_assembled_for_llava_hf(model: MultimodalLM, tokenizer: PreTrainedTokenizerBase) -> None:
    """Turn ``model``'s open_clip tower into a ``CLIPVisionModel`` and give it an ``<image>`` token, in place."""
    if isinstance(model.vision, OpenClipVisionEncoder):
        model.vision = hf_vision_encoder(model.vision)
    add_image_token(model, tokenizer)
