"""Batched greedy generation of replies to eval prompts, each rank taking its own slice.

Every rank runs the same number of ``generate`` calls on batches of the same size: the slices are padded with
filler prompts whose replies are dropped, so ranks of a sharded model never wait on one another for a batch that
never comes. A prompt whose image cannot be opened is replaced by a filler in its batch and reported as skipped.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import lightning as L
import torch
import torch.distributed as dist

from mllm_safety.data.processor import ModelSample
from mllm_safety.evaluation.sets import BadImage, EvalPrompt

log = logging.getLogger(__name__)


@dataclass
class Generation:
    index: int
    """Position of the prompt in the evaluation's list of all prompts (every set, in order)."""
    prompt: EvalPrompt
    reply: str | None
    """None when the prompt was skipped."""
    error: str | None = None
    """Why the prompt was skipped (an image that failed to open), naming the file."""


def rank_slice(prompts: list[EvalPrompt], rank: int, world: int) -> list[int | None]:
    """Indices of the prompts this rank generates for, padded with None to the same length on every rank.

    Prompts are ordered by (has an image, question length) before they are dealt out, so a batch holds prompts of
    similar length and text-only prompts are not padded to the length of image prompts.
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside a world of {world}")
    order = sorted(range(len(prompts)), key=lambda i: (prompts[i].image is not None, len(prompts[i].question)))
    mine: list[int | None] = list(order[rank::world])
    return mine + [None] * (math.ceil(len(prompts) / world) - len(mine))


@torch.no_grad()
def generate_replies(module: L.LightningModule, samples: list[ModelSample], max_new_tokens: int) -> list[str]:
    """Greedy replies to a batch of prompt samples: the one call the safety evaluation makes into the model.

    ``module`` is the LightningModule (``.model`` the model, ``.processor`` its processor); prompts are left-padded
    so that every reply starts right after its prompt, decoding uses the KV cache, and a reply ends at any of the
    processor's stop tokens (every end-of-sequence id of the checkpoint).
    """
    processor = module.processor
    tokenizer = processor.tokenizer
    batch = module.transfer_batch_to_device(processor.collate(samples, padding_side="left"), module.device, 0)
    new_tokens = module.model.generate(
        **batch.generation_inputs(),
        max_new_tokens=max_new_tokens,
        eos_token_id=processor.stop_token_ids,
        pad_token_id=tokenizer.pad_token_id,
    )
    return [reply.strip() for reply in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def generate_for_rank(
    module: L.LightningModule,
    prompts: list[EvalPrompt],
    rank: int,
    world: int,
    batch_size: int,
    max_new_tokens: int,
) -> list[Generation]:
    """Replies to this rank's slice of ``prompts``, in batches of ``batch_size``."""
    processor = module.processor
    slots = rank_slice(prompts, rank, world)
    real = [index for index in slots if index is not None]
    filler_question = prompts[real[-1] if real else 0].question
    out: list[Generation] = []
    num_batches = math.ceil(len(slots) / batch_size)
    for number, start in enumerate(range(0, len(slots), batch_size)):
        samples: list[ModelSample] = []
        kept: list[tuple[int, int]] = []  # (row in the batch, prompt index)
        for index in slots[start : start + batch_size]:
            if index is not None:
                prompt = prompts[index]
                try:
                    image = prompt.image.load() if prompt.image is not None else None
                except BadImage as error:
                    log.warning("skipping %s/%s: %s", prompt.set_name, prompt.id, error)
                    out.append(Generation(index, prompt, None, str(error)))
                else:
                    kept.append((len(samples), index))
                    samples.append(processor.prompt(prompt.id, prompt.question, image))
                    continue
            samples.append(processor.prompt("<filler>", filler_question, None))
        replies = generate_replies(module, samples, max_new_tokens)
        out += [Generation(index, prompts[index], replies[row]) for row, index in kept]
        if rank == 0 and (number + 1) % max(1, num_batches // 10) == 0:
            log.info("safety evaluation: batch %d of %d on each rank", number + 1, num_batches)
    return out


def gather_generations(generations: list[Generation]) -> list[Generation]:
    """Every rank's generations on every rank, in prompt order (strings only: a few MB for thousands of replies)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts: list[list[Generation] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, generations)
        generations = [g for part in parts for g in part or []]
    return sorted(generations, key=lambda g: g.index)
