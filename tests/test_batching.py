import random

import pytest

from mllm_safety.data.batching import exact_batches, length_grouped_batches


def non_pad_share(batches):
    return sum(sum(b) for b in batches) / sum(len(b) * max(b) for b in batches)


def test_length_grouping_keeps_every_item_once_and_cuts_padding():
    rng = random.Random(0)
    lengths = [rng.choice([rng.randint(40, 120), rng.randint(600, 900)]) for _ in range(1000)]
    grouped = list(length_grouped_batches(lengths, 16, 16, lambda n: n, random.Random(1)))
    plain = list(length_grouped_batches(lengths, 16, 1, lambda n: n, random.Random(1)))
    assert sorted(n for b in grouped for n in b) == sorted(lengths)
    assert all(len(b) == 16 for b in grouped[:-1]) and len(grouped[-1]) == 1000 % 16
    assert [n for b in plain for n in b] == lengths, "one batch per pool keeps the stream order"
    assert non_pad_share(grouped) > 0.9 > non_pad_share(plain)
    firsts = [b[0] for b in grouped[:16]]
    assert firsts != sorted(firsts), "batches of a pool come in random order, not short to long"


def test_exact_batches_pads_short_streams_with_counted_repeats():
    batches = [[1, 2, 3], [4, 5, 6], [7]]
    out = list(exact_batches(iter(batches), 5, 3))
    assert out == [([1, 2, 3], 0), ([4, 5, 6], 0), ([7, 4, 5], 2), ([7, 4, 5], 3), ([7, 4, 5], 3)]


def test_exact_batches_stops_reading_once_it_has_enough():
    pulled = []

    def endless():
        k = 0
        while True:
            pulled.append(k)
            yield [k, k]
            k += 1

    assert [b for b, _ in exact_batches(endless(), 3, 2)] == [[0, 0], [1, 1], [2, 2]]
    assert pulled == [0, 1, 2]


def test_exact_batches_from_an_empty_stream_is_an_error():
    with pytest.raises(RuntimeError, match="no usable sample"):
        list(exact_batches(iter([]), 2, 4))
