import pytest

from mllm_safety.data.manifest import ShardEntry
from mllm_safety.data.rejection import RejectionConfig, RejectionSwap
from mllm_safety.data.selection import eligible_ids, select_samples, stable_uniform


def shards(layout):
    """(path, entry) pairs: ``layout`` maps a source to its shard sizes; ids are ``<source>-<n>``."""
    used = []
    for source, sizes in layout.items():
        n = 0
        for k, size in enumerate(sizes):
            used.append(
                (
                    f"/d/{source}-{k}.tar",
                    ShardEntry(f"{source}-{k}.tar", source, [f"{source}-{n + i}" for i in range(size)]),
                )
            )
            n += size
    return used


def ids_of(selected):
    return {i for shard in selected for i in shard.ids}


def test_mixture_takes_counts_per_source_and_nothing_else():
    used = shards({"llava": [400, 400, 200], "med": [300, 300], "other": [50]})
    selected = select_samples(used, {"llava": 500, "med": 200}, seed=0)
    chosen = ids_of(selected)
    assert len({i for i in chosen if i.startswith("llava")}) == 500
    assert len({i for i in chosen if i.startswith("med")}) == 200 and not any(i.startswith("other") for i in chosen)
    for shard in selected:  # positions point at the chosen ids
        entry = dict(used)[shard.path]
        assert [entry.ids[k] for k in shard.positions] == list(shard.ids)
    everything = select_samples(used, {"llava": None, "med": 300}, seed=0)
    assert len(ids_of(everything)) == 1300


def test_mixture_is_nested_in_counts_and_independent_of_shard_layout():
    small = ids_of(select_samples(shards({"a": [1000]}), {"a": 100}, seed=3))
    large = ids_of(select_samples(shards({"a": [1000]}), {"a": 300}, seed=3))
    regrouped = ids_of(select_samples(list(reversed(shards({"a": [7, 500, 93, 400]}))), {"a": 100}, seed=3))
    assert small < large and small == regrouped
    assert small != ids_of(select_samples(shards({"a": [1000]}), {"a": 100}, seed=4))


@pytest.mark.parametrize(
    ("mixture", "message"),
    [({"nope": 3}, "names source 'nope'"), ({"a": 11}, "asks for 11 samples of 'a', which has 10")],
)
def test_bad_mixtures_are_named(mixture, message):
    with pytest.raises(ValueError, match=message):
        select_samples(shards({"a": [10]}), mixture, seed=0)


def test_ids_must_be_unique():
    used = shards({"a": [3]}) + [("/e/a-0.tar", ShardEntry("a-0.tar", "a", ["a-1"]))]
    with pytest.raises(ValueError, match="'a-1' of /e/a-0.tar appears twice"):
        select_samples(used, None, seed=0)


@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.37, 1.0])
def test_the_paper_setup_swaps_exactly_round_r_n_of_the_benign_pool(ratio):
    """5000 normal samples beside 2000 of a pool whose replies may be swapped (the paper's mixture)."""
    used = shards({"llava": [3000, 3000], "med": [1500, 1500]})
    selected = select_samples(used, {"llava": 5000, "med": 2000}, seed=0)
    config = RejectionConfig(sources=["med"])
    swap = RejectionSwap(ratio, config, ids=eligible_ids(selected, config.sources))
    swapped = {i for i in ids_of(selected) if swap.is_swapped(i)}
    assert len(swapped) == round(ratio * 2000) and all(i.startswith("med") for i in swapped)


def test_swaps_are_nested_in_the_ratio_and_depend_on_seed_and_id_only():
    selected = select_samples(shards({"a": [500, 300], "b": [200]}), None, seed=0)
    regrouped = select_samples(list(reversed(shards({"a": [100, 700], "b": [50, 150]}))), None, seed=0)

    def swapped(selection, ratio, seed=0):
        swap = RejectionSwap(ratio, RejectionConfig(seed=seed), ids=eligible_ids(selection, None))
        return {i for i in ids_of(selection) if swap.is_swapped(i)}

    assert swapped(selected, 0.1) < swapped(selected, 0.25) < swapped(selected, 0.6)
    assert swapped(selected, 0.25) == swapped(regrouped, 0.25)
    assert swapped(selected, 0.25) != swapped(selected, 0.25, seed=1)


def test_eligible_sources_must_be_present():
    selected = select_samples(shards({"a": [5], "b": [5]}), {"a": 5}, seed=0)
    with pytest.raises(ValueError, match=r"rejection.sources names \['b'\]"):
        eligible_ids(selected, ["b"])


def test_a_mixture_picks_the_same_samples_in_every_version():
    """A run is described by its mixture counts and seed; the samples behind them must not change with the code."""
    used = shards({"a": [10]})
    assert ids_of(select_samples(used, {"a": 3}, seed=0)) == {"a-3", "a-5", "a-7"}
    assert ids_of(select_samples(used, {"a": 3}, seed=1)) == {"a-7", "a-8", "a-9"}


def test_stable_uniform_is_uniform_on_the_unit_interval():
    """The swap without ids compares it with the ratio: its values must spread evenly over [0, 1)."""
    values = [stable_uniform(0, f"sample-{i}") for i in range(4000)]
    assert all(0.0 <= v < 1.0 for v in values)
    for threshold in (0.1, 0.5, 0.9):
        assert abs(sum(v < threshold for v in values) / len(values) - threshold) < 0.03


def test_a_source_can_be_named_with_no_samples_but_not_with_a_negative_count():
    used = shards({"a": [10], "b": [10]})
    chosen = ids_of(select_samples(used, {"a": 0, "b": 2}, seed=0))
    assert len(chosen) == 2 and all(i.startswith("b-") for i in chosen)
    with pytest.raises(ValueError, match="asks for -1 samples of 'a'"):
        select_samples(used, {"a": -1}, seed=0)
