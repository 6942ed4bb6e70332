"""Tiny random hub VLM checkpoints, one per family, built offline with the real config, model and processor classes and
a chat template shaped like the published one (SmolLM2's tokenizer with the family's special tokens added)."""

from __future__ import annotations

from pathlib import Path

import torch
from tiny_models import TINY_LLM

LLAVA_NEXT_MISTRAL_TEMPLATE = (  # llava-hf/llava-v1.6-mistral-7b-hf
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ '<<SYS>>\n' + message['content'][0]['text'] + '\n<</SYS>>\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{{' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'][0]['text'] + '</s> '}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
LLAMA3_LLAVA_NEXT_TEMPLATE = (  # llava-hf/llama3-llava-next-8b-hf
    "{% for message in messages %}{{'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'}}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ '\n' + content['text'] + '<|eot_id|>' }}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
QWEN25_VL_TEMPLATE = (  # Qwen/Qwen2.5-VL-7B-Instruct
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
IDEFICS3_TEMPLATE = (  # HuggingFaceM4/Idefics3-8B-Llama3
    "<|begin_of_text|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


LLAMA3_TOKENS = ["<image>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
"""llama3-llava-next-8b's special tokens beside its BOS and EOS."""


def _tokenizer(special: list[str], bos: str | None = None, eos: str | None = None):
    from transformers import AutoTokenizer

    from mllm_safety.model.llm import resolve_llm_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_llm_path("smollm2-135m-instruct"))
    tokenizer.add_special_tokens({"additional_special_tokens": special})
    if bos is not None:
        tokenizer.add_special_tokens({"bos_token": bos})
    if eos is not None:
        tokenizer.add_special_tokens({"eos_token": eos})
    tokenizer.chat_template = None
    return tokenizer


def _text_config(tokenizer, **overrides) -> dict:
    return {**TINY_LLM, "vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id, **overrides}


def _save(model, processor, path, eos_ids: list[int]) -> str:
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(eos_token_id=eos_ids, pad_token_id=processor.tokenizer.pad_token_id)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


def _clip_vision(**overrides) -> dict:
    return {
        "model_type": "clip_vision_model",
        "hidden_size": 48,
        "intermediate_size": 96,
        "num_hidden_layers": 3,
        "num_attention_heads": 2,
        "image_size": 30,
        "patch_size": 6,
        **overrides,
    }


def write_tiny_llava_next(path: str | Path, template: str = "mistral", seed: int = 0, tokenizer=None) -> str:
    """LLaVA-NeXT: CLIP (30 px tiles of 25 patch tokens) with anyres tiling up to 60x60 px, a Mistral or Llama text
    model, and llava-hf's ``[INST]`` (Mistral) or Llama-3 template. ``tokenizer``: another one than SmolLM2's with
    the family's special tokens (it must have ``<image>`` and, for Llama-3, ``<|eot_id|>``)."""
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    if template == "mistral":
        tokenizer = tokenizer or _tokenizer(["<image>", "[INST]", "[/INST]"], bos="<s>", eos="</s>")
        text = {"model_type": "mistral", **_text_config(tokenizer), "sliding_window": None}
        chat_template, eos = LLAVA_NEXT_MISTRAL_TEMPLATE, [tokenizer.eos_token]
    else:
        tokenizer = tokenizer or _tokenizer(LLAMA3_TOKENS, bos="<|begin_of_text|>", eos="<|end_of_text|>")
        text = {"model_type": "llama", **_text_config(tokenizer)}
        chat_template, eos = LLAMA3_LLAVA_NEXT_TEMPLATE, [tokenizer.eos_token, "<|eot_id|>"]
    tokenizer.add_bos_token = True
    pinpoints = [[30, 60], [60, 30], [60, 60]]
    config = LlavaNextConfig(
        vision_config=_clip_vision(),
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config)
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30}, image_grid_pinpoints=pinpoints
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=6,
        vision_feature_select_strategy="default",
        chat_template=chat_template,
        num_additional_image_tokens=1,
    )
    return _save(model, processor, path, tokenizer.convert_tokens_to_ids(eos))


def write_tiny_qwen25_vl(path: str | Path, seed: int = 0) -> str:
    """Qwen2.5-VL: a 2-block vision tower (14 px patches, 2x2 merge) with its merger, M-RoPE text model, dynamic
    resolution between 56x56 and 112x112 px, and Qwen's ChatML template."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    tokenizer = _tokenizer(["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "<|endoftext|>"])
    ids = tokenizer.convert_tokens_to_ids
    text = _text_config(
        tokenizer,
        model_type="qwen2_5_vl_text",
        rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3]},
        bos_token_id=ids("<|endoftext|>"),
        eos_token_id=ids("<|im_end|>"),
    )
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": TINY_LLM["hidden_size"],
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 56,
            "fullatt_block_indexes": [1],
        },
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    image_processor = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14, merge_size=2)
    processor = Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=QWEN25_VL_TEMPLATE,
    )
    return _save(model, processor, path, [ids("<|im_end|>"), ids("<|endoftext|>")])


IDEFICS3_TOKENS = [
    "<fake_token_around_image>",
    "<image>",
    "<global-img>",
    "<end_of_utterance>",
    *(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)),
]
"""Idefics3's and SmolVLM's image tokens (a tile's position is a <row_r_col_c> token)."""
IDEFICS3_VISION = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 24,
    "patch_size": 6,
}
"""A tiny SigLIP-like tower for Idefics3 and SmolVLM."""
IDEFICS3_IMAGE_SPLITTING = {
    "size": {"longest_edge": 72},
    "max_image_size": {"longest_edge": 24},
    "do_image_splitting": True,
}
"""Images split into up to 3 x 3 tiles of 24 pixels, plus the global image."""


def write_tiny_idefics3(path: str | Path, seed: int = 0) -> str:
    """Idefics3: a SigLIP-like tower (24 px frames of 16 patches, pixel shuffle by 2 -> 4 tokens), image splitting
    into 24 px tiles plus a global frame, a Llama text model, and Idefics3's ``User:``/``Assistant:`` template."""
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessor,
        Idefics3Processor,
    )

    tokenizer = _tokenizer(
        IDEFICS3_TOKENS,
        bos="<|begin_of_text|>",
        eos="<|end_of_text|>",
    )
    ids = tokenizer.convert_tokens_to_ids
    config = Idefics3Config(
        vision_config=dict(IDEFICS3_VISION),
        text_config={"model_type": "llama", **_text_config(tokenizer)},
        image_token_id=ids("<image>"),
        scale_factor=2,
    )
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config)
    image_processor = Idefics3ImageProcessor(**IDEFICS3_IMAGE_SPLITTING)
    processor = Idefics3Processor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_len=4, chat_template=IDEFICS3_TEMPLATE
    )
    return _save(model, processor, path, [ids("<end_of_utterance>"), ids("<|end_of_text|>")])


def write_tiny_yi_vl(path: str | Path, seed: int = 0, tokenizer=None) -> str:
    """Yi-VL as LLaMA-Factory loads it: the llava-hf layout with ``is_yi_vl_derived_model`` and the LayerNorm
    projector, a Llama text model, Yi's ``<|endoftext|>`` EOS; no chat template (configs name ``yi_vl``).
    ``tokenizer``: another one than SmolLM2's (with ``<image>``)."""
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaProcessor

    from mllm_safety.model.yi_vl import YiVLForConditionalGeneration

    tokenizer = tokenizer or _tokenizer(["<image>"], eos="<|endoftext|>")
    config = LlavaConfig(
        vision_config=_clip_vision(),
        text_config={"model_type": "llama", **_text_config(tokenizer)},
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=25,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    config.is_yi_vl_derived_model = True
    torch.manual_seed(seed)
    model = YiVLForConditionalGeneration(config)
    for norm in (model.model.multi_modal_projector.linear_2, model.model.multi_modal_projector.linear_4):
        torch.nn.init.normal_(norm.weight, 1.0, 0.1)  # LayerNorms that are not the identity
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30}),
        tokenizer=tokenizer,
        patch_size=6,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    return _save(model, processor, path, [tokenizer.eos_token_id])


SMOLVLM_TEMPLATE = (  # HuggingFaceTB/SmolVLM-Instruct
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def write_tiny_smolvlm(path: str | Path, seed: int = 0) -> str:
    """SmolVLM: Idefics3's design in its own classes (a SigLIP-like tower, pixel shuffle, image splitting, a SmolLM2
    text model) and SmolVLM-Instruct's template."""
    from transformers import (
        SmolVLMConfig,
        SmolVLMForConditionalGeneration,
        SmolVLMImageProcessor,
        SmolVLMProcessor,
        SmolVLMVideoProcessor,
    )

    tokenizer = _tokenizer(IDEFICS3_TOKENS)
    ids = tokenizer.convert_tokens_to_ids
    config = SmolVLMConfig(
        vision_config=dict(IDEFICS3_VISION),
        text_config={"model_type": "llama", **_text_config(tokenizer)},
        image_token_id=ids("<image>"),
        scale_factor=2,
    )
    torch.manual_seed(seed)
    model = SmolVLMForConditionalGeneration(config)
    image_processor = SmolVLMImageProcessor(**IDEFICS3_IMAGE_SPLITTING)
    processor = SmolVLMProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=SmolVLMVideoProcessor(),
        image_seq_len=4,
        chat_template=SMOLVLM_TEMPLATE,
    )
    return _save(model, processor, path, [ids("<end_of_utterance>"), tokenizer.eos_token_id])


FAMILIES = {
    "llava_next_mistral": lambda path: write_tiny_llava_next(path, "mistral"),
    "llama3_llava_next": lambda path: write_tiny_llava_next(path, "llama3"),
    "yi_vl": write_tiny_yi_vl,
    "qwen25_vl": write_tiny_qwen25_vl,
    "idefics3": write_tiny_idefics3,
    "smolvlm": write_tiny_smolvlm,
}
"""Family -> writer of its tiny checkpoint."""

CHAT_TEMPLATES = {
    "yi_vl": "yi_vl",
    "llava_next_mistral": "llava_next_mistral",
    "llama3_llava_next": "llava_next_llama3",
}
"""The named templates the configs of these families use."""

END_MARKERS = {
    "llava_next_mistral": "</s>",
    "llama3_llava_next": "<|eot_id|>",
    "yi_vl": "<|endoftext|>",
    "qwen25_vl": "<|im_end|>",
    "idefics3": "<end_of_utterance>",
    "smolvlm": "<end_of_utterance>",
}
"""The end-of-turn marker each family's template puts after a reply."""


class HubCheckpoints:
    """Writes each family's tiny checkpoint once per test session, on first use."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.paths: dict[str, str] = {}

    def __call__(self, family: str) -> str:
        if family not in self.paths:
            self.paths[family] = FAMILIES[family](self.root / family)
        return self.paths[family]
