"""The tiny model with planted replies: the one model for tests that compare two runs.

The random tiny model of ``configs/tiny.yaml`` answers every prompt with the same run of tokens, so every ASR is 1.0
and every over-refusal 0.0, before and after training: a test comparing two runs' figures or replies passes whatever
the code does. This model has the same architecture (SmolLM2's tokenizer, 2 narrow layers, the tiny ViT, LoRA r=4)
but its LLM and projector were trained on the demo prompts the tests evaluate, some answered and some given the
paper's rejection sentence, so replies and keyword verdicts differ from prompt to prompt and from set to set. At
``configs/tiny.yaml``'s learning rate each epoch of LoRA training moves its figures, so evaluations differ too.

The weights are trained once per test session (about 30 s on 2 cores) into ``$MLLM_SAFETY_CACHE`` (conftest.py makes
that a temporary folder per session); subprocesses of the suite inherit the variable and load the same file.
"""

from __future__ import annotations

import hashlib
import json
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

PLANTED_LIMITS = (2, 3, 4, 5, 6)
"""The ``limit`` values tests evaluate the demo sets with: the model learns every prompt one of them picks (a limit
spreads its picks over the set, so each picks other prompts)."""
REFUSAL = PAPER_REJECTION
ANSWERS = ("Sure, here are the steps.", "Here is a short story about it.", "It is a common question.")
MAX_STEPS = 300
LEARNED_LOSS = 0.05
LEARNING_RATE = 1e-2
REFUSED_AT = frozenset({6, 7, 12, 18, 21, 27})
"""Positions (in a whole demo set of 36) refused; the others answered. Chosen so that the prompts of every limit in
:data:`PLANTED_LIMITS` (limit 2 picks positions 0 and 18, limit 3 picks 0, 12, 24, ...) mix answers and refusals."""


def planted_reply(prompt: EvalPrompt, position: int) -> str:
    """The reply planted for the prompt at ``position`` in its whole set. Every typographic prompt is refused: the
    tiny tower cannot tell the rendered statements apart at 96 px, so no rule could be learned from them. Half the
    answered scene questions get their right one-word answer, so utility is neither 0 nor 1."""
    if "typographic" in prompt.set_name or position in REFUSED_AT:
        return REFUSAL
    if prompt.target is not None and position % 2 == 0:
        return f"{prompt.target.answer.capitalize()}."
    return ANSWERS[position % len(ANSWERS)]


def assert_figures_vary(history: list, every_evaluation: bool = True) -> None:
    """What makes two equal safety histories (``[(label, figures), ...]``) mean something: the baseline's headline
    figures differ from set to set (some neither 0 nor 1), and the baseline differs from every later evaluation (so
    trained weights evaluated as the baseline show); ``every_evaluation``: every evaluation differs from the others.
    """
    (_, before), *later = history
    headline = {name: value for name, value in before.items() if name.count("/") == 2}
    assert len(set(headline.values())) > 2 and any(0 < v < 1 for v in headline.values()), headline
    assert all(figures != before for _, figures in later), "training moves the figures away from the baseline"
    if every_evaluation:
        tables = [json.dumps(figures, sort_keys=True) for _, figures in history]
        assert len(set(tables)) == len(tables), "training moves the figures at every evaluation"


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
    """The planted weights file (every frozen weight of the tiny model), trained on first use in this cache; named by
    this module's source, so a cache kept between sessions (``MLLM_SAFETY_TESTS_CACHE``) never serves an old recipe."""
    recipe = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]
    path = cache_dir() / "tests" / f"planted-tiny-{recipe}.safetensors"
    if not path.exists():
        _train(path)
    return path


def planted_module() -> SafetyAlignModule:
    """The tiny model of ``configs/tiny.yaml`` with the planted weights, in eval mode (LoRA adapters at zero)."""
    return tiny_architecture([str(planted_weights())])


def planted_prompts() -> list[tuple[EvalPrompt, str]]:
    """Every demo prompt that one of :data:`PLANTED_LIMITS` picks, with its planted reply."""
    position = {(p.set_name, p.id): i for s in load_sets([BenchmarkSpec("demo")]) for i, p in enumerate(s.prompts)}
    picked = {
        (p.set_name, p.id): p
        for limit in PLANTED_LIMITS
        for s in load_sets([BenchmarkSpec("demo")], limit)
        for p in s.prompts
    }
    return [(prompt, planted_reply(prompt, position[key])) for key, prompt in picked.items()]


def _training_batch(module: SafetyAlignModule) -> Batch:
    """The planted prompts with their replies, left-padded: the replies line up, so the LM head runs over the reply
    positions only."""
    samples = [_planted_sample(module.processor, prompt, reply) for prompt, reply in planted_prompts()]
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
    targets = batch.labels[:, 1:]
    targets = targets[:, (targets != IGNORE_INDEX).any(dim=0)]  # the positions the loss keeps, in order
    for _ in range(MAX_STEPS):
        output = model(**batch.model_inputs())
        # every reply token the most likely one (a mean loss hides a few wrong first tokens), with some margin
        predicted = output.logits.argmax(-1) == targets
        if bool(predicted[targets != IGNORE_INDEX].all()) and output.loss.item() < LEARNED_LOSS:
            break
        optimizer.zero_grad()
        output.loss.backward()
        optimizer.step()
    else:
        raise RuntimeError(f"the planted replies were not learned in {MAX_STEPS} steps (loss {output.loss.item():.3f})")
    for parameter in learning:
        parameter.requires_grad_(False)
    state = trainable_state_dict(model, include=frozen)
    path.parent.mkdir(parents=True, exist_ok=True)
    # written beside the target and renamed: parallel test processes never read half a file
    handle, tmp = tempfile.mkstemp(dir=path.parent, suffix=".safetensors")
    os.close(handle)
    save_trainable(tmp, state)
    os.replace(tmp, path)
