"""Every use of a private Lightning attribute, in one place, for the Lightning versions it was written and tested for.

A private attribute can change in any release without notice. Importing this module checks the installed version
against :data:`TESTED_LIGHTNING`; outside that range the project stops instead of resuming a run silently wrong.
Each function names the upstream issue it works around, so it can go once the issue is fixed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.strategies.launchers.subprocess_script import (
    _SubprocessScriptLauncher as _FabricSubprocessScriptLauncher,
)
from lightning.fabric.strategies.model_parallel import _is_sharded_checkpoint
from lightning.fabric.utilities.load import _METADATA_FILENAME
from lightning.pytorch.cli import LightningCLI, _InstantiatorFn
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from packaging.version import Version

TESTED_LIGHTNING = (Version("2.4"), Version("2.7"))
"""Lightning versions ``[low, high)`` whose private attributes used below were checked."""

if not TESTED_LIGHTNING[0] <= Version(L.__version__) < TESTED_LIGHTNING[1]:
    raise ImportError(
        f"mllm_safety uses private Lightning attributes checked for lightning>={TESTED_LIGHTNING[0]},"
        f"<{TESTED_LIGHTNING[1]} (mllm_safety/train/lightning_compat.py); lightning {L.__version__} is "
        "installed. Install a version in that range, or check each function there against the new release."
    )

SHARDED_METADATA_FILE = _METADATA_FILENAME
"""The file (``meta.pt``) in a sharded checkpoint folder holding everything but the tensors; rank 0 writes it last,
so a folder that has it is complete."""


def is_sharded_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a sharded checkpoint folder written by ``ModelParallelStrategy`` (FSDP2)."""
    return _is_sharded_checkpoint(Path(path))


def rebuild_train_loader_after_restore(trainer: L.Trainer) -> None:
    """Drop the train loader Lightning made before restoring a checkpoint, so the fit loop makes it again.

    ``estimated_stepping_batches`` (the LR schedule's length) makes and starts the train loader before the checkpoint
    is restored, and the fit loop keeps it (Lightning-AI/pytorch-lightning#20550): without this the loader would not
    start at the restored stream position. Its fetcher goes too; a stale one crashes the loop's teardown when there
    is nothing left to train (``Please call iter(combined_loader) first``).
    """
    fit_loop = trainer.fit_loop
    if fit_loop._data_fetcher is not None:
        fit_loop._data_fetcher.teardown()
        fit_loop._data_fetcher = None
    fit_loop._combined_loader = None


def shard_over_every_rank(strategy: ModelParallelStrategy) -> None:
    """Make ``ModelParallelStrategy``'s data-parallel dimension span all ranks of all nodes.

    Its ``data_parallel_size="auto"`` means one group per node (room for tensor parallelism inside a node, as
    documented); FSDP alone should shard over every rank. Call before ``ModelParallelStrategy.setup_environment``.
    """
    strategy._data_parallel_size = strategy.num_nodes * strategy.num_processes


def instantiate_model_later(cli: LightningCLI) -> Callable[..., functools.partial]:
    """A jsonargparse instantiator for the CLI's model class that returns the call to make once the trainer (and so
    the rank's device) exists, through Lightning's own instantiator, which records the config as the model's
    hyperparameters (LightningCLI instantiates the model before the trainer)."""
    lightning_instantiator = _InstantiatorFn(cli=cli, key="model")

    def later(class_type: type, *args: Any, applied_instantiation_links: dict, **kwargs: Any) -> functools.partial:
        links = {"applied_instantiation_links": applied_instantiation_links}
        return functools.partial(lightning_instantiator, class_type, *args, **links, **kwargs)

    return later


def each_process_builds_its_model(strategy: Any) -> bool:
    """Whether every process of ``strategy`` (a Trainer's or Fabric's) runs the command and builds its own model:
    one process, Lightning's launcher starting the command once per device, torchrun or SLURM; not ``ddp_spawn`` /
    ``ddp_fork``, where one process builds the model for the processes it starts."""
    launcher = strategy.launcher
    return launcher is None or isinstance(launcher, (_SubprocessScriptLauncher, _FabricSubprocessScriptLauncher))
