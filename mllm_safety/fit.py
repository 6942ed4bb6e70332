"""``python -m mllm_safety.fit --config configs/X.yaml``: train with safety evaluation every epoch.

Every option is a typed, documented argument: ``--help`` lists them, ``--print_config`` prints the resolved config.
"""

from __future__ import annotations

import os

from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger

from mllm_safety.data.datamodule import SafetyDataModule
from mllm_safety.train.module import SafetyAlignModule


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
        parser.add_argument("--ckpt_path", type=str | None, default=None, help="Lightning checkpoint to resume from.")


def main(args: list[str] | None = None) -> SafetyCLI:
    cli = SafetyCLI(
        SafetyAlignModule,
        SafetyDataModule,
        save_config_callback=SaveRunConfig,
        save_config_kwargs={"overwrite": True},
        run=False,
        args=args,
        seed_everything_default=0,
    )
    cli.trainer.fit(cli.model, cli.datamodule, ckpt_path=cli.config.get("ckpt_path"))
    return cli


if __name__ == "__main__":
    main()
