"""Where a model's weights are created when it is built for a device.

A rank builds its model inside ``torch.device(<its device>)`` (the entry points do; see ``mllm_safety.cli``). Weights
read from a checkpoint then go straight to that device, tensor by tensor from the memory-mapped files, so a rank never
holds a second full copy of an 8B model in host memory; weights drawn at random (a fresh projector, LoRA adapters, the
tests' random towers) are drawn on the CPU, so that a seed gives the same values whatever the device, and Lightning
moves them with the rest.
"""

from __future__ import annotations

from typing import Any

import torch


def context_device() -> torch.device:
    """The device of the enclosing ``torch.device(...)`` context (or of ``torch.set_default_device``); the CPU
    without one."""
    return torch.empty(0).device


def random_init_device(device: torch.device) -> torch.device:
    """Where random weights are drawn for a model built for ``device``: the CPU (CUDA's generator draws other numbers
    from the same seed), except on the meta device, where nothing is allocated (dry runs)."""
    return device if device.type == "meta" else torch.device("cpu")


def load_onto(device: torch.device | None) -> dict[str, Any]:
    """``from_pretrained`` arguments that load every weight straight onto ``device``; none for the CPU."""
    if device is None or device.type == "cpu":
        return {}
    return {"device_map": {"": device}}
