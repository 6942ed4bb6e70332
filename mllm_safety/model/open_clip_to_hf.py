"""An open_clip ViT tower as a Hugging Face ``CLIPVisionModel``, so an assembled model exports as a llava-hf folder.

open_clip's ``VisionTransformer`` and transformers' ``CLIPVisionModel`` are the same network under other names
(patch convolution without bias, class token, learned positions, ``ln_pre``, pre-norm blocks, ``ln_post``); the one
difference in layout is the fused ``in_proj`` of ``nn.MultiheadAttention``, which is split into ``q_proj``,
``k_proj`` and ``v_proj`` (views, no copies). The tower keeps only the blocks up to the selected one (as the
encoder does), so the HF tower's last hidden state is the selected one (``vision_feature_layer: -1``).

The eval preprocessing of open_clip (resize the short side bicubically, centre crop, normalise) is a
``CLIPImageProcessor`` with the same size, mean and std; the centre crop may differ by a pixel on images whose
excess is odd (torchvision rounds half to even, transformers floors), which pad-to-square (the default) never crops.
Towers with features CLIP does not have (layer scale, attention pooling, patch dropout, other activations) are
refused by name.
"""

from __future__ import annotations

import torch
from open_clip.transformer import ResidualAttentionBlock
from torch import nn
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel
from transformers.image_utils import PILImageResampling

from mllm_safety.model.vision import HFVisionEncoder, OpenClipVisionEncoder

ACTIVATIONS = {nn.GELU: "gelu"}
"""open_clip block activation -> transformers' ``hidden_act`` (QuickGELU is open_clip's own class, below)."""


def _activation(block: ResidualAttentionBlock) -> str:
    act = block.mlp.gelu
    if type(act).__name__ == "QuickGELU":
        return "quick_gelu"
    if type(act) in ACTIVATIONS and getattr(act, "approximate", "none") == "none":
        return ACTIVATIONS[type(act)]
    raise ValueError(f"the open_clip tower's activation {act} has no CLIPVisionModel counterpart")


def _check_plain_clip(encoder: OpenClipVisionEncoder) -> None:
    visual = encoder.visual
    blocks = list(visual.transformer.resblocks)
    unsupported = []
    if not isinstance(visual.patch_dropout, nn.Identity):
        unsupported.append("patch dropout")
    if getattr(visual, "attn_pool", None) is not None:
        unsupported.append("attention pooling")
    if visual.conv1.bias is not None:
        unsupported.append("a patch convolution with bias")
    for block in blocks:
        if not isinstance(block, ResidualAttentionBlock) or not isinstance(block.attn, nn.MultiheadAttention):
            unsupported.append(f"block type {type(block).__name__}")
        elif not (isinstance(block.ls_1, nn.Identity) and isinstance(block.ls_2, nn.Identity)):
            unsupported.append("layer scale")
        elif not isinstance(getattr(block, "ln_attn", nn.Identity()), nn.Identity):
            unsupported.append("a LayerNorm inside attention")
    if unsupported:
        raise ValueError(
            f"the open_clip tower {encoder.config.name!r} has {', '.join(sorted(set(unsupported)))}, which "
            "CLIPVisionModel lacks; it cannot be exported as a llava-hf folder"
        )


def clip_vision_config(encoder: OpenClipVisionEncoder) -> CLIPVisionConfig:
    """The ``CLIPVisionConfig`` of the kept part of ``encoder``'s tower."""
    visual = encoder.visual
    first = visual.transformer.resblocks[0]
    height, width = encoder.image_size
    patch = visual.conv1.kernel_size
    if height != width or patch[0] != patch[1]:
        raise ValueError(f"CLIPVisionModel has square images and patches; {encoder.config.name!r} has {height}x{width}")
    return CLIPVisionConfig(
        hidden_size=visual.transformer.width,
        intermediate_size=first.mlp.c_fc.out_features,
        num_hidden_layers=len(visual.transformer.resblocks),
        num_attention_heads=first.attn.num_heads,
        image_size=height,
        patch_size=patch[0],
        hidden_act=_activation(first),
        layer_norm_eps=first.ln_1.eps,
    )


def clip_vision_tensors(encoder: OpenClipVisionEncoder) -> dict[str, torch.Tensor]:
    """``encoder``'s tower weights under ``CLIPVisionModel``'s names (views of the same storage)."""
    visual = encoder.visual
    tensors = {
        "embeddings.class_embedding": visual.class_embedding,
        "embeddings.patch_embedding.weight": visual.conv1.weight,
        "embeddings.position_embedding.weight": visual.positional_embedding,
        "pre_layrnorm.weight": visual.ln_pre.weight,
        "pre_layrnorm.bias": visual.ln_pre.bias,
        "post_layernorm.weight": visual.ln_post.weight,
        "post_layernorm.bias": visual.ln_post.bias,
    }
    for index, block in enumerate(visual.transformer.resblocks):
        prefix = f"encoder.layers.{index}."
        weights = block.attn.in_proj_weight.chunk(3)
        biases = block.attn.in_proj_bias.chunk(3)
        for name, weight, bias in zip(("q_proj", "k_proj", "v_proj"), weights, biases):
            tensors |= {f"{prefix}self_attn.{name}.weight": weight, f"{prefix}self_attn.{name}.bias": bias}
        pairs = {
            "self_attn.out_proj": block.attn.out_proj,
            "layer_norm1": block.ln_1,
            "layer_norm2": block.ln_2,
            "mlp.fc1": block.mlp.c_fc,
            "mlp.fc2": block.mlp.c_proj,
        }
        for name, module in pairs.items():
            tensors |= {f"{prefix}{name}.weight": module.weight, f"{prefix}{name}.bias": module.bias}
    return {name: tensor.detach() for name, tensor in tensors.items()}


def clip_image_processor(encoder: OpenClipVisionEncoder) -> CLIPImageProcessor:
    """open_clip's eval preprocessing as a ``CLIPImageProcessor``: same size, resampling, mean and std."""
    cfg = encoder.visual.preprocess_cfg
    if cfg.get("resize_mode", "shortest") != "shortest" or cfg.get("interpolation", "bicubic") != "bicubic":
        raise ValueError(
            f"the open_clip tower {encoder.config.name!r} resizes with {cfg.get('resize_mode')}/"
            f"{cfg.get('interpolation')}; CLIPImageProcessor resizes the short side bicubically"
        )
    side = encoder.image_size[0]
    return CLIPImageProcessor(
        size={"shortest_edge": side},
        crop_size={"height": side, "width": side},
        resample=PILImageResampling.BICUBIC,
        image_mean=list(cfg["mean"]),
        image_std=list(cfg["std"]),
    )


def hf_vision_encoder(encoder: OpenClipVisionEncoder) -> HFVisionEncoder:
    """``encoder`` as an :class:`HFVisionEncoder` on a ``CLIPVisionModel`` holding the same tensors: the same tokens
    for the same pixels, and the image processor of the same preprocessing."""
    _check_plain_clip(encoder)
    config = clip_vision_config(encoder)
    tower = CLIPVisionModel(config).to(encoder.visual.conv1.weight.dtype)
    tower.load_state_dict(clip_vision_tensors(encoder), strict=True, assign=True)
    tower.eval()
    return HFVisionEncoder(
        tower, clip_image_processor(encoder), -1, encoder.config.keep_cls, encoder.config.image_aspect_ratio
    )
