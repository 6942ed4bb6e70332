"""SLURM requeue pieces; the full signal -> checkpoint -> requeue -> exact continuation is in test_resume.py."""

import os
import signal
import subprocess
from pathlib import Path

import lightning as L
import pytest

from mllm_safety.train.slurm import SlurmRequeue, requeue_checkpoint_path

ROOT = Path(__file__).parents[1]


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


def test_sbatch_script_launches_one_task_per_gpu_and_resumes_with_the_same_command(tmp_path):
    calls = tmp_path / "srun_calls.txt"
    srun = tmp_path / "srun"
    srun.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {calls}\n')
    srun.chmod(0o755)
    env = {
        "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}",
        "SLURM_JOB_ID": "77",
        "SLURM_JOB_NAME": "ratio",
        "SLURM_NNODES": "2",
        "SLURM_NTASKS_PER_NODE": "8",
        "SRUN_ARGS": "--container-image=mllm-safety.sqsh",
    }
    script = ROOT / "scripts" / "slurm" / "fit.sbatch"
    directives = [line for line in script.read_text().splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --signal=SIGUSR1@90" in directives and "#SBATCH --requeue" in directives
    out = subprocess.run(
        ["bash", str(script), "configs/demo.yaml", "--data.rejection_ratio", "0.1"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "2 nodes x 8 tasks" in out.stdout
    args = calls.read_text().splitlines()
    assert args[:4] == ["--kill-on-bad-exit=1", "--container-image=mllm-safety.sqsh", ".venv/bin/python", "-m"]
    command = " ".join(args)
    assert "mllm_safety.fit --config configs/demo.yaml --trainer.num_nodes 2 --trainer.devices 8" in command
    assert "--trainer.default_root_dir runs/ratio-77" in command
    assert "--trainer.callbacks.dirpath=runs/ratio-77/checkpoints" in command
    assert command.endswith("--ckpt_path last --data.rejection_ratio 0.1")
