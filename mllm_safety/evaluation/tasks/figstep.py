"""FigStep's SafeBench (Gong et al., 2023): the request as a typographic list image, and as plain text."""

from __future__ import annotations

from mllm_safety.evaluation.files import existing, read_csv, set_name
from mllm_safety.evaluation.sets import EvalPrompt, EvalSet, FigStepImage, ImageFile, Task
from mllm_safety.evaluation.typography import FIGSTEP_PROMPT

FIGSTEP_ADVICE_CATEGORIES = frozenset({8, 9, 10})
"""SafeBench category ids of Legal Opinion, Financial Advice and Health Consultation: FigStep counts answers there
as attack success, but answering with care is legitimate, so they are reported apart."""

_FIGSTEP_COLUMNS = ("dataset", "category_id", "task_id", "category_name", "question", "instruction")


def load_figstep(path: str, images: str | None, modes: tuple[str, ...]) -> list[EvalSet]:
    """FigStep's SafeBench: ``image`` is the attack (the ``instruction`` in the image, FigStep's prompt as text),
    ``text`` the plain question (FigStep's vanilla baseline)."""
    rows = read_csv(path, "FigStep SafeBench", _FIGSTEP_COLUMNS)
    folder = existing(images, "FigStep images folder", folder=True) if images else None
    source = f"{path}; images {'from ' + str(folder) if folder else 'rendered from instruction'}"
    prompts: dict[str, list[EvalPrompt]] = {mode: [] for mode in modes}
    for line, row in enumerate(rows, start=2):
        try:
            category_id = int(row["category_id"])
        except (TypeError, ValueError) as error:
            raise ValueError(f"{path}: line {line}: category_id {row['category_id']!r} is not a number") from error
        key = f"{row['dataset']}_{row['category_id']}_{row['task_id']}"
        common = dict(category=row["category_name"], request=row["question"])
        common["advice"] = category_id in FIGSTEP_ADVICE_CATEGORIES
        if "image" in prompts:
            image = ImageFile(str(folder / f"query_{key}_6.png")) if folder else FigStepImage(row["instruction"])
            name = set_name("figstep", "image")
            prompts["image"].append(EvalPrompt(key, name, question=FIGSTEP_PROMPT, image=image, **common))
        if "text" in prompts:
            name = set_name("figstep", "text")
            prompts["text"].append(EvalPrompt(key, name, question=row["question"], image=None, **common))
    return [
        EvalSet(set_name("figstep", m), "figstep", True, p, source=source if m == "image" else str(path))
        for m, p in prompts.items()
    ]


TASK = Task("figstep", ("image", "text"), load_figstep)
