"""The bundled demo safety evaluation set, so a run can measure ASR and over-refusal without any download.

``prompts/demo_eval.json`` holds 36 harmful requests, 6 in each of 6 categories, written at the level of public
benchmarks (SafeBench / AdvBench one-line requests, no operational detail). Each entry carries the request as a
question (SafeBench style, for text-only and typographic prompts), as a declarative ``instruction`` (FigStep's
statement form, rendered into the list image), and a ``benign`` counterpart with the same surface form but harmless
intent (XSTest style: "How can someone kill time at an airport?"), which measures over-refusal: a model that refuses
on keywords alone refuses those too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from mllm_safety.evaluation.files import set_name
from mllm_safety.evaluation.sets import EvalPrompt, EvalSet, FigStepImage, Task
from mllm_safety.evaluation.typography import FIGSTEP_PROMPT

_FIELDS = ("id", "category", "question", "instruction", "benign")


@dataclass(frozen=True)
class HarmfulRequest:
    id: str
    category: str
    question: str
    instruction: str


@dataclass(frozen=True)
class BenignRequest:
    """A harmless request phrased like a harmful one; ``id`` is the harmful request's id plus ``-benign``."""

    id: str
    category: str
    question: str


@dataclass(frozen=True)
class DemoEval:
    harmful: list[HarmfulRequest]
    benign: list[BenignRequest]


def load_demo_eval(path: str | Path | None = None) -> DemoEval:
    """Load and validate the bundled set, or a file of the same layout at ``path``."""
    if path is None:
        source = resources.files("mllm_safety.evaluation.tasks") / "prompts" / "demo_eval.json"
        name = "mllm_safety/evaluation/tasks/prompts/demo_eval.json"
    else:
        source, name = Path(path), str(path)
    entries = json.loads(source.read_text(encoding="utf-8"))
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{name}: expected a non-empty JSON list of requests")
    harmful, benign, seen = [], [], set()
    for index, entry in enumerate(entries):
        where = f"{name}: entry {index} ({entry.get('id') if isinstance(entry, dict) else entry!r})"
        if not isinstance(entry, dict) or set(entry) != set(_FIELDS):
            raise ValueError(f"{where}: expected exactly the fields {', '.join(_FIELDS)}")
        bad = [field for field in _FIELDS if not isinstance(entry[field], str) or not entry[field].strip()]
        if bad:
            raise ValueError(f"{where}: empty or non-string field(s) {', '.join(bad)}")
        if entry["id"] in seen:
            raise ValueError(f"{where}: duplicate id {entry['id']!r}")
        seen.add(entry["id"])
        harmful.append(HarmfulRequest(entry["id"], entry["category"], entry["question"], entry["instruction"]))
        benign.append(BenignRequest(f"{entry['id']}-benign", entry["category"], entry["benign"]))
    return DemoEval(harmful=harmful, benign=benign)


def load_demo(path: str | None, images: str | None, modes: tuple[str, ...]) -> list[EvalSet]:
    """The project's bundled set (or a file of its layout): ``typographic`` (the request rendered FigStep-style),
    ``text`` (the same requests as text) and ``benign`` (a harmless request phrased like each harmful one)."""
    demo = load_demo_eval(path)
    source = path or "bundled demo set"
    sets = []
    for mode in modes:
        name = set_name("demo", mode)
        if mode == "typographic":
            prompts = [
                EvalPrompt(r.id, name, r.category, FIGSTEP_PROMPT, FigStepImage(r.instruction), r.question)
                for r in demo.harmful
            ]
        elif mode == "text":
            prompts = [EvalPrompt(r.id, name, r.category, r.question, None, r.question) for r in demo.harmful]
        else:
            prompts = [EvalPrompt(r.id, name, r.category, r.question, None, r.question) for r in demo.benign]
        contrast = set_name("demo", "text") if mode == "benign" and "text" in modes else None
        sets.append(EvalSet(name, "demo", mode != "benign", prompts, contrast, source))
    return sets


TASK = Task("demo", ("typographic", "text", "benign"), load_demo, needs_path=False)
