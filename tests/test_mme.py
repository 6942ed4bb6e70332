"""MME: loader on the release folder's two layouts, MME's yes/no reading and its scores."""

import pytest
from PIL import Image

from mllm_safety.evaluation.registry import BenchmarkSpec, load_benchmark
from mllm_safety.evaluation.sets import EvalPrompt, ImageFile
from mllm_safety.evaluation.tasks.mme import CATEGORIES, YesNo, read_yes_no, score_mme

NESTED = {"posters", "celebrity", "scene", "landmark", "artwork"}


def write_mme(root):
    """One image and its two questions per category, in the release's layout (nested for five categories)."""
    for category in CATEGORIES["perception"] + CATEGORIES["cognition"]:
        nested = category in NESTED
        images = root / category / ("images" if nested else "")
        questions = root / category / ("questions_answers_YN" if nested else "")
        images.mkdir(parents=True, exist_ok=True)
        questions.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 16), "white").save(images / "0001.png" if category == "OCR" else images / "0001.jpg")
        lines = [
            f"Is this a {category} image? Please answer yes or no.\tYes",
            "Is this a cat? Please answer yes or no.\tNo",
        ]
        (questions / "0001.txt").write_text("\n".join(lines) + "\n")
    return root


def test_loads_both_layouts_with_llavas_prompt(tmp_path):
    root = write_mme(tmp_path / "MME_Benchmark_release_version")
    perception, cognition = load_benchmark(BenchmarkSpec("mme", str(root)))
    assert (perception.name, len(perception.prompts)) == ("mme_perception", 20) and len(cognition.prompts) == 8
    first = perception.prompts[0]
    assert first.id == "existence/0001/0" and first.category == "existence"
    # LLaVA's MME prompt: MME's "Please answer yes or no." gives way to the short-answer line
    assert first.question == "Is this a existence image?\nAnswer the question using a single word or phrase."
    assert first.request == "Is this a existence image? Please answer yes or no."
    assert first.image == ImageFile(str(root / "existence" / "0001.jpg"))
    assert first.target == YesNo("yes", "existence/0001") and perception.prompts[1].target.answer == "no"
    posters = next(p for p in perception.prompts if p.category == "posters")
    assert posters.image == ImageFile(str(root / "posters" / "images" / "0001.jpg"))
    ocr = next(p for p in perception.prompts if p.category == "OCR")
    assert ocr.image.path.endswith("OCR/0001.png")


@pytest.mark.parametrize(
    ("reply", "label"),
    [
        ("Yes", "yes"),
        ("no", "no"),
        ("Yes, it is.", "yes"),
        ("No, there is not.", "no"),
        ("There is a dog", "other"),
        ("Not sure", "no"),  # "no" within the first 4 characters
        ("I think yes", "other"),  # "yes" beyond them
        ("y", "other"),
    ],
)
def test_replies_are_read_as_mmes_calculation_reads_them(reply, label):
    assert read_yes_no(reply) == label


def test_category_scores_are_accuracy_plus_accuracy_plus():
    def prompt(category, image, answer):
        return EvalPrompt("x", "mme_perception", category, "q", None, "q", target=YesNo(answer, f"{category}/{image}"))

    prompts = [
        prompt("existence", "a", "yes"),
        prompt("existence", "a", "no"),
        prompt("existence", "b", "yes"),
        prompt("existence", "b", "no"),
        prompt("count", "c", "yes"),
        prompt("count", "c", "no"),
    ]
    replies = ["Yes", "No", "Yes", "Yes", "maybe", "No"]
    figures = score_mme(prompts, replies)
    # existence: 3 of 4 questions right (75), 1 of 2 images with both right (50); count: 1 of 2 (50), 0 of 1 (0)
    assert figures["score/existence"] == pytest.approx(125.0) and figures["score/count"] == pytest.approx(50.0)
    assert figures["score"] == pytest.approx(175.0)
    assert figures["accuracy"] == pytest.approx(4 / 6) and figures["accuracy_plus"] == pytest.approx(1 / 3)


def test_a_missing_category_or_another_line_layout_is_named(tmp_path):
    root = write_mme(tmp_path / "mme")
    (root / "count" / "0001.txt").write_text("Is this a cat? Yes\n")
    with pytest.raises(ValueError, match=r"count/0001.txt: line 1 is not 'question<TAB>Yes\|No'"):
        load_benchmark(BenchmarkSpec("mme", str(root), modes=["perception"]))
    for file in (root / "code_reasoning").iterdir():
        file.unlink()
    (root / "code_reasoning").rmdir()
    with pytest.raises(FileNotFoundError, match=r"MME category 'code_reasoning': .*code_reasoning does not exist"):
        load_benchmark(BenchmarkSpec("mme", str(root), modes=["cognition"]))


def test_a_limit_that_splits_an_images_pair_leaves_its_category_score_out():
    def prompt(category, image, answer):
        return EvalPrompt("x", "mme_perception", category, "q", None, "q", target=YesNo(answer, f"{category}/{image}"))

    # a limit kept one question of image b: its category cannot reach 200, so no score that looks halved
    prompts = [prompt("existence", "a", "yes"), prompt("existence", "b", "no"), prompt("count", "c", "yes")]
    prompts.append(prompt("count", "c", "no"))
    figures = score_mme(prompts, ["Yes", "No", "Yes", "No"])
    assert "score/existence" not in figures and "score" not in figures
    assert figures["score/count"] == pytest.approx(200.0) and figures["accuracy"] == 1.0
    # a skipped image (empty replies) is two wrong answers and a wrong pair
    assert score_mme(prompts[2:], ["", ""])["score/count"] == 0.0


def test_only_the_first_four_characters_are_searched():
    """MME's parse_pred_ans looks for "yes" and "no" in ``reply[:4]`` only."""
    assert read_yes_no("A yes") == "other" and read_yes_no("Um no") == "other"
    assert read_yes_no("A no") == "no"


def test_a_reply_per_question_is_required():
    prompts = [EvalPrompt("x", "mme_perception", "count", "q", None, "q", target=YesNo("yes", "count/c"))] * 2
    with pytest.raises(ValueError):
        score_mme(prompts, ["Yes"])
