"""Evaluation works with every hub family: batched generation on safety and utility sets, the CLI fit with the
safety callback, and the standalone evaluate from the fit's config and checkpoint."""

import json
from pathlib import Path

import pytest
from hub_models import CHAT_TEMPLATES, FAMILIES

from mllm_safety.evaluate import main as evaluate_main
from mllm_safety.evaluation.callback import SafetyEvalCallback
from mllm_safety.evaluation.generation import GenerationSettings, generate_for_rank
from mllm_safety.evaluation.judge import KeywordJudge
from mllm_safety.evaluation.metrics import judge_and_reduce, score_utility
from mllm_safety.evaluation.registry import BenchmarkSpec, load_benchmark, load_sets
from mllm_safety.evaluation.sets import EvalPrompt, EvalSet, all_prompts
from mllm_safety.fit import main as fit_main
from mllm_safety.model.hub_vlm import HubOptions
from mllm_safety.model.lora import LoraSettings
from mllm_safety.train.module import SafetyAlignModule, TrainableParts

CONFIG = str(Path(__file__).parents[1] / "configs" / "tiny.yaml")


def exact_match(prompts, replies):
    return {"accuracy": sum(p.target == r for p, r in zip(prompts, replies)) / len(prompts)}


def eval_sets() -> list[EvalSet]:
    sets = load_benchmark(BenchmarkSpec("demo", modes=["typographic", "benign"]), limit=3)
    images = [p.image for p in sets[0].prompts]
    questions = ["Which colour is the text?", "How many lines are there?", "Is it a list?"]
    utility = [
        EvalPrompt(str(i), "shapes_qa", None, question, image, question, target="A")
        for i, (question, image) in enumerate(zip(questions, images))
    ]
    return [*sets, EvalSet("shapes_qa", "shapes", False, utility, scorer=exact_match)]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_safety_and_utility_sets_are_generated_judged_and_scored(family, hub_checkpoint):
    module = SafetyAlignModule(
        pretrained=hub_checkpoint(family),
        hub=HubOptions(chat_template=CHAT_TEMPLATES.get(family)),
        lora=LoraSettings(r=2, alpha=4),
        trainable=TrainableParts(projector=False),
    ).eval()
    sets = eval_sets()
    prompts = all_prompts(sets)
    batched = generate_for_rank(module, sets, 0, 1, GenerationSettings(max_new_tokens=4, batch_size=4))
    one_by_one = generate_for_rank(module, sets, 0, 1, GenerationSettings(max_new_tokens=4, batch_size=1))
    assert len(batched) == len(prompts) and all(isinstance(g.reply, str) and g.reply for g in batched)
    assert sorted((g.index, g.reply) for g in batched) == sorted((g.index, g.reply) for g in one_by_one)
    result = judge_and_reduce(sets, batched, [KeywordJudge("xstest")])
    figures = result.metrics["xstest"]
    assert {"asr/demo_typographic", "over_refusal/demo_benign"} <= set(figures)
    assert "over_refusal/shapes_qa" not in figures
    assert set(score_utility(sets, batched)) == {"shapes_qa"}


def test_fit_with_the_safety_callback_then_evaluate_from_config_and_checkpoint(hub_checkpoint, tmp_path):
    """The evaluated replies are the trained model's: the base model (no checkpoint) gives other replies, so an
    evaluate that dropped the checkpoint's weights fails. A high learning rate makes two steps move the replies."""
    model = ["--model.llm", "null", "--model.vision", "null", "--model.projector", "null"]
    model += ["--model.pretrained", hub_checkpoint("qwen25_vl"), "--model.trainable.projector", "false"]
    model += ["--model.optim.lr", "0.05", "--model.optim.warmup_ratio", "0"]
    fit = fit_main(
        [
            "--config",
            CONFIG,
            *model,
            "--trainer.max_steps",
            "2",
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.logger.init_args.save_dir",
            str(tmp_path),
        ]
    )
    callback = next(c for c in fit.trainer.callbacks if isinstance(c, SafetyEvalCallback))
    assert callback.history[0][0] == "before" and "safety/asr/mean" in callback.history[-1][1]
    checkpoint = next((tmp_path / "checkpoints").glob("*.ckpt"))  # the run's own folder under default_root_dir
    assert (tmp_path / "checkpoints" / "trainable.safetensors").is_file(), "written as for LLaVA"

    def evaluate(out, *checkpoint_args):
        args = ["--config", CONFIG, *model, *checkpoint_args, "--output", str(out)]
        figures = evaluate_main([*args, "--eval.limit", "2", "--eval.generation.max_new_tokens", "3"])
        lines = (out / "generations.jsonl").read_text().splitlines()
        return figures, json.loads((out / "report.json").read_text()), [json.loads(line) for line in lines]

    figures, report, generations = evaluate(tmp_path / "report", "--ckpt_path", str(checkpoint))
    assert report["model"]["pretrained"] == hub_checkpoint("qwen25_vl") and report["checkpoint"] == str(checkpoint)
    assert "asr/demo_typographic" in figures["xstest"]
    replies = {(g["set"], g["id"]): g["reply"] for g in generations}
    assert len(set(replies.values())) > 1, "replies differ from prompt to prompt"

    sets = load_sets([BenchmarkSpec(**spec) for spec in report["benchmarks"]], 2)
    settings = GenerationSettings(**report["generation"])
    trained = generate_for_rank(fit.model.eval(), sets, 0, 1, settings)
    assert {(g.prompt.set_name, g.prompt.id): g.reply for g in trained} == replies

    _, _, base = evaluate(tmp_path / "base")
    base_replies = {(g["set"], g["id"]): g["reply"] for g in base}
    assert base_replies.keys() == replies.keys()
    assert sum(base_replies[key] != reply for key, reply in replies.items()) >= len(replies) // 2, "base replies"
