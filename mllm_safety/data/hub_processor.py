"""Conversations -> model inputs for hub VLMs, through the checkpoint's own transformers processor.

The chat template renders the conversation with the image as a content part, so it writes the model's own image
marker (``<image>``, Qwen's ``<|vision_start|><|image_pad|><|vision_end|>``, ...). The prompt span holding that
marker goes through the transformers processor with the image, which expands it into as many image tokens as this
image needs (LLaVA-NeXT's anyres tiles and newlines, Qwen's dynamic resolution, Idefics3's splits) and returns the
image tensors the model takes; every other span is tokenized on its own, so labels stay exact. Nothing here knows
a model family: the processor's outputs are passed on by name.
"""

from __future__ import annotations

import torch
from PIL import Image

from mllm_safety.constants import IGNORE_INDEX, WORD_SLOT_ID
from mllm_safety.data.conversation import ChatEncoder, Conversation, SampleError, Span, truncate
from mllm_safety.data.image_slot import WordsInImageSlot, slot_word_inputs
from mllm_safety.data.processor import Batch, ModelSample, long_tensor, pad_tokens

TEXT_KEYS = ("input_ids", "attention_mask")


def stack_images(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate per-sample image tensors along the first dimension, zero-padding every other dimension to the
    largest: how transformers' image processors batch a variable number of tiles or frames per image (LLaVA-NeXT,
    Idefics3); rows of patches (Qwen) simply concatenate."""
    shape = [max(t.shape[d] for t in tensors) for d in range(1, tensors[0].dim())]
    padded = []
    for tensor in tensors:
        if list(tensor.shape[1:]) != shape:
            grown = tensor.new_zeros((tensor.shape[0], *shape))
            grown[(slice(None), *(slice(0, n) for n in tensor.shape[1:]))] = tensor
            tensor = grown
        padded.append(tensor)
    return torch.cat(padded)


class HubProcessor:
    """The :class:`~mllm_safety.data.processor.Processor` of a hub VLM: chat template and labels from
    :class:`ChatEncoder` (in ``image_parts`` mode), image tokens and tensors from ``hf_processor``."""

    def __init__(self, hf_processor, encoder: ChatEncoder, stop_token_ids: list[int]) -> None:
        if not encoder.image_parts:
            raise ValueError("HubProcessor needs a ChatEncoder with image_parts=True")
        self.hf_processor = hf_processor
        self.encoder = encoder
        self.stop_token_ids = stop_token_ids
        self.image_token = hf_processor.image_token
        """The marker the template writes for an image and the processor expands."""
        if self.image_token not in encoder.prompt_text("x", has_image=True):
            # a property of the template, not of a sample: else every image sample would be skipped, one by one
            raise ValueError(
                f"the chat template does not write the processor's image marker {self.image_token!r} for an image "
                "(is model.hub.chat_template written for another model?)"
            )

    @property
    def tokenizer(self):
        return self.encoder.tokenizer

    def _expand(self, text: str, image: Image.Image) -> tuple[list[int], dict[str, torch.Tensor], dict]:
        """Token ids of ``text`` with its image marker expanded, the image tensors, and per-token tensors."""
        image = image.convert("RGB")
        out = self.hf_processor(text=[text], images=[image], add_special_tokens=False, return_tensors="pt")
        ids = out["input_ids"][0].tolist()
        per_token = {
            name: value[0]
            for name, value in out.items()
            if name not in TEXT_KEYS and not value.is_floating_point() and value.shape == (1, len(ids))
        }
        images = {name: value for name, value in out.items() if name not in TEXT_KEYS and name not in per_token}
        return ids, images, per_token

    def _encode(self, sample_id: str, spans: list[Span], image: Image.Image | None, max_length: int | None):
        texts = [span.text for span in spans]
        holding = [index for index, text in enumerate(texts) if self.image_token in text]
        if (image is None) != (not holding) or len(holding) > 1:
            raise SampleError(
                sample_id,
                "bad_image",
                f"the chat template placed {len(holding)} image marker(s) {self.image_token!r} for "
                f"{int(image is not None)} image",
            )
        # the span holding the image is tokenized by the processor, with its image tokens expanded
        tokenized = self.tokenizer(["" if i in holding else t for i, t in enumerate(texts)], add_special_tokens=False)
        tokenized = tokenized["input_ids"]
        input_ids, labels = list(self.encoder.bos), [IGNORE_INDEX] * len(self.encoder.bos)
        images: dict[str, torch.Tensor] = {}
        per_token: dict[str, list[int]] = {}
        keep = 0
        template = self.encoder.template
        eos = self.tokenizer.convert_tokens_to_ids(template.eos_token(self.tokenizer)) if template else None
        for index, (span, ids) in enumerate(zip(spans, tokenized, strict=True)):
            if holding and index == holding[0]:
                ids, images, span_tokens = self._expand(texts[index], image)
                per_token = {name: [0] * len(input_ids) + values.tolist() for name, values in span_tokens.items()}
                keep = len(input_ids) + len(ids)  # everything up to the end of the image's prompt stays whole
            input_ids += ids
            if span.learned:
                labels += ids
            elif span.eos_label and ids:  # LLaMA-Factory's efficient EOS: the reply before ends here
                labels += [eos] + [IGNORE_INDEX] * (len(ids) - 1)
            else:
                labels += [IGNORE_INDEX] * len(ids)
            for values in per_token.values():
                values += [0] * (len(input_ids) - len(values))
        if max_length is not None:
            input_ids, labels = truncate(sample_id, input_ids, labels, max_length, keep)
        return ModelSample(
            id=sample_id,
            input_ids=long_tensor(input_ids),
            labels=long_tensor(labels),
            pixel_values=images.pop("pixel_values", None),
            image_inputs=images,
            token_inputs={name: long_tensor(values[: len(input_ids)]) for name, values in per_token.items()},
        )

    def stream_sample(self, conversation: Conversation) -> ModelSample:
        """A training sample (its pixels are model-ready: the transformers processor normalizes them)."""
        spans = self.encoder.spans(conversation)
        return self._encode(conversation.id, spans, conversation.image, self.encoder.max_length)

    __call__ = stream_sample

    def prompt(self, sample_id: str, question: str, image: Image.Image | WordsInImageSlot | None) -> ModelSample:
        spans = self.encoder.prompt_spans(question, has_image=image is not None)
        if isinstance(image, WordsInImageSlot):
            return self._words_prompt(sample_id, spans, image)
        return self._encode(sample_id, spans, image, max_length=None)

    def _words_prompt(self, sample_id: str, spans: list[Span], words: WordsInImageSlot) -> ModelSample:
        """The prompt tokenized piece by piece as ``_encode`` tokenizes it around an image, with the image marker
        expanded to one ``WORD_SLOT_ID`` position per word token instead of the image's tokens."""
        ids = [i for span in spans for i in self.tokenizer(span.text, add_special_tokens=False)["input_ids"]]
        marker = self.tokenizer.convert_tokens_to_ids(self.image_token)
        if ids.count(marker) != 1:
            raise ValueError(
                f"prompt {sample_id!r}: the chat template placed {ids.count(marker)} image marker(s) "
                f"{self.image_token!r}; words fill exactly one image slot"
            )
        word_ids = words.token_ids(self.tokenizer)
        at = ids.index(marker)
        input_ids = long_tensor([*self.encoder.bos, *ids[:at], *[WORD_SLOT_ID] * len(word_ids), *ids[at + 1 :]])
        return ModelSample(sample_id, input_ids, torch.full_like(input_ids, IGNORE_INDEX), None, slot_words=word_ids)

    def finish_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return pixel_values

    def collate(self, samples: list[ModelSample], padding_side: str = "right") -> Batch:
        """Pad token tensors to the longest sample; stack the images of the samples that have one, in batch order."""
        input_ids, labels, attention_mask, extra = pad_tokens(samples, self.tokenizer.pad_token_id, padding_side)
        with_image = [s for s in samples if s.pixel_values is not None]
        pixel_values = stack_images([s.pixel_values for s in with_image]) if with_image else torch.zeros(0)
        for name in sorted({name for s in with_image for name in s.image_inputs}):
            extra[name] = stack_images([s.image_inputs[name] for s in with_image])
        extra |= slot_word_inputs([s.slot_words for s in samples])
        return Batch([s.id for s in samples], input_ids, attention_mask, labels, pixel_values, extra)
