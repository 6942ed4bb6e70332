"""Hub VLMs (LLaVA-NeXT, Yi-VL, Qwen2.5-VL, Idefics3/SmolVLM, ...) through their own transformers class.

``model.pretrained: DIR`` loads any transformers image-text-to-text checkpoint with ``AutoModelForImageTextToText``
and its ``AutoProcessor``: the model's image handling (anyres tiling, image newlines, dynamic resolution and
M-RoPE, image splitting) is transformers' own. :class:`HubVLM` wraps it in the contract the trainer and the
evaluation use for every model (``forward`` -> reply-token mean loss with its token count, ``generate`` -> new tokens
only), finds the vision tower, projector and language model by the layout transformers 5 gives VLMs, and puts LoRA
adapters on the language model only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoProcessor,
    LlavaForConditionalGeneration,
    LlavaNextForConditionalGeneration,
    LogitsProcessorList,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING

from mllm_safety.data.slot_templates import LLAMAFACTORY_TEMPLATES
from mllm_safety.model.chat_templates import named_chat_template
from mllm_safety.model.export_weights import write_weights
from mllm_safety.model.legacy_processor import complete_legacy_processor
from mllm_safety.model.lora import LoraSettings, inject_lora
from mllm_safety.model.mllm import (
    PLAIN_DECODING,
    MultimodalOutput,
    check_left_padded,
    fill_word_slots,
    is_sharded,
    reply_token_loss,
)
from mllm_safety.model.placement import load_onto
from mllm_safety.model.tokenizer_files import missing_tokenizer_files
from mllm_safety.model.yi_vl import YiVLForConditionalGeneration, is_yi_vl, save_as_llava_config

PART_PREFIXES: dict[str, str] = {
    "model.vision_tower.": "vision",
    "model.visual.": "vision",
    "model.vision_model.": "vision",
    "model.multi_modal_projector.": "projector",
    "model.visual.merger.": "projector",
    "model.connector.": "projector",
    "model.image_newline": "projector",
    "model.language_model.": "llm",
    "model.text_model.": "llm",
    "lm_head.": "llm",
}
"""Where transformers 5 keeps the parts of an image-text-to-text model (parameter-name prefixes; the longest
matching prefix wins, so Qwen's merger inside its vision tower is the projector, and LLaVA-NeXT's image newline
embedding trains with the projector)."""

WORD_SLOT_FAMILIES = (LlavaForConditionalGeneration, LlavaNextForConditionalGeneration)
"""Hub classes whose image slot words can fill (the ``img2text`` probe); Yi-VL's class is a LLaVA subclass."""


@dataclass
class HubOptions:
    """How to read a hub VLM checkpoint (``model.pretrained``)."""

    chat_template: str | None = None
    """``None`` keeps the checkpoint's template. ``llava_next_mistral``, ``llava_next_llama3`` and ``yi_vl`` are
    LLaMA-Factory's, with which the paper trained those models (tokenized piece by piece as LLaMA-Factory does);
    ``llava_hf_mistral`` is llava-hf's Mistral template with its EOS fixed; ``llava_v1`` LLaVA-1.5's. Any other value
    is a Jinja template (given the image as a ``{"type": "image"}`` content part)."""
    processor_kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for ``AutoProcessor.from_pretrained``, e.g. ``{max_pixels: 1003520}`` to bound the image
    tokens of Qwen2.5-VL (its default allows 16384 per image)."""
    trust_remote_code: bool = False
    """Run code shipped with the checkpoint. Off unless you trust its author."""
    load_weights: bool = True
    """``False`` builds the architecture from ``config.json`` without reading weights (dry runs; under
    ``torch.device("meta")`` nothing is allocated)."""
    extra_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for ``from_pretrained`` (e.g. ``attn_implementation: flash_attention_2``)."""


def read_hub_config(path: str, trust_remote_code: bool = False) -> PretrainedConfig:
    """The checkpoint's config; an error naming ``path`` when it cannot be read or needs remote code that is off."""
    config_file = Path(path) / "config.json"
    if config_file.is_file():
        raw = json.loads(config_file.read_text(encoding="utf-8"))
        if raw.get("model_type") not in CONFIG_MAPPING and "auto_map" in raw and not trust_remote_code:
            raise ValueError(
                f"{path!r} (model_type {raw.get('model_type')!r}) needs its own code (auto_map in config.json), and "
                "model.hub.trust_remote_code is off; set it to true only if you trust the checkpoint's author"
            )
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise FileNotFoundError(
            f"{path!r} is not a transformers checkpoint with a readable config.json: {error}"
        ) from error


def model_class(config: PretrainedConfig, path: str) -> type[PreTrainedModel]:
    """The transformers class of an image-text-to-text checkpoint; an error naming ``path`` for any other kind."""
    if is_yi_vl(config):
        return YiVLForConditionalGeneration
    if type(config) in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING:
        return MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING[type(config)]
    if "AutoModelForImageTextToText" in (getattr(config, "auto_map", None) or {}):
        return AutoModelForImageTextToText
    raise ValueError(
        f"{path!r}: unsupported architecture {config.model_type!r} ({', '.join(config.architectures or [])}): "
        "not an image-text-to-text model of transformers (AutoModelForImageTextToText). A text-only LLM goes in "
        "model.llm with model.vision"
    )


def load_hub_processor(path: str, options: HubOptions):
    """The checkpoint's transformers processor, with its (or the configured) chat template and a pad token."""
    try:
        processor = AutoProcessor.from_pretrained(
            path, trust_remote_code=options.trust_remote_code, **options.processor_kwargs
        )
    except (OSError, ValueError, TypeError, ImportError) as error:
        if missing := missing_tokenizer_files(path):
            raise FileNotFoundError(missing) from error
        raise FileNotFoundError(
            f"{path!r} has no readable processor (processor_config.json, preprocessor_config.json and the "
            f"tokenizer files): {error}"
        ) from error
    if getattr(processor, "image_processor", None) is None or getattr(processor, "tokenizer", None) is None:
        raise FileNotFoundError(
            f"{path!r} has no multimodal processor: AutoProcessor gives a {type(processor).__name__} without an image "
            "processor and tokenizer (preprocessor_config.json / processor_config.json are missing)"
        )
    if getattr(processor, "image_token", None) is None:
        raise ValueError(f"{path!r}: {type(processor).__name__} names no image token; it cannot place images")
    template = named_chat_template(options.chat_template) or processor.chat_template
    template = template or processor.tokenizer.chat_template
    if template is None:
        raise ValueError(f"{path!r} has no chat template (chat_template.jinja); set model.hub.chat_template")
    processor.chat_template = processor.tokenizer.chat_template = template
    tokenizer = processor.tokenizer
    if options.chat_template in LLAMAFACTORY_TEMPLATES:
        LLAMAFACTORY_TEMPLATES[options.chat_template].fix_tokenizer(tokenizer)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return processor


def load_hub_vlm(
    path: str, options: HubOptions, dtype: torch.dtype | str = torch.float32, device: torch.device | None = None
) -> tuple[HubVLM, Any]:
    """The checkpoint as a :class:`HubVLM`, its weights read straight onto ``device``, and its transformers
    processor."""
    config = read_hub_config(path, options.trust_remote_code)
    cls = model_class(config, path)
    processor = load_hub_processor(path, options)
    kwargs = {"trust_remote_code": options.trust_remote_code, **options.extra_kwargs}
    if not options.load_weights and cls is AutoModelForImageTextToText:
        model = cls.from_config(config, dtype=dtype, **kwargs)
    elif not options.load_weights:
        model = cls._from_config(config, dtype=dtype)
    else:
        try:
            model, info = cls.from_pretrained(
                path, dtype=dtype, output_loading_info=True, **(load_onto(device) | kwargs)
            )
        except OSError as error:
            raise FileNotFoundError(f"{path!r}: the weights cannot be read ({error})") from error
        if info["missing_keys"]:
            missing = sorted(info["missing_keys"])
            raise ValueError(f"{path!r} lacks {len(missing)} weights of {cls.__name__}, e.g. {missing[:3]}")
        check_no_unknown_weights(info, cls, path)
    complete_legacy_processor(processor, model, path)
    blank = processor.image_processor(images=[Image.new("RGB", (64, 64))], return_tensors="pt")
    return HubVLM(model, dict(blank), path), processor


def check_no_unknown_weights(info: dict, cls: type, path: str) -> None:
    """Weights ``from_pretrained`` read but did not place (a layout it does not rename) are an error, not dropped."""
    unexpected = sorted(info["unexpected_keys"])
    if unexpected:
        raise ValueError(
            f"{path!r} holds {len(unexpected)} weights it does not know as a {cls.__name__}, e.g. {unexpected[:3]}: "
            "a file layout this transformers version does not map"
        )


def _tensor_sum(value: Any) -> torch.Tensor | float:
    """Sum of every floating-point tensor in a model output (tensors, tuples, lists, dicts, ModelOutputs)."""
    if isinstance(value, torch.Tensor):
        return value.float().sum() if value.is_floating_point() else 0.0
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return sum((_tensor_sum(item) for item in value), 0.0)
    return 0.0


class HubVLM(nn.Module):
    """A transformers image-text-to-text model behind the project's model contract (see :class:`MultimodalLM`).

    Inputs are what the checkpoint's processor produces (``input_ids`` with image tokens already expanded,
    ``pixel_values`` and family-specific tensors such as ``image_grid_thw``), passed through by name; an empty
    ``pixel_values`` means a batch without images.
    """

    def __init__(self, model: PreTrainedModel, blank_image: dict[str, torch.Tensor], source: str = "") -> None:
        super().__init__()
        self.hf = model
        self.blank_image = blank_image
        """Image inputs of one blank image: run when a batch has none (see :meth:`_blank_image_term`)."""
        unknown = [name for name, _ in model.named_parameters() if _part(name) is None]
        if unknown:
            raise ValueError(
                f"{source!r}: unsupported architecture {type(model).__name__}: {len(unknown)} weights lie outside "
                f"the vision tower / projector / language model layout this project knows, e.g. {unknown[:3]}"
            )

    @property
    def generation_config(self):
        return self.hf.generation_config

    def parameter_parts(self) -> dict[str, str]:
        """``{parameter name: "vision" | "projector" | "llm"}``."""
        return {name: _part(name.removeprefix("hf.")) for name, _ in self.named_parameters()}

    def part_modules(self) -> dict[str, list[nn.Module]]:
        """The top modules of each part (FSDP units); parameters directly on the model (LLaVA-NeXT's image newline)
        belong to no module here."""
        modules: dict[str, list[nn.Module]] = {"vision": [], "projector": [], "llm": []}
        for prefix, part in PART_PREFIXES.items():
            name = prefix.rstrip(".")
            if prefix.endswith(".") and _has_submodule(self.hf, name):
                modules[part].append(self.hf.get_submodule(name))
        return modules

    def add_lora(self, settings: LoraSettings) -> None:
        """LoRA adapters inside the language model's decoder (not the LM head, projector or vision tower)."""
        for module in self.part_modules()["llm"]:
            if isinstance(module, PreTrainedModel):
                inject_lora(module, settings)

    @staticmethod
    def _images(pixel_values: torch.Tensor | None, image_inputs: dict[str, torch.Tensor]) -> dict:
        """The keyword inputs beside ids and mask; ``pixel_values`` only when the batch has images."""
        if pixel_values is None or pixel_values.numel() == 0:
            return dict(image_inputs)
        return {"pixel_values": pixel_values, **image_inputs}

    @property
    def family(self) -> str:
        """The transformers class and model type, as errors name the model."""
        return f"{type(self.hf).__name__} ({self.hf.config.model_type})"

    def check_words_in_image_slot(self, what: str) -> None:
        """An error naming ``what`` and the family unless words can fill this family's image slot: LLaVA's and
        LLaVA-NeXT's (Yi-VL's) features are a run of positions of ordinary 1-D positions, which the LLM's input
        embeddings of words can take; Qwen2.5-VL places image tokens on an M-RoPE grid and Idefics3 frames them with
        tile tokens, so words there would not be what the probe means."""
        if not isinstance(self.hf, WORD_SLOT_FAMILIES):
            raise ValueError(
                f"{what} puts word embeddings in the image slot, which only the LLaVA family supports (the assembled "
                f"model, llava-hf LLaVA-1.5, LLaVA-NeXT, Yi-VL); this model is {self.family}"
            )

    def _words_in_slot(self, input_ids: torch.Tensor, image_inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """``input_ids`` with the image-slot positions that hold words given the words' ids (``slot_word_ids``, taken
        out of ``image_inputs``), which the model then embeds where image features would be."""
        slot_word_ids = image_inputs.pop("slot_word_ids", None)
        if slot_word_ids is not None:
            self.check_words_in_image_slot("a batch")
        return fill_word_slots(input_ids, slot_word_ids)

    def _blank_image_term(self, images: dict) -> torch.Tensor | float:
        """``0 * features of a blank image`` when the batch has no image, else 0: every rank then runs the vision
        tower and projector in each step, as FSDP's collectives (and DDP's gradient buckets) require."""
        if "pixel_values" in images:
            return 0.0
        device = self.hf.get_input_embeddings().weight.device
        blank = {name: value.to(device) for name, value in self.blank_image.items()}
        return 0.0 * _tensor_sum(self.hf.get_image_features(**blank))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **image_inputs: torch.Tensor,
    ) -> MultimodalOutput:
        input_ids = self._words_in_slot(input_ids, image_inputs)
        images = self._images(pixel_values, image_inputs)
        blank = self._blank_image_term(images)
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False, **images}
        if labels is None:
            logits = self.hf(**inputs).logits + blank
            return MultimodalOutput(loss=None, logits=logits, num_label_tokens=torch.zeros((), dtype=torch.long))
        out = reply_token_loss(labels, lambda keep: self.hf(**inputs, logits_to_keep=keep).logits)
        return replace(out, loss=out.loss + blank)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        max_new_tokens: int = 64,
        min_new_tokens: int = 0,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        logits_processor: LogitsProcessorList | None = None,
        **image_inputs: torch.Tensor,
    ) -> torch.Tensor:
        """Decoding of a left-padded batch with the model's own ``generate``; only the new tokens ``(B, <=max)``.

        Greedy over the scores after ``logits_processor`` whatever the checkpoint's ``generation_config`` suggests
        (no repetition penalty), so every family is evaluated alike: sampling is a processor perturbing the scores,
        seeded per row. ``eos_token_id`` defaults to the checkpoint's.
        """
        check_left_padded(attention_mask)
        input_ids = self._words_in_slot(input_ids, image_inputs)
        images = self._images(pixel_values, image_inputs)
        if is_sharded(self):  # every rank runs the sharded vision tower as often as the others (see forward)
            self._blank_image_term(images)
        out = self.hf.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            **images,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            **PLAIN_DECODING,
            eos_token_id=eos_token_id if eos_token_id is not None else self.hf.generation_config.eos_token_id,
            pad_token_id=pad_token_id,
            logits_processor=logits_processor,
            use_cache=True,
        )
        return out[:, input_ids.shape[1] :]


def _part(name: str) -> str | None:
    matches = [prefix for prefix in PART_PREFIXES if name.startswith(prefix)]
    return PART_PREFIXES[max(matches, key=len)] if matches else None


def _has_submodule(module: nn.Module, name: str) -> bool:
    try:
        module.get_submodule(name)
    except AttributeError:
        return False
    return True


def save_hub_vlm(model: HubVLM, processor, path: str | Path, dtype: torch.dtype | None = None) -> None:
    """Write ``model`` with its LoRA adapters folded in (in place: ``model`` keeps computing the same function), and
    its processor with the chat template it was trained with, as a folder ``AutoModelForImageTextToText`` and
    ``AutoProcessor`` load. Yi-VL's folder names ``LlavaForConditionalGeneration`` with ``is_yi_vl_derived_model``
    as the published ones do (load it with :class:`YiVLForConditionalGeneration` or LLaMA-Factory; stock
    transformers has no Yi-VL projector)."""
    write_weights(model.hf, path, dtype)
    if is_yi_vl(model.hf.config):
        save_as_llava_config(model.hf.config, path)
    processor.save_pretrained(path)
