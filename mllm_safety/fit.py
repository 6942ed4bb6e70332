"""``python -m mllm_safety.fit --config configs/X.yaml``: train with safety evaluation every epoch.

Every option is a typed, documented argument: ``--help`` lists them, ``--print_config`` prints the resolved config.
``--ckpt_path last`` makes the same command start a run or continue it (after a crash, or a SLURM requeue): it looks
only in the run's own folder, ``trainer.default_root_dir``, and a checkpoint of other model or data settings stops the
run with an error naming them.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from jsonargparse import set_parsing_settings
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger

from mllm_safety.data.datamodule import SafetyDataModule
from mllm_safety.train.module import SafetyAlignModule
from mllm_safety.train.resume import ExactResume, SameRunSettings, newest_checkpoint
from mllm_safety.train.slurm import JobRequeued, SlurmRequeue

log = logging.getLogger(__name__)

RUN_DATA_SETTINGS = (
    "train_shards",
    "rejection_ratio",
    "rejection",
    "mixture",
    "seed",
    "mode",
    "num_samples",
    "demo_samples",
    "batch_size",
)
"""The data options a resumed run must share with its checkpoint: which samples, which swapped, in which order."""

# Option docs live in the config dataclasses' attribute docstrings; without this, --help shows none of them.
set_parsing_settings(docstring_parse_attribute_docstrings=True)


class SaveRunConfig(SaveConfigCallback):
    """Saves the resolved config as ``config.yaml`` in the run's folder and records it in the W&B run config."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_hyperparams(self.config.as_dict())
                run_dir = logger.experiment.dir
                self.parser.save(self.config, os.path.join(run_dir, self.config_filename), overwrite=True)


class SafetyCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--ckpt_path",
            type=str | None,
            default=None,
            help="Lightning checkpoint to resume from, or 'last': the newest checkpoint of this run (periodic, end "
            "of epoch or SLURM requeue) in trainer.default_root_dir and its checkpoints/ folder, which must be set; "
            "starting fresh when there is none.",
        )
        parser.add_argument(
            "--allow_changed_settings",
            type=bool,
            default=False,
            help="Resume even from a checkpoint written with other model or data settings (rejection ratio, "
            "mixture, seeds, model ...) than this command's; without it they stop the run with an error naming them.",
        )
        parser.add_lightning_class_args(SlurmRequeue, "slurm")

    def use_run_folder(self) -> list[Path]:
        """The run's own checkpoint folders when ``trainer.default_root_dir`` is set (else none): the root dir
        (requeue checkpoints) and each checkpoint callback's folder, made ``<default_root_dir>/checkpoints`` where
        unset (Lightning's default, the logger's version folder, changes with every restart)."""
        if self.config.trainer.default_root_dir is None:
            return []
        root = Path(self.trainer.default_root_dir)
        callbacks = [c for c in self.trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)]
        for callback in callbacks:
            if callback.dirpath is None:
                callback.dirpath = os.path.realpath(root / "checkpoints")
        return [root, *(Path(c.dirpath) for c in callbacks)]

    def run_settings(self) -> dict[str, Any]:
        """What makes a run this run: its model, its data and its seed (not devices, schedule or logging)."""
        config = self.config.as_dict()
        model = {k: v for k, v in config["model"].items() if k not in ("optim", "gradient_checkpointing")}
        data = {k: v for k, v in config["data"].items() if k in RUN_DATA_SETTINGS}
        return {"model": model, "data": data, "seed_everything": config.get("seed_everything")}

    def resume_path(self, folders: list[Path]) -> str | None:
        """``--ckpt_path`` with ``last`` resolved to the newest checkpoint in the run's ``folders`` (or ``None``:
        start fresh)."""
        ckpt_path = self.config.get("ckpt_path")
        if ckpt_path != "last":
            return ckpt_path
        if not folders:
            raise ValueError(
                "--ckpt_path last resumes the run in its own folder: set --trainer.default_root_dir (the configs "
                "for the paper's models do)"
            )
        newest = newest_checkpoint(folders)
        if newest is None:
            log.warning("no checkpoint in %s: starting fresh", ", ".join(map(str, folders)))
            return None
        log.warning("resuming from %s", newest)
        return str(newest)


def main(args: list[str] | None = None) -> SafetyCLI:
    cli = SafetyCLI(
        SafetyAlignModule,
        SafetyDataModule,
        save_config_callback=SaveRunConfig,
        save_config_kwargs={"overwrite": True},
        run=False,
        args=args,
        seed_everything_default=0,
        trainer_defaults={"callbacks": [ExactResume()]},
    )
    cli.datamodule.connect(cli.model.processor)
    ckpt_path = cli.resume_path(cli.use_run_folder())
    cli.trainer.callbacks.append(SameRunSettings(cli.run_settings(), cli.config.allow_changed_settings))
    try:
        cli.trainer.fit(cli.model, cli.datamodule, ckpt_path=ckpt_path)
    except JobRequeued as requeued:
        log.warning("%s", requeued)
    return cli


if __name__ == "__main__":
    main()
