"""VizWiz-VQA (Gurari et al., CVPR 2018), validation split: questions from blind people, many unanswerable.

``path`` is the published ``val.json`` (records ``image``, ``question``, ``answers`` (10 crowd answers),
``answer_type``, ``answerable``); ``images`` the ``val/`` images folder. The prompt is LLaVA's, which the paper
used: the question, then "When the provided information is insufficient, respond with 'Unanswerable'." and "Answer
the question using a single word or phrase." on lines of their own. Metrics:

- ``accuracy``: the standard VQA accuracy, as EvalAI and lmms-eval's ``vizwiz_vqa`` compute it: reply and crowd
  answers normalised (:func:`normalize_answer`); for each of the 10 answers, min(1, matches among the other 9 / 3),
  averaged.
- ``paper_accuracy``: the paper's simpler score (``evaluation/evaluate_vizwiz.py``): min(1, crowd answers equal to
  the reply, lower-cased, / 3).
- ``unanswerable_f1``: F1 of replying "unanswerable" (after normalisation) to the questions marked unanswerable.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from statistics import fmean

from mllm_safety.evaluation.files import existing, read_json, set_name
from mllm_safety.evaluation.sets import SHORT_ANSWER_PROMPT, EvalPrompt, EvalSet, ImageFile, Task

VIZWIZ_PROMPT = f"When the provided information is insufficient, respond with 'Unanswerable'.\n{SHORT_ANSWER_PROMPT}"

_CONTRACTED = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd "
    "he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've might've mustn't must've "
    "needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've shouldn't shouldn't've somebody'd've "
    "somebody'll somebody's someone'd someone'd've someone'll someone's something'd something'd've something'll "
    "that's there'd there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't we'd've we've "
    "weren't what'll what're what's what've when's where'd where's where've who'd who'd've who'll who's who've "
    "why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll "
    "you're you've"
).split()


def _missing_one_apostrophe(word: str) -> list[str]:
    cuts = [i for i, char in enumerate(word) if char == "'"]
    return [word[:i] + word[i + 1 :] for i in cuts]


CONTRACTIONS: dict[str, str] = {
    **{written: word for word in _CONTRACTED for written in _missing_one_apostrophe(word)},
    "somebody'd": "somebodyd",
}
"""EvalAI's contraction table (VQA evaluation ``vqaEval.py``, as in mmf's ``EvalAIAnswerProcessor``): each
contraction written without one of its apostrophes maps to the contraction. The table's entries with capital letters
("Im", "Ive", "Id've") never match lower-cased text and its identities ("let's", "she's") change nothing, so they
are left out; its "somebody'd" -> "somebodyd" is kept so scores stay identical."""
NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6"}
NUMBERS |= {"seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_DIGIT_COMMA = re.compile(r"(?<=\d)(\,)+(?=\d)")


def normalize_answer(answer: str) -> str:
    """EvalAI's VQA answer normalisation (lmms-eval's ``EvalAIAnswerProcessor``): lower case, no commas or question
    marks, punctuation dropped (next to a space) or turned into a space, periods dropped except in numbers (up to
    32, as upstream passes ``re.UNICODE`` as the count), number words as digits, no articles, contractions spelled
    out."""
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    out = text
    for mark in PUNCTUATION:
        spaced = mark + " " in text or " " + mark in text or _DIGIT_COMMA.search(text) is not None
        out = out.replace(mark, "" if spaced else " ")
    out = _PERIOD.sub("", out, count=re.UNICODE)
    words = [NUMBERS.get(word, word) for word in out.lower().split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


@dataclass(frozen=True)
class CrowdAnswers:
    """The crowd's answers to a VizWiz question."""

    answers: tuple[str, ...]
    answerable: bool


def vqa_accuracy(answers: tuple[str, ...], reply: str) -> float:
    """For each answer, min(1, matches among the others / 3), averaged (both sides normalised)."""
    normalised = [normalize_answer(a) for a in answers]
    predicted = normalize_answer(reply)
    return fmean(
        min(1.0, sum(other == predicted for j, other in enumerate(normalised) if j != i) / 3)
        for i in range(len(normalised))
    )


def paper_accuracy(answers: tuple[str, ...], reply: str) -> float:
    """The paper's score: min(1, answers equal to the reply (lower-cased) / 3)."""
    return min(1.0, sum(a.lower() == reply.lower() for a in answers) / 3)


def score_vizwiz(prompts: list[EvalPrompt], replies: list[str]) -> dict[str, float]:
    targets: list[CrowdAnswers] = [p.target for p in prompts]
    said = [normalize_answer(r) == "unanswerable" for r in replies]
    truth = [not t.answerable for t in targets]
    tp = sum(s and t for s, t in zip(said, truth))
    precision = tp / sum(said) if any(said) else 0.0
    recall = tp / sum(truth) if any(truth) else 0.0
    return {
        "accuracy": fmean(vqa_accuracy(t.answers, r) for t, r in zip(targets, replies)),
        "paper_accuracy": fmean(paper_accuracy(t.answers, r) for t, r in zip(targets, replies)),
        "unanswerable_f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
    }


def load_vizwiz(path: str, images: str | None, modes: tuple[str, ...]) -> list[EvalSet]:
    records = read_json(path, "VizWiz val.json")
    if images is None:
        raise ValueError("benchmark vizwiz needs images: the VizWiz val images folder")
    folder = existing(images, "VizWiz images folder", folder=True)
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of VizWiz records")
    name = set_name("vizwiz", "val")
    prompts = []
    for index, record in enumerate(records):
        if not (isinstance(record, dict) and {"image", "question", "answers", "answerable"} <= set(record)):
            raise ValueError(f"{path}: record {index} lacks one of image, question, answers, answerable")
        answers = record["answers"]
        if not answers or not all(isinstance(a, dict) and isinstance(a.get("answer"), str) for a in answers):
            raise ValueError(f"{path}: record {index} ({record['image']}): answers are not [{{answer: ...}}, ...]")
        target = CrowdAnswers(tuple(a["answer"] for a in answers), bool(record["answerable"]))
        question = f"{record['question']}\n{VIZWIZ_PROMPT}"
        image = ImageFile(str(folder / record["image"]))
        category = record.get("answer_type")
        prompts.append(EvalPrompt(record["image"], name, category, question, image, record["question"], target=target))
    return [EvalSet(name, "vizwiz", False, prompts, source=f"{path}; images from {folder}", scorer=score_vizwiz)]


TASK = Task("vizwiz", ("val",), load_vizwiz)
