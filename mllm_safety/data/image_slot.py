"""What fills a prompt's image slot when it is not an image: words, for the paper's ``img2text`` probe.

The safety-finetuning paper (Wang et al., CVPR 2025, ``evaluation/evaluate_MM_llava_ablation.py``) argues that safety
is "obscured, not lost" by putting a harmful request's token embeddings where the image features go: the model refuses
the request as words in the image slot though it answers it as pixels. What fills the slot is a property of the
prompt. The processor lays the slot out as one position per word token (``constants.WORD_SLOT_ID``) and carries the
ids beside the batch (``slot_word_ids``); the model's splice fills those positions with the LLM's input embeddings of
the ids, where it would put projected image features (``mllm_safety.model.mllm.fill_word_slots``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class WordsInImageSlot:
    """Words whose token embeddings (without BOS, one position per token) fill the image slot instead of an image."""

    text: str

    def load(self) -> WordsInImageSlot:
        """Nothing to open: the words are the slot's content (the evaluation loads every slot content alike)."""
        return self

    def describe(self) -> str:
        return f"words in the image slot: {self.text}"

    def token_ids(self, tokenizer) -> torch.Tensor:
        """The words' ids as the tokenizer gives them without special tokens (the paper drops the BOS: ``[:, 1:]``);
        an error naming the words when they give none."""
        ids = tokenizer(self.text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"words for the image slot {self.text!r} give no tokens")
        return torch.tensor(ids, dtype=torch.long)


def slot_word_inputs(slot_words: list[torch.Tensor | None]) -> dict[str, torch.Tensor]:
    """``{"slot_word_ids": ...}``: the word ids of every sample whose slot holds words, concatenated in batch order
    (as ``pixel_values`` holds the images of the samples that have one); empty when none does."""
    present = [ids for ids in slot_words if ids is not None]
    return {"slot_word_ids": torch.cat(present)} if present else {}
