"""LoRA adapters on the language model, and folding them back into plain weights for export."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from peft import LoraConfig, PeftModel, get_peft_model, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from transformers import PreTrainedModel


@dataclass
class LoraSettings:
    """LoRA adapters on the LLM (the paper: r=128, alpha=256)."""

    r: int = 128
    """Rank of the adapters."""
    alpha: int = 256
    """Scaling numerator: the update is multiplied by alpha / r."""
    dropout: float = 0.05
    """Dropout on the adapter input."""
    target_modules: str | list[str] = "all-linear"
    """Modules of the LLM that get adapters: ``all-linear`` is every linear layer of the LLM except ``lm_head`` (as
    LLaVA; the projector and the vision tower never get adapters), or a list of module-name suffixes such as
    ``[q_proj, v_proj]``."""

    def __post_init__(self) -> None:
        if self.r < 1 or self.alpha <= 0 or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora needs r >= 1, alpha > 0 and dropout in [0, 1); got {self}")
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ValueError("lora.target_modules is empty; use 'all-linear' or name at least one module")


def lora_config(settings: LoraSettings, **extra) -> LoraConfig:
    """peft's config of these settings (the one place they are translated)."""
    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        **extra,
    )


def apply_lora(llm: PreTrainedModel, settings: LoraSettings) -> PeftModel:
    """Wrap ``llm`` with fresh adapters; only the adapters require gradients afterwards (kept in float32 by peft)."""
    return get_peft_model(llm, lora_config(settings, task_type="CAUSAL_LM"))


def fold_lora_in_place(module: torch.nn.Module) -> int:
    """Fold every active LoRA adapter of ``module`` into its base weight, one weight at a time, and return how many
    layers were folded.

    peft's merge adds the adapter's float32 ``scale * B @ A`` into the stored weight (one rounding to its dtype), so
    an export holds no second copy of any weight: merging into copies made a 7B export need twice its size in host
    memory. peft's layers know they are merged, so ``module`` computes what it computed before.
    """
    folded = 0
    for layer in module.modules():
        if isinstance(layer, LoraLayer) and not layer.merged:
            adapters = [a for a in layer.active_adapters if a in layer.lora_A]
            if adapters:
                layer.merge(adapter_names=adapters)
                folded += 1
    return folded


def plain_named_tensors(module: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of ``module`` under the names they have without adapters (``...q_proj.weight``), adapters left out:
    after :func:`fold_lora_in_place`, the weights an export writes."""
    for name, tensor in named_tensors(module):
        if ".lora_" not in name:
            yield name.replace(".base_layer.", "."), tensor


def inject_lora(module: PreTrainedModel, settings: LoraSettings) -> None:
    """Add fresh adapters inside ``module`` in place (parameter names keep their paths, ``...q_proj.lora_A...``);
    only the adapters of ``module`` require gradients afterwards."""
    inject_adapter_in_model(lora_config(settings), module)


def named_tensors(module: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Every parameter (detached) and buffer, persistent or not, tied ones under each of their names."""
    yield from ((name, p.detach()) for name, p in module.named_parameters(remove_duplicate=False))
    yield from module.named_buffers(remove_duplicate=False)
