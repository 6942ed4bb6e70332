"""Streaming shards to every rank and worker in step: equal shares, the same number of batches, epoch-seeded order.

Each (rank, DataLoader worker) pair is a *slot*. In ``exact`` mode every epoch shuffles the shard order with
(seed, epoch), lays the selected samples of all shards end to end and gives slot ``s`` of ``S`` the contiguous range
``[s*N/S, (s+1)*N/S)``, read by position from the shards that range covers: each sample is seen once per epoch, and
shares differ by one sample at most even when shards differ in size. In ``resampled`` mode each slot draws shards
with replacement, weighted by their sample counts, for an endless stream cut into epochs of a fixed size.

Every slot yields the same number of full batches (:func:`~mllm_safety.data.batching.exact_batches`), so no rank
waits at the end of an epoch for a batch that never comes.
"""

from __future__ import annotations

import logging
import math
import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Literal

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mllm_safety.data.batching import NothingUsable, exact_batches, length_grouped_batches
from mllm_safety.data.conversation import Conversation, SampleError
from mllm_safety.data.processor import Batch, ModelSample, Processor
from mllm_safety.data.shards import ShardSlice, decode_sample, read_slice
from mllm_safety.data.skips import SKIP_FIXES, SkipTally

log = logging.getLogger(__name__)

StreamMode = Literal["exact", "resampled"]
Transform = Callable[[Conversation], Conversation]
"""What happens to a decoded sample before tokenizing: the curated experiments and the rejection swap."""


class SampleStream:
    """The per-sample part of the pipeline (decode, transform, tokenize), skipping and counting unusable samples."""

    def __init__(
        self,
        processor: Processor,
        transform: Transform,
        skip_bad_samples: bool,
        tally: SkipTally | None = None,
    ) -> None:
        self.processor = processor
        self.transform = transform
        self.skip_bad_samples = skip_bad_samples
        self.tally = SkipTally() if tally is None else tally

    @property
    def skipped(self) -> Counter[str]:
        return self.tally.skipped

    def process(self, raw: dict) -> ModelSample:
        conversation = decode_sample(raw)
        expected = raw.get("__id__")
        if expected is not None and conversation.id != expected:
            raise ValueError(
                f"{raw.get('__url__')} holds sample {conversation.id!r} where its manifest lists {expected!r}: "
                "the manifest does not describe these shards (rewrite both with mllm_safety.data.convert)"
            )
        return self.processor.stream_sample(self.transform(conversation))

    def __call__(self, raws: Iterator[dict]) -> Iterator[ModelSample]:
        for raw in raws:
            self.tally.seen += 1
            try:
                yield self.process(raw)
            except SampleError as error:
                if not self.skip_bad_samples:
                    raise
                self.tally.skip(error.reason, _example(error, raw))
                log.warning(
                    "skipped %s (%s so far in this worker: %d)", error, error.reason, self.skipped[error.reason]
                )


def _example(error: SampleError, raw: dict) -> str:
    """The skipped sample as the error names it, with where it is stored when the error does not say."""
    where = f"{raw.get('__key__')} in {raw.get('__url__')}"
    return str(error) if where in str(error) else f"{error} [{where}]"


def read_counted(pieces: Iterator[ShardSlice], tally: SkipTally) -> Iterator[dict]:
    """The raw samples of ``pieces``; those a damaged shard could not deliver are counted as seen and skipped."""
    for piece in pieces:
        lost = Counter()
        yield from read_slice(piece, lost)
        if lost["corrupt_tar"]:
            tally.seen += lost["corrupt_tar"]
            tally.skip("corrupt_tar", f"shard {piece.path}", lost["corrupt_tar"])


def exact_slices(pieces: list[ShardSlice], epoch: int, seed: int, num_slots: int, slot: int) -> list[ShardSlice]:
    """Slot ``slot``'s contiguous share of the epoch's samples, as slices of the shards it covers."""
    order = list(pieces)
    random.Random(f"shards/{seed}/{epoch}").shuffle(order)
    total = sum(len(piece.positions) for piece in order)
    start, stop = slot * total // num_slots, (slot + 1) * total // num_slots
    slices, offset = [], 0
    for piece in order:
        count = len(piece.positions)
        lo, hi = max(start, offset) - offset, min(stop, offset + count) - offset
        if lo < hi:
            slices.append(ShardSlice(piece.path, piece.positions[lo:hi], piece.ids[lo:hi]))
        offset += count
    return slices


def resampled_slices(pieces: list[ShardSlice], epoch: int, seed: int, slot: int) -> Iterator[ShardSlice]:
    """Shards drawn with replacement, weighted by their sample counts, forever."""
    rng = random.Random(f"resampled/{seed}/{epoch}/{slot}")
    weights = [1 if piece.positions is None else len(piece.positions) for piece in pieces]
    while True:
        yield rng.choices(pieces, weights)[0]


class ShardStream(IterableDataset):
    """Batches for one rank, produced by its DataLoader workers; see the module docstring for the split.

    ``pieces`` are whole shards: with positions and ids from the manifest, or (resampled mode only) bare paths.
    """

    def __init__(
        self,
        pieces: list[ShardSlice],
        processor: Processor,
        transform: Transform,
        *,
        batch_size: int,
        mode: StreamMode = "exact",
        samples_per_epoch: int | None = None,
        seed: int = 0,
        shuffle_buffer: int = 256,
        group_batches: int = 16,
        skip_bad_samples: bool = True,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if mode == "exact" and any(piece.positions is None for piece in pieces):
            raise ValueError("exact mode needs a manifest listing every shard's samples; use mode 'resampled'")
        self.pieces = pieces
        self.processor = processor
        self.transform = transform
        self.batch_size = batch_size
        self.mode = mode
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.group_batches = group_batches
        self.skip_bad_samples = skip_bad_samples
        self.rank = rank
        self.workers_per_rank = max(1, num_workers)
        self.num_slots = world_size * self.workers_per_rank
        known = None if any(piece.positions is None for piece in pieces) else sum(len(p.positions) for p in pieces)
        total = known if mode == "exact" or samples_per_epoch is None else samples_per_epoch
        if total is None:
            raise ValueError("resampled mode over shards without a manifest needs the number of samples per epoch")
        if total < self.num_slots:
            raise ValueError(
                f"{total} samples per epoch cannot be shared by {world_size} ranks x {self.workers_per_rank} "
                "workers; use fewer DataLoader workers"
            )
        self.samples_per_epoch = total
        self.batches_per_slot = math.ceil(math.ceil(total / self.num_slots) / batch_size)
        self._epoch = torch.zeros((), dtype=torch.long).share_memory_()

    @property
    def repeated_per_epoch(self) -> int:
        """Samples repeated each epoch (over all ranks) so that every slot fills the same number of batches."""
        return self.num_slots * self.batches_per_slot * self.batch_size - self.samples_per_epoch

    def set_epoch(self, epoch: int) -> None:
        """Seeds this epoch's order; shared memory, so workers started earlier (persistent ones) see it too."""
        self._epoch.fill_(epoch)

    def __len__(self) -> int:
        return self.batches_per_slot * self.workers_per_rank

    def __iter__(self) -> Iterator[Batch]:
        worker = get_worker_info()
        if (worker.num_workers if worker is not None else 1) != self.workers_per_rank:
            raise RuntimeError(
                f"the stream was split for {self.workers_per_rank} workers per rank but the DataLoader runs "
                f"{worker.num_workers if worker is not None else 0}; give both the same num_workers"
            )
        slot = self.rank * self.workers_per_rank + (worker.id if worker is not None else 0)
        epoch = int(self._epoch)
        tally = SkipTally()
        if self.mode == "exact":
            pieces = iter(exact_slices(self.pieces, epoch, self.seed, self.num_slots, slot))
        else:
            pieces = resampled_slices(self.pieces, epoch, self.seed, slot)
        raws = read_counted(pieces, tally)
        if self.shuffle_buffer:
            rng = random.Random(f"samples/{self.seed}/{epoch}/{slot}")
            raws = wds.shuffle(self.shuffle_buffer, self.shuffle_buffer, rng=rng)(raws)
        samples = SampleStream(self.processor, self.transform, self.skip_bad_samples, tally)(raws)
        batches = length_grouped_batches(
            samples,
            self.batch_size,
            self.group_batches,
            lambda sample: len(sample.input_ids),
            random.Random(f"batches/{self.seed}/{epoch}/{slot}"),
        )
        try:
            for items, repeated in exact_batches(batches, self.batches_per_slot, self.batch_size):
                batch = self.processor.collate(items)
                batch.stats, batch.skip_examples = tally.drain()
                batch.stats["repeated"] = repeated
                yield batch
        except NothingUsable as error:
            if not tally.skipped:
                raise
            reason, _ = tally.skipped.most_common(1)[0]
            raise NothingUsable(
                f"{error}: this worker read {tally.seen} samples and skipped {dict(tally.skipped)}, e.g. "
                f"{tally.examples[reason]}. Fix: {SKIP_FIXES[reason]}"
            ) from None


@dataclass
class StreamPosition:
    """How far training got in the stream on this rank: the epoch and how many of its batches were trained on.

    Saved in checkpoints (by the DataModule), so that a restarted run continues exactly where it stopped.
    """

    epoch: int = 0
    batches: int = 0

    def state_dict(self) -> dict[str, int]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.batches = int(state["epoch"]), int(state["batches"])


class EpochLoader(DataLoader):
    """A DataLoader of :class:`ShardStream` batches that starts every pass at the right epoch and position.

    Lightning calls ``set_epoch`` only on samplers, which an ``IterableDataset`` does not have; ``epoch_fn``
    (e.g. the trainer's ``current_epoch``) is read each time iteration starts instead. When the pass resumes the
    epoch of ``position``, the batches already trained on are drawn and dropped (exact, at the cost of decoding them
    again, as ``accelerate.skip_first_batches`` does). The loader's own generator, seeded by (seed, epoch), seeds the
    workers, so starting an epoch draws nothing from the global random state that dropout uses.
    """

    def __init__(
        self,
        dataset: ShardStream,
        epoch_fn: Callable[[], int],
        position: StreamPosition | None = None,
        seed: int = 0,
        **kwargs,
    ) -> None:
        super().__init__(dataset, batch_size=None, generator=torch.Generator(), **kwargs)
        self.epoch_fn = epoch_fn
        self.position = position or StreamPosition()
        self.seed = seed

    def __iter__(self):
        epoch = self.epoch_fn()
        if epoch > self.position.epoch:
            self.position.epoch, self.position.batches = epoch, 0
        # An epoch before the position's is only iterated before a checkpoint's loop state is restored (Lightning
        # starts the loader early to count the steps of the LR schedule); that iterator is dropped unused.
        skip = self.position.batches if epoch == self.position.epoch else 0
        self.dataset.set_epoch(epoch)
        self.generator.manual_seed(self.seed * 1_000_003 + epoch)
        iterator = super().__iter__()
        for _ in range(skip):
            next(iterator)
        return iterator
