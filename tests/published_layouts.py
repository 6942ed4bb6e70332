"""Tiny checkpoints in the file layout of the PUBLISHED folders that predate transformers 5.

transformers 5 renames weights as it loads (``language_model.model.*`` -> ``model.language_model.*``), but only for its
own classes, and a save by today's transformers is no proof of what the Hub holds. So these fixtures write the
published names themselves, in two safetensors shards with their index as the Hub folders are split, and the
config.json keys of transformers 4.4x (``torch_dtype``, the architecture the folder names):

- llava-1.5 (``llava-hf/llava-1.5-7b-hf``) and LLaVA-NeXT (``llava-hf/llava-v1.6-mistral-7b-hf``): ``language_model.
  model.*``, ``language_model.lm_head.weight``, ``vision_tower.vision_model.*``, ``multi_modal_projector.*``,
  ``image_newline``; their processor_config.json (patch_size, num_additional_image_tokens) as updated on the Hub.
- Qwen2.5-VL (``Qwen/Qwen2.5-VL-7B-Instruct``, written by transformers 4.4x): ``model.layers.*``,
  ``model.embed_tokens``, ``visual.*``, ``lm_head.weight``, and a flat config.json (the text settings at the top,
  ``rope_scaling: {type: mrope, mrope_section}``).
- Yi-VL (``BUAADreamer/Yi-VL-6B-hf``, written by transformers 4.40.1): the same names with the four projector layers,
  ``architectures: [LlavaForConditionalGeneration]`` and ``is_yi_vl_derived_model: true``, and the processor of
  that time: no processor_config.json (no patch_size, vision_feature_select_strategy or num_additional_image_tokens),
  ``processor_class`` in preprocessor_config.json.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

LLAVA_PREFIXES = (
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.vision_tower.", "vision_tower.vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.image_newline", "image_newline"),
)
QWEN_PREFIXES = (("model.language_model.", "model."), ("model.visual.", "visual."), ("lm_head.", "lm_head."))
PUBLISHED_PREFIXES = {"llava": LLAVA_PREFIXES, "llava_next": LLAVA_PREFIXES, "qwen2_5_vl": QWEN_PREFIXES}
"""model_type -> (transformers 5 parameter name prefix, the name the published transformers 4.4x files give it)."""
ARCHITECTURES = {
    "llava": "LlavaForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
}


def published_name(name: str, model_type: str) -> str:
    for today, published in PUBLISHED_PREFIXES[model_type]:
        if name.startswith(today):
            return published + name.removeprefix(today)
    raise ValueError(f"no published name for {name!r}")


def _as_4x_qwen_config(config: dict) -> dict:
    """Qwen2.5-VL's config.json as published: the text settings flat at the top, M-RoPE as ``rope_scaling``."""
    text = {key: value for key, value in config.pop("text_config").items() if key not in ("model_type", "dtype")}
    rope = text.pop("rope_parameters")
    vision = {key: value for key, value in config.pop("vision_config").items() if key != "rope_parameters"}
    rope_scaling = {"type": "mrope", "mrope_section": rope["mrope_section"]}
    return config | text | {"vision_config": vision, "rope_scaling": rope_scaling, "rope_theta": rope["rope_theta"]}


def _as_4x_config(config: dict, architecture: str | None) -> dict:
    """config.json as transformers 4.4x wrote it: ``torch_dtype``, not ``dtype``, in every (sub-)config."""
    config = {key: value for key, value in config.items() if key != "dtype"}
    for key in ("text_config", "vision_config"):
        if isinstance(config.get(key), dict):
            config[key] = _as_4x_config(config[key], None)
            config[key]["torch_dtype"] = "float32"
    if architecture is not None:
        config |= {"architectures": [architecture], "torch_dtype": "float32", "transformers_version": "4.40.1"}
    return config


def write_published_layout(model, source: str | Path, target: str | Path, pre_447_processor: bool = False) -> str:
    """Copy the tiny checkpoint ``source`` (whose loaded model is ``model``) to ``target`` in the published layout."""
    source, target = Path(source), Path(target)
    target.mkdir(parents=True, exist_ok=True)
    for file in source.iterdir():
        if file.suffix != ".safetensors" and file.name not in ("model.safetensors.index.json", "config.json"):
            shutil.copy(file, target / file.name)
    model_type = model.config.model_type
    state = {published_name(n, model_type): t.detach().clone().contiguous() for n, t in model.state_dict().items()}
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, shard in shards.items():
        save_file({name: state[name] for name in shard}, target / file, metadata={"format": "pt"})
    weight_map = {name: file for file, shard in shards.items() for name in shard}
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (target / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = model.config.to_dict()
    config = _as_4x_config(
        _as_4x_qwen_config(config) if model_type == "qwen2_5_vl" else config, ARCHITECTURES[model_type]
    )
    (target / "config.json").write_text(json.dumps(config, indent=2))
    if pre_447_processor:
        if model.config.model_type != "llava":
            raise ValueError("the pre-4.47 processor layout is written for LlavaProcessor folders only")
        processor = json.loads((target / "processor_config.json").read_text())
        (target / "processor_config.json").unlink()
        preprocessor = processor["image_processor"] | {"processor_class": "LlavaProcessor"}
        (target / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    return str(target)


def published_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a sharded published folder, under its file names."""
    from safetensors.torch import load_file

    weight_map = json.loads((Path(path) / "model.safetensors.index.json").read_text())["weight_map"]
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(set(weight_map.values())):
        tensors |= load_file(Path(path) / file)
    return tensors
