"""Batched generation of replies to eval prompts, each rank taking its own slice, with one shared setting.

Every rank runs the same number of ``generate`` calls on batches of the same size: the slices are padded with
filler prompts whose replies are dropped, so ranks of a sharded model never wait on one another for a batch that
never comes. A prompt whose image cannot be opened is replaced by a filler in its batch and reported as skipped.

:class:`GenerationSettings` is the one place generation is configured, for ``SafetyEvalCallback`` and
``mllm_safety.evaluate`` alike, so the figures of a training run and of a standalone evaluation are comparable. A
set run under a protocol (``BenchmarkSpec.protocol``) overrides some settings for its own prompts; prompts of
different settings are never batched together. Sampling is seeded per prompt (``sampling.py``): replies are the same
whatever the batch size, the batch composition or the number of ranks.

Beside each reply, :func:`paper_view` gives the text the safety-finetuning paper's scripts judged in its place, for
the sets whose protocol asks for it (``Protocol.paper_view``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass

import lightning as L
import torch
import torch.distributed as dist

from mllm_safety.data.image_slot import WordsInImageSlot
from mllm_safety.data.processor import ModelSample
from mllm_safety.evaluation.sampling import row_seed, sampling_processors
from mllm_safety.evaluation.sets import BadImage, EvalPrompt, EvalSet, all_prompts

log = logging.getLogger(__name__)


@dataclass
class GenerationSettings:
    """How replies are generated; the same defaults for the training callback and the standalone evaluation."""

    max_new_tokens: int = 256
    """Tokens generated per reply at most (the paper's protocols: 512; refusals show in the first few dozen)."""
    batch_size: int = 16
    """Prompts generated together per device (replies do not depend on it)."""
    do_sample: bool = False
    """Sample instead of greedy decoding (the paper's FigStep protocol samples at temperature 0.2)."""
    temperature: float = 1.0
    """Sampling temperature (> 0)."""
    top_k: int | None = None
    """Sample among the k most likely tokens only (Hugging Face's ``generate`` applies 50 unless told otherwise)."""
    top_p: float = 1.0
    """Nucleus sampling: the smallest set of tokens with this much probability (1: all tokens)."""
    seed: int = 0
    """Sampling seed; each prompt's noise is seeded by (seed, set, prompt id)."""
    min_new_tokens: int = 0
    """Tokens generated before an end of sequence may end the reply (VLGuard's evaluation: 1, so no reply is empty;
    0: none forced, as LLaVA's and the paper's scripts)."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError(f"generation: max_new_tokens and batch_size must be >= 1, got {self}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(
                f"generation: min_new_tokens must be in [0, max_new_tokens={self.max_new_tokens}], "
                f"got {self.min_new_tokens}"
            )
        if not self.temperature > 0 or not 0 < self.top_p <= 1 or (self.top_k is not None and self.top_k < 1):
            raise ValueError(f"generation: need temperature > 0, 0 < top_p <= 1 and top_k >= 1, got {self}")

    def for_set(self, eval_set: EvalSet) -> GenerationSettings:
        """These settings with the overrides of the set's protocol, if it has one."""
        if eval_set.protocol is None or not eval_set.protocol.generation:
            return self
        return dataclasses.replace(self, **eval_set.protocol.generation)

    def as_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


@dataclass
class Generation:
    index: int
    """Position of the prompt in the evaluation's list of all prompts (every set, in order)."""
    prompt: EvalPrompt
    reply: str | None
    """None when the prompt was skipped."""
    error: str | None = None
    """Why the prompt was skipped (an image that failed to open), naming the file."""
    paper_view: str | None = None
    """The reply as the paper's scripts saw it (:func:`paper_view`), for sets whose protocol asks; else None."""


@dataclass(frozen=True)
class Reply:
    text: str
    """The reply: the new tokens decoded without special tokens, stripped."""
    tokens: list[int]
    """The new tokens (padding included), for :func:`paper_view` where a set's protocol asks for it."""


PAPER_VIEW_SLICE = slice(4, -4)
"""``outputs[4:-4]`` of the paper's ``evaluate_figstep_llava.py`` and ``evaluate_MM_llava_ablation.py``."""


def paper_view(tokenizer, new_tokens: list[int], stop_token_ids: list[int]) -> str:
    """The reply as the paper's scripts judged it: ``tokenizer.decode(output_ids[0]).strip()[4:-4]``.

    LLaVA's ``generate`` passes ``inputs_embeds`` to transformers' (4.37, LLaVA's pin), which then starts the output
    ids with the BOS id (``_maybe_initialize_input_ids_for_generation``: ``ones((batch, 1)) * bos_token_id``; later
    versions start them empty) and ends them with the EOS when one is generated. So ``output_ids[0]`` is BOS, the
    reply's tokens and its EOS; decoded with special tokens (``"<s> I cannot ...</s>"`` with LLaVA-1.5's Llama
    tokenizer), stripped, then sliced: ``[4:]`` drops ``"<s> "`` and ``[:-4]`` the ``"</s>"``. What the slice eats
    depends on the decode: a reply cut at ``max_new_tokens`` has no ``</s>`` and loses its last four characters; a
    tokenizer that decodes ``"<s>I"`` (no space) loses the reply's first one; a model without a BOS loses four.
    Here: the tokenizer's BOS id (if it has one), the new tokens up to and including the first stop token (padding
    after it dropped), decoded by the model's tokenizer, stripped, sliced.
    """
    stops = set(stop_token_ids)
    end = next((i + 1 for i, token in enumerate(new_tokens) if token in stops), len(new_tokens))
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return tokenizer.decode(bos + list(new_tokens[:end]), skip_special_tokens=False).strip()[PAPER_VIEW_SLICE]


def prompt_key(prompt: EvalPrompt) -> str:
    """What identifies a prompt across runs: its set and id (the seed of its sampling noise)."""
    return f"{prompt.set_name}/{prompt.id}"


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
def generate_replies(
    module: L.LightningModule, samples: list[ModelSample], settings: GenerationSettings, keys: list[str]
) -> list[Reply]:
    """Replies to a batch of prompt samples: the one call the evaluation makes into the model.

    ``module`` is the LightningModule (``.model`` the model, ``.processor`` its processor); prompts are left-padded
    so that every reply starts right after its prompt, decoding uses the KV cache, and a reply ends at any of the
    processor's stop tokens (every end-of-sequence id of the checkpoint and the chat template's end-of-turn marker).
    ``keys`` seed each row's sampling.
    """
    processor = module.processor
    tokenizer = processor.tokenizer
    batch = module.transfer_batch_to_device(processor.collate(samples, padding_side="left"), module.device, 0)
    processors = None
    if settings.do_sample:
        seeds = [row_seed(settings.seed, key) for key in keys]
        processors = sampling_processors(seeds, settings.temperature, settings.top_k, settings.top_p)
    new_tokens = module.model.generate(
        **batch.generation_inputs(),
        max_new_tokens=settings.max_new_tokens,
        min_new_tokens=settings.min_new_tokens,
        eos_token_id=processor.stop_token_ids,
        pad_token_id=tokenizer.pad_token_id,
        logits_processor=processors,
    )
    texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    rows = new_tokens.tolist()
    return [Reply(text.strip(), row) for text, row in zip(texts, rows)]


def generate_for_rank(
    module: L.LightningModule, sets: list[EvalSet], rank: int, world: int, settings: GenerationSettings
) -> list[Generation]:
    """Replies to this rank's slice of the sets' prompts (indices as in ``all_prompts(sets)``): the prompts of each
    generation setting (``settings`` with each set's protocol overrides) are dealt out and batched apart."""
    check_image_slots(module.model, sets)
    prompts = all_prompts(sets)
    viewed = {s.name for s in sets if s.protocol is not None and s.protocol.paper_view}
    groups: dict[tuple, tuple[GenerationSettings, list[int]]] = {}
    offset = 0
    for eval_set in sets:
        own = settings.for_set(eval_set)
        group = groups.setdefault(tuple(own.as_dict().items()), (own, []))
        group[1].extend(range(offset, offset + len(eval_set.prompts)))
        offset += len(eval_set.prompts)
    out: list[Generation] = []
    for own, indices in groups.values():
        out += _generate_group(module, prompts, indices, rank, world, own, viewed)
    return out


def check_image_slots(model, sets: list[EvalSet]) -> None:
    """Before any generation: an error naming the set (its probe mode) and the model's family when a set fills the
    image slot with words (the ``img2text`` probe) and the model's image slot cannot take them."""
    for eval_set in sets:
        if any(isinstance(p.image, WordsInImageSlot) for p in eval_set.prompts):
            model.check_words_in_image_slot(f"set {eval_set.name} (the img2text probe)")


def _generate_group(
    module: L.LightningModule,
    prompts: list[EvalPrompt],
    indices: list[int],
    rank: int,
    world: int,
    settings: GenerationSettings,
    viewed: set[str],
) -> list[Generation]:
    processor = module.processor
    slots = [indices[i] if i is not None else None for i in rank_slice([prompts[i] for i in indices], rank, world)]
    real = [index for index in slots if index is not None]
    filler = prompts[real[-1] if real else indices[0]]
    out: list[Generation] = []
    size = settings.batch_size
    num_batches = math.ceil(len(slots) / size)
    for number, start in enumerate(range(0, len(slots), size)):
        samples: list[ModelSample] = []
        keys: list[str] = []
        kept: list[tuple[int, int]] = []  # (row in the batch, prompt index)
        for index in slots[start : start + size]:
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
                    keys.append(prompt_key(prompt))
                    continue
            samples.append(processor.prompt("<filler>", filler.question, None))
            keys.append("<filler>")
        replies = generate_replies(module, samples, settings, keys)
        for row, index in kept:
            view = None
            if prompts[index].set_name in viewed:  # decoded again only where the protocol reports the paper's view
                view = paper_view(processor.tokenizer, replies[row].tokens, processor.stop_token_ids)
            out.append(Generation(index, prompts[index], replies[row].text, paper_view=view))
        if rank == 0 and (number + 1) % max(1, num_batches // 10) == 0:
            log.info("evaluation: batch %d of %d on each rank (%d prompts)", number + 1, num_batches, len(indices))
    return out


def gather_generations(generations: list[Generation]) -> list[Generation]:
    """Every rank's generations on every rank, in prompt order (strings only: a few MB for thousands of replies)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts: list[list[Generation] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, generations)
        generations = [g for part in parts for g in part or []]
    return sorted(generations, key=lambda g: g.index)
