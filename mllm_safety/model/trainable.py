"""The one home of trainable weights: which they are, gathering them, saving and loading them, and what must match.

A 7B LLaVA with LoRA r=128 trains ~340M of ~7B parameters. Checkpoints (Lightning's and ``trainable.safetensors``)
hold only those; the frozen rest is rebuilt from the config. Two rules keep that honest:

- every way weights come back (resume under DDP or FSDP2, ``evaluate``, ``load_trainable``) applies
  :func:`check_weight_names`: the source holds every trainable weight of the model and nothing the model lacks;
- frozen parts rebuilt rather than loaded (a random demo vision tower, a random test LLM) are recorded by
  :func:`fingerprint` (shapes and a SHA-256 of their values) and compared by :func:`check_fingerprints`, so a trained
  projector is never paired with a different tower.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Collection, Iterable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from mllm_safety.model.lora import LoraSettings

FORMAT = "mllm_safety.trainable/1"
"""Recorded in the file's metadata, so a foreign safetensors file is refused with a clear message."""
FINGERPRINTS_KEY = "frozen_fingerprints"
"""Where a checkpoint (Lightning's, or a trainable-weights file's metadata) records the fingerprints of the frozen
parts rebuilt from the config."""

Fingerprints = dict[str, dict[str, Any]]
"""``{part: {"shapes": {name: shape}, "sha256": hex}}`` of frozen parts rebuilt from their config."""


def parameter_counts(model: nn.Module) -> dict[str, tuple[int, int]]:
    """``{part: (trainable, total)}`` for each part of ``model`` (vision, projector, llm) and ``"all"``; shared
    tensors count once."""
    parts = model.parameter_parts()
    counts: dict[str, list[int]] = {}
    for name, param in model.named_parameters():
        for part in (parts[name], "all"):
            count = counts.setdefault(part, [0, 0])
            count[0] += param.numel() if param.requires_grad else 0
            count[1] += param.numel()
    return {part: (count[0], count[1]) for part, count in sorted(counts.items(), key=lambda kv: kv[0] == "all")}


def format_parameter_counts(counts: dict[str, tuple[int, int]]) -> str:
    return ", ".join(
        f"{part} {trainable:,} of {total:,} trainable ({100 * trainable / max(total, 1):.2f}%)"
        for part, (trainable, total) in counts.items()
    )


def trainable_names(model: nn.Module) -> set[str]:
    """Names of the parameters that learn: what every checkpoint of ``model`` holds."""
    return {name for name, param in model.named_parameters() if param.requires_grad}


def keep_trainable(state: Mapping[str, Any], model: nn.Module) -> dict[str, Any]:
    """The entries of a state dict of ``model`` that are trainable weights."""
    names = trainable_names(model)
    return {name: value for name, value in state.items() if name in names}


def trainable_state_dict(model: nn.Module, full: bool = True, include: Collection[str] = ()) -> dict[str, torch.Tensor]:
    """The trainable weights of ``model``, and the frozen ones named in ``include`` (weights a run started from, which
    its output must carry on); other frozen weights are never copied.

    ``full``: whole tensors on the CPU of rank 0 (a single process is rank 0; other ranks get nothing). Sharded
    weights are gathered to rank 0 only, one at a time (torch's ``get_model_state_dict`` with full state and CPU
    offload), so every rank must call this. Otherwise: each rank's own shards (a sharded checkpoint). With ``include``
    the frozen weights are gathered too (torch cannot pick single frozen ones), then dropped.
    """
    options = StateDictOptions(full_state_dict=full, cpu_offload=full, ignore_frozen_params=not include)
    state = get_model_state_dict(model, options=options)
    names = trainable_names(model) | set(include)
    return {name: value for name, value in state.items() if name in names}


def check_weight_names(
    source: str | Path, names: Iterable[str], model: nn.Module, require_every_trainable: bool = True
) -> None:
    """The rule for every way weights come back: ``source`` must hold every trainable weight of ``model`` (else it
    would keep its initial values silently) and only weights ``model`` has (else they would be dropped silently).
    Frozen weights of ``model`` may be present too; they are loaded like the rest. ``require_every_trainable=False``
    is for a bare base model (an export), which is not set up for training: what would learn there is unknown."""
    names = set(names)
    known = set(_tensors(model))
    if unknown := sorted(names - known):
        raise ValueError(
            f"{source} holds {len(unknown)} weight(s) the model does not have, e.g. {unknown[:3]}; was it written "
            "for another architecture or LoRA target set?"
        )
    if require_every_trainable and (missing := sorted(trainable_names(model) - names)):
        raise ValueError(
            f"{source} lacks {len(missing)} trainable weight(s) of the model, e.g. {missing[:3]}; was it written "
            "with other trainable parts or LoRA settings?"
        )


def load_weights(
    model: nn.Module, state: Mapping[str, torch.Tensor], source: str | Path, require_every_trainable: bool = True
) -> list[str]:
    """Copy ``state`` into ``model`` after :func:`check_weight_names`; every tensor must have its weight's shape."""
    check_weight_names(source, state, model, require_every_trainable)
    tensors = _tensors(model)
    for name, value in state.items():
        target = tensors[name]
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(
                f"{source}: {name} has shape {tuple(value.shape)} but the model expects {tuple(target.shape)} "
                "(vision or LLM hidden sizes differ from the model it was trained with)"
            )
        with torch.no_grad():
            target.copy_(value.to(target.dtype))
    return sorted(state)


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer by name, tied ones (an LM head sharing the embeddings) under each of their names."""
    return dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))


def fingerprint(module: nn.Module, names: Collection[str] | None = None) -> dict[str, Any] | None:
    """Shapes and a SHA-256 of the frozen weights of ``module``, or of the weights ``names`` (those a recorded
    fingerprint covered: a part may have trained then and be frozen now); ``None`` on the meta device."""
    frozen = [(n, p) for n, p in module.named_parameters() if (not p.requires_grad if names is None else n in names)]
    if any(p.is_meta for _, p in frozen):
        return None
    digest = hashlib.sha256()
    shapes = {}
    for name, param in frozen:
        tensor = param.detach()
        if hasattr(tensor, "full_tensor"):
            tensor = tensor.full_tensor()
        tensor = tensor.cpu().contiguous()
        shapes[name] = list(tensor.shape)
        digest.update(f"{name}:{tensor.dtype}:".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return {"shapes": shapes, "sha256": digest.hexdigest()}


def fingerprints(model: nn.Module, parts: Iterable[str]) -> Fingerprints:
    """:func:`fingerprint` of each named submodule of ``model`` (parts on the meta device are left out)."""
    found = {part: fingerprint(model.get_submodule(part)) for part in parts}
    return {part: value for part, value in found.items() if value is not None}


def check_fingerprints(recorded: Fingerprints | None, model: nn.Module, source: str | Path) -> None:
    """Stop when a frozen part of ``model`` differs from the one ``source`` was trained with."""
    for part, expected in (recorded or {}).items():
        actual = fingerprint(model.get_submodule(part), names=set(expected["shapes"]))
        if actual is None or actual == expected:
            continue
        if actual["shapes"] != expected["shapes"]:
            differ = sorted(
                name
                for name in set(actual["shapes"]) | set(expected["shapes"])
                if actual["shapes"].get(name) != expected["shapes"].get(name)
            )
            detail = f"its weights differ in name or shape, e.g. {differ[:3]}"
        else:
            now, then = actual["sha256"][:12], expected["sha256"][:12]
            detail = f"its weights have other values (sha256 {now}..., trained with {then}...)"
        raise ValueError(
            f"{source} was trained with another frozen '{part}' than this model's: {detail}. It is rebuilt from "
            "the config, not loaded: use the run's config and seed (and the same torch / open_clip versions)"
        )


def save_trainable(
    path: str | Path,
    state: Mapping[str, torch.Tensor],
    lora: LoraSettings | None = None,
    chat_template: str | None = None,
    frozen: Fingerprints | None = None,
) -> None:
    """Write trainable weights (:func:`trainable_state_dict`) to one safetensors file, atomically.

    ``lora`` and ``chat_template`` go into the metadata (:func:`load_trainable` re-creates the adapters from the
    first, an export writes the second), and so do the ``frozen`` fingerprints.
    """
    if not state:
        raise ValueError(f"nothing to save to {path}: no parameter requires a gradient")
    metadata = {"format": FORMAT}
    if lora is not None:
        metadata["lora"] = json.dumps(asdict(lora))
    if chat_template is not None:
        metadata["chat_template"] = chat_template
    if frozen:
        metadata[FINGERPRINTS_KEY] = json.dumps(frozen)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({name: tensor.contiguous() for name, tensor in state.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def read_trainable_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a trainable-weights file; an error naming ``path`` for anything else."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"trainable-weights file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except SafetensorError as error:
        raise ValueError(f"{path} is not a safetensors file: {error}") from error
    if metadata.get("format") != FORMAT:
        raise ValueError(
            f"{path} is not a trainable-weights file of this project (metadata format "
            f"{metadata.get('format')!r}, expected {FORMAT!r})"
        )
    return metadata


def load_trainable(model: nn.Module, path: str | Path, require_every_trainable: bool = True) -> list[str]:
    """Put the weights of a trainable-weights file back into ``model``; returns the names loaded.

    ``model`` is the base model the run started from (same architecture, e.g. ``load_llava_hf`` of the same
    checkpoint) or the training module's model. When the file holds LoRA adapters and the model has none yet,
    they are created (``model.add_lora``) from the settings recorded in the file. Rebuilt frozen parts must match
    the fingerprints the file records. ``require_every_trainable``: see :func:`check_weight_names`.
    """
    metadata = read_trainable_metadata(path)
    with safe_open(str(path), framework="pt") as f:
        state = {name: f.get_tensor(name) for name in f.keys()}
    has_lora = any(".lora_" in name for name, _ in model.named_parameters())
    if any(".lora_" in name for name in state) and not has_lora:
        if "lora" not in metadata:
            raise ValueError(f"{path} holds LoRA weights but no LoRA settings to re-create the adapters")
        model.add_lora(LoraSettings(**json.loads(metadata["lora"])))
    loaded = load_weights(model, state, path, require_every_trainable)
    # after loading: a file that carries a frozen part's weights (a world stage's output) matches by construction
    check_fingerprints(json.loads(metadata.get(FINGERPRINTS_KEY, "{}")), model, path)
    return loaded
