"""Batching for a stream: length-grouped batches (less padding) and an exact batch count (ranks stay in step)."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def length_grouped_batches(
    items: Iterable[T], batch_size: int, pool_batches: int, length: Callable[[T], int], rng: random.Random
) -> Iterator[list[T]]:
    """Batches of ``batch_size`` items of similar length.

    Items are pooled ``pool_batches`` batches at a time, sorted by length and cut into batches, which are yielded
    in random order, so the model does not see all short batches first. With ``pool_batches=1`` batches keep the
    stream's order. Only the very last batch may be short.
    """
    pool: list[T] = []
    for item in items:
        pool.append(item)
        if len(pool) == batch_size * pool_batches:
            yield from _cut(pool, batch_size, length, rng)
            pool = []
    if pool:
        yield from _cut(pool, batch_size, length, rng)


def _cut(pool: list[T], batch_size: int, length: Callable[[T], int], rng: random.Random) -> list[list[T]]:
    if len(pool) <= batch_size:
        return [pool]
    ordered = sorted(pool, key=length)
    batches = [ordered[k : k + batch_size] for k in range(0, len(ordered), batch_size)]
    full = [b for b in batches if len(b) == batch_size]
    rng.shuffle(full)
    return full + [b for b in batches if len(b) < batch_size]


class NothingUsable(RuntimeError):
    """A stream whose every sample was skipped: it has nothing to fill its batches with."""


def exact_batches(batches: Iterable[list[T]], num_batches: int, batch_size: int) -> Iterator[tuple[list[T], int]]:
    """Exactly ``num_batches`` full batches, each with how many of its items are repeats.

    Extra batches are not read. A short last batch, and batches missing because the stream ran dry (samples
    skipped, or a smaller share of the data), are filled by repeating the items of the latest full batch, the way
    a distributed sampler pads: every rank then takes the same number of steps and none waits forever for another.
    """
    recent: list[T] = []
    emitted = 0
    for batch in batches:
        repeats = batch_size - len(batch)
        if repeats:
            batch = batch + _repeat(recent or batch, repeats)
        recent = batch
        emitted += 1
        yield batch, repeats
        if emitted == num_batches:
            return
    if emitted < num_batches and not recent:
        raise NothingUsable("the stream gave no usable sample to fill its batches (all its samples were skipped)")
    for _ in range(num_batches - emitted):
        yield _repeat(recent, batch_size), batch_size


def _repeat(items: list[T], count: int) -> list[T]:
    return [items[k % len(items)] for k in range(count)]
