"""Sampling seeded per prompt, so a sampled reply depends on its prompt and the seed, never on its batch or rank.

Hugging Face's ``generate`` samples every row of a batch from one random stream: a prompt's reply changes with the
prompts batched beside it, the batch size and the number of ranks. Here each row draws its noise from a generator of
its own, seeded by (seed, prompt key), and the sample is taken with the Gumbel-max trick: the arg-max of the
(temperature-scaled, top-k / top-p filtered) logits plus Gumbel noise is an exact sample of the softmax of those
logits. ``generate`` then decodes greedily over the perturbed scores, and the t-th token of a reply depends only on
the prompt, the seed and the tokens before it.
"""

from __future__ import annotations

import hashlib

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


def row_seed(seed: int, key: str) -> int:
    """A 63-bit seed from the evaluation seed and a prompt's key, the same in every process (``hash()`` is not)."""
    digest = hashlib.sha256(f"{seed}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class PerRowGumbelNoise(LogitsProcessor):
    """Adds Gumbel noise drawn from each row's own generator; greedy decoding over the result samples each row.

    Every call draws one vocabulary-sized vector per row, so the noise of step t of a row is the t-th draw of its
    generator whatever the other rows do. The noise is drawn on the CPU: the same numbers on every device.
    """

    def __init__(self, seeds: list[int]) -> None:
        self.generators = [torch.Generator().manual_seed(seed) for seed in seeds]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if scores.shape[0] != len(self.generators):
            raise ValueError(f"{scores.shape[0]} rows of scores for {len(self.generators)} seeded rows")
        tiny = torch.finfo(torch.float32).tiny
        uniform = torch.stack(
            [torch.rand(scores.shape[1], generator=g, dtype=torch.float32) for g in self.generators]
        ).clamp_(min=tiny)
        gumbel = -torch.log(-torch.log(uniform))
        return scores + gumbel.to(device=scores.device, dtype=scores.dtype)


def sampling_processors(seeds: list[int], temperature: float, top_k: int | None, top_p: float) -> LogitsProcessorList:
    """Temperature, top-k and top-p (in Hugging Face's order), then per-row Gumbel noise: with greedy decoding, the
    same distribution as ``generate(do_sample=True, ...)`` with one seeded generator per row."""
    processors = LogitsProcessorList()
    if temperature != 1.0:
        processors.append(TemperatureLogitsWarper(temperature))
    if top_k is not None:
        processors.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p))
    processors.append(PerRowGumbelNoise(seeds))
    return processors
