"""Sampling seeded per prompt: exact samples of the warped distribution, whatever the batch."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mllm_safety.evaluation.sampling import PerRowGumbelNoise, row_seed, sampling_processors

ROOT = Path(__file__).parents[1]


def sample(scores: torch.Tensor, seeds: list[int], steps: int = 1, **warp) -> list[list[int]]:
    processors = sampling_processors(seeds, **({"temperature": 1.0, "top_k": None, "top_p": 1.0} | warp))
    out = []
    for _ in range(steps):
        out.append(processors(torch.zeros((len(seeds), 1), dtype=torch.long), scores.clone()).argmax(-1).tolist())
    return [list(row) for row in zip(*out)]


KEYS = [(0, "demo_text/a"), (1, "demo_text/a"), (0, "demo_text/b"), (123, "x")]


def test_row_seeds_are_the_same_in_every_process_and_distinct():
    """Ranks and reruns are separate processes: two interpreters with other string-hash seeds give the same seeds."""
    here = [row_seed(seed, key) for seed, key in KEYS]
    assert len(set(here)) == len(KEYS) and all(0 <= s < 2**63 for s in here)
    code = f"from mllm_safety.evaluation.sampling import row_seed; print([row_seed(s, k) for s, k in {KEYS!r}])"
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.PIPE,
            text=True,
        )
        for hash_seed in ("1", "2")
    ]
    outputs = [run.communicate(timeout=120)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0]
    assert [ast.literal_eval(out) for out in outputs] == [here, here]


def test_gumbel_max_samples_the_softmax():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    scores = probs.log().expand(4000, 4)
    drawn = torch.tensor(sample(scores, list(range(4000)))).flatten()
    frequency = torch.bincount(drawn, minlength=4).float() / len(drawn)
    assert torch.allclose(frequency, probs, atol=0.025), frequency


def test_temperature_top_k_and_top_p_shape_the_distribution():
    scores = torch.tensor([2.0, 1.0, 0.5, 0.0]).expand(2000, 4)
    seeds = list(range(2000))
    cold = torch.tensor(sample(scores, seeds, temperature=0.2)).flatten()
    assert (cold == 0).float().mean() > 0.99, "temperature 0.2 is nearly greedy"
    assert set(torch.tensor(sample(scores, seeds, top_k=2)).flatten().tolist()) == {0, 1}
    nucleus = set(torch.tensor(sample(scores, seeds, top_p=0.6)).flatten().tolist())
    assert nucleus == {0, 1}, "softmax [.58 .21 .13 .08]: top-p 0.6 keeps the two tokens reaching it"


def test_each_row_draws_from_its_own_generator_whatever_its_neighbours():
    scores = torch.zeros(3, 50)
    together = sample(scores, [11, 12, 13], steps=5)
    alone = [sample(scores[:1], [seed], steps=5)[0] for seed in (11, 12, 13)]
    assert together == alone
    assert len({tuple(row) for row in together}) == 3


def test_a_batch_of_another_size_is_an_error():
    with pytest.raises(ValueError, match="3 rows of scores for 2 seeded rows"):
        PerRowGumbelNoise([1, 2])(torch.zeros((3, 1), dtype=torch.long), torch.zeros(3, 5))
