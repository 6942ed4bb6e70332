"""Small shard sets, a small processor and a sample-recording callback for the data tests."""

from __future__ import annotations

import io
import json
from pathlib import Path

import lightning as L
from PIL import Image
from torchvision import transforms as T

from mllm_safety.constants import IMAGE_TOKEN_ID
from mllm_safety.data.conversation import ChatEncoder
from mllm_safety.data.manifest import Manifest, ShardSetWriter
from mllm_safety.data.processor import MultimodalProcessor
from mllm_safety.data.selection import select_samples
from mllm_safety.data.shards import ShardSlice, expand_shards, manifest_entries


def count_shard_writes(monkeypatch) -> list[str]:
    """Records the source of every shard set the generators start writing (a write counter: a set rebuilt and then
    discarded in favour of the existing copy leaves the files, and their times, untouched)."""
    from mllm_safety.data import synthetic

    started: list[str] = []

    class CountingWriter(ShardSetWriter):
        def __init__(self, folder, source: str, shard_size: int) -> None:
            started.append(source)
            super().__init__(folder, source, shard_size)

    monkeypatch.setattr(synthetic, "ShardSetWriter", CountingWriter)
    return started


def png_bytes(colour: str | tuple[int, int, int] = "red", size: int = 32) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def record(sample_id: str, image: bool = True, turns: int = 1, answer: str = "Red.") -> dict:
    conversations = []
    for turn in range(turns):
        question = f"Question {turn} about {sample_id}?"
        if image and turn == 0:
            question = f"<image>\n{question}"
        conversations += [{"from": "human", "value": question}, {"from": "gpt", "value": answer * (turn + 1)}]
    return {"id": sample_id, "conversations": conversations}


def write_source(folder: Path, source: str, shard_sizes: list[int], image_every: int = 2) -> Manifest:
    """Add a source with shards of the given sizes (ids ``<source>-<n>``) to the set in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    manifest = Manifest.read(folder) or Manifest(shards=[])
    index = 0
    with ShardSetWriter(folder, source, shard_size=max(shard_sizes)) as writer:
        for size in shard_sizes:
            writer.start_shard()
            for _ in range(size):
                sample_id = f"{source}-{index}"
                image = index % image_every == 0
                writer.write(sample_id, record(sample_id, image), ("png", png_bytes()) if image else None)
                index += 1
    manifest.shards += writer.entries
    manifest.write(folder)
    return manifest


def tiny_processor(tokenizer, image_tokens: int = 4, max_length: int = 256) -> MultimodalProcessor:
    transform = T.Compose(
        [T.Resize(16), T.CenterCrop(16), T.ToTensor(), T.Normalize((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))]
    )
    return MultimodalProcessor(ChatEncoder(tokenizer, image_tokens, IMAGE_TOKEN_ID, max_length), transform, (16, 16))


class RecordSeenIds(L.Callback):
    """Writes, per rank, the ids of every batch (repeats marked) to ``seen-rank<R>.json`` in the run folder."""

    def __init__(self) -> None:
        self.batches: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        fresh = len(batch.ids) - batch.stats["repeated"]
        self.batches.append({"epoch": trainer.current_epoch, "ids": batch.ids[:fresh], "repeats": batch.ids[fresh:]})

    def on_train_end(self, trainer, pl_module) -> None:
        path = Path(trainer.default_root_dir) / f"seen-rank{trainer.global_rank}.json"
        path.write_text(json.dumps(self.batches))


def pieces_of(folder: Path, mixture: dict | None = None) -> list[ShardSlice]:
    """Whole-shard slices of the set in ``folder``, as the data module builds them."""
    selected = select_samples(manifest_entries(expand_shards(str(folder / "*.tar"))), mixture, seed=0)
    return [ShardSlice(s.path, s.positions, s.ids) for s in selected]
