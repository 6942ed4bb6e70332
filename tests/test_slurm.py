"""SLURM requeue pieces; the full signal -> checkpoint -> requeue -> exact continuation is in test_resume.py."""

import signal

import lightning as L
import pytest

from mllm_safety.train.slurm import SlurmRequeue, requeue_checkpoint_path


def test_requeue_checkpoints_are_numbered_after_the_existing_ones(tmp_path):
    assert requeue_checkpoint_path(tmp_path).name == "hpc_ckpt_1.ckpt"
    for name in ["hpc_ckpt_1.ckpt", "hpc_ckpt_7.ckpt", "hpc_ckpt_x.ckpt", "last.ckpt"]:
        (tmp_path / name).touch()
    assert requeue_checkpoint_path(tmp_path).name == "hpc_ckpt_8.ckpt"


def test_outside_slurm_the_signal_is_left_alone(monkeypatch):
    for name in ["SLURM_NTASKS", "SLURM_JOB_NAME", "SLURM_JOB_ID"]:
        monkeypatch.delenv(name, raising=False)
    before = signal.getsignal(signal.SIGUSR1)
    callback = SlurmRequeue()
    callback.setup(L.Trainer(logger=False, accelerator="cpu"), L.LightningModule(), "fit")
    assert signal.getsignal(signal.SIGUSR1) == before


def test_unknown_signal_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown signal 'SIGNOPE'"):
        SlurmRequeue(signal_name="SIGNOPE")
