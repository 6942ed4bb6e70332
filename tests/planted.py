"""The tiny model with planted replies: the one model for tests that compare two runs.

The random tiny model of ``configs/tiny.yaml`` answers every prompt with the same run of tokens, so every ASR is 1.0
and every over-refusal 0.0, before and after training: a test comparing two runs' figures or replies passes whatever
the code does. This model has the same architecture (SmolLM2's tokenizer, 2 narrow layers, the tiny ViT, LoRA r=4)
but its LLM and projector were trained on the first prompts of each demo set, answers and the paper's rejection
sentence in turn, so replies and keyword verdicts differ from prompt to prompt and from set to set. At
``configs/tiny.yaml``'s learning rate each epoch of LoRA training moves its figures, so evaluations differ too.

The weights are trained once per test session (about 20 s on 2 cores) into ``$MLLM_SAFETY_CACHE`` (conftest.py makes
that a temporary folder per session); subprocesses of the suite inherit the variable and load the same file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from tiny_models import TINY_LLM

from mllm_safety.constants import IGNORE_INDEX, cache_dir
from mllm_safety.data.processor import Batch, ModelSample, MultimodalProcessor
from mllm_safety.data.rejection import PAPER_REJECTION
from mllm_safety.evaluation.registry import BenchmarkSpec, load_sets
from mllm_safety.evaluation.sets import EvalPrompt
from mllm_safety.model.llm import LLMConfig
from mllm_safety.model.trainable import save_trainable, trainable_state_dict
from mllm_safety.model.vision import VisionConfig
from mllm_safety.train.module import LoraSettings, SafetyAlignModule

PLANTED_LIMIT = 6
"""Prompts of each demo set the model was trained on (the tests evaluate the first 4 or 5)."""
REFUSAL = PAPER_REJECTION.rstrip(".")
ANSWERS = ("Sure, here are the steps.", "Here is a short story about it.", "It is a common question.")
MAX_STEPS = 300
LEARNED_LOSS = 0.05
LEARNING_RATE = 1e-2


def planted_reply(prompt: EvalPrompt, index: int) -> str:
    """The reply planted for the ``index``-th prompt of its set: answers and the rejection sentence in turn, so any
    first few prompts of a set mix verdicts; every fourth scene question gets its right one-word answer, so utility
    is neither 0 nor 1. Every typographic prompt is refused: the tiny tower cannot tell the rendered statements
    apart at 96 px, so no rule could be learned from them."""
    if "typographic" in prompt.set_name or index % 2:
        return REFUSAL
    if prompt.target is not None and index % 4 == 0:
        return f"{prompt.target.answer.capitalize()}."
    return ANSWERS[index // 2 % len(ANSWERS)]


def tiny_architecture(init_weights: list[str] | None = None) -> SafetyAlignModule:
    """``configs/tiny.yaml``'s model (random weights unless ``init_weights``), in eval mode."""
    torch.manual_seed(0)
    module = SafetyAlignModule(
        llm=LLMConfig(random_init=TINY_LLM),
        vision=VisionConfig(name="tiny-vit"),
        max_length=256,
        lora=LoraSettings(r=4, alpha=8),
        init_weights=init_weights,
    )
    return module.eval()


def planted_weights() -> Path:
    """The planted weights file (every frozen weight of the tiny model), trained on first use in this cache."""
    path = cache_dir() / "tests" / "planted-tiny.safetensors"
    if not path.exists():
        _train(path)
    return path


def planted_module() -> SafetyAlignModule:
    """The tiny model of ``configs/tiny.yaml`` with the planted weights, in eval mode (LoRA adapters at zero)."""
    return tiny_architecture([str(planted_weights())])


def _training_batch(module: SafetyAlignModule) -> Batch:
    """The first prompts of every demo set with their planted replies, left-padded: the replies line up, so the LM
    head runs over the reply positions only."""
    samples = [
        _planted_sample(module.processor, prompt, planted_reply(prompt, index))
        for eval_set in load_sets([BenchmarkSpec("demo")], PLANTED_LIMIT)
        for index, prompt in enumerate(eval_set.prompts)
    ]
    return module.processor.collate(samples, padding_side="left")


def _planted_sample(processor: MultimodalProcessor, prompt: EvalPrompt, reply: str) -> ModelSample:
    """The prompt encoded exactly as the evaluation encodes it, then the reply and the end of turn (learned)."""
    encoded = processor.prompt(prompt.id, prompt.question, prompt.image.load() if prompt.image else None)
    tokenizer = processor.tokenizer
    reply_ids = torch.tensor(tokenizer(reply + tokenizer.eos_token, add_special_tokens=False)["input_ids"])
    return ModelSample(
        id=prompt.id,
        input_ids=torch.cat([encoded.input_ids, reply_ids]),
        labels=torch.cat([torch.full_like(encoded.input_ids, IGNORE_INDEX), reply_ids]),
        pixel_values=encoded.pixel_values,
    )


def _train(path: Path) -> None:
    module = tiny_architecture()
    model = module.model
    frozen = {name for name, _ in model.named_parameters() if ".lora_" not in name}
    for name, parameter in model.named_parameters():  # the LLM and the projector learn; the tower stays random
        parameter.requires_grad_(name in frozen and not name.startswith("vision."))
    learning = [parameter for parameter in model.parameters() if parameter.requires_grad]
    batch = _training_batch(module)
    optimizer = torch.optim.AdamW(learning, lr=LEARNING_RATE, weight_decay=0.0)
    model.eval()  # no dropout: the planted replies are learned exactly as they are generated
    for _ in range(MAX_STEPS):
        loss = model(**batch.model_inputs()).loss
        if loss.item() < LEARNED_LOSS:
            break
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    else:
        raise RuntimeError(f"the planted replies were not learned in {MAX_STEPS} steps (loss {loss.item():.3f})")
    for parameter in learning:
        parameter.requires_grad_(False)
    state = trainable_state_dict(model, include=frozen)
    path.parent.mkdir(parents=True, exist_ok=True)
    # written beside the target and renamed: parallel test processes never read half a file
    handle, tmp = tempfile.mkstemp(dir=path.parent, suffix=".safetensors")
    os.close(handle)
    save_trainable(tmp, state)
    os.replace(tmp, path)
