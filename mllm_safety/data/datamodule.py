"""The training data: shards -> selection (mixture) -> safe decode -> curated experiments, rejection swap -> tokenize
-> even batches."""

from __future__ import annotations

import warnings
from collections import Counter

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from mllm_safety.constants import cache_dir
from mllm_safety.data.curated import CuratedConfig, CuratedTransform, Transforms, left_out, refusing
from mllm_safety.data.processor import Batch, Processor
from mllm_safety.data.rejection import RejectionConfig, RejectionSwap
from mllm_safety.data.selection import eligible_ids, select_samples
from mllm_safety.data.shards import ShardSlice, expand_shards, first_images, manifest_entries
from mllm_safety.data.skips import SkipShareGuard
from mllm_safety.data.streaming import EpochLoader, ShardStream, StreamMode, StreamPosition
from mllm_safety.data.synthetic import ensure_demo_shards
from mllm_safety.world.samples import WorldData, ensure_world_shards

# The stream gives every worker its own share and reports its exact length; Lightning warns about any such dataset.
warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")


class SafetyDataModule(L.LightningDataModule):
    """Benign instruction data with a fraction of replies swapped for a rejection.

    The model hands over its processor (chat encoding, image transform) with :meth:`connect` before training, so the
    data always matches the vision tower and chat template being trained, and the data layer never reaches into
    the model.
    """

    def __init__(
        self,
        train_shards: str | list[str] | None = None,
        rejection_ratio: float = 0.0,
        rejection: RejectionConfig = RejectionConfig(),
        mixture: dict[str, int | None] | None = None,
        curated: CuratedConfig = CuratedConfig(),
        batch_size: int = 8,
        num_workers: int = 1,
        mode: StreamMode = "exact",
        num_samples: int | None = None,
        shuffle_buffer: int = 256,
        group_by_length: bool = True,
        group_buffer: int = 16,
        seed: int = 0,
        skip_bad_samples: bool = True,
        max_skipped_share: float = 0.01,
        demo_samples: int = 512,
        donor_images: int = 64,
        world: WorldData | None = None,
    ) -> None:
        """
        Args:
            train_shards: Shard paths, brace or glob patterns (``/data/llava-{000..099}.tar``). ``None`` generates
                the project's demo set (synthetic images with benign Q&A) on first use.
            rejection_ratio: Fraction r of the eligible samples (``rejection.sources``) whose reply is swapped for
                a rejection: exactly round(r·N) of them when the shards have a manifest.
            rejection: How replies are swapped (sentence or pool, turns kept, end-of-turn learning, image
                ablation, eligible sources, seed).
            mixture: Samples per source, e.g. ``{llava: 5000, med: 2000}`` (``null`` for all of a source); sources
                not named are left out. ``null`` uses every sample. Needs a manifest.
            curated: The paper's comparison experiments on a curated source's samples (``--format vlguard``):
                image content, refusal replies, safe turns or images removed, one turn each, refusal share.
            batch_size: Samples per batch on each device.
            num_workers: DataLoader worker processes per device.
            mode: ``exact``: every selected sample once per epoch, split evenly over ranks and workers (needs a
                manifest); ``resampled``: shards drawn with replacement for an endless stream, ``num_samples`` a
                epoch.
            num_samples: Samples per epoch in resampled mode (default: the selected samples).
            shuffle_buffer: Samples held in each worker's shuffle buffer (0 keeps storage order within a shard).
            group_by_length: Batch samples of similar length together to cut padding.
            group_buffer: Batches pooled and sorted by length when grouping.
            seed: Seed of the mixture, shard order and sample shuffling (varied per epoch).
            skip_bad_samples: Skip and count samples that cannot be used (bad JSON or image, no reply, too long,
                damaged shard), logged as ``data/skipped_<reason>``, instead of stopping the run.
            max_skipped_share: The largest share of the samples seen that one skip reason may take, summed over
                workers and ranks; past it the run stops, naming the reason, an example and the fix. Judged once
                200 samples were seen, then at the end of every epoch. ``1`` never stops.
            demo_samples: Size of the generated demo set when ``train_shards`` is ``None``.
            donor_images: Images collected from the data for ``rejection.image: other``.
            world: Generate one of the world's training sets instead (``mllm_safety.world``: ``{kind, samples,
                seed}``), tokenized for the model's LLM; leave ``train_shards`` unset.
        """
        super().__init__()
        self.rejection = rejection
        self.rejection_ratio = rejection_ratio
        self.curated = curated
        RejectionSwap(rejection_ratio, self.rejection)  # fail at configuration time, not after the model loads
        self.skip_guard = SkipShareGuard(max_skipped_share)
        problems = [
            f"{name} must be >= {low}, got {value}"
            for name, value, low in (
                ("batch_size", batch_size, 1),
                ("num_workers", num_workers, 0),
                ("shuffle_buffer", shuffle_buffer, 0),
                ("group_buffer", group_buffer, 1),
                ("num_samples", num_samples if num_samples is not None else 1, 1),
                ("donor_images", donor_images, 2),
            )
            if value < low
        ]
        if mode == "exact" and num_samples is not None:
            problems.append("num_samples sets the epoch of mode 'resampled'; exact mode takes it from the manifest")
        if world is not None and train_shards is not None:
            problems.append("data.world generates the training set; leave data.train_shards unset")
        if problems:
            raise ValueError("; ".join(problems))
        self.train_shards = train_shards
        self.mixture = mixture
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.mode = mode
        self.num_samples = num_samples
        self.shuffle_buffer = shuffle_buffer
        self.group_batches = group_buffer if group_by_length else 1
        self.seed = seed
        self.skip_bad_samples = skip_bad_samples
        self.demo_samples = demo_samples
        self.donor_images = donor_images
        self.world = world
        self.pieces: list[ShardSlice] = []
        self.swap: RejectionSwap | None = None
        self.curated_transform: CuratedTransform | None = None
        self.position = StreamPosition()
        self.processor: Processor | None = None

    def connect(self, processor: Processor) -> None:
        """Take the model's processor: how conversations become token ids and images become pixels."""
        self.processor = processor

    def prepare_data(self) -> None:
        if self.train_shards is None:
            self._generated_shards()

    def _generated_shards(self) -> list[str]:
        """The shards of the world set or the demo set, generated on first use."""
        if self.world is not None:
            if self.processor is None:
                raise RuntimeError("data.world needs the model's tokenizer: call connect(model.processor) first")
            shards = ensure_world_shards(cache_dir() / "data", self.processor.tokenizer, self.world)
        else:
            shards = ensure_demo_shards(cache_dir() / "data", self.demo_samples, self.seed)
        return [str(p) for p in shards]

    def setup(self, stage: str) -> None:
        if self.train_shards is None:
            shards = self._generated_shards()
        else:
            shards = expand_shards(self.train_shards)
        entries = manifest_entries(shards)
        if entries is None:
            if self.mode == "exact" or self.num_samples is None or self.mixture is not None:
                raise ValueError(
                    f"{self.train_shards!r} has no manifest.json beside the shards: convert them with "
                    "`python -m mllm_safety.data.convert`, or set data.mode=resampled and data.num_samples "
                    "(no mixture; rejection ratios then hold in expectation only)"
                )
            if self.curated.contrast == "no_safe_images" or self.curated.refusal_share is not None:
                raise ValueError(
                    "data.curated.contrast no_safe_images and data.curated.refusal_share choose samples by the kinds "
                    f"of their turns listed in manifest.json, which {self.train_shards!r} lacks: convert them"
                )
            self.pieces = [ShardSlice(shard) for shard in shards]
            ids = None
            curated_pieces, refusers = self.pieces, None
        else:
            kinds = {i: k for _, entry in entries if entry.kinds is not None for i, k in zip(entry.ids, entry.kinds)}
            selected = select_samples(entries, self.mixture, self.seed, exclude=left_out(self.curated, kinds))
            self.pieces = [ShardSlice(s.path, s.positions, s.ids) for s in selected]
            chosen = {i: kinds[i] for shard in selected for i in shard.ids if i in kinds}
            refusers = refusing(self.curated, chosen)
            curated_sources = {entry.source for _, entry in entries if entry.kinds is not None}
            curated_pieces = [piece for piece, s in zip(self.pieces, selected) if s.source in curated_sources]
            ids = eligible_ids(selected, self.rejection.sources)
            counts: Counter[str] = Counter()
            for shard in selected:
                counts[shard.source] += len(shard.ids)
            rank_zero_info(f"training samples per source: {dict(counts)}")
        donors = None
        if self.rejection.image == "other" and self.rejection_ratio > 0:
            donors = first_images(self.pieces, self.donor_images)
        self.swap = RejectionSwap(self.rejection_ratio, self.rejection, ids=ids, donors=donors)
        curated_donors = first_images(curated_pieces, self.donor_images) if self.curated.image == "other" else None
        self.curated_transform = CuratedTransform(self.curated, refusers, curated_donors)
        if refusers is not None:
            rank_zero_info(f"curated refusal share: {len(refusers)} of {len(chosen)} curated samples refuse")
        if self.swap.chosen is not None:
            rank_zero_info(f"rejection swap: {len(self.swap.chosen)} of {len(ids)} eligible samples")

    @property
    def transform(self) -> Transforms:
        """What every decoded sample goes through before tokenizing: the curated experiments, then the swap."""
        if self.swap is None or self.curated_transform is None:
            raise RuntimeError("SafetyDataModule.setup() builds the sample transforms; call it first")
        return Transforms(self.curated_transform, self.swap)

    def train_dataloader(self) -> EpochLoader:
        if self.processor is None:
            raise RuntimeError("SafetyDataModule.connect(model.processor) must be called before training")
        stream = ShardStream(
            self.pieces,
            self.processor,
            self.transform,
            batch_size=self.batch_size,
            mode=self.mode,
            samples_per_epoch=self.num_samples,
            seed=self.seed,
            shuffle_buffer=self.shuffle_buffer,
            group_batches=self.group_batches,
            skip_bad_samples=self.skip_bad_samples,
            rank=self.trainer.global_rank,
            world_size=self.trainer.world_size,
            num_workers=self.num_workers,
        )
        if stream.repeated_per_epoch > 0.05 * stream.samples_per_epoch:
            rank_zero_warn(
                f"{stream.repeated_per_epoch} samples per epoch are repeats so that {stream.num_slots} rank x worker "
                f"slots fill {stream.batches_per_slot} batches of {self.batch_size} each from "
                f"{stream.samples_per_epoch} samples; fewer workers or a smaller batch repeat less"
            )
        return EpochLoader(
            stream,
            epoch_fn=lambda: self.trainer.current_epoch,
            position=self.position,
            seed=self.seed,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def on_after_batch_transfer(self, batch: Batch, dataloader_idx: int) -> Batch:
        """Finish the images on the device (``uint8`` ones are scaled and normalized: :class:`MultimodalProcessor`)."""
        if isinstance(batch, Batch):
            batch.pixel_values = self.processor.finish_pixels(batch.pixel_values)
        return batch

    def on_before_batch_transfer(self, batch: Batch, dataloader_idx: int) -> Batch:
        if self.trainer.training:
            self.position.batches += 1  # this batch goes into a training step
            self._judge_skips(batch)
        return batch

    def _judge_skips(self, batch: Batch) -> None:
        """Add the batch's skip counts and, at the batches every rank judges alike, stop a run losing too much."""
        self.skip_guard.add(batch.stats, batch.skip_examples)
        if self.skip_guard.due(epoch_ends=self.position.batches >= self.trainer.num_training_batches):
            strategy = self.trainer.strategy
            self.skip_guard.check(lambda counts: strategy.reduce(counts, reduce_op="sum"), strategy.root_device)

    def state_dict(self) -> dict[str, int]:
        """The stream position, saved in checkpoints so that a restarted run continues exactly where this one was."""
        return self.position.state_dict()

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.position.load_state_dict(state_dict)
