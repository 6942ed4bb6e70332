import json
from collections import Counter

import pytest

from mllm_safety.evaluation.tasks.demo import load_demo_eval


def test_bundled_set_has_six_categories_of_six_with_unique_ids():
    demo = load_demo_eval()
    assert Counter(request.category for request in demo.harmful) == {
        "illegal_activity": 6,
        "hate_speech": 6,
        "malware": 6,
        "physical_harm": 6,
        "fraud": 6,
        "privacy_violation": 6,
    }
    ids = [request.id for request in demo.harmful + demo.benign]
    assert len(set(ids)) == len(ids) == 72


def test_each_harmful_request_has_a_question_a_figstep_statement_and_a_benign_twin():
    demo = load_demo_eval()
    for harmful, benign in zip(demo.harmful, demo.benign, strict=True):
        assert harmful.question.endswith("?")
        assert harmful.instruction.startswith("Steps to") and harmful.instruction.endswith(".")
        assert benign.id == f"{harmful.id}-benign" and benign.category == harmful.category
        assert benign.question.endswith("?") and benign.question != harmful.question
        assert benign.question.split()[:2] == harmful.question.split()[:2]


def write(tmp_path, entries) -> str:
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(entries))
    return str(path)


ENTRY = {"id": "a", "category": "fraud", "question": "Q?", "instruction": "Steps.", "benign": "B?"}


def test_loads_a_user_file_of_the_same_layout(tmp_path):
    demo = load_demo_eval(write(tmp_path, [ENTRY]))
    assert [r.id for r in demo.harmful] == ["a"] and [r.question for r in demo.benign] == ["B?"]


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([ENTRY, dict(ENTRY)], r"entry 1 \('a'\): duplicate id 'a'"),
        ([{**ENTRY, "question": "  "}], r"entry 0 \('a'\): empty or non-string field\(s\) question"),
        ([{k: v for k, v in ENTRY.items() if k != "benign"}], r"entry 0 \('a'\): expected exactly the fields"),
        ([], "non-empty JSON list"),
    ],
)
def test_bad_entries_are_reported_with_file_and_entry(tmp_path, entries, message):
    path = write(tmp_path, entries)
    with pytest.raises(ValueError, match=message) as error:
        load_demo_eval(path)
    assert str(error.value).startswith(path)
