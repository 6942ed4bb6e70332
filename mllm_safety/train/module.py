"""The LightningModule: builds the MLLM, chooses what trains, and optimises the reply-token loss."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from transformers import PreTrainedTokenizerBase, get_cosine_schedule_with_warmup

from mllm_safety.constants import IMAGE_TOKEN_ID
from mllm_safety.data.conversation import ChatEncoder
from mllm_safety.data.processor import Batch, MultimodalProcessor
from mllm_safety.model.llava_hf import LlavaHFConfig, load_llava_hf, load_llava_tokenizer
from mllm_safety.model.llm import LLMConfig, load_llm, load_tokenizer
from mllm_safety.model.lora import LoraSettings, apply_lora
from mllm_safety.model.mllm import MultimodalLM
from mllm_safety.model.projector import build_projector
from mllm_safety.model.trainable import (
    format_parameter_counts,
    load_trainable,
    parameter_counts,
    save_trainable,
    trainable_state_dict,
)
from mllm_safety.model.vision import VisionConfig, build_vision_encoder
from mllm_safety.train.parallel import FSDP2Strategy, global_token_mean, shard_multimodal_lm

FrozenDtype = Literal["float32", "bfloat16", "float16"]

__all__ = ["LoraSettings", "OptimSettings", "SafetyAlignModule", "TrainableParts"]


@dataclass
class OptimSettings:
    """AdamW with a separate projector learning rate and a cosine schedule after linear warmup."""

    lr: float = 2e-4
    """Learning rate of the LLM's trainable weights (LoRA or full)."""
    projector_lr: float = 2e-5
    """Learning rate of the projector (and of the vision tower, when it trains)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_ratio: float = 0.03
    """Share of the optimizer steps spent warming up linearly from 0."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.projector_lr <= 0 or not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"optim needs lr > 0, projector_lr > 0 and warmup_ratio in [0, 1); got {self}")


@dataclass
class TrainableParts:
    """Which parts of the model learn; the rest is frozen."""

    vision: bool = False
    """Train the vision tower (LLaVA-1.5 keeps it frozen)."""
    projector: bool = True
    """Train the projector."""
    llm: bool = False
    """Train every LLM weight (full finetuning); with LoRA the base LLM stays frozen and only adapters learn."""
    lora: bool = True
    """Train the LoRA adapters (with ``model.lora`` set); false keeps them as built or loaded from
    ``model.init_weights``, e.g. to align only the projector of a model whose adapters an earlier stage trained."""


class SafetyAlignModule(L.LightningModule):
    """Finetunes a LLaVA-style MLLM on (rejection-swapped) instruction data.

    The model comes either from a llava-hf checkpoint (``llava``) or is assembled from an LLM, a vision tower and a
    fresh projector (``llm`` + ``vision`` + ``projector``).
    """

    def __init__(
        self,
        llm: LLMConfig | None = None,
        vision: VisionConfig | None = None,
        projector: str | None = None,
        llava: LlavaHFConfig | None = None,
        max_length: int = 2048,
        lora: LoraSettings | None = LoraSettings(),
        trainable: TrainableParts = TrainableParts(),
        optim: OptimSettings = OptimSettings(),
        gradient_checkpointing: bool = False,
        frozen_dtype: FrozenDtype = "float32",
        init_weights: list[str] | None = None,
    ) -> None:
        """
        Args:
            llm: The language model (with ``vision``; leave unset with ``llava``).
            vision: The vision tower (with ``llm``; leave unset with ``llava``).
            projector: ``linear`` or ``mlpNx_gelu``; default ``mlp2x_gelu`` (LLaVA-1.5). Leave unset with ``llava``.
            llava: A llava-hf checkpoint supplying vision tower, projector, LLM and tokenizer (the paper's models).
            max_length: Longest tokenized sample, image tokens included; longer ones are truncated.
            lora: LoRA adapters on the LLM; ``null`` for none.
            trainable: Which parts learn.
            optim: Optimizer and schedule.
            gradient_checkpointing: Recompute LLM activations in the backward pass to save memory.
            frozen_dtype: Storage dtype of the frozen weights (vision tower, base LLM); trainable weights stay
                float32 for the optimizer. ``bfloat16`` halves the memory of a 7B model and needs
                ``trainer.precision: bf16-mixed``.
            init_weights: Trainable-weights files (``trainable.safetensors`` of an earlier run, or a pretrained
                tower) loaded into the built model in order, a later file overriding an earlier one: a run starts
                from an earlier stage's tower, projector and LoRA adapters. Their weights, frozen ones included, are
                also written to this run's trainable-weights file, so that file holds everything the config does
                not rebuild.
        """
        super().__init__()
        self.optim = optim
        self.lora_settings = lora
        self.frozen_dtype = frozen_dtype
        if llava is not None and (llm is not None or vision is not None or projector is not None):
            raise ValueError(
                "model.llava supplies the LLM, vision tower and projector; leave model.llm, model.vision and "
                "model.projector unset"
            )
        if llava is None and (llm is None or vision is None):
            raise ValueError("set model.llava (a llava-hf checkpoint), or model.llm and model.vision")
        if lora is not None and trainable.llm:
            raise ValueError("trainable.llm=true trains every LLM weight; it cannot be combined with lora")
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        if frozen_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"unknown frozen_dtype {frozen_dtype!r}; use float32, bfloat16 or float16")
        self.save_hyperparameters()

        dtype = getattr(torch, frozen_dtype)
        if llava is not None:
            model = load_llava_hf(llava.path, dtype, llava.image_aspect_ratio, llava.load_weights, **llava.extra_kwargs)
            tokenizer = load_llava_tokenizer(llava.path, llava.chat_template)
        else:
            model, tokenizer = _assemble(llm, vision, projector or "mlp2x_gelu", dtype)
        self.model = _prepare_training(model, lora, trainable, gradient_checkpointing)
        self.init_names = _load_init_weights(self.model, init_weights or [], trainable.lora)
        self.model.train()  # from_pretrained leaves the LLM in eval mode; evaluation switches modes explicitly
        self.processor = MultimodalProcessor(
            ChatEncoder(tokenizer, model.vision.num_tokens, model.image_token_id, max_length),
            model.vision.image_transform,
            model.vision.image_size,
        )
        # Counted before any sharding, so the figures are the model's, not one rank's.
        self.parameter_counts = parameter_counts(self.model)
        if self.parameter_counts["all"][0] == 0:
            raise ValueError("nothing to train: enable lora or at least one of trainable.{vision,projector,llm}")
        # Checkpoints hold only what trains (see on_save_checkpoint), so loading must accept the frozen rest missing.
        self.strict_loading = False

    def setup(self, stage: str) -> None:
        precision = str(self.trainer.precision)
        if self.frozen_dtype != "float32" and precision in ("32-true", "32", "64-true", "64"):
            raise ValueError(
                f"model.frozen_dtype={self.frozen_dtype} stores frozen weights in low precision, which needs "
                f"trainer.precision bf16-mixed (or 16-mixed); got {precision}"
            )

    def on_fit_start(self) -> None:
        rank_zero_info(f"parameters: {format_parameter_counts(self.parameter_counts)}")
        trainable, total = self.parameter_counts["all"]
        for logger in self.loggers:
            logger.log_hyperparams({"parameters/trainable": trainable, "parameters/total": total})

    def load_trainable(self, path: str | Path) -> list[str]:
        """Put the weights of a trainable-weights file (``save_trainable``) back into this model."""
        return load_trainable(self.model, path)

    def save_trainable(self, path: str | Path, write: bool = True) -> None:
        """Write the trainable weights, LoRA settings and chat template to one safetensors file.

        Every rank must call this (sharded weights are gathered); only ranks with ``write`` write the file.
        """
        state = trainable_state_dict(self.model, include=self.init_names)
        if write:
            template = self.processor.tokenizer.chat_template
            save_trainable(self.model, path, lora=self.lora_settings, chat_template=template, state=state)

    def configure_model(self) -> None:
        """Shards the model when the strategy is FSDP2 (``trainer.strategy: fsdp2``); other strategies need nothing."""
        strategy = self.trainer.strategy
        if isinstance(strategy, FSDP2Strategy):
            mesh = self.device_mesh["data_parallel"]
            shard_multimodal_lm(self.model, mesh, strategy.mixed_precision(), strategy.reshard_after_forward)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        out = self.model(**batch.model_inputs())
        loss, global_loss = global_token_mean(out.loss, out.num_label_tokens)
        self.log("train/loss", global_loss, prog_bar=True, batch_size=len(batch.ids))
        self.log("train/reply_tokens", out.num_label_tokens.float(), reduce_fx="sum", batch_size=len(batch.ids))
        # Same keys on every rank (the stream fills each), so the epoch-end sync cannot hang.
        self.log_dict(
            {f"data/{name}": float(count) for name, count in batch.stats.items()},
            on_step=False,
            on_epoch=True,
            reduce_fx="sum",
            sync_dist=True,
            batch_size=len(batch.ids),
        )
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        projector_params = [p for p in self.model.projector.parameters() if p.requires_grad]
        projector_params += [p for p in self.model.vision.parameters() if p.requires_grad]
        llm_params = [p for p in self.model.llm.parameters() if p.requires_grad]
        groups = [
            {"params": llm_params, "lr": self.optim.lr},
            {"params": projector_params, "lr": self.optim.projector_lr},
        ]
        optimizer = torch.optim.AdamW(
            [g for g in groups if g["params"]], weight_decay=self.optim.weight_decay, betas=self.optim.betas
        )
        total_steps = int(self.trainer.estimated_stepping_batches)
        scheduler = get_cosine_schedule_with_warmup(
            optimizer, round(self.optim.warmup_ratio * total_steps), total_steps
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only trainable weights: the frozen vision tower and base LLM are rebuilt from their configs."""
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}


def _assemble(
    llm: LLMConfig, vision: VisionConfig, projector: str, dtype: torch.dtype
) -> tuple[MultimodalLM, PreTrainedTokenizerBase]:
    """An MLLM from separate parts: an LLM, a vision tower and a freshly initialised projector."""
    tokenizer = load_tokenizer(llm)
    vision_encoder = build_vision_encoder(vision, dtype)
    language_model = load_llm(llm, tokenizer, dtype=dtype)
    llm_size = language_model.get_input_embeddings().embedding_dim
    projector_module = build_projector(projector, vision_encoder.hidden_size, llm_size)
    return MultimodalLM(vision_encoder, projector_module, language_model, IMAGE_TOKEN_ID), tokenizer


def _prepare_training(
    model: MultimodalLM, lora: LoraSettings | None, trainable: TrainableParts, gradient_checkpointing: bool
) -> MultimodalLM:
    """Freeze per part, add LoRA adapters, enable checkpointing; trainable weights are float32 for the optimizer."""
    if gradient_checkpointing:
        model.llm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.requires_grad_(False)
    model.vision.requires_grad_(trainable.vision)
    model.projector.requires_grad_(trainable.projector)
    model.llm.requires_grad_(trainable.llm)
    if lora is not None:
        model.llm = apply_lora(model.llm, lora)
        _set_lora_trainable(model, trainable.lora)
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    return model


def _set_lora_trainable(model: MultimodalLM, trainable: bool) -> None:
    for name, param in model.llm.named_parameters():
        if ".lora_" in name:
            param.requires_grad_(trainable)


def _load_init_weights(model: MultimodalLM, paths: list[str], train_lora: bool) -> frozenset[str]:
    """Load each trainable-weights file into ``model`` in order; the names of every weight loaded."""
    names: set[str] = set()
    for path in paths:
        had_lora = any(".lora_" in name for name, _ in model.named_parameters())
        names.update(load_trainable(model, path))
        if not had_lora:  # adapters created from the file's settings follow trainable.lora like configured ones
            _set_lora_trainable(model, train_lora)
        rank_zero_info(f"init_weights: loaded {path}")
    return frozenset(names)
