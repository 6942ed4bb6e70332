"""Compact checkpoints holding only the trainable weights (LoRA adapters + projector), as one safetensors file.

A 7B LLaVA with LoRA r=128 trains ~340M of ~7B parameters: this file is what a run produces, and
``load_trainable`` puts it back on the base model it started from.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection
from dataclasses import asdict
from pathlib import Path

import torch
from peft import PeftModel
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from mllm_safety.model.lora import LoraSettings, apply_lora

FORMAT = "mllm_safety.trainable/1"
"""Recorded in the file's metadata, so a foreign safetensors file is refused with a clear message."""


def parameter_counts(model: nn.Module) -> dict[str, tuple[int, int]]:
    """``{part: (trainable, total)}`` for each direct child of ``model`` and ``"all"``; shared tensors count once."""
    counts: dict[str, tuple[int, int]] = {}
    for part, module in [*model.named_children(), ("all", model)]:
        params = list(module.parameters())
        counts[part] = (sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))
    return counts


def format_parameter_counts(counts: dict[str, tuple[int, int]]) -> str:
    return ", ".join(
        f"{part} {trainable:,} of {total:,} trainable ({100 * trainable / max(total, 1):.2f}%)"
        for part, (trainable, total) in counts.items()
    )


def trainable_state_dict(model: nn.Module, include: Collection[str] = ()) -> dict[str, torch.Tensor]:
    """Every parameter that requires a gradient, and the frozen ones named in ``include``, as full tensors on the CPU
    (sharded DTensors are gathered, so every rank must call this)."""
    state = {}
    for name, param in model.named_parameters():
        if param.requires_grad or name in include:
            tensor = param.detach()
            if hasattr(tensor, "full_tensor"):
                tensor = tensor.full_tensor()
            state[name] = tensor.to("cpu", copy=True).contiguous()
    return state


def save_trainable(
    model: nn.Module,
    path: str | Path,
    lora: LoraSettings | None = None,
    chat_template: str | None = None,
    state: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write the trainable weights of ``model`` (or a precomputed ``state``) to ``path`` atomically.

    ``lora`` and ``chat_template`` are recorded in the metadata: ``load_trainable`` re-creates the adapters from the
    first, and an export writes the template the model was trained with.
    """
    state = trainable_state_dict(model) if state is None else state
    if not state:
        raise ValueError(f"nothing to save to {path}: no parameter requires a gradient")
    metadata = {"format": FORMAT}
    if lora is not None:
        metadata["lora"] = json.dumps(asdict(lora))
    if chat_template is not None:
        metadata["chat_template"] = chat_template
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(state, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def read_trainable_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a trainable-weights file; an error naming ``path`` for anything else."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"trainable-weights file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except SafetensorError as error:
        raise ValueError(f"{path} is not a safetensors file: {error}") from error
    if metadata.get("format") != FORMAT:
        raise ValueError(
            f"{path} is not a trainable-weights file of this project (metadata format "
            f"{metadata.get('format')!r}, expected {FORMAT!r})"
        )
    return metadata


def load_trainable(model: nn.Module, path: str | Path) -> list[str]:
    """Copy the weights in ``path`` into ``model``; returns the names loaded.

    ``model`` is the base model the run started from (same architecture, e.g. ``load_llava_hf`` of the same
    checkpoint) or the training module's model. When the file holds LoRA adapters and ``model.llm`` has none yet,
    they are created from the settings recorded in the file. Every tensor must find a parameter of the same shape.
    """
    metadata = read_trainable_metadata(path)
    with safe_open(str(path), framework="pt") as f:
        names = list(f.keys())
        if any(".lora_" in name for name in names) and not isinstance(getattr(model, "llm", None), PeftModel):
            if "lora" not in metadata:
                raise ValueError(f"{path} holds LoRA weights but no LoRA settings to re-create the adapters")
            model.llm = apply_lora(model.llm, LoraSettings(**json.loads(metadata["lora"])))
        params = dict(model.named_parameters())
        unknown = [name for name in names if name not in params]
        if unknown:
            raise ValueError(
                f"{path} holds {len(unknown)} weights the model does not have, e.g. {unknown[:3]}; "
                "was it written for another architecture or LoRA target set?"
            )
        for name in names:
            tensor = f.get_tensor(name)
            param = params[name]
            if tensor.shape != param.shape:
                raise ValueError(
                    f"{path}: {name} has shape {tuple(tensor.shape)} but the model expects {tuple(param.shape)} "
                    "(vision or LLM hidden sizes differ from the model the file was trained with)"
                )
            with torch.no_grad():
                param.copy_(tensor.to(param.dtype))
    return names
