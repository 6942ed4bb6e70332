"""Vision encoders that turn images into a sequence of patch tokens for the projector."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from PIL import Image
from torch import nn

_OPEN_CLIP_CONFIGS = Path(__file__).parent / "open_clip_configs"
open_clip.add_model_config(_OPEN_CLIP_CONFIGS)


@dataclass
class VisionConfig:
    """Which vision tower to use and which of its hidden states feed the projector."""

    name: str = "ViT-L-14-336"
    """open_clip model name (``open_clip.list_models()``; this project adds ``tiny-vit``)."""
    pretrained: str | None = None
    """open_clip pretrained tag or local checkpoint path; ``None`` keeps random weights (tests, demo)."""
    select_layer: int = -2
    """Hidden state to take, LLaVA's ``mm_vision_select_layer``: -1 is the last block's output, -2 the one before."""
    keep_cls: bool = False
    """Keep the class token in front of the patch tokens (LLaVA-1.5 drops it)."""

    def __post_init__(self) -> None:
        if self.name not in open_clip.list_models():
            raise ValueError(
                f"unknown open_clip vision model {self.name!r}; choose one of open_clip.list_models(), "
                "e.g. 'ViT-L-14-336' or this project's 'tiny-vit'"
            )
        if self.select_layer == 0:
            raise ValueError("vision.select_layer=0 would select the patch embeddings; use a negative block index")


class OpenClipVisionEncoder(nn.Module):
    """The image tower of an open_clip model, returning the patch tokens of one transformer block.

    Only the visual tower is kept: the text tower of the CLIP model is never used by the MLLM.
    """

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        clip = open_clip.create_model(
            config.name, pretrained=config.pretrained, load_weights=config.pretrained is not None
        )
        self.visual = clip.visual
        self.config = config
        num_blocks = len(self.visual.transformer.resblocks)
        # hidden_states[k] of a HF/LLaVA tower is block k-1's output (hidden_states[0] is the patch embedding).
        self.block_index = num_blocks + config.select_layer if config.select_layer < 0 else config.select_layer - 1
        if not 0 <= self.block_index < num_blocks:
            raise ValueError(
                f"vision.select_layer={config.select_layer} is outside the {num_blocks} blocks of {config.name}"
            )
        # Blocks after the selected one never contribute: drop them so they take no memory and no compute.
        self.visual.transformer.resblocks = self.visual.transformer.resblocks[: self.block_index + 1]
        self.visual.proj = None
        self.image_transform: Callable[[Image.Image], torch.Tensor] = open_clip.image_transform(
            self.visual.preprocess_cfg["size"] if hasattr(self.visual, "preprocess_cfg") else self.visual.image_size,
            is_train=False,
            mean=self.visual.image_mean,
            std=self.visual.image_std,
        )
        grid = self.visual.grid_size
        self.num_tokens = grid[0] * grid[1] + (1 if config.keep_cls else 0)
        self.hidden_size = self.visual.transformer.width

    @property
    def image_size(self) -> tuple[int, int]:
        size = self.visual.image_size
        return (size, size) if isinstance(size, int) else tuple(size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> ``(B, num_tokens, hidden_size)``."""
        out = self.visual.forward_intermediates(
            pixel_values,
            indices=[self.block_index],
            intermediates_only=True,
            output_fmt="NLC",
            output_extra_tokens=self.config.keep_cls,
        )
        tokens = out["image_intermediates"][0]
        if self.config.keep_cls:
            tokens = torch.cat([out["image_intermediates_prefix"][0], tokens], dim=1)
        return tokens
