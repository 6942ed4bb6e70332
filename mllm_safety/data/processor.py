"""Turns conversations and images into model tensors, and pads them into batches."""

from __future__ import annotations

from array import array
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Protocol

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from mllm_safety.constants import IGNORE_INDEX, WORD_SLOT_ID
from mllm_safety.data.conversation import ChatEncoder, Conversation
from mllm_safety.data.image_slot import WordsInImageSlot, slot_word_inputs


@dataclass
class ModelSample:
    id: str
    input_ids: torch.Tensor
    labels: torch.Tensor
    pixel_values: torch.Tensor | None
    image_inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    """Other tensors of the sample's image a hub model takes (``image_grid_thw``, ``image_sizes``, ...)."""
    token_inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    """Tensors with one entry per token beside ``input_ids`` (Qwen's ``mm_token_type_ids``), padded with 0."""
    slot_words: torch.Tensor | None = None
    """Token ids that fill the image slot instead of an image (``mllm_safety.data.image_slot``), one per
    ``WORD_SLOT_ID`` position of ``input_ids``; ``None`` for every other sample."""


@dataclass
class Batch:
    ids: list[str]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    pixel_values: torch.Tensor
    """Images of the samples that have one, in batch order; empty (``(0, 3, H, W)`` or ``(0,)``) when none has."""
    extra_inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    """Model-specific inputs beside ids and pixels, passed to the model by name: ``image_grid_thw`` and
    ``mm_token_type_ids`` (Qwen2.5-VL), ``image_sizes`` (LLaVA-NeXT), ``pixel_attention_mask`` (Idefics3); and
    ``slot_word_ids`` when some sample's image slot holds words (``mllm_safety.data.image_slot``)."""
    stats: dict[str, int] = field(default_factory=dict)
    """Data-pipeline counts since the previous batch of the same worker (``seen``, ``skipped_<reason>``,
    ``repeated``), for the trainer to log and judge; the same keys on every rank."""
    skip_examples: dict[str, str] = field(default_factory=dict)
    """One skipped sample per reason since the previous batch of the same worker, named for the error that stops a
    run skipping too many (``mllm_safety.data.skips``)."""

    def pin_memory(self) -> Batch:
        """Page-locked copies of the tensors (the DataLoader calls this with ``pin_memory=True``)."""
        pinned = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in pinned.items():
            if isinstance(value, torch.Tensor):
                pinned[name] = value.pin_memory()
        pinned["extra_inputs"] = {name: value.pin_memory() for name, value in self.extra_inputs.items()}
        return Batch(**pinned)

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments of the model's ``forward``."""
        return {**self.generation_inputs(), "labels": self.labels}

    def generation_inputs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments of the model's ``generate`` (no labels)."""
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "pixel_values": self.pixel_values,
            **self.extra_inputs,
        }


class Processor(Protocol):
    """What data and evaluation take from a model, whatever its family: conversations in, padded batches out.

    :class:`MultimodalProcessor` serves the assembled LLaVA-style model; ``mllm_safety.data.hub_processor.HubProcessor``
    serves hub VLMs through their own transformers processor.
    """

    stop_token_ids: list[int]
    """Token ids that end a reply in generation (every end-of-sequence id of the checkpoint)."""

    @property
    def tokenizer(self): ...

    def __call__(self, conversation: Conversation) -> ModelSample:
        """A training sample with model-ready pixels."""

    def stream_sample(self, conversation: Conversation) -> ModelSample:
        """A training sample for the data workers; its batch needs :meth:`finish_pixels` on the device."""

    def prompt(self, sample_id: str, question: str, image: Image.Image | WordsInImageSlot | None) -> ModelSample:
        """A single-turn generation prompt; its image slot holds the image, or words (``WordsInImageSlot``)."""

    def collate(self, samples: list[ModelSample], padding_side: str = "right") -> Batch:
        """Pad samples into a batch: right for training, left for generation."""

    def finish_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Model-ready pixels from a batch's (possibly ``uint8``) ones, on their device."""


def pad_tokens(
    samples: list[ModelSample], pad_id: int, padding_side: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """``input_ids``, ``labels``, ``attention_mask`` and the samples' ``token_inputs``, padded to the longest sample
    on ``padding_side`` (token inputs with 0, a sample without one counts as all 0)."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    length = max(len(s.input_ids) for s in samples)
    input_ids = torch.full((len(samples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), length), dtype=torch.long)
    names = sorted({name for s in samples for name in s.token_inputs})
    token_inputs = {name: torch.zeros((len(samples), length), dtype=torch.long) for name in names}
    for row, sample in enumerate(samples):
        n = len(sample.input_ids)
        span = slice(0, n) if padding_side == "right" else slice(length - n, length)
        input_ids[row, span] = sample.input_ids
        labels[row, span] = sample.labels
        attention_mask[row, span] = 1
        for name, values in sample.token_inputs.items():
            token_inputs[name][row, span] = values
    return input_ids, labels, attention_mask, token_inputs


def long_tensor(values: list[int]) -> torch.Tensor:
    """``torch.tensor(values)``, several times faster for long lists of ints."""
    return torch.frombuffer(array("q", values), dtype=torch.long) if values else torch.zeros(0, dtype=torch.long)


def split_at_to_tensor(
    transform: Callable[[Image.Image], torch.Tensor],
) -> tuple[Callable[[Image.Image], object], Callable[[torch.Tensor], torch.Tensor]] | None:
    """Split a torchvision ``Compose`` into its PIL steps and the tensor steps after ``ToTensor`` (``Normalize``).

    A transform wrapping such a ``Compose`` can offer ``split_with(split_at_to_tensor)`` (the model's
    ``ImageTransform`` does). ``None`` when the transform has another shape: then it runs whole, in the workers.
    """
    if callable(split_with := getattr(transform, "split_with", None)):
        return split_with(split_at_to_tensor)
    steps = getattr(transform, "transforms", None)
    if not isinstance(transform, T.Compose) or not isinstance(steps, list):
        return None
    cut = next((k for k, step in enumerate(steps) if isinstance(step, T.ToTensor)), None)
    if cut is None or not all(isinstance(step, T.Normalize) for step in steps[cut + 1 :]):
        return None
    return T.Compose(steps[:cut]), T.Compose(steps[cut:])


class MultimodalProcessor:
    """What the data pipeline and the safety evaluation need from the model: its chat encoding and image transform.

    Samples of the training stream (:meth:`stream_sample`) carry their image as ``uint8`` when the transform allows
    (a torchvision ``Compose`` whose steps after ``ToTensor`` are ``Normalize``): the resize and crop run in the data
    workers, the scaling to float and the normalization run on the batch once it is on the device
    (:meth:`finish_pixels`). A quarter of the bytes cross process boundaries and the host-to-device copy, and no
    float math is done on the CPU.
    """

    def __init__(
        self,
        encoder: ChatEncoder,
        image_transform: Callable[[Image.Image], torch.Tensor],
        image_size: tuple[int, int],
        stop_token_ids: list[int] | None = None,
    ) -> None:
        self.encoder = encoder
        self.image_transform = image_transform
        self.image_size = image_size
        self.stop_token_ids = stop_token_ids or [encoder.tokenizer.eos_token_id]
        self._split = split_at_to_tensor(image_transform)

    def _raw_pixels(self, image: Image.Image | None) -> torch.Tensor | None:
        """The image after the transform's PIL steps, as ``uint8`` ``(3, H, W)`` (float if it cannot be split)."""
        if image is None:
            return None
        if self._split is None:
            return self.image_transform(image.convert("RGB"))
        pil_steps, tensor_steps = self._split
        resized = pil_steps(image.convert("RGB"))
        if not isinstance(resized, Image.Image) or resized.mode != "RGB":
            return tensor_steps(resized)
        return torch.from_numpy(np.array(resized, dtype=np.uint8)).permute(2, 0, 1)  # a (3, H, W) view of HWC pixels

    def finish_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Model-ready pixels from a batch's ``uint8`` ones (float ones pass through), on whatever device they are."""
        if pixel_values.dtype != torch.uint8:
            return pixel_values
        _, tensor_steps = self._split
        pixels = pixel_values.float().div(255)
        for step in tensor_steps.transforms[1:]:
            pixels = step(pixels)
        return pixels.contiguous()

    @property
    def tokenizer(self):
        return self.encoder.tokenizer

    def _pixels(self, image: Image.Image | None) -> torch.Tensor | None:
        return None if image is None else self.image_transform(image.convert("RGB"))

    def __call__(self, conversation: Conversation) -> ModelSample:
        """A training sample with model-ready pixels."""
        sample = self.stream_sample(conversation)
        if sample.pixel_values is not None:
            sample.pixel_values = self.finish_pixels(sample.pixel_values)
        return sample

    def stream_sample(self, conversation: Conversation) -> ModelSample:
        """A training sample whose pixels may still be ``uint8``: the data workers' half of :meth:`__call__`; a batch
        of them needs :meth:`finish_pixels` (on the device) before the model sees it."""
        encoded = self.encoder.encode(conversation)
        return ModelSample(
            id=encoded.id,
            input_ids=long_tensor(encoded.input_ids),
            labels=long_tensor(encoded.labels),
            pixel_values=self._raw_pixels(conversation.image),
        )

    def prompt(self, sample_id: str, question: str, image: Image.Image | WordsInImageSlot | None) -> ModelSample:
        if isinstance(image, WordsInImageSlot):
            words = image.token_ids(self.tokenizer)
            ids = torch.tensor(self.encoder.encode_prompt(question, True, [WORD_SLOT_ID] * len(words)))
            return ModelSample(sample_id, ids, torch.full_like(ids, IGNORE_INDEX), None, slot_words=words)
        ids = torch.tensor(self.encoder.encode_prompt(question, has_image=image is not None))
        return ModelSample(
            id=sample_id, input_ids=ids, labels=torch.full_like(ids, IGNORE_INDEX), pixel_values=self._pixels(image)
        )

    def collate(self, samples: list[ModelSample], padding_side: str = "right") -> Batch:
        """Pad to the longest sample: right for training, left for generation."""
        input_ids, labels, attention_mask, _ = pad_tokens(samples, self.tokenizer.pad_token_id, padding_side)
        images = [s.pixel_values for s in samples if s.pixel_values is not None]
        if images and all(image.dtype == torch.uint8 for image in images):
            # Stacked in the HWC order they are stored in: a plain copy instead of a strided gather (several times
            # faster); the batch is a channels-last view until finish_pixels makes it contiguous on the device.
            pixel_values = torch.stack([image.permute(1, 2, 0) for image in images]).permute(0, 3, 1, 2)
        elif images:
            pixel_values = torch.stack([self.finish_pixels(image) for image in images])
        else:
            pixel_values = torch.zeros((0, 3, *self.image_size))
        words = slot_word_inputs([s.slot_words for s in samples])
        return Batch([s.id for s in samples], input_ids, attention_mask, labels, pixel_values, words)
