"""Exact resume: a run stopped mid-epoch (a crash, or SLURM's requeue signal) and restarted with the same command ends
as if it had never stopped: the same batches in the same order, bit-identical weights."""

import json
import os
import random
import signal
import stat
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from mllm_safety.data.streaming import StreamPosition
from mllm_safety.fit import main
from mllm_safety.train.resume import capture_random_state, newest_checkpoint, restore_random_state

CONFIG = str(Path(__file__).parents[1] / "configs" / "tiny.yaml")


class RecordBatches(L.Callback):
    """Appends ``<global step> <sample ids>`` of every training batch to a file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        with open(self.path, "a") as f:
            f.write(f"{trainer.global_step} {' '.join(batch.ids)}\n")


class CrashAfterStep(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError("simulated crash")


class SignalBeforeStep(L.Callback):
    """Sends this process a signal as the batch of ``step`` starts (SLURM sends it to every task of the job)."""

    def __init__(self, step: int, signal_name: str = "SIGUSR1") -> None:
        self.step = step
        self.signal_name = signal_name

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), getattr(signal, self.signal_name))


def fit(root: Path, record: Path, *callbacks: dict) -> L.Trainer:
    """The same command every time: 2 epochs of 8 batches, a checkpoint every 3 steps, ``--ckpt_path last``."""
    checkpoint = {
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"dirpath": str(root / "checkpoints"), "every_n_train_steps": 3, "save_top_k": -1},
    }
    recorder = {"class_path": "test_resume.RecordBatches", "init_args": {"path": str(record)}}
    cli = main(
        [
            "--config",
            CONFIG,
            "--trainer.default_root_dir",
            str(root),
            "--trainer.logger.init_args.save_dir",
            str(root),
            "--trainer.max_epochs",
            "2",
            "--trainer.callbacks",
            json.dumps([checkpoint, recorder, *callbacks]),
            "--data.num_workers",
            "1",
            "--ckpt_path",
            "last",
        ]
    )
    return cli.trainer


def trainable_weights(trainer: L.Trainer) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in trainer.lightning_module.named_parameters() if p.requires_grad}


def read_record(path: Path) -> list[tuple[int, list[str]]]:
    return [(int(step), ids) for step, *ids in (line.split() for line in path.read_text().splitlines())]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[dict[str, torch.Tensor], list[tuple[int, list[str]]]]:
    root = tmp_path_factory.mktemp("uninterrupted")
    weights = trainable_weights(fit(root, root / "batches.txt"))
    batches = read_record(root / "batches.txt")
    assert len(batches) == 16 and batches[0][1] != batches[8][1], "16 batches; each epoch has its own order"
    return weights, batches


def assert_continues_exactly(uninterrupted, before: Path, after: Path, resumed: dict[str, torch.Tensor], step: int):
    weights, batches = uninterrupted
    before_batches, after_batches = read_record(before), read_record(after)
    assert [s for s, _ in after_batches] == list(range(step, 16)), "continues at the step after the checkpoint"
    assert before_batches[:step] + after_batches == batches, "the same batches in the same order: none repeated or lost"
    for name, weight in weights.items():
        assert torch.equal(resumed[name], weight), name  # dropout drew the same masks too


def test_restart_after_a_crash_mid_epoch_continues_exactly(tmp_path, uninterrupted):
    crash = {"class_path": "test_resume.CrashAfterStep", "init_args": {"step": 11}}
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(tmp_path, tmp_path / "before.txt", crash)
    assert newest_checkpoint(tmp_path).name == "epoch=1-step=9.ckpt"  # one batch into the second epoch
    resumed = trainable_weights(fit(tmp_path, tmp_path / "after.txt"))
    assert_continues_exactly(uninterrupted, tmp_path / "before.txt", tmp_path / "after.txt", resumed, step=9)


@pytest.fixture
def slurm_job(tmp_path, monkeypatch) -> Path:
    """A simulated one-task SLURM job step, with an ``scontrol`` on PATH that records its arguments."""
    calls = tmp_path / "scontrol_calls.txt"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "fit", "SLURM_NTASKS": "1", "SLURM_NNODES": "1"}
    slurm |= {"SLURM_NTASKS_PER_NODE": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}
    for name, value in slurm.items():
        monkeypatch.setenv(name, value)
    return calls


def test_slurm_signal_checkpoints_requeues_and_the_requeued_job_continues_exactly(tmp_path, slurm_job, uninterrupted):
    warned = {"class_path": "test_resume.SignalBeforeStep", "init_args": {"step": 5}}
    trainer = fit(tmp_path, tmp_path / "before.txt", warned)
    assert trainer.global_step == 6, "the batch under way when the signal came is finished, then the run stops"
    assert slurm_job.read_text().split() == ["requeue", "4242"]
    assert [p.name for p in tmp_path.glob("*.ckpt")] == ["hpc_ckpt_1.ckpt"]
    assert newest_checkpoint(tmp_path).name == "hpc_ckpt_1.ckpt"

    resumed = trainable_weights(fit(tmp_path, tmp_path / "after.txt"))  # the requeued job: the same command
    assert_continues_exactly(uninterrupted, tmp_path / "before.txt", tmp_path / "after.txt", resumed, step=6)
    assert slurm_job.read_text().split() == ["requeue", "4242"], "no signal, no second requeue"


def test_newest_checkpoint_ignores_incomplete_ones(tmp_path):
    assert newest_checkpoint(tmp_path) is None
    torch.save({"step": 1}, tmp_path / "epoch=0-step=1.ckpt")
    (tmp_path / "truncated.ckpt").write_bytes(b"PK\x03\x04 cut short")  # killed while writing
    sharded = tmp_path / "sub" / "epoch=0-step=2.ckpt"
    sharded.mkdir(parents=True)
    assert newest_checkpoint(tmp_path).name == "epoch=0-step=1.ckpt", "a sharded folder without metadata is partial"
    time.sleep(0.01)
    torch.save({}, sharded / "meta.pt")
    assert newest_checkpoint(tmp_path) == sharded


def test_random_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    torch.manual_seed(3)
    state = capture_random_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = (torch.rand(3), random.random(), np.random.rand())
    restore_random_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (
        torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1] and np.random.rand() == expected[2]
    )


def test_stream_position_round_trips():
    position = StreamPosition(epoch=3, batches=17)
    restored = StreamPosition()
    restored.load_state_dict(position.state_dict())
    assert restored == position
