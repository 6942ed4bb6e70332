"""The Qwen2.5-VL-7B shape for benchmarks/gpu_throughput.py: a hub VLM built from the published architecture
(configs/architectures/qwen2.5_vl_7b.json) with random weights, trained through ``model.pretrained`` like a
downloaded checkpoint, and synthetic batches of its inputs (patch rows, ``image_grid_thw``, ``mm_token_type_ids``)."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer, Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

from mllm_safety.constants import IGNORE_INDEX
from mllm_safety.data.processor import Batch
from mllm_safety.model.hub_vlm import HubOptions
from mllm_safety.model.llm import resolve_llm_path
from mllm_safety.train.module import LoraSettings, OptimSettings, SafetyAlignModule, TrainableParts

ARCHITECTURE = Path(__file__).parents[1] / "configs" / "architectures" / "qwen2.5_vl_7b.json"
TINY = {
    "model_type": "qwen2_5_vl",
    "text_config": {
        "model_type": "qwen2_5_vl_text",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 1024,
        "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3]},
    },
    "vision_config": {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64},
    "image_token_id": 1001,
    "video_token_id": 1002,
    "vision_start_token_id": 1003,
    "vision_end_token_id": 1004,
}
SPECIAL = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write_folder(architecture: dict) -> str:
    """A checkpoint folder without weights: the architecture's config.json and a Qwen2.5-VL processor (SmolLM2's
    tokenizer with Qwen's vision tokens: the batches are synthetic ids, only the model's token ids matter)."""
    folder = tempfile.mkdtemp(prefix="qwen25-vl-shape-")
    spec = dict(architecture)
    AutoConfig.for_model(spec.pop("model_type"), **spec).save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(resolve_llm_path("smollm2-135m-instruct"))
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL})
    image_processor = Qwen2VLImageProcessor()
    processor = Qwen2_5_VLProcessor(image_processor, tokenizer, Qwen2VLVideoProcessor(), chat_template=CHATML)
    processor.save_pretrained(folder)
    return folder


def build_module(tiny: bool, seq_len: int, lora_r: int, gradient_checkpointing: bool) -> SafetyAlignModule:
    """The model, on the current default device (random weights made in place, nothing read)."""
    architecture = TINY if tiny else json.loads(ARCHITECTURE.read_text())
    return SafetyAlignModule(
        pretrained=write_folder(architecture),
        hub=HubOptions(load_weights=False),
        max_length=seq_len,
        lora=LoraSettings(r=lora_r, alpha=2 * lora_r, dropout=0.05),
        trainable=TrainableParts(vision=False, projector=False, llm=False),
        optim=OptimSettings(lr=2e-4),
        gradient_checkpointing=gradient_checkpointing,
    )


def synthetic_batches(
    module: SafetyAlignModule, num_batches: int, batch_size: int, seq_len: int, image_px: int
) -> list[Batch]:
    """Samples of exactly ``seq_len`` tokens: 6 prompt tokens, one ``image_px`` square image, a question, a reply
    (the last 40% of the text after the image, carrying the loss)."""
    config = module.model.hf.config
    merge = config.vision_config.spatial_merge_size
    grid = image_px // config.vision_config.patch_size
    patches, tokens = grid * grid, grid * grid // merge**2
    text = seq_len - tokens
    if text < 16:
        raise ValueError(f"--seq_len {seq_len} leaves no room for text after {tokens} image tokens")
    reply_start = tokens + 6 + int(0.6 * (text - 6))
    channels = 3 * config.vision_config.temporal_patch_size * config.vision_config.patch_size**2
    text_vocab = min(config.text_config.vocab_size, config.image_token_id - 8)  # no special token among the text
    generator = torch.Generator().manual_seed(0)
    batches = []
    for index in range(num_batches):
        ids = torch.randint(3, text_vocab, (batch_size, seq_len), generator=generator)
        ids[:, 6 : 6 + tokens] = config.image_token_id
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[:, reply_start:] = ids[:, reply_start:]
        extra = {
            "image_grid_thw": torch.tensor([[1, grid, grid]] * batch_size),
            "mm_token_type_ids": (ids == config.image_token_id).long(),
        }
        pixels = torch.randn((batch_size * patches, channels), generator=generator)
        names = [f"synthetic-{index}-{row}" for row in range(batch_size)]
        batches.append(Batch(names, ids, torch.ones_like(ids), labels, pixels, extra))
    return batches


@dataclass
class FlopCount:
    per_sample: float
    reply_tokens_per_sample: int
    image_tokens_per_sample: int


def count_model_flops(module: SafetyAlignModule, batch: Batch) -> FlopCount:
    """Model FLOPs of one sample (as gpu_throughput.py counts them): per LLM token 4 x frozen + 6 x trainable weights
    and 12 x layers x hidden x sequence for attention; the LM head for reply positions; the frozen vision tower and
    merger forward only (nothing before them learns), with windowed attention in all blocks but the full ones."""
    model = module.model
    hf = model.hf
    parts = model.parameter_parts()
    embeddings = {id(hf.get_input_embeddings().weight), id(hf.get_output_embeddings().weight)}
    frozen = trainable = vision = merger = 0
    for name, param in model.named_parameters():
        if param.dim() < 2 or id(param) in embeddings:
            continue
        if parts[name] == "vision":
            vision += param.numel()
        elif parts[name] == "projector":
            merger += param.numel()
        elif param.requires_grad:
            trainable += param.numel()
        else:
            frozen += param.numel()
    text, visual = hf.config.text_config, hf.config.vision_config
    seq_len = batch.input_ids.shape[1]
    reply_tokens = int((batch.labels[0, 1:] != IGNORE_INDEX).sum())
    llm = seq_len * (4 * frozen + 6 * trainable) + 12 * text.num_hidden_layers * text.hidden_size * seq_len**2
    llm += reply_tokens * 4 * hf.get_output_embeddings().weight.numel()
    thw = batch.extra_inputs["image_grid_thw"][0]
    patches = int(thw.prod())
    window = min((visual.window_size // visual.patch_size) ** 2, patches)
    full = len(visual.fullatt_block_indexes)
    attention = 4 * visual.hidden_size * patches * (full * patches + (visual.depth - full) * window)
    image_tokens = patches // visual.spatial_merge_size**2
    return FlopCount(llm + 2 * vision * patches + attention + 2 * merger * image_tokens, reply_tokens, image_tokens)
