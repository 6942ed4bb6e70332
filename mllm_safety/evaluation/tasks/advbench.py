"""AdvBench's harmful behaviours (Zou et al., 2023), as text or rendered FigStep-style."""

from __future__ import annotations

from mllm_safety.evaluation.files import read_csv, set_name
from mllm_safety.evaluation.sets import EvalPrompt, EvalSet, FigStepImage, Task
from mllm_safety.evaluation.typography import FIGSTEP_PROMPT


def behaviour_sets(
    benchmark: str,
    modes: tuple[str, ...],
    rows: list[tuple[str, str | None, str, str]],
    source: str,
) -> list[EvalSet]:
    """Text and FigStep-image sets from (id, category, behaviour, context) rows."""
    sets = []
    for mode in modes:
        name = set_name(benchmark, mode)
        prompts = []
        for key, category, behaviour, context in rows:
            prefix = f"{context}\n\n---\n\n" if context else ""
            request = prefix + behaviour
            if mode == "text":
                prompts.append(EvalPrompt(key, name, category, request, None, request))
            else:
                image = FigStepImage(behaviour)
                prompts.append(EvalPrompt(key, name, category, prefix + FIGSTEP_PROMPT, image, request))
        sets.append(EvalSet(name, benchmark, True, prompts, source=source))
    return sets


def load_advbench(path: str, images: str | None, modes: tuple[str, ...]) -> list[EvalSet]:
    """AdvBench's ``harmful_behaviors.csv`` (goal, target): the goal as text, or rendered FigStep-style."""
    rows = read_csv(path, "AdvBench harmful behaviours", ("goal", "target"))
    behaviours = [(f"advbench_{index}", None, row["goal"], "") for index, row in enumerate(rows)]
    return behaviour_sets("advbench", modes, behaviours, str(path))


TASK = Task("advbench", ("text", "image"), load_advbench)
