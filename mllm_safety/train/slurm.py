"""SLURM requeue: checkpoint and requeue the job when SLURM warns that it is about to end it.

``sbatch --signal=SIGUSR1@90`` sends SIGUSR1 to every task 90 s before the time limit. Lightning's own handler (its
``SLURMEnvironment`` auto-requeue) saves the checkpoint from inside the signal handler, wherever the main thread
happens to be: possibly between an optimizer step and the loop counters (a batch trained twice after the resume), and
with several ranks while the others are in the middle of collectives (an FSDP checkpoint is itself a collective). This
callback takes its place: the handler only raises a flag, and at the end of the next training batch all ranks agree,
save one checkpoint together, rank 0 requeues the job, and the run stops.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment

log = logging.getLogger(__name__)


class JobRequeued(Exception):
    """Stops a run whose checkpoint is saved and whose SLURM job is requeued."""


def requeue_checkpoint_path(root: str | Path) -> Path:
    """``hpc_ckpt_<N+1>.ckpt`` in ``root``: Lightning's name for requeue checkpoints (it resumes them under SLURM)."""
    versions = [
        int(m.group(1))
        for p in Path(root).glob("hpc_ckpt_*.ckpt")
        if (m := re.fullmatch(r"hpc_ckpt_(\d+)\.ckpt", p.name))
    ]
    return Path(root) / f"hpc_ckpt_{max(versions, default=0) + 1}.ckpt"


class SlurmRequeue(L.Callback):
    """On SLURM's warning signal: checkpoint at the next batch boundary on every rank, requeue the job, stop.

    Active only when the run is a SLURM job step (``srun``); then it costs one all-reduce of a flag per batch. The
    checkpoint goes to ``trainer.default_root_dir``; the requeued job, started with the same command and
    ``--ckpt_path last``, continues from it.
    """

    def __init__(self, signal_name: str = "SIGUSR1", requeue: bool = True) -> None:
        """
        Args:
            signal_name: The signal ``sbatch --signal`` sends.
            requeue: Run ``scontrol requeue $SLURM_JOB_ID`` after the checkpoint; ``false`` only checkpoints and stops.
        """
        if not hasattr(signal, signal_name):
            raise ValueError(f"unknown signal {signal_name!r}")
        self.signal_name = signal_name
        self.requeue = requeue
        self._signalled = False
        self._previous_handler: Any = None
        self._active = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Installed before Lightning installs its own handlers, which then leaves this signal alone.
        self._active = stage == "fit" and SLURMEnvironment.detect()
        if self._active:
            self._signalled = False
            self._previous_handler = signal.signal(getattr(signal, self.signal_name), self._on_signal)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._active:
            signal.signal(getattr(signal, self.signal_name), self._previous_handler)
            self._active = False

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signalled = True

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._active or (batch_idx + 1) % trainer.accumulate_grad_batches:
            return  # mid-accumulation the gradients are not in any checkpoint
        if not trainer.strategy.reduce_boolean_decision(self._signalled, all=False):
            return
        path = trainer.strategy.broadcast(requeue_checkpoint_path(trainer.default_root_dir))
        trainer.save_checkpoint(path)
        job_id = _job_id()
        if trainer.is_global_zero:
            log.warning("%s received: saved %s", self.signal_name, path)
            if self.requeue:
                result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
                if result.returncode != 0:
                    log.error("scontrol requeue %s failed: %s", job_id, result.stderr.strip())
        raise JobRequeued(f"checkpoint {path} saved; SLURM job {job_id} {'requeued' if self.requeue else 'stopped'}")


def _job_id() -> str:
    """The job to requeue: ``<array job>_<task>`` for array jobs."""
    if array_job := os.environ.get("SLURM_ARRAY_JOB_ID"):
        return f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ["SLURM_JOB_ID"]
