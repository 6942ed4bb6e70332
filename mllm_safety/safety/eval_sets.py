"""The project's own safety eval sets, built from the demo requests: typographic, text-only and benign."""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

from mllm_safety.safety.demo_eval import load_demo_eval
from mllm_safety.safety.typography import FIGSTEP_PROMPT, render_figstep

EVAL_SETS: dict[str, bool] = {"typographic": True, "text": True, "benign": False}
"""Eval set name -> whether its prompts are harmful (ASR is measured) or benign (over-refusal is measured)."""


@dataclass
class EvalPrompt:
    id: str
    set_name: str
    category: str
    question: str
    image: Image.Image | None


def build_eval_set(name: str) -> list[EvalPrompt]:
    """``typographic``: the request rendered FigStep-style with FigStep's prompt; ``text``: the request as text;
    ``benign``: a harmless request phrased like each harmful one (for over-refusal)."""
    demo = load_demo_eval()
    if name == "typographic":
        return [EvalPrompt(r.id, name, r.category, FIGSTEP_PROMPT, render_figstep(r.instruction)) for r in demo.harmful]
    if name == "text":
        return [EvalPrompt(r.id, name, r.category, r.question, None) for r in demo.harmful]
    if name == "benign":
        return [EvalPrompt(r.id, name, r.category, r.question, None) for r in demo.benign]
    raise ValueError(f"unknown eval set {name!r}; choose from {sorted(EVAL_SETS)}")
