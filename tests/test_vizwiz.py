"""VizWiz-VQA: loader on the published val.json, EvalAI's answer normalisation and the three scores."""

import json

import pytest

from mllm_safety.evaluation.registry import BenchmarkSpec, load_benchmark
from mllm_safety.evaluation.sets import EvalPrompt, ImageFile
from mllm_safety.evaluation.tasks.vizwiz import (
    CrowdAnswers,
    normalize_answer,
    paper_accuracy,
    score_vizwiz,
    vqa_accuracy,
)


def crowd(*answers: str) -> list[dict]:
    return [{"answer": a, "answer_confidence": "yes"} for a in answers]


def write_vizwiz(root):
    records = [
        {
            "image": "VizWiz_val_00000000.jpg",
            "question": "What is this?",
            "answers": crowd(*["soda"] * 7, *["coke"] * 3),
            "answer_type": "other",
            "answerable": 1,
        },
        {
            "image": "VizWiz_val_00000001.jpg",
            "question": "What color is this shirt?",
            "answers": crowd(*["unanswerable"] * 8, "blue", "unsuitable"),
            "answer_type": "unanswerable",
            "answerable": 0,
        },
    ]
    (root / "val").mkdir(parents=True)
    (root / "val.json").write_text(json.dumps(records))
    return root / "val.json"


def test_loads_val_json_with_llavas_prompt(tmp_path):
    path = write_vizwiz(tmp_path)
    (val,) = load_benchmark(BenchmarkSpec("vizwiz", str(path), images=str(tmp_path / "val")))
    assert val.name == "vizwiz_val" and val.is_utility
    first = val.prompts[0]
    assert first.question == (
        "What is this?\nWhen the provided information is insufficient, respond with 'Unanswerable'.\n"
        "Answer the question using a single word or phrase."
    )
    assert first.image == ImageFile(str(tmp_path / "val" / "VizWiz_val_00000000.jpg"))
    assert first.target == CrowdAnswers(("soda",) * 7 + ("coke",) * 3, True) and not val.prompts[1].target.answerable


@pytest.mark.parametrize(
    ("answer", "normalised"),
    [
        ("Yes.", "yes"),  # lower case, final period dropped
        ("The dog's bowl", "dog 's bowl"),  # article dropped, possessive split
        ("Two", "2"),  # number words as digits
        ("none", "0"),
        ("dont", "don't"),  # contractions spelled out
        ("couldnt've", "couldn't've"),
        ("3.5", "3.5"),  # a period inside a number stays
        ("red, white", "red white"),  # commas go
        ("e-mail", "e mail"),  # punctuation not next to a space becomes a space
        ("black - white", "black white"),  # ... next to a space it goes
        ("a cat?", "cat"),
        ("1,000", "1000"),
        ("Unanswerable\n", "unanswerable"),
    ],
)
def test_answers_are_normalised_as_evalai_does(answer, normalised):
    assert normalize_answer(answer) == normalised


def test_vqa_accuracy_counts_matches_among_the_other_nine():
    answers = ("red",) * 2 + ("blue",) * 8
    # each red answer sees 1 other red (1/3), each blue one sees 2 reds (2/3): (2/3 + 16/3) / 10
    assert vqa_accuracy(answers, "Red") == pytest.approx(0.6)
    assert vqa_accuracy(answers, "blue") == 1.0 and vqa_accuracy(("yes",) * 10, "Yes.") == 1.0
    assert vqa_accuracy(("two",) * 3 + ("three",) * 7, "2") == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)
    assert paper_accuracy(answers, "Red") == pytest.approx(2 / 3)
    assert paper_accuracy(("yes",) * 10, "Yes.") == 0.0, "the paper's score has no normalisation"


def test_scores_on_worked_examples():
    targets = [
        CrowdAnswers(("soda",) * 7 + ("coke",) * 3, True),
        CrowdAnswers(("unanswerable",) * 8 + ("blue", "unsuitable"), False),
        CrowdAnswers(("unanswerable",) * 10, False),
        CrowdAnswers(("blue",) * 10, True),
    ]
    prompts = [EvalPrompt(str(i), "vizwiz_val", None, "q", None, "q", target=t) for i, t in enumerate(targets)]
    replies = ["Coke", "Unanswerable", "blue", "Unanswerable."]
    figures = score_vizwiz(prompts, replies)
    coke = (3 * 2 / 3 + 7 * 1) / 10
    assert figures["accuracy"] == pytest.approx((coke + 1.0 + 0.0 + 0.0) / 4)
    assert figures["paper_accuracy"] == pytest.approx((1.0 + 1.0 + 0.0 + 0.0) / 4)
    # "unanswerable" said twice, once rightly; 2 questions are unanswerable: precision 1/2, recall 1/2
    assert figures["unanswerable_f1"] == pytest.approx(0.5)


def test_another_layout_or_a_missing_file_is_named(tmp_path):
    path = write_vizwiz(tmp_path)
    path.write_text(json.dumps([{"image": "a.jpg", "question": "What?", "answers": ["soda"] * 10}]))
    with pytest.raises(ValueError, match=r"val.json: record 0 lacks one of image, question, answers, answerable"):
        load_benchmark(BenchmarkSpec("vizwiz", str(path), images=str(tmp_path / "val")))
    path.write_text(json.dumps([{"image": "a.jpg", "question": "What?", "answers": ["soda"], "answerable": 1}]))
    with pytest.raises(ValueError, match=r"record 0 \(a.jpg\): answers are not"):
        load_benchmark(BenchmarkSpec("vizwiz", str(path), images=str(tmp_path / "val")))
    with pytest.raises(FileNotFoundError, match=r"nowhere.json does not exist"):
        load_benchmark(BenchmarkSpec("vizwiz", str(tmp_path / "nowhere.json"), images=str(tmp_path / "val")))


@pytest.mark.parametrize(
    ("answer", "normalised"),
    [
        ("black,white", "blackwhite"),  # commas go before punctuation is looked at
        ("left?right", "leftright"),  # so do question marks
        ("red\nblue\tgreen", "red blue green"),
        ("t-shirt-\nyes", "tshirt yes"),  # line breaks and tabs are spaces when punctuation is looked at
        ("t-shirt-\tyes", "tshirt yes"),
        ("t-shirt- yes", "tshirt yes"),  # a mark followed by a space anywhere: that mark goes everywhere
        ("x -b-c", "x bc"),  # ... or preceded by one
        ("t-shirt", "t shirt"),  # otherwise it becomes a space
        ("a" + "." * 40, "a" + "." * 8),  # upstream's count=re.UNICODE: at most 32 periods dropped
    ],
)
def test_evalai_normalisation_quirks_are_kept(answer, normalised):
    """Scores stay comparable with published VizWiz numbers only if the normaliser's odd corners are EvalAI's."""
    assert normalize_answer(answer) == normalised


def vizwiz_prompts(*targets: CrowdAnswers) -> list[EvalPrompt]:
    return [EvalPrompt(str(i), "vizwiz_val", None, "q", None, "q", target=t) for i, t in enumerate(targets)]


def test_unanswerable_f1_weighs_precision_and_recall():
    answerable, unanswerable = CrowdAnswers(("blue",) * 10, True), CrowdAnswers(("unanswerable",) * 10, False)
    prompts = vizwiz_prompts(answerable, answerable, unanswerable)
    assert score_vizwiz(prompts, ["blue", "blue", "Unanswerable"])["unanswerable_f1"] == 1.0
    # "unanswerable" said twice, once rightly, and the one unanswerable question found: precision 1/2, recall 1
    figures = score_vizwiz(prompts, ["Unanswerable", "blue", "unanswerable"])
    assert figures["unanswerable_f1"] == pytest.approx(2 * 0.5 * 1 / 1.5)


def test_unanswerable_f1_is_zero_when_it_is_undefined():
    answerable, unanswerable = CrowdAnswers(("blue",) * 10, True), CrowdAnswers(("unanswerable",) * 10, False)
    assert score_vizwiz(vizwiz_prompts(answerable, unanswerable), ["blue", "blue"])["unanswerable_f1"] == 0.0
    assert score_vizwiz(vizwiz_prompts(answerable), ["blue"])["unanswerable_f1"] == 0.0
