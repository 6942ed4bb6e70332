"""POPE as LLaVA evaluates it: loader on the published JSON lines, and LLaVA's yes/no reading."""

import json

import pytest

from mllm_safety.evaluation.registry import BenchmarkSpec, load_benchmark
from mllm_safety.evaluation.sets import EvalPrompt, ImageFile
from mllm_safety.evaluation.tasks.pope import says_yes, score_pope


def write_pope(root, name="coco_pope_random.json", lines=None):
    root.mkdir(parents=True, exist_ok=True)
    lines = lines or [
        {"question_id": 1, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a snowboard?", "label": "yes"},
        {"question_id": 2, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a dog?", "label": "no"},
    ]
    (root / name).write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    (root / "val2014").mkdir(exist_ok=True)
    return root / name


def test_loads_a_split_file_with_llavas_short_answer_prompt(tmp_path):
    path = write_pope(tmp_path / "pope")
    (split,) = load_benchmark(BenchmarkSpec("pope", str(path), images=str(tmp_path / "pope" / "val2014")))
    assert split.name == "pope_random" and split.is_utility
    first = split.prompts[0]
    assert first.question == "Is there a snowboard?\nAnswer the question using a single word or phrase."
    assert first.image == ImageFile(str(tmp_path / "pope" / "val2014" / "COCO_val2014_000000310196.jpg"))
    assert [p.target for p in split.prompts] == ["yes", "no"] and first.id == "1"


@pytest.mark.parametrize(
    ("reply", "yes"),
    [
        ("Yes", True),
        ("Yes, there is a snowboard in the image.", True),
        ("No", False),
        ("No, there is no dog.", False),
        ("There is not a dog in the image.", False),
        ("The answer is no", False),
        ("Yes. No, wait", True),  # only the first sentence counts
        ("no.", False),
        ("I don't think so", True),  # LLaVA only looks for the words No, no and not
        ("NO", True),  # ... in these cases
        ("Nope", True),
    ],
)
def test_replies_are_read_as_llavas_eval_pope_reads_them(reply, yes):
    assert says_yes(reply) is yes


def test_metrics_on_a_worked_example():
    labels = ["yes", "yes", "yes", "no", "no"]
    prompts = [EvalPrompt(str(i), "pope_random", None, "q", None, "q", target=label) for i, label in enumerate(labels)]
    replies = ["Yes", "No", "Yes.", "Yes", "No"]  # TP, FN, TP, FP, TN
    figures = score_pope(prompts, replies)
    assert figures == pytest.approx(
        {"accuracy": 3 / 5, "precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "yes_ratio": 3 / 5}
    )
    assert score_pope(prompts[3:], ["No", "No"])["precision"] == 0.0, "no yes at all: 0, not a division error"


def test_bad_files_are_named(tmp_path):
    images = str(tmp_path / "pope" / "val2014")
    path = write_pope(tmp_path / "pope", lines=[{"question_id": 1, "image": "a.jpg", "text": "Is there a cat?"}])
    with pytest.raises(ValueError, match=r"coco_pope_random.json: line 1 lacks one of question_id"):
        load_benchmark(BenchmarkSpec("pope", str(path), images=images))
    other = write_pope(tmp_path / "pope", name="pope_questions.json")
    with pytest.raises(ValueError, match=r"pope_questions.json: cannot tell which POPE split"):
        load_benchmark(BenchmarkSpec("pope", str(other), images=images))
    with pytest.raises(ValueError, match="needs images"):
        load_benchmark(BenchmarkSpec("pope", str(path)))
    with pytest.raises(FileNotFoundError, match=r"coco_pope_popular.json does not exist"):
        load_benchmark(BenchmarkSpec("pope", str(tmp_path / "pope"), images=images, modes=["popular"]))


def test_an_empty_reply_counts_as_the_wrong_answer():
    """A skipped image comes back as an empty reply, which LLaVA's reading would take for "yes"."""
    labels = ["yes", "no"]
    prompts = [EvalPrompt(str(i), "pope_random", None, "q", None, "q", target=label) for i, label in enumerate(labels)]
    figures = score_pope(prompts, ["", ""])
    assert figures["accuracy"] == 0.0 and figures["recall"] == 0.0


@pytest.mark.parametrize(
    ("reply", "yes"),
    [
        ("No, there is a dog", False),  # commas go before the words are split
        ("There is\nno dog", True),  # words are split on single spaces only
    ],
)
def test_llavas_word_splitting_is_kept(reply, yes):
    assert says_yes(reply) is yes


def pope_prompts(*labels: str) -> list[EvalPrompt]:
    return [EvalPrompt(str(i), "pope_random", None, "q", None, "q", target=label) for i, label in enumerate(labels)]


def test_precision_and_recall_with_as_many_errors_as_hits():
    figures = score_pope(pope_prompts("yes", "yes", "no"), ["Yes", "No", "Yes"])  # TP, FN, FP
    assert figures["precision"] == 0.5 and figures["recall"] == 0.5 and figures["f1"] == 0.5


def test_recall_and_f1_are_zero_when_no_answer_is_yes():
    figures = score_pope(pope_prompts("no", "no"), ["No", "No"])
    assert figures == {"accuracy": 1.0, "precision": 0.0, "recall": 0.0, "f1": 0.0, "yes_ratio": 0.0}


def test_a_reply_per_question_is_required():
    with pytest.raises(ValueError):
        score_pope(pope_prompts("yes", "no"), ["Yes"])
