import json
import math

import pytest
import torch.multiprocessing as mp
from planted import planted_module
from safety_fixtures import evaluate_shard, write_figstep

from mllm_safety.evaluation import generation
from mllm_safety.evaluation.generation import GenerationSettings, generate_for_rank, rank_slice
from mllm_safety.evaluation.judge import KeywordJudge
from mllm_safety.evaluation.metrics import judge_and_reduce
from mllm_safety.evaluation.registry import BenchmarkSpec, load_benchmark
from mllm_safety.evaluation.sets import all_prompts

SAMPLED = {"max_new_tokens": 6, "batch_size": 4, "do_sample": True, "temperature": 1.5, "top_p": 0.95, "seed": 7}
"""Hot enough that the planted model's confident replies depend on each prompt's noise."""


@pytest.fixture(scope="module")
def module():
    return planted_module()


@pytest.fixture
def specs(tmp_path):
    """FigStep fixture (4 published images, one of them broken) and 4 demo prompts of each set."""
    csv_path, images = write_figstep(tmp_path / "figstep")
    (images / "query_ForbidQI_5_1_6.png").write_bytes(b"truncated")
    return [
        {"name": "figstep", "path": str(csv_path), "images": str(images)},
        {"name": "demo", "limit": 4, "modes": ["typographic", "text", "benign"]},
    ]


def load_sets(specs):
    return [s for spec in specs for s in load_benchmark(BenchmarkSpec(**spec))]


def replies(generations):
    return sorted((g.index, g.reply) for g in generations)


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
    sets = load_sets(specs)
    calls: dict[int, list[int]] = {}
    real_generate = generation.generate_replies
    rank = 0

    def counting(module, samples, settings, keys):
        calls.setdefault(rank, []).append(len(samples))
        return real_generate(module, samples, settings, keys)

    monkeypatch.setattr(generation, "generate_replies", counting)
    results = []
    for rank in range(3):
        results += generate_for_rank(module, sets, rank, 3, GenerationSettings(max_new_tokens=3, batch_size=4))
    assert calls[0] == calls[1] == calls[2] == [4, 3], "same number and size of batches on every rank"
    assert sorted(g.index for g in results) == list(range(20))
    skipped = [g for g in results if g.reply is None]
    assert [g.prompt.id for g in skipped] == ["ForbidQI_5_1"]
    assert "query_ForbidQI_5_1_6.png: cannot open image" in skipped[0].error
    assert all(isinstance(g.reply, str) for g in results if g.error is None)


@pytest.mark.parametrize("settings", [{"max_new_tokens": 4, "batch_size": 4}, SAMPLED], ids=["greedy", "sampled"])
def test_two_process_sharded_evaluation_equals_one_process(module, specs, tmp_path, settings):
    sets = load_sets(specs)
    single_generations = generate_for_rank(module, sets, 0, 1, GenerationSettings(**settings))
    single = judge_and_reduce(sets, single_generations, [KeywordJudge("xstest"), KeywordJudge("gcg")])

    out = tmp_path / "sharded.json"
    mp.spawn(evaluate_shard, args=(2, str(tmp_path / "init"), str(out), specs, settings), nprocs=2, join=True)
    sharded = json.loads(out.read_text())
    expected = sorted((g.index, g.reply, g.error) for g in single_generations)
    assert [tuple(r) for r in sharded["replies"]] == expected
    assert sharded["codes"] == single.codes
    assert sharded["metrics"] == single.metrics
    assert single.counts["figstep_image"]["skipped"] == 1
    # what is compared varies: replies and verdicts differ from prompt to prompt, figures from set to set
    assert len({reply for _, reply, _ in expected if reply}) >= 2 and len(set(single.metrics["xstest"].values())) > 2


def test_generation_is_greedy_and_batch_independent(module, specs):
    sets = [s for s in load_sets(specs) if s.name in ("demo_text", "demo_typographic")]
    batched = generate_for_rank(module, sets, 0, 1, GenerationSettings(max_new_tokens=5, batch_size=16))
    alone = generate_for_rank(module, sets, 0, 1, GenerationSettings(max_new_tokens=5, batch_size=1))
    assert replies(batched) == replies(alone)
    assert len({g.reply for g in batched}) > 1, "the test needs replies that differ"


def test_sampled_replies_depend_on_prompt_and_seed_not_on_the_batch(module, specs):
    sets = [s for s in load_sets(specs) if s.name.startswith("demo")]
    settings = GenerationSettings(**{**SAMPLED, "batch_size": 1})
    alone = generate_for_rank(module, sets, 0, 1, settings)
    batched = generate_for_rank(module, sets, 0, 1, GenerationSettings(**SAMPLED))
    assert replies(alone) == replies(batched), "batch size 1 and 4 give the same sampled replies"
    reordered = generate_for_rank(module, sets[::-1], 0, 1, GenerationSettings(**SAMPLED))
    by_key = {(g.prompt.set_name, g.prompt.id): g.reply for g in alone}
    assert {(g.prompt.set_name, g.prompt.id): g.reply for g in reordered} == by_key, "other batch neighbours"
    greedy = generate_for_rank(module, sets, 0, 1, GenerationSettings(max_new_tokens=6))
    other_seed = generate_for_rank(module, sets, 0, 1, GenerationSettings(**{**SAMPLED, "seed": 8}))
    assert replies(alone) != replies(greedy) and replies(alone) != replies(other_seed), "it samples, by the seed"


def test_a_protocol_generates_its_sets_with_its_own_settings(module, specs, monkeypatch):
    figstep = load_benchmark(BenchmarkSpec(**{**specs[0], "protocol": "paper"}))
    demo = load_benchmark(BenchmarkSpec("demo", modes=["text"], limit=2))
    seen = []
    real_generate = generation.generate_replies

    def recording(module, samples, settings, keys):
        seen.append((settings.max_new_tokens, settings.do_sample, settings.temperature, len(samples)))
        return real_generate(module, samples, GenerationSettings(max_new_tokens=2), keys)

    monkeypatch.setattr(generation, "generate_replies", recording)
    generate_for_rank(module, figstep + demo, 0, 1, GenerationSettings(max_new_tokens=3, batch_size=8))
    assert seen == [(512, True, 0.2, 4), (3, False, 1.0, 2)], "FigStep's image set apart from the demo set"


def test_bad_generation_settings_are_rejected():
    with pytest.raises(ValueError, match="temperature > 0"):
        GenerationSettings(do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        GenerationSettings(top_p=1.5)
    with pytest.raises(ValueError, match="max_new_tokens and batch_size"):
        GenerationSettings(max_new_tokens=0)


def test_min_new_tokens_is_validated_and_recorded():
    with pytest.raises(ValueError, match=r"min_new_tokens must be in \[0, max_new_tokens=4\], got 5"):
        GenerationSettings(max_new_tokens=4, min_new_tokens=5)
    with pytest.raises(ValueError, match="got -1"):
        GenerationSettings(min_new_tokens=-1)
    assert GenerationSettings(min_new_tokens=1).as_dict()["min_new_tokens"] == 1
    assert GenerationSettings().min_new_tokens == 0


def test_min_new_tokens_keeps_a_stop_token_from_ending_the_reply_early(module):
    """The tiny model's first greedy token is made a stop token: the reply ends at once, unless min_new_tokens
    forbids stopping before that many tokens (the assembled model's generate passes it on to transformers')."""
    processor = module.processor
    sample = processor.prompt("a", "Describe the picture.", None)
    batch = processor.collate([sample], "left")
    first = int(module.model.generate(**batch.generation_inputs(), max_new_tokens=1)[0, 0])
    original = list(processor.stop_token_ids)
    processor.stop_token_ids = [*original, first]
    try:
        lengths = {}
        for minimum in (0, 3):
            out = module.model.generate(
                **batch.generation_inputs(), max_new_tokens=5, min_new_tokens=minimum, eos_token_id=[first]
            )
            lengths[minimum] = out.shape[1]
        assert lengths[0] == 1 and lengths[3] >= 4
        plain = generation.generate_replies(module, [sample], GenerationSettings(max_new_tokens=5), ["a"])[0]
        forced = generation.generate_replies(module, [sample], GenerationSettings(5, min_new_tokens=3), ["a"])[0]
        assert plain.text == processor.tokenizer.decode([first], skip_special_tokens=True).strip()
        assert forced.text != plain.text, "the stop token could not end the reply at once"
    finally:
        processor.stop_token_ids = original


def test_paper_view_is_the_papers_slice_of_bos_reply_and_eos():
    """``decode(output_ids[0]).strip()[4:-4]`` with LLaVA's output ids: BOS, the reply's tokens, EOS."""
    from types import SimpleNamespace

    from test_conversation import sentencepiece_llama_tokenizer

    tokenizer = sentencepiece_llama_tokenizer(legacy=False)
    reply = tokenizer("I cannot do so.", add_special_tokens=False).input_ids
    eos, pad = tokenizer.eos_token_id, tokenizer.unk_token_id
    assert tokenizer.decode([tokenizer.bos_token_id, *reply, eos]) == "<s> I cannot do so.</s>"
    # "<s> " and "</s>" are what the slice drops; padding after the EOS is no part of the output
    assert generation.paper_view(tokenizer, [*reply, eos, pad, pad], [eos]) == "I cannot do so."
    # a reply cut at max_new_tokens has no EOS: the slice eats its last four characters
    assert generation.paper_view(tokenizer, reply, [eos]) == "I cannot do"
    # without a BOS (a tokenizer that has none) it eats the reply's first four: "I cannot" loses its marker
    no_bos = SimpleNamespace(bos_token_id=None, decode=tokenizer.decode)
    assert generation.paper_view(no_bos, [*reply, eos], [eos]) == "nnot do so."
    assert KeywordJudge("paper").outcome("nnot do so.") == 2  # PARTIAL: 3 words, no marker


def test_only_sets_whose_protocol_asks_carry_the_paper_view(module, specs):
    figstep = load_benchmark(BenchmarkSpec(**{**specs[0], "protocol": "paper"}))
    demo = load_benchmark(BenchmarkSpec("demo", modes=["text"], limit=2))
    out = generate_for_rank(module, figstep + demo, 0, 1, GenerationSettings(max_new_tokens=3, batch_size=8))
    views = {g.prompt.set_name: g.paper_view for g in out if g.reply is not None}
    assert isinstance(views["figstep_image"], str) and views["demo_text"] is None
