"""No silent data loss: skipped samples are counted over workers and ranks, and a run losing more than
``data.max_skipped_share`` of its samples to one reason stops, naming the reason, an example and the fix."""

import csv
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from data_helpers import pieces_of, png_bytes, record, tiny_processor

from mllm_safety.data.conversation import SKIP_REASONS
from mllm_safety.data.datamodule import SafetyDataModule
from mllm_safety.data.manifest import Manifest, ShardSetWriter
from mllm_safety.data.rejection import RejectionConfig, RejectionSwap
from mllm_safety.data.skips import MIN_SAMPLES, SKIP_FIXES, SkippedShareError, SkipShareGuard
from mllm_safety.data.streaming import EpochLoader, ShardStream

ROOT = Path(__file__).parents[1]
LONG_QUESTION = "Describe every detail of the picture, " * 60  # ~400 tokens: the prompt alone passes max_length 256


def write_shards(folder: Path, shards: list[tuple[int, int]]) -> None:
    """One shard per ``(fine, too_long)`` pair: fine samples first, then samples whose prompt passes 256 tokens."""
    folder.mkdir(parents=True, exist_ok=True)
    with ShardSetWriter(folder, "a", shard_size=10_000) as writer:
        index = 0
        for fine, long in shards:
            writer.start_shard()
            for k in range(fine + long):
                sample = record(f"a-{index}")
                if k >= fine:
                    sample["conversations"][0]["value"] = f"<image>\n{LONG_QUESTION}"
                writer.write(f"a-{index}", sample, ("png", png_bytes()))
                index += 1
    Manifest(writer.entries).write(folder)


def stats_of(batches) -> Counter:
    total = Counter()
    for batch in batches:
        total.update(batch.stats)
    return total


def test_every_reason_has_a_fix():
    assert set(SKIP_FIXES) == set(SKIP_REASONS)
    assert "raise model.max_length or bound the image size: model.hub.processor_kwargs" in SKIP_FIXES["too_long"]


@pytest.mark.parametrize("share", [-0.1, 1.5])
def test_the_share_must_be_a_share(share):
    with pytest.raises(ValueError, match=rf"max_skipped_share must be in \[0, 1\].*got {share}"):
        SafetyDataModule(max_skipped_share=share)


def judged(guard: SkipShareGuard, seen: int, too_long: int) -> None:
    guard.add({"seen": seen, "skipped_too_long": too_long, "repeated": 3}, {"too_long": "sample 'x-1': 2412 tokens"})
    guard.check(lambda counts: counts)


def test_the_guard_judges_each_reason_against_the_share_once_enough_samples_are_seen():
    guard = SkipShareGuard(0.01)
    judged(guard, MIN_SAMPLES - 1, 150)  # most lost, but too few samples seen to judge a share
    assert not guard.judged_early and guard.due(epoch_ends=False)
    with pytest.raises(SkippedShareError) as stop:
        judged(guard, 1, 0)
    message = str(stop.value)
    assert "150 of the first 200 samples seen (75.0%) were skipped as too_long" in message
    assert "data.max_skipped_share=0.01" in message and "Example: sample 'x-1': 2412 tokens" in message
    assert "Fix: raise model.max_length or bound the image size: model.hub.processor_kwargs" in message

    fine = SkipShareGuard(0.01)
    judged(fine, 400, 4)  # exactly 1%: allowed
    assert fine.judged_early and not fine.due(epoch_ends=False) and fine.due(epoch_ends=True)
    with pytest.raises(SkippedShareError, match="5 of the first 400"):
        judged(fine, 0, 1)
    judged(SkipShareGuard(1.0), 400, 400)  # a share of 1 never stops


def test_two_workers_count_every_sample_and_the_guard_sums_them(tmp_path, tokenizer):
    """Each worker reads one shard: the first all fine, the second mostly too long. The batches of both together
    carry every sample read and every skip, with an example naming the shard and key."""
    write_shards(tmp_path, [(150, 0), (30, 120)])
    stream = ShardStream(
        pieces_of(tmp_path), tiny_processor(tokenizer), RejectionSwap(0.0, RejectionConfig()), batch_size=4,
        num_workers=2,
    )  # fmt: skip
    batches = list(EpochLoader(stream, lambda: 0, num_workers=2))
    totals = stats_of(batches)
    assert totals["seen"] == 300 and totals["skipped_too_long"] == 120
    assert sum(v for k, v in totals.items() if k.startswith("skipped_")) == 120
    examples = [b.skip_examples["too_long"] for b in batches if "too_long" in b.skip_examples]
    assert len(examples) == 1 and f"in {tmp_path}" in examples[0] and "max_length=256" in examples[0]

    # the first batch of each worker: 64 fine samples from one (a group of 16 batches of 4), and from the other
    # all of its 150 (it never gathers 64 usable ones): neither alone reaches 200 samples, both together do
    first = batches[:2]
    assert sorted(b.stats["seen"] for b in first) == [64, 150]
    guard = SkipShareGuard(0.01)
    guard.add(first[0].stats, first[0].skip_examples)
    guard.check(lambda counts: counts)
    guard.add(first[1].stats, first[1].skip_examples)
    with pytest.raises(SkippedShareError, match=r"120 of the first 214 samples seen \(56.1%\)"):
        guard.check(lambda counts: counts)


def test_a_worker_whose_every_sample_is_skipped_names_the_reason(tmp_path, tokenizer):
    write_shards(tmp_path, [(0, 8)])
    stream = ShardStream(
        pieces_of(tmp_path), tiny_processor(tokenizer), RejectionSwap(0.0, RejectionConfig()), batch_size=4
    )
    with pytest.raises(RuntimeError, match=r"read 8 samples and skipped \{'too_long': 8\}.*Fix: raise model"):
        list(EpochLoader(stream, lambda: 0))


def fit(tmp_path, data: Path, *overrides: str, timeout: int = 300) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "mllm_safety.fit", "--config", str(ROOT / "configs" / "tiny.yaml"),
        "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path),
        "--trainer.callbacks", "[]", "--data.train_shards", str(data / "*.tar"), "--data.rejection_ratio", "0",
        *overrides,
    ]  # fmt: skip
    env = os.environ | {"PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_a_run_whose_samples_are_mostly_too_long_stops_at_its_first_step(tmp_path):
    write_shards(tmp_path / "data", [(150, 0), (30, 120)])
    done = fit(tmp_path, tmp_path / "data", "--data.num_workers", "2")
    assert done.returncode != 0
    err = done.stderr
    assert "SkippedShareError: 120 of the first 214 samples seen (56.1%) were skipped as too_long" in err
    assert "Example: sample 'a-" in err and "max_length=256 [000" in err, "an example: the sample, its key, its shard"
    assert "Fix: raise model.max_length or bound the image size: model.hub.processor_kwargs" in err
    assert not list(tmp_path.rglob("*.ckpt")), "stopped before a single epoch was trained"


def test_a_run_under_the_share_trains_on_and_still_counts(tmp_path):
    write_shards(tmp_path / "data", [(104, 1), (104, 1)])
    done = fit(tmp_path, tmp_path / "data", "--data.num_workers", "2", "--data.max_skipped_share", "0.01")
    assert done.returncode == 0, done.stderr[-3000:]
    (log_dir,) = (tmp_path / "lightning_logs").iterdir()
    rows = [r for r in csv.DictReader(open(log_dir / "metrics.csv")) if r.get("data/seen")]
    assert [(float(r["data/seen"]), float(r["data/skipped_too_long"])) for r in rows] == [(210.0, 2.0)]


def test_ranks_stop_together_when_only_one_rank_skips(tmp_path):
    """Rank 0 reads the fine shard (seed 0 swaps the two shards), rank 1 the mostly too-long one, whose 150 samples
    are fewer than the 200 a share needs: only the sum over ranks judges them, and rank 0, which sees nothing wrong
    on its own, must stop with rank 1 (training on alone, it would wait forever in its next collective)."""
    write_shards(tmp_path / "data", [(30, 120), (150, 0)])
    ddp = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]
    done = fit(tmp_path, tmp_path / "data", *ddp, "--data.num_workers", "1", timeout=240)
    assert done.returncode != 0
    assert "120 of the first 214 samples seen (56.1%) were skipped as too_long" in done.stderr, done.stderr[-3000:]
