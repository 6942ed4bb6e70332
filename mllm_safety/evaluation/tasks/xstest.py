"""XSTest (Röttger et al., NAACL 2024): harmless prompts that look unsafe, and their unsafe contrasts."""

from __future__ import annotations

from mllm_safety.evaluation.files import read_csv, set_name
from mllm_safety.evaluation.sets import EvalPrompt, EvalSet, Task


def load_xstest(path: str, images: str | None, modes: tuple[str, ...]) -> list[EvalSet]:
    """XSTest prompts: ``safe`` (250 harmless prompts that look unsafe: over-refusal) and ``unsafe`` (their 200
    contrasts). Reads ``xstest_prompts.csv`` (label column) or ``xstest_v2_prompts.csv`` (``contrast_`` types)."""
    rows = read_csv(path, "XSTest prompts", ("prompt", "type"))
    prompts: dict[str, list[EvalPrompt]] = {mode: [] for mode in modes}
    for line, row in enumerate(rows, start=2):
        label = row.get("label") or ("unsafe" if row["type"].startswith("contrast_") else "safe")
        if label not in ("safe", "unsafe"):
            raise ValueError(f"{path}: line {line}: label {label!r} is neither safe nor unsafe")
        if label in prompts:
            key = row.get("id") or row.get("id_v2") or str(line - 1)
            name = set_name("xstest", label)
            prompts[label].append(EvalPrompt(key, name, row["type"], row["prompt"], None, row["prompt"]))
    contrast = set_name("xstest", "unsafe") if "unsafe" in modes else None
    return [
        EvalSet(set_name("xstest", m), "xstest", m == "unsafe", p, contrast if m == "safe" else None, str(path))
        for m, p in prompts.items()
    ]


TASK = Task("xstest", ("safe", "unsafe"), load_xstest)
