"""Exact resume: a run stopped mid-epoch (a crash, or SLURM's requeue signal) and restarted with the same command ends
as if it had never stopped: the same batches in the same order, bit-identical weights."""

import inspect
import json
import logging
import os
import random
import signal
import stat
from dataclasses import asdict
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from planted import assert_figures_vary

from mllm_safety.data.curated import CuratedConfig
from mllm_safety.data.datamodule import SafetyDataModule
from mllm_safety.data.streaming import StreamPosition
from mllm_safety.evaluation.callback import SafetyEvalCallback
from mllm_safety.fit import RUN_DATA_SETTINGS, main
from mllm_safety.train.resume import (
    SameRunSettings,
    capture_random_state,
    flatten,
    newest_checkpoint,
    restore_random_state,
)

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


SAFETY = {
    "class_path": "mllm_safety.evaluation.callback.SafetyEvalCallback",
    "init_args": {"generation": {"max_new_tokens": 4, "batch_size": 8}, "limit": 4},
}


def checkpoint_every(steps: int) -> dict:
    """A ModelCheckpoint writing to the run's own checkpoints/ folder (its default with a default_root_dir)."""
    return {
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"every_n_train_steps": steps, "save_top_k": -1},
    }


def fit(
    root: Path,
    record: Path,
    *callbacks: dict,
    epochs: int = 2,
    extra: tuple[str, ...] = (),
    planted: str | None = None,
) -> L.Trainer:
    """The same command every time: 2 epochs of 8 batches, a checkpoint every 3 steps, ``--ckpt_path last``;
    ``planted``: start from the planted tiny model (tests/planted.py), whose figures differ between evaluations."""
    if planted is not None:
        extra = (*extra, "--model.init_weights", json.dumps([planted]))
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
            str(epochs),
            "--trainer.callbacks",
            json.dumps([checkpoint_every(3), recorder, SAFETY, *callbacks]),
            "--data.num_workers",
            "1",
            "--ckpt_path",
            "last",
            *extra,
        ]
    )
    return cli.trainer


def safety_history(trainer: L.Trainer) -> list[tuple[str, dict[str, float]]]:
    return next(c for c in trainer.callbacks if isinstance(c, SafetyEvalCallback)).history


def trainable_weights(trainer: L.Trainer) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in trainer.lightning_module.named_parameters() if p.requires_grad}


def read_record(path: Path) -> list[tuple[int, list[str]]]:
    return [(int(step), ids) for step, *ids in (line.split() for line in path.read_text().splitlines())]


@pytest.fixture(scope="module")
def uninterrupted(
    tmp_path_factory, planted_weights
) -> tuple[dict[str, torch.Tensor], list[tuple[int, list[str]]], list]:
    root = tmp_path_factory.mktemp("uninterrupted")
    trainer = fit(root, root / "batches.txt", planted=planted_weights)
    batches = read_record(root / "batches.txt")
    assert len(batches) == 16 and batches[0][1] != batches[8][1], "16 batches; each epoch has its own order"
    history = safety_history(trainer)
    assert [label for label, _ in history] == ["before", "epoch 0", "epoch 1"]
    assert_figures_vary(history)
    return trainable_weights(trainer), batches, history


def assert_continues_exactly(uninterrupted, before: Path, after: Path, resumed: L.Trainer, step: int):
    weights, batches, history = uninterrupted
    before_batches, after_batches = read_record(before), read_record(after)
    assert [s for s, _ in after_batches] == list(range(step, 16)), "continues at the step after the checkpoint"
    assert before_batches[:step] + after_batches == batches, "the same batches in the same order: none repeated or lost"
    resumed_weights = trainable_weights(resumed)
    for name, weight in weights.items():
        assert torch.equal(resumed_weights[name], weight), name  # dropout drew the same masks too
    # the baseline and the evaluations before the stop come from the checkpoint, not from evaluating trained weights
    assert safety_history(resumed) == history, "the before/after table of the uninterrupted run"


def test_restart_after_a_crash_mid_epoch_continues_exactly(tmp_path, uninterrupted, planted_weights):
    crash = {"class_path": "test_resume.CrashAfterStep", "init_args": {"step": 11}}
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(tmp_path, tmp_path / "before.txt", crash, planted=planted_weights)
    folders = [tmp_path, tmp_path / "checkpoints"]
    assert newest_checkpoint(folders).name == "epoch=1-step=9.ckpt"  # one batch into the second epoch
    resumed = fit(tmp_path, tmp_path / "after.txt", planted=planted_weights)
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


def test_slurm_signal_checkpoints_requeues_and_the_requeued_job_continues_exactly(
    tmp_path, slurm_job, uninterrupted, planted_weights
):
    warned = {"class_path": "test_resume.SignalBeforeStep", "init_args": {"step": 5}}
    trainer = fit(tmp_path, tmp_path / "before.txt", warned, planted=planted_weights)
    assert trainer.global_step == 6, "the batch under way when the signal came is finished, then the run stops"
    assert slurm_job.read_text().split() == ["requeue", "4242"]
    assert [p.name for p in tmp_path.glob("*.ckpt")] == ["hpc_ckpt_1.ckpt"]
    assert newest_checkpoint([tmp_path, tmp_path / "checkpoints"]).name == "hpc_ckpt_1.ckpt"

    resumed = fit(tmp_path, tmp_path / "after.txt", planted=planted_weights)  # the requeued job: the same command
    assert_continues_exactly(uninterrupted, tmp_path / "before.txt", tmp_path / "after.txt", resumed, step=6)
    assert slurm_job.read_text().split() == ["requeue", "4242"], "no signal, no second requeue"


def written_at(path, second: int) -> None:
    """Give ``path`` the modification time ``second`` (explicit times: no sleeping, no ties on coarse clocks)."""
    os.utime(path, ns=(second * 10**9, second * 10**9))


def test_newest_checkpoint_ignores_incomplete_ones_and_other_folders(tmp_path):
    """Newest by write time, not by name; a sharded folder counts from its metadata file (written last), not from
    the folder's own time."""
    folders = [tmp_path, tmp_path / "checkpoints"]
    assert newest_checkpoint(folders) is None
    torch.save({"step": 1}, tmp_path / "epoch=0-step=1.ckpt")
    written_at(tmp_path / "epoch=0-step=1.ckpt", 2000)
    (tmp_path / "truncated.ckpt").write_bytes(b"PK\x03\x04 cut short")  # killed while writing
    written_at(tmp_path / "truncated.ckpt", 9000)
    sharded = tmp_path / "checkpoints" / "epoch=0-step=2.ckpt"
    sharded.mkdir(parents=True)
    written_at(sharded, 9000)
    assert newest_checkpoint(folders).name == "epoch=0-step=1.ckpt", "a sharded folder without metadata is partial"
    torch.save({}, sharded / "meta.pt")
    written_at(sharded / "meta.pt", 3000)
    written_at(sharded, 1000)  # the folder's own time says nothing about when the checkpoint was complete
    assert newest_checkpoint(folders) == sharded
    written_at(sharded / "meta.pt", 1500)
    assert newest_checkpoint(folders).name == "epoch=0-step=1.ckpt", "the older by write time, whatever its name"
    written_at(sharded / "meta.pt", 3000)
    other_run = tmp_path / "lightning_logs" / "version_0" / "checkpoints"  # below the run's folder, not its own
    other_run.mkdir(parents=True)
    torch.save({"step": 9}, other_run / "epoch=9-step=99.ckpt")
    written_at(other_run / "epoch=9-step=99.ckpt", 8000)
    assert newest_checkpoint(folders) == sharded


def test_last_needs_the_runs_own_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a checkpoint of another run somewhere below the current directory
    torch.save({"step": 1}, tmp_path / "epoch=0-step=1.ckpt")
    args = ["--config", CONFIG, "--trainer.logger.init_args.save_dir", str(tmp_path), "--ckpt_path", "last"]
    with pytest.raises(ValueError, match="newest checkpoint in the run.s own folder: set --trainer.default_root_dir"):
        main(args)


def test_resuming_with_other_model_or_data_settings_stops_naming_them(tmp_path, caplog):
    finished = fit(tmp_path, tmp_path / "first.txt", epochs=1)  # rejection_ratio 0.3 (configs/tiny.yaml)
    trained = trainable_weights(finished)
    changed = ("--data.rejection_ratio", "0.0", "--model.lora.alpha", "16", "--data.shuffle_buffer", "8")
    with pytest.raises(ValueError, match="other settings") as error:
        fit(tmp_path, tmp_path / "second.txt", epochs=2, extra=changed)
    assert "data.rejection_ratio: checkpoint 0.3, now 0.0" in str(error.value)
    assert "model.lora.alpha: checkpoint 8, now 16" in str(error.value)
    assert "data.shuffle_buffer: checkpoint 256, now 8" in str(error.value), "another order of the stream"
    assert "seed" not in str(error.value), "only the settings that differ are named"
    with pytest.raises(ValueError, match="model.lora.r: checkpoint 4, now 8"):  # named before the weights clash
        fit(tmp_path, tmp_path / "second.txt", epochs=2, extra=("--model.lora.r", "8"))

    with caplog.at_level(logging.WARNING):
        resumed = fit(tmp_path, tmp_path / "third.txt", epochs=2, extra=(*changed, "--allow_changed_settings", "true"))
    assert "resuming with changed settings" in caplog.text and resumed.global_step == 16
    assert any(not torch.equal(trainable_weights(resumed)[n], w) for n, w in trained.items()), "continued training"

    # a frozen part rebuilt from another seed (a random tower) is not the one the projector was trained with
    other_seed = ("--seed_everything", "1", "--allow_changed_settings", "true", "--trainer.max_epochs", "3")
    with pytest.raises(ValueError, match="was trained with another frozen 'vision' than this model's"):
        fit(tmp_path, tmp_path / "fourth.txt", epochs=3, extra=other_seed)


def test_every_data_option_that_changes_the_samples_is_compared_on_resume():
    # neither changes the samples trained on: they decide whether a run stops (a stopped run resumes with a new share)
    not_compared = {"skip_bad_samples", "max_skipped_share"}
    assert set(inspect.signature(SafetyDataModule).parameters) - set(RUN_DATA_SETTINGS) == not_compared
    saved, now = ({"data": {"curated": asdict(CuratedConfig(reply=reply))}} for reply in ("keep", "fixed"))
    assert flatten(saved) != flatten(now)
    with pytest.raises(ValueError, match="data.curated.reply: checkpoint 'keep', now 'fixed'"):
        SameRunSettings(now).load_state_dict({"settings": flatten(saved)})


def test_rerunning_a_finished_run_ends_cleanly_with_a_message(tmp_path, caplog, planted_weights):
    """A retried array job, or a requeue after the final checkpoint: here the last checkpoint was written after the
    last batch, before the epoch's end (Lightning then counts the epoch as done without its end hooks)."""
    first = fit(tmp_path, tmp_path / "first.txt", checkpoint_every(4), epochs=1, planted=planted_weights)
    assert_figures_vary(safety_history(first))
    assert newest_checkpoint([tmp_path, tmp_path / "checkpoints"]).name == "epoch=0-step=8.ckpt"
    with caplog.at_level(logging.INFO):
        again = fit(tmp_path, tmp_path / "again.txt", checkpoint_every(4), epochs=1, planted=planted_weights)
    assert "nothing left to train: the run had already finished" in caplog.text
    assert not (tmp_path / "again.txt").exists(), "no batch trained again"
    assert again.global_step == first.global_step == 8
    assert safety_history(again) == safety_history(first), "the same table, the epoch's evaluation included"


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


def settings_checkpoint(path: Path, settings: dict) -> Path:
    """A checkpoint file holding only what the settings check reads: the callbacks' states, ours among others."""
    states = {
        "ModelCheckpoint{'monitor': None}": {"best": 1},
        "SameRunSettings": SameRunSettings(settings).state_dict(),
    }
    torch.save({"callbacks": states}, path)
    return path


SAVED = {
    "data": {"rejection_ratio": 0.3, "rejection": {"seed": 0, "sources": None}, "mixture": {}},
    "model": {"lora": {"r": 4}},
}


def test_the_settings_check_passes_the_same_settings_in_any_order(tmp_path):
    path = settings_checkpoint(tmp_path / "a.ckpt", SAVED)
    data = {"mixture": {}, "rejection": {"sources": None, "seed": 0}, "rejection_ratio": 0.3}
    same = SameRunSettings({"model": {"lora": {"r": 4}}, "data": data})
    same.check_checkpoint(path)
    assert same.checked


def test_the_settings_check_names_every_difference_by_its_full_key(tmp_path):
    path = settings_checkpoint(tmp_path / "a.ckpt", SAVED)
    now = {"data": {"rejection_ratio": 0.0, "rejection": {"seed": 0}, "mixture": {"med": 5}}, "model": {"lr": None}}
    with pytest.raises(ValueError, match="--allow_changed_settings true") as error:
        SameRunSettings(now).check_checkpoint(path)
    listed = (
        "data.mixture: checkpoint {}, now '<unset>'; data.mixture.med: checkpoint '<unset>', now 5; "
        "data.rejection.sources: checkpoint None, now '<unset>'; data.rejection_ratio: checkpoint 0.3, now 0.0; "
        "model.lora.r: checkpoint 4, now '<unset>'; model.lr: checkpoint '<unset>', now None"
    )
    assert f"other settings ({listed})" in str(error.value)


def test_allowed_setting_changes_are_warned_about_once(tmp_path, caplog):
    path = settings_checkpoint(tmp_path / "a.ckpt", SAVED)
    now = SameRunSettings(SAVED | {"model": {"lora": {"r": 8}}}, allow_changes=True)
    with caplog.at_level(logging.WARNING):
        now.check_checkpoint(path)
        now.load_state_dict(torch.load(path)["callbacks"]["SameRunSettings"])  # Lightning restores it after the weights
    warnings = [r.getMessage() for r in caplog.records if "changed settings" in r.getMessage()]
    assert warnings == ["resuming with changed settings (--allow_changed_settings): model.lora.r: checkpoint 4, now 8"]


def test_a_checkpoint_without_saved_settings_is_checked_when_lightning_restores_states(tmp_path):
    torch.save({"callbacks": {}}, tmp_path / "old.ckpt")
    now = SameRunSettings(SAVED)
    now.check_checkpoint(tmp_path / "old.ckpt")
    assert not now.checked
    with pytest.raises(ValueError, match="data.rejection_ratio: checkpoint 0.5, now 0.3"):
        now.load_state_dict({"settings": {**now.settings, "data.rejection_ratio": 0.5}})
    with pytest.raises(ValueError, match="model.lora.r: checkpoint '<unset>', now 4"):
        now.load_state_dict({})  # a state saved without settings
