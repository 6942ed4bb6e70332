"""Which samples of a shard set train a run: mixtures as counts per source, chosen by (seed, id) alone."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from mllm_safety.data.manifest import ShardEntry


def stable_uniform(*parts: object) -> float:
    """A uniform number in [0, 1) fixed by ``parts`` alone (not by order, process, rank or worker)."""
    digest = hashlib.blake2b("\x00".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


@dataclass(frozen=True)
class SelectedShard:
    """The samples of one shard that train this run."""

    path: str
    source: str
    positions: tuple[int, ...]
    """Positions (tar keys) of the selected samples in the shard, ascending."""
    ids: tuple[str, ...]
    """Their ids, aligned with ``positions``."""


def select_samples(
    used: list[tuple[str, ShardEntry]],
    mixture: dict[str, int | None] | None,
    seed: int,
    exclude: set[str] | frozenset[str] = frozenset(),
) -> list[SelectedShard]:
    """The samples to train on, shard by shard, from ``(path, manifest entry)`` pairs.

    Without ``mixture`` every sample is used. With it, each named source contributes the given number of samples
    (``None``: all of them) and other sources none. The samples of a source are those with the smallest
    ``stable_uniform("mixture", seed, id)``: a larger count keeps every sample of a smaller one. Ids in ``exclude``
    (a curated experiment's left-out samples) are never used, and the counts are drawn from the others.
    """
    seen: set[str] = set()
    for path, entry in used:
        for sample_id in entry.ids:
            if sample_id in seen:
                raise ValueError(f"sample id {sample_id!r} of {path} appears twice in the shards; ids must be unique")
            seen.add(sample_id)
    chosen: set[str] | None = None
    if mixture is not None:
        available: dict[str, list[str]] = {}
        for _, entry in used:
            available.setdefault(entry.source, []).extend(i for i in entry.ids if i not in exclude)
        chosen = set()
        for source, count in mixture.items():
            ids = available.get(source)
            if ids is None:
                raise ValueError(f"mixture names source {source!r}, but the shards hold only {sorted(available)}")
            if count is not None and not 0 <= count <= len(ids):
                raise ValueError(f"mixture asks for {count} samples of {source!r}, which has {len(ids)}")
            ranked = sorted(ids, key=lambda sample_id: stable_uniform("mixture", seed, sample_id))
            chosen.update(ranked if count is None else ranked[:count])
    selected = []
    for path, entry in used:
        picks = [(k, i) for k, i in enumerate(entry.ids) if i not in exclude and (chosen is None or i in chosen)]
        if picks:
            selected.append(SelectedShard(path, entry.source, tuple(k for k, _ in picks), tuple(i for _, i in picks)))
    return selected


def eligible_ids(selected: list[SelectedShard], sources: list[str] | None) -> list[str]:
    """Ids of the selected samples that may be swapped: all, or those of the named ``sources``."""
    present = {shard.source for shard in selected}
    if sources is not None and (missing := sorted(set(sources) - present)):
        raise ValueError(f"rejection.sources names {missing}, but the selected samples come from {sorted(present)}")
    return [i for shard in selected if sources is None or shard.source in sources for i in shard.ids]
