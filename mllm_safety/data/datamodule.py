"""The training data: webdataset shards -> safe decode -> rejection swap -> tokenize -> padded batches."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator

import lightning as L
import webdataset as wds

from mllm_safety.data.conversation import Conversation, SampleError
from mllm_safety.data.processor import Batch, ModelSample, MultimodalProcessor
from mllm_safety.data.rejection import RejectionConfig, RejectionSwap
from mllm_safety.data.resumable import ResumableLoader, StreamPosition
from mllm_safety.data.shards import decode_sample, expand_shards, read_manifest
from mllm_safety.data.synthetic import ensure_demo_shards
from mllm_safety.model.llm import cache_dir

log = logging.getLogger(__name__)


class SampleStream:
    """The per-sample part of the pipeline, skipping (and counting) samples that cannot be trained on.

    A picklable callable so that each DataLoader worker gets its own copy.
    """

    def __init__(self, processor: MultimodalProcessor, swap: RejectionSwap, skip_bad_samples: bool) -> None:
        self.processor = processor
        self.swap = swap
        self.skip_bad_samples = skip_bad_samples
        self.skipped: Counter[str] = Counter()

    def process(self, raw: dict) -> ModelSample:
        conversation: Conversation = decode_sample(raw)
        return self.processor(self.swap(conversation))

    def __call__(self, raws: Iterator[dict]) -> Iterator[ModelSample]:
        for raw in raws:
            try:
                yield self.process(raw)
            except SampleError as error:
                if not self.skip_bad_samples:
                    raise
                self.skipped[error.reason] += 1
                log.warning("skipped %s (%s so far: %d)", error, error.reason, self.skipped[error.reason])


class SafetyDataModule(L.LightningDataModule):
    """Benign instruction data with a fraction of replies swapped for a rejection.

    The tokenizer and image transform come from the model (``trainer.lightning_module.processor``), so the data
    always matches the vision tower and chat template being trained.
    """

    def __init__(
        self,
        train_shards: str | list[str] | None = None,
        rejection_ratio: float = 0.0,
        rejection: RejectionConfig | None = None,
        batch_size: int = 8,
        num_workers: int = 1,
        shuffle_buffer: int = 256,
        seed: int = 0,
        num_samples: int | None = None,
        skip_bad_samples: bool = True,
        demo_samples: int = 512,
    ) -> None:
        """
        Args:
            train_shards: Shard paths, brace or glob patterns (``/data/llava-{000..099}.tar``). ``None`` generates
                the project's demo set (synthetic images with benign Q&A) on first use.
            rejection_ratio: Fraction r of samples whose reply is swapped for the rejection sentence.
            rejection: How replies are swapped (sentence, seed, turns kept, end-of-turn learning).
            batch_size: Samples per batch on each device.
            num_workers: DataLoader worker processes per device.
            shuffle_buffer: Samples held in the shuffle buffer (0 disables sample shuffling).
            seed: Seed of shard and sample shuffling.
            num_samples: Samples in the shards, for the epoch length; read from the shards' ``manifest.json`` when
                not given.
            skip_bad_samples: Skip and count samples that cannot be used (bad JSON, missing image, no reply, too
                long) with a warning naming each, instead of stopping the run.
            demo_samples: Size of the generated demo set when ``train_shards`` is ``None``.
        """
        super().__init__()
        self.rejection = rejection or RejectionConfig()
        self.rejection_ratio = rejection_ratio
        RejectionSwap(rejection_ratio, self.rejection)  # fail at configuration time, not after the model loads
        if batch_size < 1 or num_workers < 0 or shuffle_buffer < 0:
            raise ValueError(
                f"batch_size ({batch_size}) must be >= 1, num_workers ({num_workers}) and shuffle_buffer "
                f"({shuffle_buffer}) >= 0"
            )
        self.train_shards = train_shards
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.num_samples = num_samples
        self.skip_bad_samples = skip_bad_samples
        self.demo_samples = demo_samples
        self.shards: list[str] = []
        self.swap: RejectionSwap | None = None
        self.position = StreamPosition()

    def prepare_data(self) -> None:
        if self.train_shards is None:
            ensure_demo_shards(cache_dir() / "data", self.demo_samples, self.seed)

    def setup(self, stage: str) -> None:
        if self.train_shards is None:
            self.shards = [str(p) for p in ensure_demo_shards(cache_dir() / "data", self.demo_samples, self.seed)]
        else:
            self.shards = expand_shards(self.train_shards)
        manifest = read_manifest(self.shards)
        if self.num_samples is None:
            if manifest is None:
                raise ValueError(
                    f"cannot tell how many samples {self.train_shards!r} hold: no manifest.json beside the shards; "
                    "set data.num_samples"
                )
            self.num_samples = int(manifest["num_samples"])
        ids = manifest.get("ids") if manifest else None
        self.swap = RejectionSwap(self.rejection_ratio, self.rejection, ids=ids)

    def train_dataloader(self) -> ResumableLoader:
        processor: MultimodalProcessor = self.trainer.lightning_module.processor
        world_size = self.trainer.world_size
        stream = SampleStream(processor, self.swap, self.skip_bad_samples)
        stages = [
            wds.SimpleShardList(self.shards),
            wds.detshuffle(bufsize=len(self.shards), initial=len(self.shards), seed=self.seed),
            wds.split_by_node,
            wds.split_by_worker,
            wds.tarfile_to_samples(),
        ]
        if self.shuffle_buffer:
            stages.append(wds.detshuffle(self.shuffle_buffer, initial=self.shuffle_buffer, seed=self.seed))
        stages.append(stream)
        pipeline = wds.DataPipeline(*stages).with_length(self.num_samples // world_size, silent=True)
        return ResumableLoader(
            pipeline,
            self.position,
            lambda: self.trainer.current_epoch,
            seed=self.seed,
            batch_size=self.batch_size,
            collate_fn=processor.collate,
            num_workers=self.num_workers,
        )

    def on_before_batch_transfer(self, batch: Batch, dataloader_idx: int) -> Batch:
        if self.trainer.training:
            self.position.batches += 1  # this batch goes into a training step
        return batch

    def state_dict(self) -> dict[str, int]:
        """The stream position, saved in checkpoints so that a restarted run continues exactly where this one was."""
        return self.position.state_dict()

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.position.load_state_dict(state_dict)
