"""``python -m mllm_safety.fit --config configs/X.yaml``: train with safety evaluation every epoch.

Every option is a typed, documented argument: ``--help`` lists them, ``--print_config`` prints the resolved config.
``--ckpt_path last`` makes the same command start a run or continue it (after a crash, or a SLURM requeue).
"""

from __future__ import annotations

import logging
import os

from jsonargparse import set_parsing_settings
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger

from mllm_safety.data.datamodule import SafetyDataModule
from mllm_safety.train.module import SafetyAlignModule
from mllm_safety.train.resume import ExactResume, newest_checkpoint
from mllm_safety.train.slurm import JobRequeued, SlurmRequeue

log = logging.getLogger(__name__)

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
            help="Lightning checkpoint to resume from, or 'last': the newest checkpoint under trainer.default_root_dir "
            "(periodic, end of epoch or SLURM requeue), starting fresh when there is none.",
        )
        parser.add_lightning_class_args(SlurmRequeue, "slurm")

    def resume_path(self) -> str | None:
        """``--ckpt_path`` with ``last`` resolved to a checkpoint file or folder (or ``None``: start fresh)."""
        ckpt_path = self.config.get("ckpt_path")
        if ckpt_path != "last":
            return ckpt_path
        newest = newest_checkpoint(self.trainer.default_root_dir)
        if newest is None:
            log.warning("no checkpoint under %s: starting fresh", self.trainer.default_root_dir)
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
    try:
        cli.trainer.fit(cli.model, cli.datamodule, ckpt_path=cli.resume_path())
    except JobRequeued as requeued:
        log.warning("%s", requeued)
    return cli


if __name__ == "__main__":
    main()
