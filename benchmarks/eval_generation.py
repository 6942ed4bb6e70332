"""Batched vs one-prompt-at-a-time generation for the safety evaluation.

The same prompts (half typographic images, half text, from the bundled demo set) go through the evaluation's
generation twice: in batches (left padding, KV cache) and one at a time, as LLaVA's own evaluation scripts do. The
greedy replies must be identical; the script prints both timings and the speedup.

    PYTHONPATH=. python benchmarks/eval_generation.py [--prompts 32] [--batch_size 16] [--max_new_tokens 64]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch

from mllm_safety.evaluation.generation import GenerationSettings, generate_for_rank
from mllm_safety.evaluation.registry import BenchmarkSpec, load_benchmark
from mllm_safety.evaluation.sets import all_prompts
from mllm_safety.model.llm import LLMConfig
from mllm_safety.model.vision import VisionConfig
from mllm_safety.train.module import LoraSettings, SafetyAlignModule


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=32, help="Prompts, half typographic and half text (even).")
    parser.add_argument("--batch_size", type=int, default=16, help="Prompts per batch in the batched run.")
    parser.add_argument("--max_new_tokens", type=int, default=64, help="Tokens generated per reply at most.")
    parser.add_argument("--llm", default="smollm2-135m-instruct", help="LLM name or folder.")
    parser.add_argument("--vision", default="tiny-vit", help="open_clip vision tower.")
    args = parser.parse_args()
    if args.prompts < 2 or args.prompts % 2:
        parser.error(f"--prompts must be an even number >= 2 (half typographic, half text), got {args.prompts}")

    torch.manual_seed(0)
    module = SafetyAlignModule(
        llm=LLMConfig(name=args.llm), vision=VisionConfig(name=args.vision), lora=LoraSettings(r=16, alpha=32)
    ).eval()
    half = args.prompts // 2
    typographic, text = load_benchmark(BenchmarkSpec("demo", modes=["typographic", "text"]))
    sets = [replace(typographic, prompts=typographic.prompts[:half]), replace(text, prompts=text.prompts[:half])]
    prompts = all_prompts(sets)

    def run(batch_size: int) -> tuple[float, dict[int, str]]:
        start = time.perf_counter()
        settings = GenerationSettings(max_new_tokens=args.max_new_tokens, batch_size=batch_size)
        generations = generate_for_rank(module, sets, 0, 1, settings)
        return time.perf_counter() - start, {g.index: g.reply for g in generations}

    warm_up = [replace(typographic, prompts=typographic.prompts[:2])]  # first-call costs stay out of both timings
    generate_for_rank(module, warm_up, 0, 1, GenerationSettings(max_new_tokens=4, batch_size=2))
    batched_s, batched = run(args.batch_size)
    single_s, single = run(1)
    differ = [i for i in single if single[i] != batched[i]]
    words = sum(len(reply.split()) for reply in single.values())
    print(f"model: {args.llm} + {args.vision}, {torch.get_num_threads()} threads, max_new_tokens {args.max_new_tokens}")
    print(f"prompts: {len(prompts)} ({half} typographic, {half} text); {words} words generated")
    print(f"one at a time:      {single_s:7.1f} s  ({single_s / len(prompts):.2f} s per prompt)")
    print(f"batches of {args.batch_size:<3}:     {batched_s:7.1f} s  ({batched_s / len(prompts):.2f} s per prompt)")
    print(f"speedup:            {single_s / batched_s:7.2f}x")
    assert not differ, f"batched and one-at-a-time greedy replies differ for prompts {differ}"
    print("greedy replies identical: yes")


if __name__ == "__main__":
    main()
