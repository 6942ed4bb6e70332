"""Choosing benchmarks: ``{name, path, images, modes, limit}`` entries of a config, turned into eval sets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from mllm_safety.evaluation.sets import EvalSet
from mllm_safety.evaluation.tasks import TASKS


@dataclass
class BenchmarkSpec:
    """One benchmark to evaluate, read from its published layout."""

    name: str
    """The benchmark (a module of ``mllm_safety/evaluation/tasks/``): ``figstep``, ``mmsafetybench``, ``vlguard``,
    ``advbench``, ``harmbench``, ``xstest`` or ``demo``."""
    path: str | None = None
    """The benchmark's file or folder (see its task module); only bundled sets work without one."""
    images: str | None = None
    """Images folder. figstep: the attack images (``query_<dataset>_<cat>_<task>_6.png``), rendered from
    ``instruction`` when unset; mmsafetybench: default ``<path>/imgs``; vlguard: default ``test/`` beside
    ``test.json``."""
    modes: list[str] | None = None
    """Which sets to build (default: all of the benchmark's modes)."""
    limit: int | None = None
    """Use at most this many prompts per set, spread evenly over the file (overrides the evaluation's limit)."""

    def __post_init__(self) -> None:
        if self.name not in TASKS:
            raise ValueError(f"unknown benchmark {self.name!r}; choose from {', '.join(TASKS)}")
        task = TASKS[self.name]
        if self.modes is not None:
            unknown = [mode for mode in self.modes if mode not in task.modes]
            if unknown or not self.modes:
                raise ValueError(
                    f"benchmark {self.name}: unknown mode(s) {unknown}; choose from {', '.join(task.modes)}"
                )
        if self.path is None and task.needs_path:
            raise ValueError(f"benchmark {self.name} needs a path to its published files")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"benchmark {self.name}: limit must be >= 1, got {self.limit}")


def load_benchmark(spec: BenchmarkSpec, limit: int | None = None) -> list[EvalSet]:
    """The eval sets of one benchmark; ``limit`` applies when the spec sets none."""
    task = TASKS[spec.name]
    sets = task.load(spec.path, spec.images, tuple(spec.modes or task.modes))
    cap = spec.limit or limit
    sets = [_limited(s, cap) for s in sets] if cap else sets
    for eval_set in sets:
        if not eval_set.prompts:
            raise ValueError(f"benchmark {spec.name}: set {eval_set.name} is empty ({eval_set.source})")
    return sets


def _limited(eval_set: EvalSet, limit: int) -> EvalSet:
    """At most ``limit`` prompts, evenly spread so that every category of a file sorted by category stays in."""
    n = len(eval_set.prompts)
    if n <= limit:
        return eval_set
    picked = [eval_set.prompts[i * n // limit] for i in range(limit)]
    return dataclasses.replace(eval_set, prompts=picked)
