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

from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger

from mllm_safety.cli import RunCLI, own_checkpoint_dirs, run_folders, sweep_run_folder
from mllm_safety.train.resume import ExactResume, SameRunSettings
from mllm_safety.train.slurm import JobRequeued

log = logging.getLogger(__name__)

RUN_DATA_SETTINGS = (
    "train_shards",
    "rejection_ratio",
    "rejection",
    "curated",
    "mixture",
    "seed",
    "mode",
    "num_samples",
    "demo_samples",
    "batch_size",
    "num_workers",
    "shuffle_buffer",
    "group_by_length",
    "group_buffer",
    "donor_images",
    "world",
)
"""The data options a resumed run must share with its checkpoint: which samples, which swapped, in which order
(a resume skips the batches the run has seen, so anything that reorders the stream, such as the workers per device
or the shuffle and grouping buffers, would train some samples twice and others never)."""


class SaveRunConfig(SaveConfigCallback):
    """Saves the resolved config as ``config.yaml`` in the run's folder and records it in the W&B run config."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_hyperparams(self.config.as_dict())
                run_dir = logger.experiment.dir
                self.parser.save(self.config, os.path.join(run_dir, self.config_filename), overwrite=True)


class SafetyCLI(RunCLI):
    """``fit``: builds model, data and trainer; ``--ckpt_path`` resumes."""

    ckpt_path_help = (
        "Lightning checkpoint to resume from, or 'last': the newest checkpoint of this run (periodic, end of epoch or "
        "SLURM requeue) in trainer.default_root_dir and its checkpoints/ folder, which must be set; starting fresh "
        "when there is none."
    )

    def before_instantiate_classes(self) -> None:
        """Under a W&B sweep agent each run gets its own folder below ``trainer.default_root_dir``
        (:func:`~mllm_safety.cli.sweep_run_folder`)."""
        root = self.config.trainer.default_root_dir
        if root is not None and (folder := sweep_run_folder(root)) != Path(root):
            self.config.trainer.default_root_dir = str(folder)
            log.warning("W&B sweep run %s: its folder is %s", os.environ["WANDB_RUN_ID"], folder)

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        self.datamodule.connect(self.model.processor)

    def use_run_folder(self) -> list[Path]:
        """The run's own checkpoint folders when ``trainer.default_root_dir`` is set (else none): the root dir
        (requeue checkpoints) and each checkpoint callback's folder, made ``<default_root_dir>/checkpoints`` where
        unset."""
        if self.config.trainer.default_root_dir is None:
            return []
        root = Path(self.trainer.default_root_dir)
        return run_folders(root, own_checkpoint_dirs(self.trainer.checkpoint_callbacks, root))

    def run_settings(self) -> dict[str, Any]:
        """What makes a run this run: its model, its data and its order, its seed, and the number of processes the
        stream is split over (not the schedule or logging)."""
        config = self.config.as_dict()
        model = {k: v for k, v in config["model"].items() if k not in ("optim", "gradient_checkpointing")}
        data = {k: v for k, v in config["data"].items() if k in RUN_DATA_SETTINGS}
        seed = config.get("seed_everything")
        return {"model": model, "data": data, "seed_everything": seed, "world_size": self.trainer.world_size}


def main(args: list[str] | None = None) -> SafetyCLI:
    cli = SafetyCLI(
        args,
        save_config_callback=SaveRunConfig,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"callbacks": [ExactResume()]},
    )
    ckpt_path = cli.resolve_ckpt_path(cli.use_run_folder(), required=False)
    same_run = SameRunSettings(cli.run_settings(), cli.config.allow_changed_settings)
    if ckpt_path is not None:
        same_run.check_checkpoint(ckpt_path)
    cli.trainer.callbacks.append(same_run)
    try:
        cli.trainer.fit(cli.model, cli.datamodule, ckpt_path=ckpt_path)
    except JobRequeued as requeued:
        log.warning("%s", requeued)
    return cli


if __name__ == "__main__":
    main()
