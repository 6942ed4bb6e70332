"""HarmBench's behaviours (Mazeika et al., 2024), as text or rendered FigStep-style."""

from __future__ import annotations

from mllm_safety.evaluation.files import read_csv
from mllm_safety.evaluation.sets import EvalSet, Task
from mllm_safety.evaluation.tasks.advbench import behaviour_sets

HARMBENCH_FUNCTIONAL_CATEGORIES = ("standard", "contextual")
"""HarmBench behaviours evaluated; ``copyright`` ones are left out (HarmBench judges them by hashing, not refusal)."""


def load_harmbench(path: str, images: str | None, modes: tuple[str, ...]) -> list[EvalSet]:
    """A HarmBench behaviour CSV (``harmbench_behaviors_text_all.csv`` ...). Contextual behaviours put their context
    before the behaviour as HarmBench's DirectRequest does (``context\\n\\n---\\n\\nbehaviour``)."""
    columns = ("Behavior", "FunctionalCategory", "SemanticCategory", "ContextString", "BehaviorID")
    rows = read_csv(path, "HarmBench behaviours", columns)
    behaviours = [
        (row["BehaviorID"], row["SemanticCategory"], row["Behavior"], row["ContextString"].strip())
        for row in rows
        if row["FunctionalCategory"] in HARMBENCH_FUNCTIONAL_CATEGORIES
    ]
    return behaviour_sets("harmbench", modes, behaviours, str(path))


TASK = Task("harmbench", ("text", "image"), load_harmbench)
