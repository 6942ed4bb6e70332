"""Projectors map vision tokens into the LLM's embedding space (LLaVA's ``mm_projector_type``)."""

from __future__ import annotations

import re

from torch import nn

_MLP_GELU = re.compile(r"^mlp(\d+)x_gelu$")


def build_projector(kind: str, vision_size: int, llm_size: int) -> nn.Module:
    """``linear`` (LLaVA-1) or ``mlpNx_gelu``: N linear layers with GELU between (LLaVA-1.5 uses ``mlp2x_gelu``)."""
    if kind == "linear":
        return nn.Linear(vision_size, llm_size)
    match = _MLP_GELU.match(kind)
    if match is None or int(match.group(1)) < 1:
        raise ValueError(f"unknown projector {kind!r}: use 'linear' or 'mlpNx_gelu' with N >= 1, e.g. 'mlp2x_gelu'")
    layers: list[nn.Module] = [nn.Linear(vision_size, llm_size)]
    for _ in range(int(match.group(1)) - 1):
        layers += [nn.GELU(), nn.Linear(llm_size, llm_size)]
    return nn.Sequential(*layers)
