import json
import math

import pytest
import torch.multiprocessing as mp
from safety_fixtures import evaluate_shard, tiny_module, write_figstep

from mllm_safety.evaluation import generation
from mllm_safety.evaluation.generation import generate_for_rank, rank_slice
from mllm_safety.evaluation.judge import KeywordJudge
from mllm_safety.evaluation.metrics import all_prompts, judge_and_reduce
from mllm_safety.evaluation.registry import BenchmarkSpec, load_benchmark


@pytest.fixture(scope="module")
def module():
    return tiny_module()


@pytest.fixture
def specs(tmp_path):
    """FigStep fixture (4 published images, one of them broken) and 4 demo prompts of each set."""
    csv_path, images = write_figstep(tmp_path / "figstep")
    (images / "query_ForbidQI_5_1_6.png").write_bytes(b"truncated")
    return [
        {"name": "figstep", "path": str(csv_path), "images": str(images)},
        {"name": "demo", "limit": 4},
    ]


def load_sets(specs):
    return [s for spec in specs for s in load_benchmark(BenchmarkSpec(**spec))]


def test_every_rank_gets_the_same_number_of_slots_and_every_prompt_once(specs):
    prompts = all_prompts(load_sets(specs))
    assert len(prompts) == 8 + 4 * 3
    for world in (1, 2, 3, 5):
        slices = [rank_slice(prompts, rank, world) for rank in range(world)]
        assert {len(s) for s in slices} == {math.ceil(len(prompts) / world)}
        real = sorted(i for s in slices for i in s if i is not None)
        assert real == list(range(len(prompts)))
    text_first = rank_slice(prompts, 0, 1)
    has_image = [prompts[i].image is not None for i in text_first]
    assert has_image == sorted(has_image), "text-only prompts are batched apart from image prompts"


def test_ranks_run_the_same_generate_calls_and_a_broken_image_is_skipped(module, specs, monkeypatch):
    prompts = all_prompts(load_sets(specs))
    calls: dict[int, list[int]] = {}
    real_generate = generation.generate_replies
    rank = 0

    def counting(module, samples, max_new_tokens):
        calls.setdefault(rank, []).append(len(samples))
        return real_generate(module, samples, max_new_tokens)

    monkeypatch.setattr(generation, "generate_replies", counting)
    results = []
    for rank in range(3):
        results += generate_for_rank(module, prompts, rank, 3, batch_size=4, max_new_tokens=3)
    assert calls[0] == calls[1] == calls[2] == [4, 3], "same number and size of batches on every rank"
    assert sorted(g.index for g in results) == list(range(len(prompts)))
    skipped = [g for g in results if g.reply is None]
    assert [g.prompt.id for g in skipped] == ["ForbidQI_5_1"]
    assert "query_ForbidQI_5_1_6.png: cannot open image" in skipped[0].error
    assert all(isinstance(g.reply, str) for g in results if g.error is None)


def test_two_process_sharded_evaluation_equals_one_process(module, specs, tmp_path):
    sets = load_sets(specs)
    single_generations = generate_for_rank(module, all_prompts(sets), 0, 1, batch_size=4, max_new_tokens=4)
    single = judge_and_reduce(sets, single_generations, [KeywordJudge("xstest"), KeywordJudge("gcg")])

    out = tmp_path / "sharded.json"
    mp.spawn(evaluate_shard, args=(2, str(tmp_path / "init"), str(out), specs, 4), nprocs=2, join=True)
    sharded = json.loads(out.read_text())
    replies = sorted((g.index, g.reply, g.error) for g in single_generations)
    assert [tuple(r) for r in sharded["replies"]] == replies
    assert sharded["codes"] == single.codes
    assert sharded["metrics"] == single.metrics
    assert single.counts["figstep_image"]["skipped"] == 1
    assert len({reply for _, reply, _ in replies}) > 5, "replies differ, so the comparison means something"


def test_generation_is_greedy_and_batch_independent(module, specs):
    sets = load_sets(specs)
    prompts = [p for p in all_prompts(sets) if p.set_name in ("demo_text", "demo_typographic")]
    batched = generate_for_rank(module, prompts, 0, 1, batch_size=16, max_new_tokens=5)
    alone = generate_for_rank(module, prompts, 0, 1, batch_size=1, max_new_tokens=5)
    assert sorted((g.index, g.reply) for g in batched) == sorted((g.index, g.reply) for g in alone)
    assert len({g.reply for g in batched}) > 1, "the test needs replies that differ"
