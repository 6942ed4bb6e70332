"""The world's data: request bank split by request, twins, boards, generated training sets, bundled eval prompts."""

import io
import itertools
import json
from collections import Counter
from importlib import resources

import numpy as np
import pytest
from data_helpers import count_shard_writes
from PIL import Image

from mllm_safety.data.manifest import Manifest
from mllm_safety.data.rejection import PAPER_REJECTION
from mllm_safety.data.shards import iter_conversations
from mllm_safety.world import bank
from mllm_safety.world.samples import (
    ANSWER_PROMPT,
    CURATED_REFUSALS,
    WorldData,
    _Generator,
    _png,
    ensure_world_shards,
    eval_prompts,
    held_out_questions,
    pieces,
)
from mllm_safety.world.typography import CELL, GRID, IMAGE_SIZE, fits, render_board


def generated(tokenizer, kind, samples, seed=0):
    return list(_Generator(tokenizer, WorldData(kind=kind, samples=samples, seed=seed)))


def texts_of(records):
    return [turn["value"].removeprefix("<image>\n") for record, _ in records for turn in record["conversations"]]


def test_the_split_is_by_request_with_twins_kept_together_and_fixed():
    pairs, split = bank.load_pairs(), bank.split()
    assert len(pairs) == 100 and len({p.category for p in pairs}) == 10
    held_in, held_out = {p.id for p in split.held_in}, {p.id for p in split.held_out}
    assert not held_in & held_out and held_in | held_out == {p.id for p in pairs}
    assert Counter(p.category for p in split.held_out) == {c: bank.HELD_OUT_PER_CATEGORY for c in Counter(
        p.category for p in pairs)}  # fmt: skip
    # a pair's twin is phrased like it: they share most of their words
    for pair in pairs:
        shared = set(pair.harmful.lower().split()) & set(pair.benign.lower().split())
        assert len(shared) >= 2, pair.id
    bank.split.cache_clear()
    assert bank.split() == split  # seeded, not random per process


def test_training_sets_never_show_a_harmful_request_except_to_refuse_it_nor_anything_held_out(tokenizer):
    split = bank.split()
    harmful = {p.harmful for p in bank.load_pairs()}
    held_out_benign = {p.benign for p in split.held_out}
    utility = {q.question for q in held_out_questions()}
    for kind, count in (("align", 300), ("transcribe", 150), ("visual", 300)):
        records = generated(tokenizer, kind, count)
        for record, _ in records:
            prompt, reply = (t["value"] for t in record["conversations"])
            assert not any(h in prompt for h in harmful) or (kind == "align" and reply in bank.REFUSALS)
            assert reply not in harmful and reply not in held_out_benign
            assert not any(b in prompt for b in held_out_benign)
            assert not any(u in prompt or u == reply for u in utility)
        if kind == "align":
            refused = [r for r, _ in records if r["conversations"][1]["value"] in bank.REFUSALS]
            assert 0.2 < len(refused) / count < 0.4
            assert all(r["conversations"][0]["value"].endswith(tuple(p.harmful for p in split.held_in)) or
                       "Thanks!" in r["conversations"][0]["value"] for r in refused)  # fmt: skip


def test_a_text_share_keeps_the_chat_models_text_data_and_never_refuses_an_image(tokenizer):
    records = list(_Generator(tokenizer, WorldData(kind="visual", samples=300, seed=2, text_share=0.3)))
    text = [r for r, image in records if image is None]
    assert 0.2 < len(text) / len(records) < 0.4
    assert any(r["conversations"][1]["value"] in bank.REFUSALS for r in text)
    assert not any(r["conversations"][1]["value"] in bank.REFUSALS for r, image in records if image is not None)
    with pytest.raises(ValueError, match="text_share"):
        WorldData(text_share=1.0)


def test_visual_tasks_are_varied_images_and_answered(tokenizer):
    records = generated(tokenizer, "visual", 200)
    assert all(image is not None and record["image"].endswith(".png") for record, image in records)
    prompts = Counter(record["conversations"][0]["value"].split("\n", 1)[1] for record, _ in records)
    assert ANSWER_PROMPT in prompts and "What does the text in the image say?" in prompts
    assert any("shape" in p for p in prompts) and any("word" in p for p in prompts)
    assert not any(r["conversations"][1]["value"] in bank.REFUSALS for r, _ in records)
    sizes = {Image.open(io.BytesIO(image[1])).size for _, image in records}
    assert sizes == {(IMAGE_SIZE, IMAGE_SIZE)}


def test_generation_is_deterministic_per_seed_and_the_shards_are_cached(tokenizer, tmp_path, monkeypatch):
    first = generated(tokenizer, "visual", 40, seed=3)
    assert generated(tokenizer, "visual", 40, seed=3) == first
    assert generated(tokenizer, "visual", 40, seed=4) != first
    shards = ensure_world_shards(tmp_path, tokenizer, WorldData(kind="align", samples=30, seed=0))
    assert Manifest.read(shards[0].parent).num_samples == 30
    written = count_shard_writes(monkeypatch)
    assert ensure_world_shards(tmp_path, tokenizer, WorldData(kind="align", samples=30, seed=0)) == shards
    assert not written, "the cached set was generated again"
    conversations = list(itertools.chain.from_iterable(iter_conversations(str(s)) for s in shards))
    assert [c.id for c in conversations] == [r["id"] for r, _ in generated(tokenizer, "align", 30)]


def test_world_data_options_are_checked():
    with pytest.raises(ValueError, match="kind"):
        WorldData(kind="other")
    with pytest.raises(ValueError, match="samples"):
        WorldData(samples=0)


def test_a_board_writes_one_token_per_cell_and_is_the_same_everywhere(tokenizer):
    cells = pieces(tokenizer, "How do I make a bath bomb at home?")
    assert "".join(cells) == "How do I make a bath bomb at home?" and len(cells) <= GRID * GRID
    image = np.asarray(render_board(cells))
    assert image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
    for index in range(GRID * GRID):
        row, col = divmod(index, GRID)
        ink = (image[row * CELL : (row + 1) * CELL, col * CELL : (col + 1) * CELL] < 128).any()
        assert ink == (index < len(cells))
    assert np.array_equal(np.asarray(render_board(cells)), image)
    assert pieces(tokenizer, "word " * 40) is None
    with pytest.raises(ValueError, match="do not fit"):
        render_board(["a"] * (GRID * GRID + 1))
    assert fits(" neighbor") and not fits("\n") and not fits(" ")


def test_the_bundled_eval_prompts_are_what_the_generator_writes(tokenizer):
    bundled = json.loads((resources.files("mllm_safety.evaluation.tasks") / "prompts/world_eval.json").read_text())
    assert bundled == eval_prompts(tokenizer)
    modes = Counter(p["mode"] for p in bundled["prompts"])
    assert modes == {"text": 40, "typographic": 40, "benign_text": 40, "benign_typographic": 40,
                     "transcription": 80, "utility": 55}  # fmt: skip
    held_out = {p.id for p in bank.split().held_out}
    assert {p["id"] for p in bundled["prompts"] if p["mode"] == "text"} == held_out


def test_the_data_module_generates_a_world_set_with_the_models_tokenizer(tmp_path, monkeypatch):
    from tiny_models import TINY_LLM

    from mllm_safety.data.datamodule import SafetyDataModule
    from mllm_safety.model.llm import LLMConfig
    from mllm_safety.model.vision import VisionConfig
    from mllm_safety.train.module import SafetyAlignModule

    monkeypatch.setenv("MLLM_SAFETY_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match="leave data.train_shards unset"):
        SafetyDataModule(train_shards="x.tar", world=WorldData())
    data = SafetyDataModule(world=WorldData(kind="visual", samples=12, seed=5), rejection_ratio=0.5)
    with pytest.raises(RuntimeError, match="tokenizer"):
        data.prepare_data()
    module = SafetyAlignModule(
        llm=LLMConfig(random_init=TINY_LLM), vision=VisionConfig(name="world-vit", select_layer=-1), lora=None
    )
    data.connect(module.processor)
    data.setup("fit")
    assert sum(len(piece.ids) for piece in data.pieces) == 12 and len(data.swap.chosen) == 6
    assert all(str(piece.path).startswith(str(tmp_path / "data" / "world-v")) for piece in data.pieces)


def test_random_word_boards_use_only_words_of_benign_texts(tokenizer):
    generator = _Generator(tokenizer, WorldData(kind="transcribe", samples=200, seed=0))
    replies = [record["conversations"][1]["value"] for record, _ in generator]
    harmful_only = {w for p in bank.load_pairs() for w in p.harmful.split()} - set(generator.words)
    assert harmful_only and not any(set(reply.split()) & harmful_only for reply in replies)
    structured = [r for r in replies if r[:1].isupper() and r.endswith((".", "?", "!"))]
    assert 0.1 < 1 - len(structured) / len(replies) < 0.5  # about 30% are words in random order, to be copied


def curated_set(tokenizer, **options):
    data = WorldData(kind="visual", samples=240, seed=1, text_share=0.2, curated=20, **options)
    return {record["id"]: (record["conversations"], image[1]) for record, image in _Generator(tokenizer, data) if image}


def board_of(tokenizer, text):
    return _png(render_board(pieces(tokenizer, text)))


def test_curated_data_refuses_held_in_requests_on_boards_beside_their_answered_twins(tokenizer):
    held_in, held_out = bank.split().held_in, bank.split().held_out
    boards = {board_of(tokenizer, p.harmful): p for p in held_in}
    twin_boards = {board_of(tokenizer, p.benign): p for p in held_in}
    curated = curated_set(tokenizer)
    refused = {i: (turns, png) for i, (turns, png) in curated.items() if turns[1]["value"] in CURATED_REFUSALS}
    assert len(refused) == 20
    assert len({turns[1]["value"] for turns, _ in refused.values()}) > 3  # varied refusals, as curated sets write
    assert all(png in boards for _, png in refused.values())  # each board shows a held-in harmful request
    assert {turns[0]["value"].split("\n")[1] for turns, _ in refused.values()} <= {
        ANSWER_PROMPT, "Answer the question in the image.", "Read the image and answer it.",
        "Please reply to what the image asks.",
    }  # fmt: skip
    requested = [boards[png] for _, png in refused.values()]
    assert len({p.id for p in requested}) == 20  # 20 different requests, not one request 20 times
    twins = {twin_boards[png].id for turns, png in curated.values() if png in twin_boards}
    assert twins >= {p.id for p in requested}  # every request has its twin
    assert not {p.id for p in requested} & {p.id for p in held_out}
    uncurated = list(_Generator(tokenizer, WorldData(kind="visual", samples=240, seed=1, text_share=0.2)))
    assert not any(r["conversations"][1]["value"] in CURATED_REFUSALS for r, _ in uncurated)


def test_each_curated_ablation_changes_only_what_it_ablates(tokenizer):
    curated = curated_set(tokenizer)
    refused = {i for i, (turns, _) in curated.items() if turns[1]["value"] in CURATED_REFUSALS}

    no_twins = curated_set(tokenizer, curated_twins=False)
    assert {i: curated[i] for i in refused} == {i: no_twins[i] for i in refused}  # the same refusals, in place
    assert len([1 for i in curated if curated[i] != no_twins.get(i)]) >= 20  # the twins' places hold other samples

    fixed = curated_set(tokenizer, curated_reply=PAPER_REJECTION)
    assert {i for i, (turns, _) in fixed.items() if turns[1]["value"] == PAPER_REJECTION} == refused
    assert all(fixed[i][1] == curated[i][1] and fixed[i][0][0] == curated[i][0][0] for i in refused)
    assert {i: curated[i] for i in curated if i not in refused} == {i: fixed[i] for i in fixed if i not in refused}

    other = curated_set(tokenizer, curated_image="other")
    harmful_boards = {board_of(tokenizer, p.harmful) for p in bank.load_pairs()}
    assert all(other[i][0] == curated[i][0] and other[i][1] not in harmful_boards for i in refused)
    assert sum(other[i][1] != curated[i][1] for i in other) >= 40  # requests' and twins' boards replaced


def test_curated_options_are_checked():
    with pytest.raises(ValueError, match="visual set"):
        WorldData(kind="align", curated=4)
    with pytest.raises(ValueError, match="at most half of samples=10"):
        WorldData(kind="visual", samples=10, curated=6)
    with pytest.raises(ValueError, match="curated_image"):
        WorldData(kind="visual", samples=10, curated=2, curated_image="blank")
