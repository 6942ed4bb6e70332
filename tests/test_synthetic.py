import hashlib
import io
import json
import re

import pytest
import webdataset as wds
from data_helpers import count_shard_writes
from PIL import Image

from mllm_safety.data import synthetic
from mllm_safety.data.manifest import Manifest
from mllm_safety.data.synthetic import COLOURS, ensure_demo_shards, generate_demo_samples, write_demo_shards

NUMBERS = {"no": 0, "one": 1, "two": 2, "three": 3}
FACTORS = {
    ("metres", "centimetres"): 100,
    ("kilometres", "metres"): 1000,
    ("kilograms", "grams"): 1000,
    ("hours", "minutes"): 60,
    ("minutes", "seconds"): 60,
    ("days", "hours"): 24,
}
CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Japan": "Tokyo",
    "Canada": "Ottawa",
    "Australia": "Canberra",
    "Egypt": "Cairo",
    "Kenya": "Nairobi",
    "India": "New Delhi",
    "Norway": "Oslo",
    "Argentina": "Buenos Aires",
}


@pytest.fixture(scope="module")
def samples():
    return list(generate_demo_samples(300, seed=0, image_size=96))


def qa_pairs(record):
    turns = record["conversations"]
    return [(turns[i]["value"].removeprefix("<image>\n"), turns[i + 1]["value"]) for i in range(0, len(turns), 2)]


def test_same_seed_same_samples_other_seed_differs():
    first = list(generate_demo_samples(20, seed=3, image_size=64))
    again = list(generate_demo_samples(20, seed=3, image_size=64))
    other = list(generate_demo_samples(20, seed=4, image_size=64))
    assert [(s.record, s.png) for s in first] == [(s.record, s.png) for s in again]
    assert [s.record for s in first] != [s.record for s in other]
    assert [s.record for s in generate_demo_samples(5, seed=3, image_size=64)] == [s.record for s in first[:5]]


def test_layout_and_image_placeholder(samples):
    for sample in samples:
        record, turns = sample.record, sample.record["conversations"]
        assert 2 <= len(turns) <= 6 and len(turns) % 2 == 0
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        placeholders = sum(t["value"].count("<image>") for t in turns)
        if sample.png is None:
            assert "image" not in record and placeholders == 0 and sample.scene == ()
        else:
            assert record["image"] == f"{record['id']}.png"
            assert placeholders == 1 and turns[0]["value"].startswith("<image>\n")


def test_about_thirty_percent_are_text_only(samples):
    assert 0.22 < sum(s.png is None for s in samples) / len(samples) < 0.38


def test_drawn_image_matches_the_scene(samples):
    for sample in (s for s in samples if s.png is not None):
        image = Image.open(io.BytesIO(sample.png))
        assert image.size == (96, 96) and image.mode == "RGB"
        assert 1 <= len(sample.scene) <= 3
        assert [s.x for s in sample.scene] == sorted(s.x for s in sample.scene)
        for shape in sample.scene:
            assert image.getpixel((shape.x, shape.y)) == COLOURS[shape.colour]


def test_answers_are_correct_for_the_scene(samples):
    checked = set()
    for sample in (s for s in samples if s.png is not None):
        names = [s.name for s in sample.scene]
        for question, answer in qa_pairs(sample.record):
            if question.startswith(("What shapes", "Which shapes", "Describe")):
                assert all(name in answer for name in names)
                assert [answer.index(name) for name in names] == sorted(answer.index(name) for name in names)
            elif m := re.fullmatch(r"How many (circle|square|triangle|shape)s .*\?", question):
                expected = sum(m[1] in ("shape", s.kind) for s in sample.scene)
                assert NUMBERS[answer.split()[2]] == expected
            elif m := re.fullmatch(r"Is there an? (\w+ \w+) in the image\?", question):
                assert answer.startswith("Yes" if m[1] in names else "No")
            elif m := re.fullmatch(r"What colour is the (\w+)\?", question):
                assert answer == f"The {m[1]} is {next(s.colour for s in sample.scene if s.kind == m[1])}."
            elif m := re.fullmatch(r"Which shape is furthest to the (left|right)\?", question):
                assert names[0 if m[1] == "left" else -1] in answer
            elif m := re.fullmatch(r"Is the (\w+ \w+) to the left or to the right of the (\w+ \w+)\?", question):
                side = "left" if names.index(m[1]) < names.index(m[2]) else "right"
                assert answer == f"The {m[1]} is to the {side} of the {m[2]}."
            else:
                pytest.fail(f"unchecked question {question!r}")
            checked.add(" ".join(question.split()[:2]))
    assert len(checked) >= 8


def test_text_answers_are_correct(samples):
    for sample in (s for s in samples if s.png is None):
        for question, answer in qa_pairs(sample.record):
            if m := re.fullmatch(r"What is (\d+) (plus|minus|times) (\d+)\?", question):
                a, b = int(m[1]), int(m[3])
                assert answer.endswith(f" is {({'plus': a + b, 'minus': a - b, 'times': a * b})[m[2]]}.")
            elif m := re.fullmatch(r'Spell the word "(\w+)" backwards\.', question):
                assert answer.endswith(f'"{m[1][::-1]}".')
            elif m := re.fullmatch(r'How many letters are in the word "(\w+)"\?', question):
                assert f" {len(m[1])} letters" in answer
            elif m := re.fullmatch(r"How many (\w+) are in (\d+) (\w+)\?", question):
                assert answer == f"There are {int(m[2]) * FACTORS[m[3], m[1]]} {m[1]} in {m[2]} {m[3]}."
            elif m := re.fullmatch(r"What is the capital of (\w+)\?", question):
                assert answer == f"The capital of {m[1]} is {CAPITALS[m[1]]}."
            else:
                assert re.fullmatch(r'What is a synonym for "\w+"\?', question), question


def test_rejects_images_too_small_to_show_shapes():
    with pytest.raises(ValueError, match="image_size must be >= 64"):
        generate_demo_samples(1, image_size=32)


def test_shards_read_back_with_webdataset(tmp_path):
    shards = write_demo_shards(tmp_path / "demo", num_samples=40, seed=1, shard_size=16, image_size=64)
    assert [p.name for p in shards] == ["demo-000000.tar", "demo-000001.tar", "demo-000002.tar"]
    manifest = Manifest.read(tmp_path / "demo")
    assert manifest.num_samples == 40 and manifest.sources == {"demo": 40}
    assert manifest.params["demo"]["seed"] == 1 and manifest.params["demo"]["image_size"] == 64
    assert [entry.name for entry in manifest.shards] == [p.name for p in shards]
    read = list(wds.WebDataset([str(p) for p in shards], shardshuffle=False))
    expected = list(generate_demo_samples(40, seed=1, image_size=64))
    ids = [sample_id for entry in manifest.shards for sample_id in entry.ids]
    assert ids == [json.loads(s["json"])["id"] for s in read] == [e.record["id"] for e in expected]
    for got, want in zip(read, expected, strict=True):
        assert json.loads(got["json"]) == want.record | {"source": "demo"}
        assert got.get("png") == want.png


def test_second_call_reuses_the_set_without_rewriting(tmp_path, monkeypatch):
    """Counted, not timed: the second call starts no shard writer and leaves every file's bytes as they were."""
    written = count_shard_writes(monkeypatch)
    shards = write_demo_shards(tmp_path / "demo", num_samples=20, shard_size=8, image_size=64)
    assert written == ["demo"]
    files = [*shards, tmp_path / "demo" / "manifest.json"]
    digests = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    assert write_demo_shards(tmp_path / "demo", num_samples=20, shard_size=8, image_size=64) == shards
    assert written == ["demo"], "the second call wrote the set again"
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in files} == digests


def test_changed_parameters_or_missing_shard_regenerate(tmp_path):
    out = tmp_path / "demo"
    first = write_demo_shards(out, num_samples=20, shard_size=8, image_size=64)
    first[1].unlink()
    assert all(p.is_file() for p in write_demo_shards(out, num_samples=20, shard_size=8, image_size=64))
    resized = write_demo_shards(out, num_samples=12, shard_size=8, image_size=64)
    assert len(resized) == 2 and not (out / "demo-000002.tar").exists()
    assert Manifest.read(out).num_samples == 12
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]


def test_interrupted_write_leaves_nothing_behind(tmp_path, monkeypatch):
    def failing(num_samples, seed, image_size):
        yield from list(generate_demo_samples(3, seed, image_size))
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "generate_demo_samples", failing)
    with pytest.raises(KeyboardInterrupt):
        write_demo_shards(tmp_path / "demo", num_samples=10, image_size=64)
    assert list(tmp_path.iterdir()) == []


def test_ensure_names_the_cache_folder_by_parameters(tmp_path):
    shards = ensure_demo_shards(tmp_path, num_samples=8, seed=2, image_size=64)
    assert shards[0].parent == tmp_path / "demo-v2-n8-s2-px64"
    assert ensure_demo_shards(tmp_path, num_samples=8, seed=2, image_size=64) == shards
