import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import pytest  # noqa: E402
import torch  # noqa: E402

from mllm_safety.model.llm import LLMConfig, load_llm, load_tokenizer  # noqa: E402

TINY_LLM = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 16,
}


@pytest.fixture(scope="session")
def tokenizer():
    """SmolLM2-135M-Instruct's real tokenizer and chat template (bundled, no download)."""
    return load_tokenizer(LLMConfig())


@pytest.fixture
def tiny_llm(tokenizer):
    torch.manual_seed(0)
    return load_llm(LLMConfig(random_init=TINY_LLM), tokenizer, dtype=torch.float32).eval()
