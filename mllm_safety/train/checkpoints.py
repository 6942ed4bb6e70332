"""What a run writes and how it is read back: Lightning's checkpoints (files or FSDP2's sharded folders) and the
compact trainable-weights file written beside them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.distributed import checkpoint as dcp

from mllm_safety.model.trainable import FINGERPRINTS_KEY, check_fingerprints, load_weights
from mllm_safety.train.lightning_compat import SHARDED_METADATA_FILE, is_sharded_checkpoint


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The weights (full tensors on the CPU) and everything else of a checkpoint of ``mllm_safety.fit``, in one process.

    ``path`` is a Lightning checkpoint file, or the folder that ``trainer.strategy: fsdp2`` writes (one shard per
    rank): its shards are put together here, without a process group. Nothing is unpickled beyond tensors and plain
    data.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_dir():
        if not is_sharded_checkpoint(path):
            raise ValueError(
                f"{path} is a folder but not a complete sharded checkpoint (no {SHARDED_METADATA_FILE}): "
                "interrupted while saving, or not a checkpoint"
            )
        metadata = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
        state = {
            key.removeprefix("state_dict."): torch.empty(meta.size, dtype=meta.properties.dtype)
            for key, meta in metadata.items()
            if key.startswith("state_dict.") and hasattr(meta, "size")
        }
        dcp.load({"state_dict": state}, checkpoint_id=path, no_dist=True)
        return state, checkpoint_metadata(path)
    checkpoint = checkpoint_metadata(path)
    state = checkpoint.pop("state_dict", None)
    if not isinstance(state, dict) or not state:
        raise ValueError(f"{path}: no state_dict with weights in this checkpoint")
    return state, checkpoint


def checkpoint_metadata(path: str | Path) -> dict[str, Any]:
    """A Lightning checkpoint without reading its tensors: loops, callbacks' states, hyper-parameters (a file's
    tensors are memory-mapped, read only when used; a sharded folder's are in other files)."""
    path = Path(path)
    if path.is_dir():
        return torch.load(path / SHARDED_METADATA_FILE, map_location="cpu", weights_only=True)
    # mmap: only the tensors used are read, never the optimizer state (GBs for a 7B run's LoRA moments)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path}: not a Lightning checkpoint (no dict of states)")
    return checkpoint


def load_checkpoint_weights(module: L.LightningModule, path: str | Path) -> list[str]:
    """Put the trained weights of a run into ``module`` (built from the run's config); returns the names loaded.

    ``path``: a Lightning checkpoint file, an FSDP2 sharded checkpoint folder, or a ``trainable.safetensors`` file.
    The same rule as on resume: every trainable weight must be there, nothing unknown, and the frozen parts rebuilt
    from the config must match the fingerprints the checkpoint recorded.
    """
    if Path(path).suffix == ".safetensors":
        return [f"model.{name}" for name in module.load_trainable(path)]
    state, rest = read_checkpoint(path)
    check_fingerprints(rest.get(FINGERPRINTS_KEY), module.model, path)
    return load_weights(module, state, path)


class TrainableWeightsCheckpoint(Callback):
    """Writes the trainable weights (LoRA adapters + projector) to one safetensors file after every training epoch.

    Lightning's ``.ckpt`` files resume a run (optimizer state included); this file is the result of a run: small
    (~1.4 GB for LLaVA-1.5-7B with LoRA r=128, instead of ~14 GB), readable without unpickling, and put back on
    the base model with ``load_trainable`` or exported with ``python -m mllm_safety.export``.
    """

    def __init__(self, dirpath: str | None = None, filename: str = "trainable.safetensors") -> None:
        """
        Args:
            dirpath: Folder of the file; default: the checkpoint callback's folder (else the trainer's root dir).
            filename: File name; rewritten after every epoch, so it always holds the last finished epoch.
        """
        if not filename.endswith(".safetensors"):
            raise ValueError(f"filename must end in .safetensors, got {filename!r}")
        self.dirpath = dirpath
        self.filename = filename

    def path(self, trainer: L.Trainer) -> Path:
        folder = self.dirpath
        if folder is None and trainer.checkpoint_callback is not None:
            folder = getattr(trainer.checkpoint_callback, "dirpath", None)
        return Path(folder or trainer.default_root_dir) / self.filename

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.save_trainable(self.path(trainer), write=trainer.is_global_zero)
        trainer.strategy.barrier("trainable-weights")
