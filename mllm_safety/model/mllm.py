"""The LLaVA-style model: vision tower -> projector -> image tokens spliced into the LLM's input embeddings."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import FSDPModule
from transformers import LogitsProcessorList, PreTrainedModel

from mllm_safety.constants import IGNORE_INDEX, IMAGE_TOKEN_ID, WORD_SLOT_ID
from mllm_safety.model.lora import LoraSettings, apply_lora

PLAIN_DECODING = {"do_sample": False, "num_beams": 1, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0}
"""Greedy search over the scores after the caller's logits processors, whatever a checkpoint's ``generation_config``
suggests (repetition penalty, n-gram blocking, sampling): every model family is evaluated alike, and sampling is a
processor seeded per row."""


@dataclass
class MultimodalOutput:
    loss: torch.Tensor | None
    """Mean cross-entropy over the reply tokens of the whole batch (not a mean of per-sample means)."""
    logits: torch.Tensor
    """``(B, L, V)`` without labels; with labels only at the positions that predict a reply token of some sample."""
    num_label_tokens: torch.Tensor
    """How many tokens the loss averages over; a trainer needs it to weight batches of different size."""


def reply_token_loss(labels: torch.Tensor, logits_at: Callable[[torch.Tensor], torch.Tensor]) -> MultimodalOutput:
    """The mean cross-entropy over the batch's reply tokens. ``logits_at(positions)`` runs the model with only those
    positions through the LM head (``logits_to_keep``): the logit at t predicts token t+1, and prompts and image
    tokens are most of a LLaVA sequence while the head is a large share of a small LLM."""
    targets = labels[:, 1:]
    keep = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)
    logits = logits_at(keep)
    targets = targets[:, keep]
    num_label_tokens = (targets != IGNORE_INDEX).sum()
    loss_sum = F.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return MultimodalOutput(
        loss=loss_sum / num_label_tokens.clamp(min=1), logits=logits, num_label_tokens=num_label_tokens
    )


def fill_word_slots(input_ids: torch.Tensor, slot_word_ids: torch.Tensor | None) -> torch.Tensor:
    """``input_ids`` with each ``WORD_SLOT_ID`` position (an image slot that holds words, ``data.image_slot``) given
    the next id of ``slot_word_ids`` in batch order: those positions then embed as the LLM's input embeddings of the
    words, where projected image features would be."""
    slots = input_ids == WORD_SLOT_ID
    count, given = int(slots.sum()), 0 if slot_word_ids is None else slot_word_ids.numel()
    if count != given:
        raise ValueError(f"batch has {count} image-slot positions for words but {given} word ids to fill them")
    return input_ids.masked_scatter(slots, slot_word_ids.to(input_ids.device)) if count else input_ids


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` is sharded with FSDP2 (``fully_shard``): its ranks must then run the same modules the same
    number of times, since every sharded module all-gathers its weights in a collective."""
    return isinstance(model, FSDPModule)


def check_left_padded(attention_mask: torch.Tensor) -> None:
    if bool((attention_mask[:, -1] == 0).any()):
        raise ValueError("generate needs left padding: the last position of every prompt must be a real token")


def check_projector_sizes(vision: nn.Module, projector: nn.Module, llm: PreTrainedModel) -> None:
    """The projector must map the vision tower's hidden size to the LLM's; a mismatch is a config error, caught here
    rather than as a matmul shape error in the first batch."""
    linears = [m for m in projector.modules() if isinstance(m, nn.Linear)]
    if not linears:
        return
    llm_size = llm.get_input_embeddings().embedding_dim
    if linears[0].in_features != vision.hidden_size or linears[-1].out_features != llm_size:
        raise ValueError(
            f"projector maps {linears[0].in_features} -> {linears[-1].out_features} features, but the vision tower "
            f"gives {vision.hidden_size} and the LLM takes {llm_size}"
        )


class MultimodalLM(nn.Module):
    """Vision encoder, projector and a Hugging Face causal LM, combined the way LLaVA-1.5 combines them.

    Every image occupies ``vision.num_tokens`` consecutive positions of ``input_ids`` equal to ``image_token_id``;
    ``pixel_values`` holds the images of the batch in the order their positions appear (samples without an image
    contribute none), so one batch may mix samples with and without images. An image slot that holds words instead
    (the ``img2text`` probe) has one ``WORD_SLOT_ID`` position per word, filled from ``slot_word_ids`` the same way.
    """

    def __init__(
        self, vision: nn.Module, projector: nn.Module, llm: PreTrainedModel, image_token_id: int = IMAGE_TOKEN_ID
    ) -> None:
        super().__init__()
        check_projector_sizes(vision, projector, llm)
        self.vision = vision
        self.projector = projector
        self.llm = llm
        self.image_token_id = image_token_id

    @property
    def generation_config(self):
        return self.llm.generation_config

    def parameter_parts(self) -> dict[str, str]:
        """``{parameter name: "vision" | "projector" | "llm"}``."""
        return {name: name.split(".", 1)[0] for name, _ in self.named_parameters()}

    def part_modules(self) -> dict[str, list[nn.Module]]:
        """The top module of each part (FSDP units)."""
        return {"vision": [self.vision], "projector": [self.projector], "llm": [self.llm]}

    def add_lora(self, settings: LoraSettings) -> None:
        """LoRA adapters on the LLM (never the projector or vision tower)."""
        self.llm = apply_lora(self.llm, settings)

    def check_words_in_image_slot(self, what: str) -> None:
        """Nothing to refuse: LLaVA's image slot is a run of positions that take any rows of the LLM's width."""

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        slot_word_ids: torch.Tensor | None = None,
        blank_image: bool = True,
    ) -> torch.Tensor:
        """Token embeddings with the image positions replaced by projected vision tokens, and the image-slot positions
        that hold words by the words' input embeddings (:func:`fill_word_slots`).

        With ``blank_image`` the vision path runs even for a batch without images (``pixel_values`` of length 0), so
        that ranks always call the same modules in the same order.
        """
        input_ids = fill_word_slots(input_ids, slot_word_ids)
        image_mask = input_ids == self.image_token_id
        text_ids = input_ids.masked_fill(image_mask, 0)
        embeds = self.llm.get_input_embeddings()(text_ids)
        num_positions = int(image_mask.sum())
        if pixel_values.shape[0] == 0 and num_positions == 0:
            if not blank_image:
                return embeds
            # Towers fail on an empty batch: run one blank image and add it with weight 0, which keeps vision and
            # projector in the autograd graph (DDP and FSDP expect every rank to use the same parameters).
            blank = pixel_values.new_zeros((1, *pixel_values.shape[1:]), dtype=embeds.dtype)
            return embeds + 0.0 * self.projector(self.vision(blank)).sum()
        features = self.projector(self.vision(pixel_values.to(embeds.dtype)))
        if features.shape[0] * features.shape[1] != num_positions:
            raise ValueError(
                f"batch has {num_positions} image positions but {features.shape[0]} images of "
                f"{features.shape[1]} tokens each; the processor and the vision tower disagree"
            )
        return embeds.masked_scatter(image_mask.unsqueeze(-1), features.to(embeds.dtype))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        slot_word_ids: torch.Tensor | None = None,
    ) -> MultimodalOutput:
        embeds = self.embed(input_ids, pixel_values, slot_word_ids)
        # Positions count real tokens only, so left- and right-padded batches give the same logits.
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        if labels is None:
            logits = self.llm(
                inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
            ).logits
            return MultimodalOutput(loss=None, logits=logits, num_label_tokens=torch.zeros((), dtype=torch.long))
        return reply_token_loss(
            labels,
            lambda keep: (
                self.llm(
                    inputs_embeds=embeds,
                    attention_mask=attention_mask,
                    position_ids=position_ids,
                    logits_to_keep=keep,
                    use_cache=False,  # a KV cache only costs memory when nothing is generated
                ).logits
            ),
        )

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor,
        max_new_tokens: int = 64,
        min_new_tokens: int = 0,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        logits_processor: LogitsProcessorList | None = None,
        slot_word_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Decoding with KV cache for a left-padded batch; returns only the new tokens ``(B, <=max_new)``.

        Greedy over the scores after ``logits_processor``: sampling is a processor that perturbs the scores (seeded
        per row), so that a row's reply never depends on the rows beside it.
        """
        check_left_padded(attention_mask)
        # Without gradients only FSDP needs the blank image (its all-gathers are collectives every rank must join).
        embeds = self.embed(input_ids, pixel_values, slot_word_ids, blank_image=is_sharded(self))
        return self.llm.generate(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            **PLAIN_DECODING,
            use_cache=True,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            logits_processor=logits_processor,
        )
