"""Choosing benchmarks: ``{name, path, images, modes, protocol, limit}`` entries of a config, turned into eval sets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from mllm_safety.evaluation.sets import EvalSet, Protocol
from mllm_safety.evaluation.tasks import TASKS


@dataclass
class BenchmarkSpec:
    """One benchmark to evaluate, read from its published layout."""

    name: str
    """The benchmark (a module of ``mllm_safety/evaluation/tasks/``): safety ``figstep``, ``mmsafetybench``,
    ``vlguard``, ``advbench``, ``harmbench``, ``xstest``, ``demo``; utility ``scienceqa``, ``vizwiz``, ``mme``,
    ``pope``."""
    path: str | None = None
    """The benchmark's file or folder (see its task module); only bundled sets work without one."""
    images: str | None = None
    """Images folder. figstep: the attack images (``query_<dataset>_<cat>_<task>_6.png``), rendered from
    ``instruction`` when unset; mmsafetybench: default ``<path>/imgs``; vlguard: default ``test/`` beside
    ``test.json``; scienceqa: the test images (``<id>/image.png``); vizwiz: the val images; pope: COCO val2014."""
    modes: list[str] | None = None
    """Which sets to build (default: the protocol's modes, else the benchmark's default ones). The analysis probes
    (``img2text``: the request's word embeddings in the image slot; mmsafetybench also ``matched_ocr``,
    ``text2img``, ``white``) are built only when named."""
    protocol: str | None = None
    """Run the benchmark as a paper ran it (``paper``: figstep, mmsafetybench): its modes, judge, generation
    settings and headline ASR. Default: ours (advice categories apart, the evaluation's judge and settings)."""
    limit: int | None = None
    """Use at most this many prompts per set, spread evenly over the file (overrides the evaluation's limit)."""

    def __post_init__(self) -> None:
        if self.name not in TASKS:
            raise ValueError(f"unknown benchmark {self.name!r}; choose from {', '.join(TASKS)}")
        task = TASKS[self.name]
        if self.protocol is not None and self.protocol not in task.protocols:
            known = ", ".join(task.protocols) or "none"
            raise ValueError(f"benchmark {self.name}: unknown protocol {self.protocol!r}; known: {known}")
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

    @property
    def protocol_preset(self) -> Protocol | None:
        return TASKS[self.name].protocols[self.protocol] if self.protocol is not None else None


def load_benchmark(spec: BenchmarkSpec, limit: int | None = None) -> list[EvalSet]:
    """The eval sets of one benchmark; ``limit`` applies when the spec sets none."""
    task = TASKS[spec.name]
    protocol = spec.protocol_preset
    modes = tuple(spec.modes or (protocol.modes if protocol else task.default_modes or task.modes))
    sets = task.load(spec.path, spec.images, modes, **(protocol.load_options if protocol else {}))
    if protocol is not None:
        sets = [_under_protocol(s, protocol) for s in sets]
    cap = spec.limit or limit
    sets = [_limited(s, cap) for s in sets] if cap else sets
    for eval_set in sets:
        if not eval_set.prompts:
            raise ValueError(f"benchmark {spec.name}: set {eval_set.name} is empty ({eval_set.source})")
    return sets


def load_sets(specs: list[BenchmarkSpec], limit: int | None = None) -> list[EvalSet]:
    """The sets of every benchmark, in order; a set listed twice is an error."""
    sets = [s for spec in specs for s in load_benchmark(spec, limit)]
    names = [s.name for s in sets]
    if len(set(names)) != len(names):
        raise ValueError(f"evaluation: a set appears twice in {names}; list each benchmark once")
    return sets


def _under_protocol(eval_set: EvalSet, protocol: Protocol) -> EvalSet:
    prompts = eval_set.prompts
    if not protocol.advice_apart:
        prompts = [dataclasses.replace(p, advice=False) for p in prompts]
    return dataclasses.replace(eval_set, prompts=prompts, protocol=protocol)


def _limited(eval_set: EvalSet, limit: int) -> EvalSet:
    """At most ``limit`` prompts, evenly spread so that every category of a file sorted by category stays in."""
    n = len(eval_set.prompts)
    if n <= limit:
        return eval_set
    picked = [eval_set.prompts[i * n // limit] for i in range(limit)]
    return dataclasses.replace(eval_set, prompts=picked)
