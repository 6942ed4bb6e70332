import atexit
import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# One cache per test session, never the user's ~/.cache/mllm_safety: SmolLM2 is converted into it once (read-only for
# the tests after that), and the planted tiny model (tests/planted.py) and generated demo data are written there.
# Subprocesses (and pytest processes that Lightning relaunches) inherit it. MLLM_SAFETY_TESTS_CACHE names a folder
# to keep between sessions instead (it saves the conversion and the planting, about 45 s on 2 cores).
if "MLLM_SAFETY_TESTS_CACHE" not in os.environ:
    os.environ["MLLM_SAFETY_TESTS_CACHE"] = tempfile.mkdtemp(prefix="mllm-safety-tests-")
    atexit.register(shutil.rmtree, os.environ["MLLM_SAFETY_TESTS_CACHE"], ignore_errors=True)
os.environ["MLLM_SAFETY_CACHE"] = os.environ["MLLM_SAFETY_TESTS_CACHE"]

import pytest  # noqa: E402
import torch  # noqa: E402
from tiny_models import TINY_LLM  # noqa: E402

from mllm_safety.model.llm import LLMConfig, load_llm, load_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    """SmolLM2-135M-Instruct's real tokenizer and chat template (bundled, no download)."""
    return load_tokenizer(LLMConfig())


@pytest.fixture(scope="session")
def planted_weights() -> str:
    """The planted tiny model's weights file (tests/planted.py), built before any subprocess needs it; pass it as
    ``--model.init_weights`` to runs of configs/tiny.yaml."""
    from planted import planted_weights

    return str(planted_weights())


@pytest.fixture
def tiny_llm(tokenizer):
    torch.manual_seed(0)
    return load_llm(LLMConfig(random_init=TINY_LLM), tokenizer, dtype=torch.float32).eval()


# A tiny llava-hf checkpoint: CLIP vision (30 px, 6 px patches -> 25 patch tokens) + Llama text, SmolLM2's tokenizer
# with an added <image> token and llava-hf's own chat template (typed content parts, no system prompt).
LLAVA_HF_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def write_tiny_llava(path, text_overrides=None, image_token=True, seed=0):
    """Save a random tiny LlavaForConditionalGeneration with its processor into ``path``; returns the path."""
    from transformers import (
        AutoTokenizer,
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    from mllm_safety.model.llm import resolve_llm_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_llm_path("smollm2-135m-instruct"))
    if image_token:
        tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    vision = CLIPVisionConfig(
        hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=2, image_size=30, patch_size=6
    )
    text = LlamaConfig(**TINY_LLM, vocab_size=len(tokenizer) + (0 if image_token else 1), pad_token_id=2)
    for key, value in (text_overrides or {}).items():
        setattr(text, key, value)
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=len(tokenizer) - 1 if image_token else len(tokenizer),
        image_seq_length=25,
    )
    torch.manual_seed(seed)
    LlavaForConditionalGeneration(config).save_pretrained(path)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30})
    if image_token:
        processor = LlavaProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=6,
            vision_feature_select_strategy="default",
            chat_template=LLAVA_HF_CHAT_TEMPLATE,
            num_additional_image_tokens=1,
        )
        processor.save_pretrained(path)
    else:
        tokenizer.chat_template = LLAVA_HF_CHAT_TEMPLATE
        tokenizer.save_pretrained(path)
        image_processor.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llava_path(tmp_path_factory):
    return str(write_tiny_llava(tmp_path_factory.mktemp("tiny-llava")))


@pytest.fixture(scope="session")
def hub_checkpoint(tmp_path_factory):
    """``hub_checkpoint(family)``: the folder of a tiny random hub VLM of that family (tests/hub_models.py)."""
    from hub_models import HubCheckpoints

    return HubCheckpoints(tmp_path_factory.mktemp("hub"))
