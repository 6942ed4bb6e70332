"""The weights of an export, written in host memory close to the exported model's own size.

An export used to load the model in float32, merge LoRA into float32 copies of the adapted weights and cast
everything into a second dictionary: 5.4x the bfloat16 export at peak (benchmarks/export_memory.py; about 83 GiB for
llama3-llava-next-8b). Here the model is loaded in the export's dtype (``mllm_safety.export``), each adapter is
folded into its weight in place (:func:`fold_lora_in_place`), the rest is cast in place, and transformers writes
the state dict shard by shard without copies: 1.3x the export (about 20 GiB at 8B), the model and its adapters.
``config.json`` names the dtype of the written tensors, as ``save_pretrained`` takes it from the model's.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel

from mllm_safety.model.lora import fold_lora_in_place, plain_named_tensors

EXPORT_SHARD_SIZE = "2GB"
"""Largest safetensors shard of an export (transformers' default, 50 GB, is one file): a bound on what one write may
hold beyond the model. The benchmark's peak was the same with 100 MB shards."""


def fold_and_cast(module: nn.Module, dtype: torch.dtype | None) -> None:
    """Fold LoRA into ``module``'s weights and cast its floating-point tensors to ``dtype``, both in place."""
    fold_lora_in_place(module)
    if dtype is not None:
        module.to(dtype)


def write_weights(
    model: PreTrainedModel, path: str | Path, dtype: torch.dtype | None = None, max_shard_size: str = EXPORT_SHARD_SIZE
) -> None:
    """Write ``model`` (config, generation config, safetensors shards and their index) with its LoRA adapters folded
    in and cast to ``dtype``; ``model`` is changed in place and still computes what it computed."""
    fold_and_cast(model, dtype)
    persistent = {name.replace(".base_layer.", ".") for name in model.state_dict() if ".lora_" not in name}
    tensors = {name: tensor for name, tensor in plain_named_tensors(model) if name in persistent}
    model.save_pretrained(path, state_dict=tensors, max_shard_size=max_shard_size)
