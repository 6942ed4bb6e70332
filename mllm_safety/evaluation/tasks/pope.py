"""POPE (Li et al., EMNLP 2023): yes/no questions about objects in COCO images, probing object hallucination.

``path`` is a ``coco_pope_{random,popular,adversarial}.json`` file (JSON lines: ``question_id``, ``image``,
``text``, ``label``) or the folder holding them (one set per mode); ``images`` is COCO val2014. The prompt is
LLaVA's (``llava_pope_test.jsonl``): the question, then "Answer the question using a single word or phrase." The
reply is read as LLaVA's ``eval_pope.py`` reads it: its first sentence, commas removed, split on spaces; "No",
"no" or "not" among the words means no, anything else yes. Metrics: ``accuracy``, ``precision``, ``recall`` and
``f1`` of the "yes" class, and the share of "yes" predictions (``yes_ratio``). An empty reply (its image failed to
open, or nothing was generated) counts as the wrong answer, where LLaVA's reading would take it for "yes".
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from mllm_safety.evaluation.files import existing, set_name
from mllm_safety.evaluation.sets import SHORT_ANSWER_PROMPT, EvalPrompt, EvalSet, ImageFile, Task

_VARIANT = re.compile(r"_pope_(random|popular|adversarial)\.json$")


def says_yes(reply: str) -> bool:
    """LLaVA's reading of a POPE reply."""
    text = reply.split(".")[0] if "." in reply else reply
    words = text.replace(",", "").split(" ")
    return not ("No" in words or "not" in words or "no" in words)


def score_pope(prompts: list[EvalPrompt], replies: list[str]) -> dict[str, float]:
    truth = [p.target == "yes" for p in prompts]
    predicted = [says_yes(r) if r.strip() else not t for r, t in zip(replies, truth, strict=True)]
    tp = sum(p and t for p, t in zip(predicted, truth))
    fp = sum(p and not t for p, t in zip(predicted, truth))
    fn = sum(t and not p for p, t in zip(predicted, truth))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "accuracy": sum(p == t for p, t in zip(predicted, truth)) / len(truth),
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "yes_ratio": sum(predicted) / len(predicted),
    }


def _read_lines(file: Path) -> list[dict]:
    records = []
    for number, line in enumerate(existing(file, "POPE questions").read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{file}: line {number} is not JSON ({error})") from error
        if not isinstance(record, dict) or not {"question_id", "image", "text", "label"} <= set(record):
            raise ValueError(f"{file}: line {number} lacks one of question_id, image, text, label")
        if record["label"] not in ("yes", "no"):
            raise ValueError(f"{file}: line {number}: label {record['label']!r} is neither yes nor no")
        records.append(record)
    return records


def load_pope(path: str, images: str | None, modes: tuple[str, ...]) -> list[EvalSet]:
    if images is None:
        raise ValueError("benchmark pope needs images: the COCO val2014 folder")
    folder = existing(images, "POPE images (COCO val2014) folder", folder=True)
    source = Path(path)
    if source.is_dir():
        files = {mode: source / f"coco_pope_{mode}.json" for mode in modes}
    else:
        match = _VARIANT.search(source.name)
        if match is None or match.group(1) not in modes:
            raise ValueError(
                f"{source}: cannot tell which POPE split ({', '.join(modes)}) this is; name it coco_pope_<split>.json"
            )
        files = {match.group(1): existing(source, "POPE questions")}
    sets = []
    for mode, file in files.items():
        name = set_name("pope", mode)
        prompts = [
            EvalPrompt(
                str(r["question_id"]),
                name,
                None,
                f"{r['text']}\n{SHORT_ANSWER_PROMPT}",
                ImageFile(str(folder / r["image"])),
                r["text"],
                target=r["label"],
            )
            for r in _read_lines(file)
        ]
        sets.append(EvalSet(name, "pope", False, prompts, source=f"{file}; images from {folder}", scorer=score_pope))
    return sets


TASK = Task("pope", ("random", "popular", "adversarial"), load_pope)
