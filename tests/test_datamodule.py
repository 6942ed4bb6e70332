"""The data module in real runs: two DDP processes on CPU (gloo), logging of skipped samples, recorded options."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from data_helpers import png_bytes, record, write_source

from mllm_safety.data.datamodule import SafetyDataModule
from mllm_safety.data.manifest import Manifest, ShardSetWriter

ROOT = Path(__file__).parents[1]
CONFIG = str(ROOT / "configs" / "tiny.yaml")


def fit_command(tmp_path, *overrides):
    return [
        sys.executable, "-m", "mllm_safety.fit", "--config", CONFIG,
        "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path),
        "--trainer.callbacks", '[{"class_path": "data_helpers.RecordSeenIds"}]', *overrides,
    ]  # fmt: skip


def metrics(tmp_path):
    (log_dir,) = (tmp_path / "lightning_logs").iterdir()
    return list(csv.DictReader(open(log_dir / "metrics.csv"))), log_dir


def test_two_ddp_processes_see_disjoint_shares_in_step_and_log_skips(tmp_path):
    data = tmp_path / "data"
    write_source(data, "a", [3, 11, 5, 17])  # uneven shards: a split by shard would give ranks 16 and 20 samples
    with ShardSetWriter(data, "bad", shard_size=10) as writer:
        writer.write("broken", record("broken"), ("png", b"\x89PNG broken"))
        writer.write("fine", record("fine"), ("png", png_bytes()))
    manifest = Manifest.read(data)
    Manifest(manifest.shards + writer.entries).write(data)
    env = os.environ | {"PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "HF_HUB_OFFLINE": "1"}
    command = fit_command(
        tmp_path,
        "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu",
        "--trainer.max_epochs", "2", "--data.train_shards", str(data / "*.tar"),
        "--data.batch_size", "4", "--data.num_workers", "1", "--data.rejection_ratio", "0.5",
    )  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]

    seen = [json.loads((tmp_path / f"seen-rank{r}.json").read_text()) for r in range(2)]
    expected = {f"a-{n}" for n in range(36)} | {"fine"}
    for epoch in (0, 1):
        shares = [[i for b in rank if b["epoch"] == epoch for i in b["ids"]] for rank in seen]
        assert len([b for b in seen[0] if b["epoch"] == epoch]) == len([b for b in seen[1] if b["epoch"] == epoch]) == 5
        assert set(shares[0]).isdisjoint(shares[1]) and sorted(shares[0] + shares[1]) == sorted(expected)
    orders = [[i for b in seen[0] if b["epoch"] == epoch for i in b["ids"]] for epoch in (0, 1)]
    assert orders[0] != orders[1], "the shuffle changes with the epoch"

    rows, log_dir = metrics(tmp_path)
    epoch_rows = [r for r in rows if r.get("data/skipped_bad_image")]
    assert [float(r["data/skipped_bad_image"]) for r in epoch_rows] == [1.0, 1.0], "summed over both ranks"
    assert [float(r["data/repeated"]) for r in epoch_rows] == [2 * 5 * 4 - 37.0] * 2
    assert "swap: 19 of 38 eligible samples" in done.stderr + done.stdout


def test_ablation_and_mixture_options_are_recorded_in_the_run_config(tmp_path):
    data = tmp_path / "data"
    write_source(data, "llava", [20])
    write_source(data, "med", [12])
    env = os.environ | {"PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "HF_HUB_OFFLINE": "1"}
    command = fit_command(
        tmp_path, "--trainer.max_steps", "2", "--data.train_shards", str(data / "*.tar"),
        "--data.mixture", '{"llava": 8, "med": 8}', "--data.rejection_ratio", "0.5",
        "--data.rejection.sources", '["med"]', "--data.rejection.image", "noise", "--data.rejection.reply", "pool",
        "--data.curated.reply", "fixed", "--data.curated.turns", "random", "--data.curated.contrast", "unsafe_only",
    )  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    _, log_dir = metrics(tmp_path)
    data_config = yaml.safe_load((log_dir / "config.yaml").read_text())["data"]
    assert data_config["mixture"] == {"llava": 8, "med": 8}
    rejection = data_config["rejection"]
    assert (rejection["image"], rejection["reply"], rejection["sources"]) == ("noise", "pool", ["med"])
    curated = data_config["curated"]
    assert (curated["reply"], curated["turns"], curated["contrast"], curated["image"]) == (
        "fixed",
        "random",
        "unsafe_only",
        "keep",
    )
    assert "swap: 4 of 8 eligible samples" in done.stderr + done.stdout
    assert "{'llava': 8, 'med': 8}" in done.stderr + done.stdout


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"batch_size": 0}, "batch_size must be >= 1, got 0"),
        ({"group_buffer": 0, "num_workers": -1}, "num_workers must be >= 0, got -1; group_buffer must be >= 1"),
        ({"num_samples": 100}, "num_samples sets the epoch of mode 'resampled'"),
        ({"rejection_ratio": 2.0}, r"rejection ratio must be in \[0, 1\], got 2.0"),
    ],
)
def test_bad_options_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        SafetyDataModule(**options)


def test_shards_without_manifest_need_resampled_mode(tmp_path):
    write_source(tmp_path, "a", [4])
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(ValueError, match="no manifest.json.*data.mode=resampled"):
        SafetyDataModule(train_shards=str(tmp_path / "*.tar")).setup("fit")
    module = SafetyDataModule(train_shards=str(tmp_path / "*.tar"), mode="resampled", num_samples=8)
    module.setup("fit")
    assert [piece.positions for piece in module.pieces] == [None]


def test_the_processor_comes_from_connect_not_from_the_trainer(tmp_path):
    """The data layer never reaches into the model: without ``connect(processor)`` there is no loader."""
    write_source(tmp_path, "a", [4])
    module = SafetyDataModule(train_shards=str(tmp_path / "*.tar"))
    module.setup("fit")
    with pytest.raises(RuntimeError, match=r"SafetyDataModule.connect\(model.processor\) must be called"):
        module.train_dataloader()
