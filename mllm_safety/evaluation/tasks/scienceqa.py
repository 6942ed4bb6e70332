"""ScienceQA (Lu et al., NeurIPS 2022), test split, as LLaVA evaluates it: the paper's utility benchmark.

``path`` is LLaVA's ScienceQA folder: ``llava_test_CQM-A.json`` (the prompts, LLaVA's conversation layout),
ScienceQA's ``problems.json`` (choices and answers) and ``pid_splits.json`` (the test split); ``images`` the test
images (``<id>/image.png``, default ``<path>/images/test``). The prompt is LLaVA's single-prediction prompt
(``model_vqa_science.py --single-pred-prompt``): the question without ``<image>``, then "Answer with the option's
letter from the given choices directly." The reply is parsed as LLaVA's ``eval_science_qa.py`` does: the letter
alone, a letter followed by ". ", or exactly one "The answer is X."; anything else is wrong. Metrics: ``accuracy``
(all questions) and ``img_accuracy`` (questions with an image: ScienceQA-IMG, the paper's figure).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from statistics import fmean

from mllm_safety.evaluation.files import existing, read_json, set_name
from mllm_safety.evaluation.sets import EvalPrompt, EvalSet, ImageFile, Task

SINGLE_PREDICTION_PROMPT = "Answer with the option's letter from the given choices directly."
OPTIONS = ("A", "B", "C", "D", "E")
_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")
QUESTIONS_FILE = "llava_test_CQM-A.json"


@dataclass(frozen=True)
class ChoiceAnswer:
    """The right choice of a ScienceQA question."""

    answer: int
    """Index of the right choice."""
    num_choices: int
    has_image: bool


def parse_choice(reply: str) -> str | None:
    """The option letter LLaVA's scorer reads from a reply, or None."""
    if reply in OPTIONS:
        return reply
    if len(reply) >= 3 and reply[0] in OPTIONS and reply[1:3] == ". ":
        return reply[0]
    found = _ANSWER_IS.findall(reply)
    return found[0] if len(found) == 1 else None


def is_correct(target: ChoiceAnswer, reply: str) -> bool:
    letter = parse_choice(reply)
    return letter in OPTIONS[: target.num_choices] and OPTIONS.index(letter) == target.answer


def score_scienceqa(prompts: list[EvalPrompt], replies: list[str]) -> dict[str, float]:
    correct = [is_correct(p.target, r) for p, r in zip(prompts, replies, strict=True)]
    figures = {"accuracy": fmean(correct)}
    with_image = [c for c, p in zip(correct, prompts) if p.target.has_image]
    if with_image:
        figures["img_accuracy"] = fmean(with_image)
    return figures


def load_scienceqa(path: str, images: str | None, modes: tuple[str, ...]) -> list[EvalSet]:
    root = existing(path, "ScienceQA folder", folder=True)
    questions_file = root / QUESTIONS_FILE
    questions = read_json(questions_file, "LLaVA ScienceQA questions")
    problems = read_json(root / "problems.json", "ScienceQA problems")
    splits = read_json(root / "pid_splits.json", "ScienceQA splits")
    if not isinstance(questions, list):
        raise ValueError(f"{questions_file}: expected a JSON list of LLaVA question records")
    if not isinstance(problems, dict):
        raise ValueError(f"{root / 'problems.json'}: expected a JSON object of problem id -> problem")
    if not isinstance(splits, dict) or not isinstance(splits.get("test"), list):
        raise ValueError(f"{root / 'pid_splits.json'}: expected a JSON object with a 'test' list of problem ids")
    test = set(splits["test"])
    folder = Path(images) if images else root / "images" / "test"
    name = set_name("scienceqa", "test")
    prompts = []
    for index, record in enumerate(questions):
        turns = record.get("conversations") if isinstance(record, dict) else None
        if not (isinstance(record, dict) and "id" in record and isinstance(turns, list) and turns):
            raise ValueError(f"{questions_file}: record {index} is not a LLaVA record with id and conversations")
        pid, text = str(record["id"]), turns[0].get("value") if isinstance(turns[0], dict) else None
        problem = problems.get(pid)
        if pid not in test or not isinstance(problem, dict):
            raise ValueError(
                f"{questions_file}: question {pid!r} is not a test problem of {root / 'pid_splits.json'} and "
                f"{root / 'problems.json'}: the files do not belong together"
            )
        if not isinstance(text, str) or not isinstance(problem.get("choices"), list) or "answer" not in problem:
            raise ValueError(f"{questions_file}: question {pid!r} lacks its text, choices or answer")
        has_image = "image" in record
        if has_image:
            existing(folder, "ScienceQA test images folder", folder=True)
        target = ChoiceAnswer(int(problem["answer"]), len(problem["choices"]), has_image)
        question = text.replace("<image>", "").strip() + "\n" + SINGLE_PREDICTION_PROMPT
        image = ImageFile(str(folder / record["image"])) if has_image else None
        prompts.append(EvalPrompt(pid, name, problem.get("subject"), question, image, question, target=target))
    missing = test - {p.id for p in prompts}
    if missing:
        raise ValueError(
            f"{questions_file}: {len(missing)} test problem(s) of {root / 'pid_splits.json'} have no question "
            f"(e.g. {sorted(missing)[0]!r}): the files do not belong together"
        )
    return [
        EvalSet(
            name, "scienceqa", False, prompts, source=f"{questions_file}; images from {folder}", scorer=score_scienceqa
        )
    ]


TASK = Task("scienceqa", ("test",), load_scienceqa)
