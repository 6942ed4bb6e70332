"""MME (Fu et al., 2023): yes/no questions, two per image, over 10 perception and 4 cognition categories.

``path`` is the ``MME_Benchmark_release_version`` folder. A category folder holds either ``images/`` and
``questions_answers_YN/`` (artwork, celebrity, landmark, posters, scene) or images and ``.txt`` files side by side;
each ``.txt`` line is "question<TAB>Yes|No" about the image of the same name. The prompt is LLaVA's
(``llava_mme.jsonl``, and lmms-eval's ``mme``): the question without MME's " Please answer yes or no.", then "Answer
the question using a single word or phrase." The reply is read as MME's ``eval_tool/calculation.py``
reads it: lower-cased, "yes" or "no" exactly, else "yes" or "no" within its first 4 characters, else neither.

Modes ``perception`` and ``cognition`` are one set each. Metrics, as MME reports them: ``score/<category>`` =
100 x (accuracy over the category's questions + accuracy+ over its images, where an image counts when both its
questions are right), ``score`` the sum over the set's categories (MME's perception (max 2000) and cognition (max
800) scores), and ``accuracy`` / ``accuracy_plus`` over all the set's questions / images. A skipped image (it
failed to open) counts as two wrong answers. A ``limit`` keeps single questions of images: accuracy+ then counts only
images with both questions, and a category's score (and the set's ``score``) is left out unless every image of the
category kept both, since half a pair would cap it at 100 instead of 200.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from statistics import fmean

from mllm_safety.evaluation.files import existing, set_name
from mllm_safety.evaluation.sets import SHORT_ANSWER_PROMPT, EvalPrompt, EvalSet, ImageFile, Task

CATEGORIES: dict[str, tuple[str, ...]] = {
    "perception": (
        "existence",
        "count",
        "position",
        "color",
        "posters",
        "celebrity",
        "scene",
        "landmark",
        "artwork",
        "OCR",
    ),
    "cognition": ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning"),
}
"""MME's ``eval_type_dict``."""
MME_YES_NO_PROMPT = "Please answer yes or no."
"""MME's own instruction at the end of every question, which LLaVA's prompt replaces with the short-answer line."""
_IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg")


@dataclass(frozen=True)
class YesNo:
    answer: str
    """``yes`` or ``no``."""
    image: str
    """``<category>/<image name>``: the two questions of an image share it."""


def read_yes_no(reply: str) -> str:
    """MME's ``parse_pred_ans``: ``yes``, ``no`` or ``other``."""
    text = reply.lower()
    if text in ("yes", "no"):
        return text
    return "yes" if "yes" in text[:4] else "no" if "no" in text[:4] else "other"


def score_mme(prompts: list[EvalPrompt], replies: list[str]) -> dict[str, float]:
    right: dict[str, list[bool]] = defaultdict(list)
    images: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for prompt, reply in zip(prompts, replies, strict=True):
        correct = read_yes_no(reply) == prompt.target.answer
        right[prompt.category].append(correct)
        images[prompt.category][prompt.target.image].append(correct)
    figures: dict[str, float] = {}
    pairs_all: list[bool] = []
    complete = True
    for category, answers in right.items():
        pairs = [all(v) for v in images[category].values() if len(v) == 2]
        pairs_all += pairs
        if len(pairs) == len(images[category]):
            figures[f"score/{category}"] = 100 * (fmean(answers) + fmean(pairs))
        else:
            complete = False
    if complete:
        figures["score"] = sum(figures.values())
    figures["accuracy"] = fmean(c for answers in right.values() for c in answers)
    if pairs_all:
        figures["accuracy_plus"] = fmean(pairs_all)
    return figures


def _category_files(root: Path, category: str) -> tuple[Path, Path]:
    folder = existing(root / category, f"MME category {category!r}", folder=True)
    if (folder / "questions_answers_YN").is_dir():
        return folder / "questions_answers_YN", existing(folder / "images", f"MME {category} images", folder=True)
    return folder, folder


def _image_of(folder: Path, stem: str) -> Path:
    found = [folder / (stem + suffix) for suffix in _IMAGE_SUFFIXES if (folder / (stem + suffix)).is_file()]
    return found[0] if found else folder / (stem + _IMAGE_SUFFIXES[0])


def load_mme(path: str, images: str | None, modes: tuple[str, ...]) -> list[EvalSet]:
    root = existing(path, "MME_Benchmark_release_version folder", folder=True)
    sets = []
    for mode in modes:
        name = set_name("mme", mode)
        prompts = []
        for category in CATEGORIES[mode]:
            questions, image_folder = _category_files(root, category)
            files = sorted(questions.glob("*.txt"))
            if not files:
                raise FileNotFoundError(f"MME category {category}: no question files (*.txt) in {questions}")
            for file in files:
                lines = [line for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
                image = ImageFile(str(_image_of(image_folder, file.stem)))
                for number, line in enumerate(lines):
                    question, _, answer = line.rpartition("\t")
                    if not question or answer.strip().lower() not in ("yes", "no"):
                        raise ValueError(f"{file}: line {number + 1} is not 'question<TAB>Yes|No': {line!r}")
                    target = YesNo(answer.strip().lower(), f"{category}/{file.stem}")
                    prompts.append(
                        EvalPrompt(
                            f"{category}/{file.stem}/{number}",
                            name,
                            category,
                            f"{question.replace(MME_YES_NO_PROMPT, '').strip()}\n{SHORT_ANSWER_PROMPT}",
                            image,
                            question.strip(),
                            target=target,
                        )
                    )
        sets.append(EvalSet(name, "mme", False, prompts, source=str(root), scorer=score_mme))
    return sets


TASK = Task("mme", ("perception", "cognition"), load_mme)
