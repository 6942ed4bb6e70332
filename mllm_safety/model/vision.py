"""Vision encoders that turn images into a sequence of patch tokens for the projector.

Two backends: open_clip towers (``OpenClipVisionEncoder``) and Hugging Face ``CLIPVisionModel`` /
``SiglipVisionModel`` towers (``HFVisionEncoder``). Each carries the image preprocessing of its checkpoint, optionally
preceded by LLaVA-1.5's pad-to-square.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import open_clip
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image
from torch import nn
from transformers import AutoConfig, AutoImageProcessor, CLIPVisionModel, PreTrainedModel, SiglipVisionModel

from mllm_safety.model.placement import load_onto

_OPEN_CLIP_CONFIGS = Path(__file__).parent / "open_clip_configs"
open_clip.add_model_config(_OPEN_CLIP_CONFIGS)

ImageAspectRatio = Literal["pad", "crop"]

# model_type in a checkpoint's config.json -> the class holding its vision tower
HF_VISION_TOWERS: dict[str, type[PreTrainedModel]] = {
    "clip": CLIPVisionModel,
    "clip_vision_model": CLIPVisionModel,
    "siglip": SiglipVisionModel,
    "siglip_vision_model": SiglipVisionModel,
}


@dataclass
class VisionConfig:
    """Which vision tower to use, which of its hidden states feed the projector, and how images are prepared."""

    backend: Literal["open_clip", "hf"] = "open_clip"
    """``open_clip`` (model ``name`` + ``pretrained``) or ``hf`` (a Hugging Face CLIP or SigLIP folder at ``path``)."""
    name: str = "ViT-L-14-336"
    """open_clip model name (``open_clip.list_models()``; this project adds ``tiny-vit``). Only for ``open_clip``."""
    pretrained: str | None = None
    """open_clip pretrained tag or local checkpoint path; ``None`` keeps random weights (tests, demo)."""
    path: str | None = None
    """For ``hf``: a folder (or hub name) with a CLIP or SigLIP checkpoint (full model or vision tower only) and its
    ``preprocessor_config.json``, e.g. ``openai/clip-vit-large-patch14-336``."""
    select_layer: int = -2
    """Hidden state to take, LLaVA's ``mm_vision_select_layer``: -1 is the last block's output, -2 the one before."""
    keep_cls: bool = False
    """Keep the class token in front of the patch tokens (LLaVA-1.5 drops it; SigLIP has none)."""
    image_aspect_ratio: ImageAspectRatio = "pad"
    """``pad``: pad to a square with the mean colour before the backend's preprocessing (LLaVA-1.5's
    ``image_aspect_ratio: pad``); ``crop``: the backend's preprocessing alone (resize the short side, centre crop)."""

    def __post_init__(self) -> None:
        if self.backend == "open_clip":
            if self.path is not None:
                raise ValueError(f"vision.path={self.path!r} is for backend 'hf'; open_clip uses name and pretrained")
            if self.name not in open_clip.list_models():
                raise ValueError(
                    f"unknown open_clip vision model {self.name!r}; choose one of open_clip.list_models(), "
                    "e.g. 'ViT-L-14-336' or this project's 'tiny-vit'"
                )
        elif self.backend == "hf":
            if self.path is None:
                raise ValueError("vision.backend='hf' needs vision.path: a CLIP or SigLIP folder or hub name")
            if self.pretrained is not None:
                raise ValueError(f"vision.pretrained={self.pretrained!r} is for backend 'open_clip'; hf loads path")
        else:
            raise ValueError(f"unknown vision.backend {self.backend!r}; use 'open_clip' or 'hf'")
        if self.select_layer == 0:
            raise ValueError("vision.select_layer=0 would select the patch embeddings; use a negative block index")
        if self.image_aspect_ratio not in ("pad", "crop"):
            raise ValueError(f"unknown vision.image_aspect_ratio {self.image_aspect_ratio!r}; use 'pad' or 'crop'")


def expand_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """Pad the short side evenly to make a square, LLaVA-1.5's ``expand2square`` (no content is cropped away)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new(image.mode, (side, side), fill)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


def mean_colour(mean: Sequence[float]) -> tuple[int, int, int]:
    """The normalisation mean as an RGB fill colour: padding then becomes zeros after normalisation."""
    return tuple(int(channel * 255) for channel in mean)


class ImageTransform:
    """PIL image -> ``(3, H, W)`` tensor: optional pad-to-square, then the backend's own preprocessing.

    A plain class (not a closure) so data-loader workers can pickle it.
    """

    def __init__(
        self, preprocess: Callable[[Image.Image], torch.Tensor], aspect_ratio: ImageAspectRatio, mean: Sequence[float]
    ) -> None:
        self.preprocess = preprocess
        self.aspect_ratio = aspect_ratio
        self.fill = mean_colour(mean)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = image.convert("RGB")
        if self.aspect_ratio == "pad":
            image = expand_to_square(image, self.fill)
        return self.preprocess(image)

    def split_with(
        self, splitter: Callable[[Callable], tuple[Callable, Callable] | None]
    ) -> tuple[Callable, Callable] | None:
        """``(this transform up to splitter's cut, the rest)``, or ``None`` where ``splitter`` cannot cut the
        preprocessing: lets the data pipeline run the tensor steps on the device
        (:func:`mllm_safety.data.processor.split_at_to_tensor`)."""
        parts = splitter(self.preprocess)
        if parts is None:
            return None
        head = copy.copy(self)
        head.preprocess = parts[0]
        return head, parts[1]


class HFImagePreprocess:
    """Applies a Hugging Face image processor to one image."""

    def __init__(self, image_processor) -> None:
        self.image_processor = image_processor

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.image_processor(images=image, return_tensors="pt")["pixel_values"][0]


def _block_index(select_layer: int, num_blocks: int, what: str) -> int:
    """Index of the transformer block whose output is hidden state ``select_layer`` (HF/LLaVA numbering)."""
    index = num_blocks + select_layer if select_layer < 0 else select_layer - 1
    if not 0 <= index < num_blocks:
        raise ValueError(f"vision.select_layer={select_layer} is outside the {num_blocks} blocks of {what}")
    return index


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
        self.block_index = _block_index(config.select_layer, num_blocks, config.name)
        # Blocks after the selected one never contribute: drop them so they take no memory and no compute.
        self.visual.transformer.resblocks = self.visual.transformer.resblocks[: self.block_index + 1]
        self.visual.proj = None
        preprocess_cfg = PreprocessCfg(**self.visual.preprocess_cfg)
        self.image_transform = ImageTransform(
            image_transform_v2(preprocess_cfg, is_train=False), config.image_aspect_ratio, preprocess_cfg.mean
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


class HFVisionEncoder(nn.Module):
    """A Hugging Face ``CLIPVisionModel`` or ``SiglipVisionModel`` returning the tokens of one hidden state.

    The tower is kept whole (not cut after the selected block) so that it can be written back unchanged into a
    llava-hf checkpoint. Selection follows ``LlavaModel.get_image_features``: ``hidden_states[select_layer]``,
    without the class token unless ``keep_cls``.
    """

    def __init__(
        self,
        tower: PreTrainedModel,
        image_processor,
        select_layer: int = -2,
        keep_cls: bool = False,
        image_aspect_ratio: ImageAspectRatio = "pad",
    ) -> None:
        super().__init__()
        self.tower = tower
        self.image_processor = image_processor
        config = tower.config
        self.has_cls = isinstance(tower, CLIPVisionModel)
        if keep_cls and not self.has_cls:
            raise ValueError(f"vision.keep_cls=true but {type(tower).__name__} has no class token")
        _block_index(select_layer, config.num_hidden_layers, type(tower).__name__)
        self.select_layer = select_layer
        self.keep_cls = keep_cls
        self.image_aspect_ratio = image_aspect_ratio
        grid = config.image_size // config.patch_size
        self.num_tokens = grid * grid + (1 if keep_cls else 0)
        self.hidden_size = config.hidden_size
        self.image_transform = ImageTransform(
            HFImagePreprocess(image_processor), image_aspect_ratio, image_processor.image_mean
        )

    @property
    def image_size(self) -> tuple[int, int]:
        size = self.tower.config.image_size
        return (size, size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> ``(B, num_tokens, hidden_size)``."""
        hidden = self.tower(pixel_values, output_hidden_states=True).hidden_states[self.select_layer]
        return hidden[:, 1:] if self.has_cls and not self.keep_cls else hidden


def load_hf_vision_tower(
    path: str, dtype: torch.dtype = torch.float32, device: torch.device | None = None
) -> PreTrainedModel:
    """The vision tower of a CLIP or SigLIP checkpoint (a full dual-encoder model or a vision-only one), its weights
    read straight onto ``device``."""
    model_type = _config_of(path).model_type
    if model_type not in HF_VISION_TOWERS:
        raise ValueError(
            f"vision.path {path!r} holds a {model_type!r} model; the hf backend reads CLIP or SigLIP "
            f"({', '.join(sorted(HF_VISION_TOWERS))})"
        )
    return HF_VISION_TOWERS[model_type].from_pretrained(path, dtype=dtype, **load_onto(device))


def load_image_processor(path: str):
    try:
        return AutoImageProcessor.from_pretrained(path)
    except OSError as error:
        raise FileNotFoundError(
            f"{path!r} has no image processor config (preprocessor_config.json), which says how to resize and "
            f"normalise images for its vision tower: {error}"
        ) from error


def _config_of(path: str):
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise FileNotFoundError(
            f"{path!r} is not a Hugging Face checkpoint with a readable config.json: {error}"
        ) from error


def build_vision_encoder(
    config: VisionConfig, dtype: torch.dtype = torch.float32, device: torch.device | None = None
) -> nn.Module:
    """The encoder ``config`` describes; both kinds expose ``image_transform``, ``image_size``, ``num_tokens`` and
    ``hidden_size``. A Hugging Face tower's weights are read straight onto ``device``; open_clip reads its checkpoint
    on the CPU (a tower, not the LLM) and Lightning moves it."""
    if config.backend == "open_clip":
        return OpenClipVisionEncoder(config).to(dtype)
    return HFVisionEncoder(
        load_hf_vision_tower(config.path, dtype, device),
        load_image_processor(config.path),
        config.select_layer,
        config.keep_cls,
        config.image_aspect_ratio,
    )
