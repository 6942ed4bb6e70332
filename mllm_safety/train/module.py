"""The LightningModule: builds the MLLM, chooses what trains, and optimises the reply-token loss."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from peft import LoraConfig, get_peft_model
from transformers import get_cosine_schedule_with_warmup

from mllm_safety.data.conversation import ChatEncoder
from mllm_safety.data.processor import Batch, MultimodalProcessor
from mllm_safety.model.llm import LLMConfig, load_llm, load_tokenizer
from mllm_safety.model.mllm import IMAGE_TOKEN_ID, MultimodalLM
from mllm_safety.model.projector import build_projector
from mllm_safety.model.vision import OpenClipVisionEncoder, VisionConfig
from mllm_safety.train.parallel import FSDP2Strategy, global_token_mean, shard_multimodal_lm

log = logging.getLogger(__name__)


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
    """Modules of the LLM that get adapters; ``all-linear`` is every linear layer except ``lm_head`` (as LLaVA)."""

    def __post_init__(self) -> None:
        if self.r < 1 or self.alpha <= 0 or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora needs r >= 1, alpha > 0 and dropout in [0, 1); got {self}")


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


class SafetyAlignModule(L.LightningModule):
    """Finetunes a LLaVA-style MLLM on (rejection-swapped) instruction data."""

    def __init__(
        self,
        llm: LLMConfig,
        vision: VisionConfig,
        projector: str = "mlp2x_gelu",
        max_length: int = 2048,
        lora: LoraSettings | None = LoraSettings(),
        trainable: TrainableParts = TrainableParts(),
        optim: OptimSettings = OptimSettings(),
        gradient_checkpointing: bool = False,
    ) -> None:
        """
        Args:
            llm: The language model.
            vision: The vision tower.
            projector: ``linear`` or ``mlpNx_gelu`` (LLaVA-1.5: ``mlp2x_gelu``).
            max_length: Longest tokenized sample, image tokens included; longer ones are truncated.
            lora: LoRA adapters on the LLM; ``null`` for none.
            trainable: Which parts learn.
            optim: Optimizer and schedule.
            gradient_checkpointing: Recompute LLM activations in the backward pass to save memory.
        """
        super().__init__()
        self.optim = optim
        if lora is not None and trainable.llm:
            raise ValueError("trainable.llm=true trains every LLM weight; it cannot be combined with lora")
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        self.save_hyperparameters()

        tokenizer = load_tokenizer(llm)
        vision_encoder = OpenClipVisionEncoder(vision)
        language_model = load_llm(llm, tokenizer, dtype=torch.float32)
        if gradient_checkpointing:
            language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        llm_size = language_model.get_input_embeddings().embedding_dim
        self.model = MultimodalLM(
            vision_encoder, build_projector(projector, vision_encoder.hidden_size, llm_size), language_model
        )
        self.model.requires_grad_(False)
        self.model.vision.requires_grad_(trainable.vision)
        self.model.projector.requires_grad_(trainable.projector)
        self.model.llm.requires_grad_(trainable.llm)
        if lora is not None:
            self.model.llm = get_peft_model(
                language_model,
                LoraConfig(
                    r=lora.r,
                    lora_alpha=lora.alpha,
                    lora_dropout=lora.dropout,
                    target_modules=lora.target_modules,
                    task_type="CAUSAL_LM",
                ),
            )
        self.model.train()  # from_pretrained leaves the LLM in eval mode; evaluation switches modes explicitly
        self.processor = MultimodalProcessor(
            ChatEncoder(tokenizer, vision_encoder.num_tokens, IMAGE_TOKEN_ID, max_length),
            vision_encoder.image_transform,
            vision_encoder.image_size,
        )
        trainable_count = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total_count = sum(p.numel() for p in self.parameters())
        log.info(
            "trainable parameters: %d of %d (%.2f%%)", trainable_count, total_count, 100 * trainable_count / total_count
        )
        if trainable_count == 0:
            raise ValueError("nothing to train: enable lora or at least one of trainable.{vision,projector,llm}")
        # Checkpoints hold only what trains (see on_save_checkpoint), so loading must accept the frozen rest missing.
        self.strict_loading = False

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
