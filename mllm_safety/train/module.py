"""The LightningModule: builds the MLLM, chooses what trains, and optimises the reply-token loss."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from transformers import PreTrainedModel, PreTrainedTokenizerBase, get_cosine_schedule_with_warmup

from mllm_safety.constants import IMAGE_TOKEN_ID
from mllm_safety.data.conversation import ChatEncoder
from mllm_safety.data.hub_processor import HubProcessor
from mllm_safety.data.processor import Batch, MultimodalProcessor, Processor
from mllm_safety.data.slot_templates import LLAMAFACTORY_TEMPLATES
from mllm_safety.model.hub_vlm import HubOptions, HubVLM, load_hub_vlm
from mllm_safety.model.llava_hf import LlavaHFConfig, load_llava_hf, load_llava_tokenizer
from mllm_safety.model.llm import LLMConfig, load_llm, load_tokenizer, stop_token_ids
from mllm_safety.model.lora import LoraSettings
from mllm_safety.model.mllm import MultimodalLM
from mllm_safety.model.placement import context_device, random_init_device
from mllm_safety.model.projector import build_projector
from mllm_safety.model.trainable import (
    FINGERPRINTS_KEY,
    check_fingerprints,
    check_weight_names,
    fingerprints,
    format_parameter_counts,
    keep_trainable,
    load_trainable,
    parameter_counts,
    save_trainable,
    trainable_state_dict,
)
from mllm_safety.model.vision import VisionConfig, build_vision_encoder
from mllm_safety.train.parallel import FSDP2Strategy, shard_multimodal_lm
from mllm_safety.train.token_mean import ReplyTokenMean

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
    """Finetunes a multimodal LLM on (rejection-swapped) instruction data.

    The model is a hub VLM running through its own transformers class (``pretrained``: LLaVA-NeXT, Yi-VL,
    Qwen2.5-VL, Idefics3, ...), a llava-hf checkpoint taken apart into the project's LLaVA model (``llava``), or
    assembled from an LLM, a vision tower and a fresh projector (``llm`` + ``vision`` + ``projector``).
    """

    def __init__(
        self,
        llm: LLMConfig | None = None,
        vision: VisionConfig | None = None,
        projector: str | None = None,
        llava: LlavaHFConfig | None = None,
        pretrained: str | None = None,
        hub: HubOptions = HubOptions(),
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
            pretrained: A transformers image-text-to-text checkpoint (folder or hub name) trained through its own
                class and processor: LLaVA-NeXT, Yi-VL, Qwen2.5-VL, Idefics3/SmolVLM, ...
            hub: How to read ``pretrained`` (chat template, processor options, remote code).
            max_length: Longest tokenized sample, image tokens included; longer ones are truncated, or skipped and
                counted when the cut would fall inside the image.
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
        for source, name in ((llava, "model.llava"), (pretrained, "model.pretrained")):
            if source is not None and (llm is not None or vision is not None or projector is not None):
                raise ValueError(
                    f"{name} supplies the LLM, vision tower and projector; leave model.llm, model.vision and "
                    "model.projector unset"
                )
        if llava is not None and pretrained is not None:
            raise ValueError("set one of model.llava and model.pretrained")
        if llava is None and pretrained is None and (llm is None or vision is None):
            raise ValueError(
                "set model.pretrained (a hub VLM), model.llava (a llava-hf checkpoint), or model.llm and model.vision"
            )
        if lora is not None and trainable.llm:
            raise ValueError("trainable.llm=true trains every LLM weight; it cannot be combined with lora")
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        if frozen_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"unknown frozen_dtype {frozen_dtype!r}; use float32, bfloat16 or float16")
        self.save_hyperparameters()

        # Built inside torch.device(<a rank's device>) (as the entry points build it), the checkpoint's weights are read
        # straight onto that device; random ones are drawn on the CPU (mllm_safety.model.placement).
        device = context_device()
        with torch.device(random_init_device(device)):
            model, self.processor = _build(
                llm, vision, projector, llava, pretrained, hub, max_length, getattr(torch, frozen_dtype), device
            )
            self.model = _prepare_training(model, lora, trainable, gradient_checkpointing)
            self.init_names = _load_init_weights(self.model, init_weights or [], trainable.lora)
        self.model.train()  # from_pretrained leaves the LLM in eval mode; evaluation switches modes explicitly
        # Counted before any sharding, so the figures are the model's, not one rank's.
        self.parameter_counts = parameter_counts(self.model)
        self.frozen_fingerprints = fingerprints(self.model, _rebuilt_parts(llm, vision))
        """Fingerprints of the frozen parts rebuilt from the config rather than loaded, kept in every checkpoint."""
        self.token_mean = ReplyTokenMean()
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
        """Write the trainable weights, LoRA settings, chat template and frozen-part fingerprints to one safetensors
        file, with the frozen weights that ``init_weights`` loaded (so a stage's output carries what it started from).
        Every rank must call this (sharded weights are gathered to rank 0); only ranks with ``write`` write."""
        state = trainable_state_dict(self.model, include=self.init_names)
        if write:
            template = self.processor.tokenizer.chat_template
            save_trainable(path, state, self.lora_settings, template, self.frozen_fingerprints)

    def configure_model(self) -> None:
        """Shards the model when the strategy is FSDP2 (``trainer.strategy: fsdp2``); other strategies need nothing."""
        strategy = self.trainer.strategy
        if isinstance(strategy, FSDP2Strategy):
            mesh = self.device_mesh["data_parallel"]
            shard_multimodal_lm(self.model, mesh, strategy.mixed_precision(), strategy.reshard_after_forward)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        out = self.model(**batch.model_inputs())
        # Same keys on every rank (the stream fills each), so the epoch-end sync cannot hang.
        self.log_dict(
            {f"data/{name}": float(count) for name, count in batch.stats.items()},
            on_step=False,
            on_epoch=True,
            reduce_fx="sum",
            sync_dist=True,
            batch_size=len(batch.ids),
        )
        # The sum of this micro-batch's token losses; on_before_optimizer_step turns the window's into one mean.
        return self.token_mean.add(out.loss, out.num_label_tokens)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        loss, tokens = self.token_mean.finish(self.parameters(), self.trainer.accumulate_grad_batches)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/reply_tokens", tokens)

    def configure_optimizers(self) -> dict[str, Any]:
        parts = self.model.parameter_parts()
        trained = [(parts[name], p) for name, p in self.model.named_parameters() if p.requires_grad]
        groups = [
            {"params": [p for part, p in trained if part == "llm"], "lr": self.optim.lr},
            {"params": [p for part, p in trained if part != "llm"], "lr": self.optim.projector_lr},
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
        """Keep only trainable weights (the frozen vision tower and base LLM are rebuilt from their configs), and the
        fingerprints of the frozen parts that are rebuilt rather than loaded."""
        checkpoint["state_dict"] = keep_trainable(checkpoint["state_dict"], self)
        checkpoint[FINGERPRINTS_KEY] = self.frozen_fingerprints

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Resume only onto the same frozen parts, with every trainable weight in the checkpoint (FSDP2's sharded
        checkpoints are checked as the strategy loads them)."""
        source = f"checkpoint {self.trainer.ckpt_path}"
        check_fingerprints(checkpoint.get(FINGERPRINTS_KEY), self.model, source)
        if "state_dict" in checkpoint:
            check_weight_names(source, checkpoint["state_dict"], self)


def _build(
    llm: LLMConfig | None,
    vision: VisionConfig | None,
    projector: str | None,
    llava: LlavaHFConfig | None,
    pretrained: str | None,
    hub: HubOptions,
    max_length: int,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[MultimodalLM | HubVLM, Processor]:
    """The model the arguments of :class:`SafetyAlignModule` describe, its checkpoint weights on ``device``, and
    the processor that turns conversations into its inputs."""
    if pretrained is not None:
        model, hf_processor = load_hub_vlm(pretrained, hub, dtype, device)
        template = LLAMAFACTORY_TEMPLATES.get(hub.chat_template)
        encoder = ChatEncoder(hf_processor.tokenizer, 0, IMAGE_TOKEN_ID, max_length, True, template)
        stops = stop_token_ids(model.generation_config, hf_processor.tokenizer, encoder.end_of_turn_ids)
        return model, HubProcessor(hf_processor, encoder, stops)
    if llava is not None:
        model = load_llava_hf(
            llava.path, dtype, llava.image_aspect_ratio, llava.load_weights, device, **llava.extra_kwargs
        )
        tokenizer = load_llava_tokenizer(llava.path, llava.chat_template)
    else:
        model, tokenizer = _assemble(llm, vision, projector or "mlp2x_gelu", dtype, device)
    encoder = ChatEncoder(tokenizer, model.vision.num_tokens, model.image_token_id, max_length)
    processor = MultimodalProcessor(
        encoder,
        model.vision.image_transform,
        model.vision.image_size,
        stop_token_ids(model.generation_config, tokenizer, encoder.end_of_turn_ids),
    )
    return model, processor


def _assemble(
    llm: LLMConfig, vision: VisionConfig, projector: str, dtype: torch.dtype, device: torch.device
) -> tuple[MultimodalLM, PreTrainedTokenizerBase]:
    """An MLLM from separate parts: an LLM, a vision tower and a freshly initialised projector."""
    tokenizer = load_tokenizer(llm)
    vision_encoder = build_vision_encoder(vision, dtype, device)
    language_model = load_llm(llm, tokenizer, dtype, device)
    llm_size = language_model.get_input_embeddings().embedding_dim
    projector_module = build_projector(projector, vision_encoder.hidden_size, llm_size)
    return MultimodalLM(vision_encoder, projector_module, language_model, IMAGE_TOKEN_ID), tokenizer


def _rebuilt_parts(llm: LLMConfig | None, vision: VisionConfig | None) -> list[str]:
    """The parts built with random weights rather than loaded: a checkpoint can only name them by fingerprint."""
    parts = []
    if vision is not None and vision.backend == "open_clip" and vision.pretrained is None:
        parts.append("vision")
    if llm is not None and llm.random_init is not None:
        parts.append("llm")
    return parts


def _prepare_training(
    model: MultimodalLM | HubVLM, lora: LoraSettings | None, trainable: TrainableParts, gradient_checkpointing: bool
) -> MultimodalLM | HubVLM:
    """Freeze per part, add LoRA adapters, enable checkpointing; trainable weights are float32 for the optimizer."""
    if gradient_checkpointing:
        for module in model.part_modules()["llm"]:
            if isinstance(module, PreTrainedModel):
                module.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    parts = model.parameter_parts()
    for name, param in model.named_parameters():
        param.requires_grad_(getattr(trainable, parts[name]))
    if lora is not None:
        model.add_lora(lora)
        _set_lora_trainable(model, trainable.lora)
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    return model


def _set_lora_trainable(model: MultimodalLM | HubVLM, trainable: bool) -> None:
    for name, param in model.named_parameters():
        if ".lora_" in name:
            param.requires_grad_(trainable)


def _load_init_weights(model: MultimodalLM | HubVLM, paths: list[str], train_lora: bool) -> frozenset[str]:
    """Load each trainable-weights file into ``model`` in order; the names of every weight loaded."""
    names: set[str] = set()
    for path in paths:
        had_lora = any(".lora_" in name for name, _ in model.named_parameters())
        names.update(load_trainable(model, path, require_every_trainable=False))
        if not had_lora:  # adapters created from the file's settings follow trainable.lora like configured ones
            _set_lora_trainable(model, train_lora)
        rank_zero_info(f"init_weights: loaded {path}")
    return frozenset(names)
