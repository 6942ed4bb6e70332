from collections import Counter

import pytest
from data_helpers import pieces_of, png_bytes, record, tiny_processor, write_source

from mllm_safety.data.manifest import Manifest, ShardSetWriter
from mllm_safety.data.rejection import RejectionConfig, RejectionSwap
from mllm_safety.data.shards import ShardSlice
from mllm_safety.data.streaming import EpochLoader, ShardStream, exact_slices

SIZES = [3, 11, 5, 17, 1, 9]  # 46 samples in shards of very different sizes


@pytest.fixture
def uneven(tmp_path):
    write_source(tmp_path, "a", SIZES)
    return tmp_path


@pytest.mark.parametrize("num_slots", [1, 2, 3, 4, 7])
def test_exact_slices_share_every_sample_once_and_evenly(uneven, num_slots):
    pieces = pieces_of(uneven)
    for epoch in (0, 1):
        shares = [
            [i for s in exact_slices(pieces, epoch, seed=0, num_slots=num_slots, slot=k) for i in s.ids]
            for k in range(num_slots)
        ]
        everything = [i for share in shares for i in share]
        assert sorted(everything) == sorted(f"a-{n}" for n in range(46)), "each sample exactly once"
        assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_exact_order_changes_with_the_epoch_and_repeats_with_it(uneven):
    pieces = pieces_of(uneven)

    def order(epoch, seed=0):
        return [i for s in exact_slices(pieces, epoch, seed, num_slots=2, slot=0) for i in s.ids]

    assert order(0) == order(0) and order(0) != order(1) and order(0) != order(0, seed=5)


def stream(folder_or_pieces, tokenizer, rank=0, world_size=1, num_workers=0, **options):
    pieces = pieces_of(folder_or_pieces) if not isinstance(folder_or_pieces, list) else folder_or_pieces
    options = {"batch_size": 4, "shuffle_buffer": 8} | options
    swap = RejectionSwap(0.0, RejectionConfig())
    return ShardStream(
        pieces, tiny_processor(tokenizer), swap, rank=rank, world_size=world_size, num_workers=num_workers, **options
    )


def run_epoch(loader):
    batches = list(loader)
    assert len(batches) == len(loader)
    fresh = [i for b in batches for i in b.ids[: len(b.ids) - b.stats["repeated"]]]
    return batches, fresh


def test_ranks_and_workers_yield_the_same_number_of_batches_and_cover_the_data(uneven, tokenizer):
    loaders = [
        EpochLoader(stream(uneven, tokenizer, rank=r, world_size=2, num_workers=2), lambda: 0, num_workers=2)
        for r in range(2)
    ]
    results = [run_epoch(loader) for loader in loaders]
    # 46 samples over 4 slots: shares of 11 or 12 samples, 3 batches of 4 each -> 6 batches per rank
    assert [len(batches) for batches, _ in results] == [6, 6]
    fresh = [i for _, ids in results for i in ids]
    assert sorted(fresh) == sorted(f"a-{n}" for n in range(46)), "each sample once over ranks and workers"
    assert set(results[0][1]).isdisjoint(results[1][1])
    assert sum(b.stats["repeated"] for batches, _ in results for b in batches) == 4 * 12 - 46
    assert all(len(b.ids) == 4 for batches, _ in results for b in batches)


def test_persistent_workers_follow_the_epoch(uneven, tokenizer):
    epoch = [0]
    dataset = stream(uneven, tokenizer, world_size=2, num_workers=2)
    loader = EpochLoader(dataset, lambda: epoch[0], num_workers=2, persistent_workers=True)
    first = run_epoch(loader)[1]
    epoch[0] = 1
    second = run_epoch(loader)[1]
    epoch[0] = 0
    again = run_epoch(loader)[1]
    assert first == again, "an epoch's order is reproducible"
    assert second != first, "and changes from epoch to epoch"


def test_bad_samples_are_skipped_counted_and_replaced_by_repeats(tmp_path, tokenizer):
    with ShardSetWriter(tmp_path, "a", shard_size=100) as writer:
        for k in range(12):
            image = ("png", b"\x89PNG broken") if k in (3, 7) else ("png", png_bytes())
            writer.write(f"a-{k}", record(f"a-{k}"), image)
        writer.write("long", record("long", answer="word " * 400), ("png", png_bytes()))
    Manifest(writer.entries).write(tmp_path)
    batches, fresh = run_epoch(stream(tmp_path, tokenizer, batch_size=4))
    skipped = Counter()
    for batch in batches:
        skipped.update({k: v for k, v in batch.stats.items() if k.startswith("skipped_")})
    assert skipped["skipped_bad_image"] == 2 and sum(skipped.values()) == 2
    assert len(batches) == 4 and sorted(fresh) == sorted({f"a-{k}" for k in range(12)} - {"a-3", "a-7"} | {"long"})
    truncated = next(b for b in batches if "long" in b.ids)
    assert truncated.input_ids.shape[1] == 256, "a long reply is truncated to max_length, not dropped"


def test_resampled_mode_is_endless_with_a_fixed_epoch_size(uneven, tokenizer):
    dataset = stream(uneven, tokenizer, world_size=2, mode="resampled", samples_per_epoch=100)
    loader = EpochLoader(dataset, lambda: 0)
    batches, fresh = run_epoch(loader)
    assert len(batches) == 13 and len(fresh) == 13 * 4, "ceil(100 / 2 ranks / 4) batches, no repeats needed"
    assert len(set(fresh)) < len(fresh), "shards are drawn with replacement"
    epoch_one = run_epoch(EpochLoader(dataset, lambda: 1))[1]
    assert epoch_one != fresh


def test_resampled_mode_reads_shards_without_manifest(uneven, tokenizer):
    pieces = [ShardSlice(p.path) for p in pieces_of(uneven)]
    batches, fresh = run_epoch(stream(pieces, tokenizer, mode="resampled", samples_per_epoch=20))
    assert len(batches) == 5 and set(fresh) <= {f"a-{n}" for n in range(46)}
    with pytest.raises(ValueError, match="exact mode needs a manifest"):
        stream(pieces, tokenizer)


def test_too_few_samples_for_the_slots_is_a_clear_error(uneven, tokenizer):
    with pytest.raises(ValueError, match="46 samples per epoch cannot be shared by 16 ranks x 4 workers"):
        stream(uneven, tokenizer, world_size=16, num_workers=4)


def test_a_loader_with_other_workers_than_the_split_is_refused(uneven, tokenizer):
    with pytest.raises(RuntimeError, match="split for 2 workers per rank but the DataLoader runs 0"):
        list(EpochLoader(stream(uneven, tokenizer, num_workers=2), lambda: 0))
