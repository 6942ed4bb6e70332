"""Import and export of llava-hf checkpoints (``LlavaForConditionalGeneration``, e.g. ``llava-hf/llava-1.5-7b-hf``).

Import maps the vision tower, ``multi_modal_projector`` and language model of the checkpoint onto a
``MultimodalLM`` (sharing the loaded tensors, nothing is copied); export folds LoRA adapters in and writes a folder
that ``LlavaForConditionalGeneration.from_pretrained`` and ``AutoProcessor.from_pretrained`` (and so vLLM) load.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaImageProcessor,
    LlavaProcessor,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from mllm_safety.constants import IMAGE_PLACEHOLDER
from mllm_safety.data.slot_templates import LLAMAFACTORY_TEMPLATES
from mllm_safety.model.chat_templates import named_chat_template
from mllm_safety.model.export_weights import EXPORT_SHARD_SIZE, fold_and_cast
from mllm_safety.model.lora import named_tensors, plain_named_tensors
from mllm_safety.model.mllm import MultimodalLM
from mllm_safety.model.placement import load_onto
from mllm_safety.model.tokenizer_files import missing_tokenizer_files
from mllm_safety.model.vision import HFVisionEncoder, ImageAspectRatio, load_image_processor


@dataclass
class LlavaHFConfig:
    """A llava-hf checkpoint to start from: it supplies vision tower, projector, LLM, tokenizer and image-token id."""

    path: str
    """Folder or hub name of a ``LlavaForConditionalGeneration`` checkpoint, e.g. ``llava-hf/llava-1.5-7b-hf``."""
    chat_template: str | None = None
    """``None`` keeps the checkpoint's template; ``llava_v1`` is LLaVA-1.5's training format (system prompt,
    ``</s>`` after each reply); any other value is a Jinja template."""
    image_aspect_ratio: ImageAspectRatio = "pad"
    """``pad``: pad images to a square with the mean colour first, as LLaVA-1.5 was trained; ``crop``: the
    checkpoint's image processor alone."""
    load_weights: bool = True
    """``False`` builds the architecture from ``config.json`` without reading weights (dry runs; under
    ``torch.device("meta")`` nothing is allocated)."""
    extra_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for ``from_pretrained`` (e.g. ``attn_implementation: flash_attention_2``)."""

    def __post_init__(self) -> None:
        if self.image_aspect_ratio not in ("pad", "crop"):
            raise ValueError(f"unknown llava.image_aspect_ratio {self.image_aspect_ratio!r}; use 'pad' or 'crop'")


def read_llava_config(path: str) -> LlavaConfig:
    """The checkpoint's ``LlavaConfig``; an error naming ``path`` when it is not a usable LLaVA checkpoint."""
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise FileNotFoundError(
            f"{path!r} is not a LLaVA checkpoint: no readable config.json ({error}). A llava-hf folder holds "
            "config.json, model*.safetensors, the tokenizer files and processor_config.json"
        ) from error
    if not isinstance(config, LlavaConfig):
        raise ValueError(
            f"{path!r} is not a LLaVA checkpoint: config.json has model_type {config.model_type!r}, "
            "expected 'llava' (LlavaForConditionalGeneration)"
        )
    if not isinstance(config.vision_feature_layer, int):
        raise ValueError(
            f"{path!r}: vision_feature_layer={config.vision_feature_layer} concatenates several layers; "
            "only a single layer is supported"
        )
    if config.projector_hidden_act != "gelu":
        raise ValueError(f"{path!r}: projector_hidden_act={config.projector_hidden_act!r}; only 'gelu' is supported")
    return config


def load_llava_hf(
    path: str,
    dtype: torch.dtype | str = torch.float32,
    image_aspect_ratio: ImageAspectRatio = "pad",
    load_weights: bool = True,
    device: torch.device | None = None,
    **from_pretrained_kwargs: Any,
) -> MultimodalLM:
    """A ``MultimodalLM`` made of the checkpoint's parts; input ids use the checkpoint's ``image_token_index``.

    ``dtype`` is a torch dtype or ``"auto"`` (the checkpoint's own); the weights are read straight onto ``device``.
    """
    config = read_llava_config(path)
    if load_weights:
        llava = _from_pretrained(path, dtype, load_onto(device) | from_pretrained_kwargs)
    else:
        llava = LlavaForConditionalGeneration._from_config(config, dtype=_resolve_dtype(dtype, config))
    tower = llava.model.vision_tower
    full = config.vision_feature_select_strategy == "full"
    if not full and not hasattr(tower.embeddings, "class_embedding"):
        raise ValueError(
            f"{path!r}: vision_feature_select_strategy='default' drops the first token, but "
            f"{type(tower).__name__} has no class token; use 'full'"
        )
    image_processor = load_image_processor(path)
    vision = HFVisionEncoder(tower, image_processor, config.vision_feature_layer, full, image_aspect_ratio)
    hf_projector = llava.model.multi_modal_projector
    projector = nn.Sequential(hf_projector.linear_1, nn.GELU(), hf_projector.linear_2)
    return MultimodalLM(vision, projector, _causal_lm(llava), image_token_id=config.image_token_index)


def _from_pretrained(path: str, dtype: torch.dtype | str, kwargs: dict[str, Any]) -> LlavaForConditionalGeneration:
    try:
        llava, info = LlavaForConditionalGeneration.from_pretrained(
            path, dtype=dtype, output_loading_info=True, **kwargs
        )
    except OSError as error:
        raise FileNotFoundError(f"{path!r} is not a LLaVA checkpoint: its weights cannot be read ({error})") from error
    except RuntimeError as error:
        raise ValueError(
            f"{path!r}: the weights do not fit config.json (vision, projector and LLM hidden sizes must agree): {error}"
        ) from error
    missing = sorted(info["missing_keys"])
    if missing:
        raise ValueError(f"{path!r} lacks {len(missing)} weights of a LLaVA model, e.g. {missing[:3]}")
    unexpected = sorted(info["unexpected_keys"])
    if unexpected:
        raise ValueError(
            f"{path!r} holds {len(unexpected)} weights it does not know as a LLaVA model, e.g. {unexpected[:3]}: a "
            "file layout this transformers version does not map"
        )
    return llava


def _resolve_dtype(dtype: torch.dtype | str, config: LlavaConfig) -> torch.dtype:
    if dtype != "auto":
        return dtype
    stored = getattr(config, "dtype", None)
    return getattr(torch, stored) if isinstance(stored, str) else stored or torch.float32


def _causal_lm(llava: LlavaForConditionalGeneration) -> PreTrainedModel:
    """The language model and LM head of ``llava`` as a causal LM (what ``MultimodalLM`` drives), without copies."""
    with torch.device("meta"):
        causal = AutoModelForCausalLM.from_config(llava.config.text_config)
    causal.model = llava.model.language_model
    causal.lm_head = llava.lm_head
    causal.generation_config = llava.generation_config
    return causal


def load_llava_tokenizer(path: str, chat_template: str | None = None) -> PreTrainedTokenizerBase:
    """The checkpoint's tokenizer with its (or the given) chat template; it must know the image token."""
    config = read_llava_config(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, ImportError) as error:
        raise FileNotFoundError(
            missing_tokenizer_files(path) or f"{path!r} has no readable tokenizer: {error}"
        ) from error
    image_token = getattr(tokenizer, "image_token", None) or IMAGE_PLACEHOLDER
    if tokenizer.convert_tokens_to_ids(image_token) != config.image_token_index:
        raise ValueError(
            f"the tokenizer in {path!r} has no {image_token!r} token with id {config.image_token_index} "
            f"(config.json's image_token_index); it maps {image_token!r} to "
            f"{tokenizer.convert_tokens_to_ids(image_token)}"
        )
    if chat_template in LLAMAFACTORY_TEMPLATES:
        raise ValueError(
            f"llava.chat_template={chat_template!r} is a LLaMA-Factory template, tokenized piece by piece: load the "
            "checkpoint with model.pretrained and model.hub.chat_template instead"
        )
    if chat_template is not None:
        tokenizer.chat_template = named_chat_template(chat_template)
    if tokenizer.chat_template is None:
        raise ValueError(f"{path!r} has no chat template (chat_template.jinja); set llava.chat_template")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def save_llava_hf(
    model: MultimodalLM,
    path: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    dtype: torch.dtype | None = None,
) -> None:
    """Write ``model`` (LoRA folded in, in place) with ``tokenizer`` and its chat template as a llava-hf folder.

    Needs a Hugging Face vision tower, an ``mlp2x_gelu`` projector and an image token known to the tokenizer (a
    llava-hf import has all three). With ``image_aspect_ratio='pad'`` the exported image processor pads too, so
    transformers and vLLM see images the way training did. ``dtype`` casts the weights in place (default: as
    stored); ``model`` keeps computing what it computed, and no weight is copied.
    """
    vision, projector = model.vision, model.projector
    if not isinstance(vision, HFVisionEncoder):
        raise ValueError(
            f"save_llava_hf needs a Hugging Face vision tower (vision.backend=hf or a llava-hf import), "
            f"not {type(vision).__name__}"
        )
    kinds = [type(m) for m in projector] if isinstance(projector, nn.Sequential) else [type(projector)]
    if kinds != [nn.Linear, nn.GELU, nn.Linear]:
        raise ValueError(f"llava-hf has an mlp2x_gelu projector (Linear, GELU, Linear); this model's is {kinds}")
    image_token = getattr(tokenizer, "image_token", None) or IMAGE_PLACEHOLDER
    if tokenizer.convert_tokens_to_ids(image_token) != model.image_token_id:
        raise ValueError(
            f"the tokenizer maps {image_token!r} to {tokenizer.convert_tokens_to_ids(image_token)}, but the model's "
            f"image positions use id {model.image_token_id}; export needs the tokenizer the model was trained with"
        )
    fold_and_cast(model, dtype)
    llm = model.llm.get_base_model() if hasattr(model.llm, "get_base_model") else model.llm
    tensors = {f"model.vision_tower.{name}": t for name, t in named_tensors(vision.tower)}
    for index, name in ((0, "linear_1"), (2, "linear_2")):
        tensors |= {f"model.multi_modal_projector.{name}.{k}": t for k, t in named_tensors(projector[index])}
    for name, tensor in plain_named_tensors(llm):
        if name.startswith("model."):
            tensors[f"model.language_model.{name.removeprefix('model.')}"] = tensor
        elif name.startswith("lm_head."):
            tensors[name] = tensor
        else:
            raise ValueError(f"the language model has a weight {name!r} outside model.* and lm_head.*")

    text_config = llm.config
    config = LlavaConfig(
        vision_config=vision.tower.config.to_dict(),
        text_config=text_config.to_dict(),
        image_token_index=model.image_token_id,
        image_seq_length=vision.num_tokens,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="full" if vision.keep_cls or not vision.has_cls else "default",
        vision_feature_layer=vision.select_layer,
        multimodal_projector_bias=projector[0].bias is not None,
        tie_word_embeddings=text_config.tie_word_embeddings,
    )
    with torch.device("meta"):
        llava = LlavaForConditionalGeneration(config)
    _assign_tensors(llava, tensors)
    llava.generation_config = llm.generation_config
    llava.save_pretrained(path, max_shard_size=EXPORT_SHARD_SIZE)
    _llava_processor(vision, tokenizer).save_pretrained(path)


def _assign_tensors(llava: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Replace every (meta) tensor of ``llava`` by ours; both sides must name exactly the same tensors."""
    expected = {name for name, _ in named_tensors(llava)}
    if expected != set(tensors):
        raise ValueError(
            f"model and LlavaConfig disagree: missing {sorted(expected - set(tensors))[:3]}, "
            f"unexpected {sorted(set(tensors) - expected)[:3]}"
        )
    for name, tensor in tensors.items():
        owner_name, _, leaf = name.rpartition(".")
        owner = llava.get_submodule(owner_name)
        if leaf in owner._parameters:
            owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
        else:
            owner._buffers[leaf] = tensor


def _llava_processor(vision: HFVisionEncoder, tokenizer: PreTrainedTokenizerBase) -> LlavaProcessor:
    image_processor = vision.image_processor
    if vision.image_aspect_ratio == "pad" and not getattr(image_processor, "do_pad", False):
        settings = {k: v for k, v in image_processor.to_dict().items() if not k.startswith("_")}
        settings.pop("image_processor_type", None)
        image_processor = LlavaImageProcessor(**settings | {"do_pad": True})
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision.tower.config.patch_size,
        vision_feature_select_strategy="full" if vision.keep_cls or not vision.has_cls else "default",
        chat_template=tokenizer.chat_template,
        image_token=getattr(tokenizer, "image_token", None) or IMAGE_PLACEHOLDER,
        num_additional_image_tokens=1 if vision.has_cls else 0,
    )
