"""Exact resume: a run that dies mid-epoch and is restarted with the same command ends as if it had never stopped."""

import json
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from mllm_safety.data.resumable import StreamPosition
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


def fit(root: Path, record: Path, *callbacks: dict) -> L.LightningModule:
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
    return cli.model


def trainable_weights(model: L.LightningModule) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def read_record(path: Path) -> list[tuple[int, list[str]]]:
    return [(int(step), ids) for step, *ids in (line.split() for line in path.read_text().splitlines())]


def test_restart_after_a_crash_mid_epoch_continues_exactly(tmp_path):
    uninterrupted = trainable_weights(fit(tmp_path / "a", tmp_path / "a.txt"))
    expected = read_record(tmp_path / "a.txt")
    assert len(expected) == 16 and expected[0][1] != expected[8][1], "16 batches; each epoch has its own order"

    crash = {"class_path": "test_resume.CrashAfterStep", "init_args": {"step": 11}}
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(tmp_path / "b", tmp_path / "before.txt", crash)
    assert newest_checkpoint(tmp_path / "b").name == "epoch=1-step=9.ckpt"  # one batch into the second epoch

    resumed = trainable_weights(fit(tmp_path / "b", tmp_path / "after.txt"))
    before, after = read_record(tmp_path / "before.txt"), read_record(tmp_path / "after.txt")
    assert [step for step, _ in after] == list(range(9, 16)), "continues at the step after the checkpoint"
    assert before[:9] + after == expected, "the same batches in the same order: none repeated, none skipped"
    for name, weight in uninterrupted.items():
        assert torch.equal(resumed[name], weight), name  # dropout drew the same masks too


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
    expected = (torch.rand(3), __import__("random").random(), __import__("numpy").random.rand())
    restore_random_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert torch.equal(torch.rand(3), expected[0])
    assert __import__("random").random() == expected[1]
    assert __import__("numpy").random.rand() == expected[2]


def test_stream_position_round_trips():
    position = StreamPosition(epoch=3, batches=17)
    restored = StreamPosition()
    restored.load_state_dict(position.state_dict())
    assert restored == position
