"""Exact resume for a streamed dataset: each epoch's order fixed by its number, and the batches already trained skipped.

A restarted run must see the rest of the interrupted epoch, in the same order, and then the same later epochs as an
uninterrupted run. Two things make that hold:

- the stream's shuffles are seeded by ``(seed, epoch)``, not by how many epochs this process has iterated (webdataset's
  ``detshuffle`` counts passes, so a restarted process would replay epoch 0's order);
- the position, ``(epoch, batches trained on)``, is part of the checkpoint, and on restart the batches of the
  interrupted epoch that were already trained on are drawn and dropped (as ``accelerate.skip_first_batches`` does:
  exact, at the cost of decoding them again).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset


@dataclass
class StreamPosition:
    """How far training got in the data stream, on each rank: the epoch and how many of its batches were trained on."""

    epoch: int = 0
    batches: int = 0

    def state_dict(self) -> dict[str, int]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.batches = int(state["epoch"]), int(state["batches"])


def set_pipeline_epoch(pipeline: wds.DataPipeline, epoch: int) -> None:
    """Makes the pipeline's seeded shuffles (``wds.detshuffle``, seeded by ``seed + epoch``) give ``epoch``'s order."""
    for stage in pipeline.pipeline:
        if isinstance(stage, wds.detshuffle):
            stage.epoch = epoch - 1  # detshuffle adds one before each pass


class ResumableLoader(DataLoader):
    """A DataLoader whose every epoch starts at ``position``: the epoch's order, minus the batches already trained on.

    ``current_epoch`` tells the epoch being started (the trainer's). Workers are started afresh each epoch (not
    persistent), so that they receive the stream set to that epoch; the loader's own generator seeds them, so starting
    an epoch draws nothing from the global random state that dropout uses.
    """

    def __init__(
        self,
        dataset: IterableDataset,
        position: StreamPosition,
        current_epoch: Callable[[], int],
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("persistent_workers"):
            raise ValueError("persistent_workers would keep each worker's stream at the epoch it started with")
        super().__init__(dataset, generator=torch.Generator(), **kwargs)
        self.position = position
        self.current_epoch = current_epoch
        self.seed = seed

    def __iter__(self) -> Iterator[Any]:
        epoch = self.current_epoch()
        if epoch > self.position.epoch:
            self.position.epoch, self.position.batches = epoch, 0
        # An epoch before the position's is only iterated before a checkpoint's loop state is restored (Lightning
        # starts the loader early to count the steps of the LR schedule); that iterator is dropped unused.
        skip = self.position.batches if epoch == self.position.epoch else 0
        if isinstance(self.dataset, wds.DataPipeline):
            set_pipeline_epoch(self.dataset, epoch)
        self.generator.manual_seed(self.seed * 1_000_003 + epoch)
        iterator = super().__iter__()
        for _ in range(skip):
            next(iterator)
        return iterator
