"""Resuming a run exactly: which checkpoint to resume from, and what Lightning leaves out of its restore.

Lightning restores weights, optimizer, schedule and loop counters; the data module saves its stream position
(``mllm_safety.data.streaming.StreamPosition``). :class:`ExactResume` adds the random state and makes sure the loader
starts at the restored position.
"""

from __future__ import annotations

import random
import zipfile
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.load import _METADATA_FILENAME


def newest_checkpoint(root: str | Path) -> Path | None:
    """The most recently written complete checkpoint under ``root``, or ``None``.

    Looks at every ``*.ckpt`` below ``root``: Lightning's single files (complete when the zip archive is whole) and
    sharded folders (complete once rank 0 wrote their metadata file, last), the SLURM requeue checkpoints
    ``hpc_ckpt_N.ckpt`` included.
    """
    found: list[tuple[float, Path]] = []
    for path in Path(root).rglob("*.ckpt"):
        if path.is_dir() and (path / _METADATA_FILENAME).is_file():
            found.append(((path / _METADATA_FILENAME).stat().st_mtime, path))
        elif path.is_file() and zipfile.is_zipfile(path):
            found.append((path.stat().st_mtime, path))
    return max(found)[1] if found else None


def capture_random_state() -> dict[str, Any]:
    """The state of every random generator a training step may draw from, as plain tensors, ints and tuples."""
    numpy_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (
            numpy_state[0],
            numpy_state[1].tolist(),
            *(x.item() if hasattr(x, "item") else x for x in numpy_state[2:]),
        ),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_random_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class ExactResume(L.Callback):
    """Makes a resumed run continue exactly: the data stream at its saved position, and the same random draws.

    - Lightning makes and starts the train loader before it restores a checkpoint (``configure_optimizers`` counts the
      steps of the LR schedule through it) and then keeps that loader; on resume it is dropped at ``on_train_start``,
      so that the fit loop makes it again from the restored position (``SafetyDataModule.state_dict``).
    - The random generators are saved in each checkpoint and restored right before the first resumed batch, so that
      dropout draws the masks an uninterrupted run would have drawn. Rank 0's state is saved and restored on every
      rank: ranks start from the same seed and draw alike.
    """

    def __init__(self) -> None:
        self._to_restore: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return capture_random_state()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._to_restore = state_dict

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.ckpt_path is not None:
            fit_loop = trainer.fit_loop
            if fit_loop._data_fetcher is not None:
                fit_loop._data_fetcher.teardown()
            fit_loop._combined_loader = None  # the next setup_data makes the loader again

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._to_restore is not None:
            restore_random_state(self._to_restore)
            self._to_restore = None
