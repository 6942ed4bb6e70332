"""ScienceQA as LLaVA evaluates it: loader on LLaVA's layout, and its answer parsing on worked examples."""

import json

import pytest
from PIL import Image

from mllm_safety.evaluation.registry import BenchmarkSpec, load_benchmark
from mllm_safety.evaluation.sets import EvalPrompt, ImageFile
from mllm_safety.evaluation.tasks.scienceqa import ChoiceAnswer, parse_choice, score_scienceqa


def write_scienceqa(root, questions=None, test=("10", "11", "12")):
    """LLaVA's ``playground/data/eval/scienceqa``: the CQM-A questions, problems.json, pid_splits.json, images."""
    root.mkdir(parents=True, exist_ok=True)
    questions = questions or [
        {
            "id": "10",
            "image": "10/image.png",
            "conversations": [
                {
                    "from": "human",
                    "value": "<image>\nContext: A map.\nWhich state is farthest north?\nA. Ohio\nB. Maine",
                },
                {"from": "gpt", "value": "B"},
            ],
        },
        {
            "id": "11",
            "conversations": [
                {"from": "human", "value": "Which word is a noun?\nA. run\nB. dog\nC. quickly"},
                {"from": "gpt", "value": "B"},
            ],
        },
        {
            "id": "12",
            "image": "12/image.png",
            "conversations": [{"from": "human", "value": "What is shown?\nA. a cell\nB. a leaf <image>"}],
        },
    ]
    problems = {
        "10": {"question": "...", "choices": ["Ohio", "Maine"], "answer": 1, "subject": "social science"},
        "11": {"question": "...", "choices": ["run", "dog", "quickly"], "answer": 1, "subject": "language science"},
        "12": {"question": "...", "choices": ["a cell", "a leaf"], "answer": 0, "subject": "natural science"},
        "13": {"question": "...", "choices": ["x", "y"], "answer": 0, "subject": "natural science"},
    }
    (root / "llava_test_CQM-A.json").write_text(json.dumps(questions))
    (root / "problems.json").write_text(json.dumps(problems))
    (root / "pid_splits.json").write_text(json.dumps({"train": ["13"], "val": [], "test": list(test)}))
    for pid in ("10", "12"):
        (root / "images" / "test" / pid).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32), "green").save(root / "images" / "test" / pid / "image.png")
    return root


def test_loads_llavas_prompts_with_the_single_prediction_suffix(tmp_path):
    root = write_scienceqa(tmp_path / "scienceqa")
    (test,) = load_benchmark(BenchmarkSpec("scienceqa", str(root)))
    assert test.name == "scienceqa_test" and test.is_utility and not test.harmful
    first, second, third = test.prompts
    assert first.question == (
        "Context: A map.\nWhich state is farthest north?\nA. Ohio\nB. Maine\n"
        "Answer with the option's letter from the given choices directly."
    )
    assert first.image == ImageFile(str(root / "images" / "test" / "10" / "image.png"))
    assert second.image is None and third.question.startswith("What is shown?\nA. a cell\nB. a leaf\nAnswer with")
    assert [p.target for p in test.prompts] == [
        ChoiceAnswer(1, 2, True),
        ChoiceAnswer(1, 3, False),
        ChoiceAnswer(0, 2, True),
    ]
    assert first.category == "social science"


@pytest.mark.parametrize(
    ("reply", "letter"),
    [
        ("B", "B"),  # the letter alone
        ("B. Maine", "B"),  # "X. " prefix
        ("The answer is B.", "B"),  # exactly one "The answer is X."
        ("Because of the map, The answer is B", None),  # the regex needs a character after the letter
        ("The answer is A. No, the answer is B.", "A"),  # "the answer" lower-case does not count
        ("The answer is A. The answer is B.", None),  # two answers: failed
        ("B.", None),  # too short for the prefix rule, no "The answer is": LLaVA counts it wrong
        ("b", None),
        ("Answer: B", None),
    ],
)
def test_replies_are_parsed_as_llavas_scorer_does(reply, letter):
    assert parse_choice(reply) == letter


def test_accuracy_and_image_accuracy_on_worked_examples():
    targets = [ChoiceAnswer(1, 2, True), ChoiceAnswer(1, 3, False), ChoiceAnswer(0, 2, True), ChoiceAnswer(1, 2, True)]
    prompts = [EvalPrompt(str(i), "scienceqa_test", None, "q", None, "q", target=t) for i, t in enumerate(targets)]
    # right, right, wrong ("C": the question has no third choice), wrong (not parsed)
    replies = ["B", "The answer is B.", "C", "I think Maine"]
    assert score_scienceqa(prompts, replies) == {"accuracy": 0.5, "img_accuracy": pytest.approx(1 / 3)}
    assert score_scienceqa(prompts[:1], ["E"]) == {"accuracy": 0.0, "img_accuracy": 0.0}, "E: no such choice"


def test_files_that_do_not_belong_together_are_named(tmp_path):
    root = write_scienceqa(tmp_path / "a", test=("10", "11"))
    with pytest.raises(ValueError, match=r"llava_test_CQM-A.json: question '12' is not a test problem"):
        load_benchmark(BenchmarkSpec("scienceqa", str(root)))
    root = write_scienceqa(tmp_path / "b", test=("10", "11", "12", "14"))
    with pytest.raises(ValueError, match=r"1 test problem\(s\) of .*pid_splits.json have no question"):
        load_benchmark(BenchmarkSpec("scienceqa", str(root)))
    (root / "problems.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"problems.json does not exist"):
        load_benchmark(BenchmarkSpec("scienceqa", str(root)))
    root = write_scienceqa(tmp_path / "c", questions=[{"id": "10", "text": "other layout"}])
    with pytest.raises(ValueError, match=r"record 0 is not a LLaVA record"):
        load_benchmark(BenchmarkSpec("scienceqa", str(root)))


def test_the_shortest_letter_prefix_reply_is_read():
    assert parse_choice("A. ") == "A" and parse_choice("C. Paris") == "C"


def test_a_reply_per_question_is_required():
    """A missing reply is an error, not a mean over fewer questions."""
    prompts = [EvalPrompt("1", "scienceqa_test", None, "q", None, "q", target=ChoiceAnswer(0, 2, True))] * 2
    with pytest.raises(ValueError):
        score_scienceqa(prompts, ["A"])
