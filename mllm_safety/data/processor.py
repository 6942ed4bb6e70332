"""Turns conversations and images into model tensors, and pads them into batches."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image

from mllm_safety.data.conversation import ChatEncoder, Conversation
from mllm_safety.model.mllm import IGNORE_INDEX


@dataclass
class ModelSample:
    id: str
    input_ids: torch.Tensor
    labels: torch.Tensor
    pixel_values: torch.Tensor | None


@dataclass
class Batch:
    ids: list[str]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    pixel_values: torch.Tensor
    """Images of the samples that have one, in batch order; ``(0, 3, H, W)`` when none has."""

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "labels": self.labels,
            "pixel_values": self.pixel_values,
        }


class MultimodalProcessor:
    """What the data pipeline and the safety evaluation need from the model: its chat encoding and image transform."""

    def __init__(
        self,
        encoder: ChatEncoder,
        image_transform: Callable[[Image.Image], torch.Tensor],
        image_size: tuple[int, int],
    ) -> None:
        self.encoder = encoder
        self.image_transform = image_transform
        self.image_size = image_size

    @property
    def tokenizer(self):
        return self.encoder.tokenizer

    def _pixels(self, image: Image.Image | None) -> torch.Tensor | None:
        return None if image is None else self.image_transform(image.convert("RGB"))

    def __call__(self, conversation: Conversation) -> ModelSample:
        encoded = self.encoder.encode(conversation)
        return ModelSample(
            id=encoded.id,
            input_ids=torch.tensor(encoded.input_ids),
            labels=torch.tensor(encoded.labels),
            pixel_values=self._pixels(conversation.image),
        )

    def prompt(self, sample_id: str, question: str, image: Image.Image | None) -> ModelSample:
        ids = torch.tensor(self.encoder.encode_prompt(question, has_image=image is not None))
        return ModelSample(
            id=sample_id, input_ids=ids, labels=torch.full_like(ids, IGNORE_INDEX), pixel_values=self._pixels(image)
        )

    def collate(self, samples: list[ModelSample], padding_side: str = "right") -> Batch:
        """Pad to the longest sample: right for training, left for generation."""
        length = max(len(s.input_ids) for s in samples)
        pad_id = self.tokenizer.pad_token_id
        input_ids = torch.full((len(samples), length), pad_id, dtype=torch.long)
        labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(samples), length), dtype=torch.long)
        for row, sample in enumerate(samples):
            n = len(sample.input_ids)
            span = slice(0, n) if padding_side == "right" else slice(length - n, length)
            input_ids[row, span] = sample.input_ids
            labels[row, span] = sample.labels
            attention_mask[row, span] = 1
        images = [s.pixel_values for s in samples if s.pixel_values is not None]
        pixel_values = torch.stack(images) if images else torch.zeros((0, 3, *self.image_size))
        return Batch([s.id for s in samples], input_ids, attention_mask, labels, pixel_values)
