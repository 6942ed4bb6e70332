"""One command line for the entry points that work on a run: ``fit``, ``evaluate``, ``export`` and ``sweep``.

Each reads the run's fit config with ``--config`` (a file written by hand, or the ``config.yaml`` a run saves) through
the parser classes of ``mllm_safety.fit``: every section is typed and documented (``--help``), a wrong key or value
stops with an error naming it, and ``--print_config`` prints the resolved config. Options have one spelling
everywhere: the fit config's sections (``--trainer.devices 8``, ``--data.rejection_ratio 0.1`` ...),
``--ckpt_path`` (a checkpoint of the run, or ``last``: its newest) and ``--output`` (the folder an entry point
writes). Each entry point adds its own options and builds only what it needs: ``fit`` everything, ``evaluate`` and
``export`` the model, ``sweep`` nothing. (``python -m mllm_safety.data.convert``, which works on raw data rather than
a run, takes its own options with the same ``--config``, ``--print_config`` and ``--output``.)
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from jsonargparse import set_parsing_settings
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.strategies import ModelParallelStrategy, Strategy
from lightning.pytorch.utilities.model_helpers import is_overridden

from mllm_safety.data.datamodule import SafetyDataModule
from mllm_safety.train.lightning_compat import each_process_builds_its_model, instantiate_model_later
from mllm_safety.train.module import SafetyAlignModule
from mllm_safety.train.resume import newest_checkpoint
from mllm_safety.train.slurm import SlurmRequeue

log = logging.getLogger(__name__)

# Option docs live in the config dataclasses' attribute docstrings; without this, --help shows none of them.
set_parsing_settings(docstring_parse_attribute_docstrings=True)


class RunCLI(LightningCLI):
    """The fit config's parser (model, data, trainer, seed, and fit's own options), for every entry point.

    Subclasses add their options in :meth:`add_entry_arguments`, describe ``--ckpt_path`` in ``ckpt_path_help`` and
    build what they need in :meth:`instantiate_classes` (the default, as ``fit``: model, data and trainer). The seed
    is set before anything is built, so the parts a checkpoint does not hold (random frozen towers) come out as in
    training.
    """

    ckpt_path_help = "A checkpoint of this run, or 'last': the newest in the run's own folder."

    def __init__(self, args: list[str] | None = None, **kwargs) -> None:
        super().__init__(SafetyAlignModule, SafetyDataModule, run=False, args=args, seed_everything_default=0, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--ckpt_path", type=str | None, default=None, help=self.ckpt_path_help)
        parser.add_argument(
            "--allow_changed_settings",
            type=bool,
            default=False,
            help="Resume even from a checkpoint written with other model or data settings (rejection ratio, "
            "mixture, seeds, model ...) than this command's; without it they stop the run with an error naming them.",
        )
        parser.add_lightning_class_args(SlurmRequeue, "slurm")
        self.add_entry_arguments(parser)

    def add_entry_arguments(self, parser: LightningArgumentParser) -> None:
        """The entry point's own options (none for ``fit``)."""

    def instantiate_classes(self) -> None:
        """The config's classes and the trainer, then the model on the rank's device (:func:`rank_device`)."""
        self.config_init = self.parser.instantiate_classes(
            self.config, instantiators=[(instantiate_model_later(self), SafetyAlignModule, True)]
        )
        self.datamodule = self._get(self.config_init, "data")
        self.trainer = self.instantiate_trainer()
        self.model = self._build_model_on(rank_device(self.trainer.strategy))
        self._add_configure_optimizers_method_to_model(self.subcommand)

    def build_model(self, device: torch.device | str = "cpu") -> None:
        """Build the model on ``device``, and the config's other classes that cost nothing until used (data module,
        callbacks, logger), but not the trainer: its devices need not exist where a run is evaluated or exported."""
        self.config_init = self.parser.instantiate_classes(
            self.config, instantiators=[(instantiate_model_later(self), SafetyAlignModule, True)]
        )
        self.model = self._build_model_on(torch.device(device))

    def _build_model_on(self, device: torch.device) -> SafetyAlignModule:
        """The model, its checkpoint weights read straight onto ``device`` (see ``mllm_safety.model.placement``)."""
        with torch.device(device):
            model = self._get(self.config_init, "model")()
        self.config_init[f"{self.subcommand}.model" if self.subcommand else "model"] = model
        return model

    def checkpoint_folders(self) -> list[Path]:
        """The run's checkpoint folders (:func:`run_folders`) as its config names them; none without a root."""
        root = self.config.trainer.default_root_dir
        if root is None:
            return []
        callbacks = [c for c in self.config.trainer.callbacks or [] if str(c.get("class_path")).endswith("Checkpoint")]
        return run_folders(Path(root), [c.get("init_args", {}).get("dirpath") for c in callbacks])

    def resolve_ckpt_path(self, folders: list[Path], required: bool) -> str | None:
        """``--ckpt_path`` with ``last`` resolved to the newest complete checkpoint in ``folders``. Without one: an
        error when ``required``, else ``None`` (start fresh). Entry points call it before building the model, so a
        wrong path costs no model build."""
        ckpt_path = self.config.get("ckpt_path")
        if ckpt_path != "last":
            if required and ckpt_path is None:
                raise ValueError("--ckpt_path is required: a checkpoint of the run, or 'last'")
            if ckpt_path is not None and not Path(ckpt_path).exists():
                raise FileNotFoundError(f"--ckpt_path {ckpt_path} does not exist")
            return ckpt_path
        if not folders:
            raise ValueError(
                "--ckpt_path last means the newest checkpoint in the run's own folder: set --trainer.default_root_dir "
                "(the configs for the paper's models do)"
            )
        newest = newest_checkpoint(folders)
        if newest is None:
            where = ", ".join(map(str, folders))
            if required:
                raise FileNotFoundError(f"--ckpt_path last: no complete checkpoint in {where}")
            log.warning("no checkpoint in %s: starting fresh", where)
            return None
        log.warning("using the newest checkpoint of the run: %s", newest)
        return str(newest)


def sweep_run_folder(root: str | Path) -> Path:
    """Where a run rooted at ``root`` keeps its files: under a W&B sweep agent (``WANDB_SWEEP_ID`` and
    ``WANDB_RUN_ID`` set) ``root/sweep-<SWEEP_ID>/<RUN_ID>``, since grid points of one config must not share (and
    overwrite) checkpoints; else ``root``."""
    sweep, run = os.environ.get("WANDB_SWEEP_ID"), os.environ.get("WANDB_RUN_ID")
    return Path(root) / f"sweep-{sweep}" / run if sweep and run else Path(root)


def rank_device(strategy: Any) -> torch.device:
    """The device a rank builds its model on, given the strategy of its trainer (or Fabric).

    The rank's own device where each process builds its own model (Lightning starts the command once per device;
    torchrun and SLURM start every rank) and holds it whole (DDP, one device): the checkpoint's weights then go straight
    to the GPU, and no rank holds a full copy in host memory (8 ranks x 17 GB for an 8B model in bf16). The CPU where
    the strategy shards a model built whole (FSDP2), and where one process builds the model for the processes it
    forks or spawns.
    """
    sharded = isinstance(strategy, ModelParallelStrategy) or (
        isinstance(strategy, Strategy) and is_overridden("model_sharded_context", strategy, parent=Strategy)
    )
    return strategy.root_device if each_process_builds_its_model(strategy) and not sharded else torch.device("cpu")


def run_folders(root: Path, dirpaths: list[str | None]) -> list[Path]:
    """Where a run keeps its checkpoints: its root (SLURM requeue checkpoints), ``<root>/checkpoints`` (where a
    checkpoint callback without a folder of its own writes: :func:`own_checkpoint_dirs`) and every callback's own
    folder."""
    folders = [root, root / "checkpoints", *(Path(d) for d in dirpaths if d)]
    return list(dict.fromkeys(folder.resolve() for folder in folders))  # one folder once, however it is written


def own_checkpoint_dirs(callbacks: list, root: Path) -> list[str]:
    """Give every checkpoint callback without a folder ``<root>/checkpoints`` (Lightning's default, the logger's
    version folder, changes with every restart); returns the callbacks' folders."""
    for callback in callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath is None:
            callback.dirpath = str((root / "checkpoints").resolve())
    return [c.dirpath for c in callbacks if isinstance(c, ModelCheckpoint)]
