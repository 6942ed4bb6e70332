"""The whole path through the CLI: config -> data -> model -> training -> safety evaluation -> logs."""

import csv
import json
import re
from pathlib import Path

import pytest
import torch
from planted import assert_figures_vary

from mllm_safety.evaluation.callback import SafetyEvalCallback
from mllm_safety.fit import SafetyCLI, main

CONFIG = str(Path(__file__).parents[1] / "configs" / "tiny.yaml")


def run_fit(tmp_path, *overrides):
    return main(
        [
            "--config",
            CONFIG,
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.logger.init_args.save_dir",
            str(tmp_path),
            *overrides,
        ]
    )


def test_tiny_fit_trains_and_logs_safety_metrics_every_epoch(tmp_path, capsys, planted_weights):
    planted = ("--model.init_weights", json.dumps([planted_weights]))
    cli = run_fit(tmp_path, "--trainer.max_epochs", "2", "--data.rejection_ratio", "0.5", *planted)
    trainer = cli.trainer
    assert trainer.current_epoch == 2 and trainer.global_step == 16  # 32 demo samples / batch 4, twice
    callback = next(c for c in trainer.callbacks if isinstance(c, SafetyEvalCallback))
    assert [label for label, _ in callback.history] == ["before", "epoch 0", "epoch 1"]
    headline = {name for name in callback.history[-1][1] if name.count("/") == 2}
    expected = {
        "safety/asr/demo_typographic",
        "safety/asr/demo_text",
        "safety/asr/mean",
        "safety/over_refusal/demo_benign",
        "safety/over_refusal/demo_typographic_benign",
        "safety/over_refusal/mean",
        "safety/refusal_gap/demo_benign",
        "safety/refusal_gap/demo_typographic_benign",
        "utility/demo_shapes/accuracy",
    }
    assert headline == expected
    assert {name.rsplit("/", 1)[0] for name in callback.history[-1][1]} >= {"safety/asr/demo_text"}, "per category"
    for _, metrics in callback.history:
        assert all(-1.0 <= value <= 1.0 for value in metrics.values())
        assert metrics["safety/refusal_gap/demo_benign"] == pytest.approx(
            (1 - metrics["safety/asr/demo_text"]) - metrics["safety/over_refusal/demo_benign"]
        )

    log_dir = Path(trainer.logger.log_dir)
    rows = list(csv.DictReader(open(log_dir / "metrics.csv")))
    safety_rows = [r for r in rows if r["safety/asr/demo_text"]]
    assert len(safety_rows) == 3, "baseline + one evaluation per epoch"
    # the logged figures are each evaluation's own: they differ between sets and evaluations, and the log has them all
    logged = [{name: float(row[name]) for name in metrics} for row, (_, metrics) in zip(safety_rows, callback.history)]
    assert logged == [metrics for _, metrics in callback.history]
    assert [row["step"] for row in safety_rows] == ["0", "8", "16"]
    assert_figures_vary(callback.history)
    assert any(r["train/loss"] for r in rows)
    assert (log_dir / "config.yaml").read_text().count("rejection_ratio: 0.5") == 1
    assert "safety/asr/demo_text" in capsys.readouterr().out, "the before/after table is printed at the end"

    # the checkpoint, in the run's own folder, holds only what trains
    checkpoint = next((tmp_path / "checkpoints").glob("*.ckpt"))
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    trainable = {n for n, p in cli.model.named_parameters() if p.requires_grad}
    assert set(state) == trainable and any("lora" in n for n in state) and any("projector" in n for n in state)


def test_training_changes_trainable_weights_only(tmp_path):
    trained = run_fit(tmp_path, "--trainer.max_steps", "3", "--trainer.callbacks", "[]").model
    initial = run_fit(tmp_path, "--trainer.max_steps", "0", "--trainer.callbacks", "[]").model  # same seed, same init
    after = dict(trained.named_parameters())
    changed = {name for name, before in initial.named_parameters() if not torch.equal(before, after[name])}
    trainable = {name for name, p in trained.named_parameters() if p.requires_grad}
    assert changed <= trainable, f"frozen weights changed: {sorted(changed - trainable)[:3]}"
    assert any("projector" in n for n in changed) and any("lora_B" in n for n in changed)
    assert not any(n.startswith("model.vision") for n in trainable), "the vision tower is frozen by default"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (["--data.rejection_ratio", "1.5"], "rejection ratio must be in \\[0, 1\\], got 1.5"),
        (["--data.no_such_option", "1"], "no_such_option"),
        (["--model.projector", "mlp2x_relu"], "unknown projector 'mlp2x_relu'"),
        (["--model.vision.name", "ViT-Nope"], "ViT-Nope"),
        (["--data.train_shards", "/nonexistent/shard-{000..009}.tar"], "matches no file"),
    ],
)
def test_bad_configuration_is_a_clear_error(tmp_path, override, message, capsys):
    with pytest.raises((SystemExit, ValueError, FileNotFoundError)) as error:
        run_fit(tmp_path, "--trainer.max_steps", "1", *override)
    text = str(error.value) + capsys.readouterr().err
    assert re.search(message, text), text


def test_each_run_of_a_wandb_sweep_gets_its_own_folder(tmp_path, monkeypatch):
    """The W&B agent starts every grid point with the same config: their checkpoints must not overwrite each other."""
    args = ["--config", CONFIG, f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false"]
    monkeypatch.setenv("WANDB_SWEEP_ID", "abc123")
    folders = set()
    for run in ("run1", "run2"):
        monkeypatch.setenv("WANDB_RUN_ID", run)
        cli = SafetyCLI(args)
        assert Path(cli.trainer.default_root_dir) == tmp_path / "sweep-abc123" / run
        folders |= {Path(folder) for folder in cli.use_run_folder()}
    assert tmp_path / "sweep-abc123" / "run1" / "checkpoints" in folders
    assert not any(folder == tmp_path or folder == tmp_path / "checkpoints" for folder in folders)
