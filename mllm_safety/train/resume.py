"""Resuming a run exactly, and only the run it is: which checkpoint, whether it fits, what Lightning leaves out.

Lightning restores weights, optimizer, schedule and loop counters; the data module saves its stream position
(``mllm_safety.data.streaming.StreamPosition``). :class:`ExactResume` adds the random state and makes sure the loader
starts at the restored position; :class:`SameRunSettings` refuses a checkpoint of a run with other model or data
settings.
"""

from __future__ import annotations

import logging
import random
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info

from mllm_safety.train.checkpoints import checkpoint_metadata
from mllm_safety.train.lightning_compat import (
    SHARDED_METADATA_FILE,
    is_sharded_checkpoint,
    rebuild_train_loader_after_restore,
)

log = logging.getLogger(__name__)


def newest_checkpoint(folders: Iterable[str | Path]) -> Path | None:
    """The most recently written complete checkpoint directly in one of ``folders`` (a run's own), or ``None``.

    Looks at the ``*.ckpt`` in each folder, not below it: Lightning's single files (complete when the zip archive is
    whole) and sharded folders (complete once rank 0 wrote their metadata file, last), the SLURM requeue checkpoints
    ``hpc_ckpt_N.ckpt`` included.
    """
    found: list[tuple[float, Path]] = []
    for folder in folders:
        for path in Path(folder).glob("*.ckpt"):
            if is_sharded_checkpoint(path):
                found.append(((path / SHARDED_METADATA_FILE).stat().st_mtime, path))
            elif path.is_file() and zipfile.is_zipfile(path):
                found.append((path.stat().st_mtime, path))
    return max(found)[1] if found else None


def flatten(settings: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"data": {"rejection": {"seed": 0}}}`` -> ``{"data.rejection.seed": 0}``."""
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, Mapping) and value:
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class SameRunSettings(L.Callback):
    """Refuses to resume from a checkpoint written with other model or data settings than this command's.

    The settings (flattened, e.g. ``data.rejection_ratio``) are saved in every checkpoint; on resume, any that
    differ stop the run with an error naming them, unless ``allow_changes`` (then a warning names them). Call
    :meth:`check_checkpoint` before ``fit``: Lightning restores callback states only after the weights, so a changed
    shape (``model.lora.r``) would otherwise fail first, with torch's size mismatch instead of the setting's name.
    """

    def __init__(self, settings: Mapping[str, Any], allow_changes: bool = False) -> None:
        self.settings = flatten(settings)
        self.allow_changes = allow_changes
        self.checked = False

    def state_dict(self) -> dict[str, Any]:
        return {"settings": self.settings}

    def check_checkpoint(self, path: str | Path) -> None:
        """Compare with the settings saved in the checkpoint at ``path`` (its tensors are not read)."""
        states = checkpoint_metadata(path).get("callbacks") or {}
        saved = next((state for key, state in states.items() if key.startswith(type(self).__qualname__)), None)
        if saved is not None:
            self.load_state_dict(saved)
            self.checked = True

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.checked:  # already compared before fit
            return
        saved = state_dict.get("settings", {})
        differ = {
            key: (saved.get(key, "<unset>"), self.settings.get(key, "<unset>"))
            for key in sorted(set(saved) | set(self.settings))
            if saved.get(key, "<unset>") != self.settings.get(key, "<unset>")
        }
        if not differ:
            return
        listed = "; ".join(f"{key}: checkpoint {old!r}, now {new!r}" for key, (old, new) in differ.items())
        if not self.allow_changes:
            raise ValueError(
                f"the checkpoint to resume was written by a run with other settings ({listed}). Resume it with "
                "its own settings, start this run in another trainer.default_root_dir, or pass "
                "--allow_changed_settings true to continue it with these"
            )
        log.warning("resuming with changed settings (--allow_changed_settings): %s", listed)


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
    - A run resumed from a checkpoint with nothing left to train (the command of a finished run, run again) ends with
      a message saying so.
    """

    def __init__(self) -> None:
        self._to_restore: dict[str, Any] | None = None
        self._trained_batches = 0

    def state_dict(self) -> dict[str, Any]:
        return capture_random_state()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._to_restore = state_dict

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._trained_batches = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.ckpt_path is not None:
            rebuild_train_loader_after_restore(trainer)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._trained_batches += 1
        if self._to_restore is not None:
            restore_random_state(self._to_restore)
            self._to_restore = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.ckpt_path is not None and self._trained_batches == 0:
            rank_zero_info(
                f"nothing left to train: the run had already finished when {trainer.ckpt_path} was saved "
                f"(epoch {trainer.current_epoch}, step {trainer.global_step})"
            )
