"""Checkpoints in the layout of their published folders (tests/published_layouts.py) load exactly, or fail loudly.

The other tests use folders today's transformers writes; the folders users download were written by transformers 4.4x:
other weight names, ``torch_dtype``, and (Yi-VL) a processor without the settings transformers 5 needs to expand
image tokens.
"""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import write_tiny_llava
from hub_models import CHAT_TEMPLATES, write_tiny_llava_next, write_tiny_qwen25_vl, write_tiny_yi_vl
from PIL import Image
from published_layouts import published_tensors, write_published_layout
from safetensors.torch import load_file, save_file
from transformers import (
    LlavaForConditionalGeneration,
    LlavaNextForConditionalGeneration,
    Qwen2_5_VLForConditionalGeneration,
)

from mllm_safety.model.hub_vlm import HubOptions, load_hub_vlm
from mllm_safety.model.legacy_processor import complete_legacy_processor
from mllm_safety.model.llava_hf import load_llava_hf
from mllm_safety.model.yi_vl import YiVLForConditionalGeneration
from mllm_safety.train.module import SafetyAlignModule

PUBLISHED = {  # family -> (writer of today's tiny folder, its class, processor predates transformers 4.47)
    "llava_1_5": (write_tiny_llava, LlavaForConditionalGeneration, False),
    "llava_next_mistral": (write_tiny_llava_next, LlavaNextForConditionalGeneration, False),
    "yi_vl": (write_tiny_yi_vl, YiVLForConditionalGeneration, True),
    "qwen25_vl": (write_tiny_qwen25_vl, Qwen2_5_VLForConditionalGeneration, False),
}
PUBLISHED_NAMES = {  # names the published files hold
    "llava": {"language_model.model.embed_tokens.weight", "language_model.lm_head.weight"},
    "qwen": {"model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "lm_head.weight"},
}


@pytest.fixture(scope="module", params=sorted(PUBLISHED))
def published(request, tmp_path_factory):
    """(family, today's folder, the same weights in the published layout, the reference model)."""
    family = request.param
    writer, cls, old_processor = PUBLISHED[family]
    root = tmp_path_factory.mktemp(family)
    source = str(writer(root / "today"))
    model = cls.from_pretrained(source).eval()
    return family, source, write_published_layout(model, source, root / "published", old_processor), model


def hub_module(path, family):
    torch.manual_seed(0)
    return SafetyAlignModule(pretrained=path, hub=HubOptions(chat_template=CHAT_TEMPLATES.get(family)), lora=None)


def test_the_fixture_is_the_published_layout(published):
    family, _, path, _ = published
    names = set(published_tensors(path))
    if family == "qwen25_vl":
        assert PUBLISHED_NAMES["qwen"] <= names and "visual.patch_embed.proj.weight" in names
        assert not any(name.startswith(("model.language_model.", "model.visual.")) for name in names)
    else:
        assert PUBLISHED_NAMES["llava"] <= names
        assert "vision_tower.vision_model.embeddings.class_embedding" in names
        assert not any(name.startswith("model.") for name in names)
    config = json.loads((Path(path) / "config.json").read_text())
    assert "torch_dtype" in config and "dtype" not in config
    if family == "qwen25_vl":  # flat, as transformers 4.4x wrote Qwen2.5-VL's
        assert "text_config" not in config and config["rope_scaling"]["type"] == "mrope"
    assert (Path(path) / "processor_config.json").exists() == (family != "yi_vl")


def test_the_published_layout_loads_every_weight_exactly(published):
    family, _, path, reference = published
    model, _ = load_hub_vlm(path, HubOptions(chat_template=CHAT_TEMPLATES.get(family)))
    loaded, expected = model.hf.state_dict(), reference.state_dict()
    assert set(loaded) == set(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(loaded[name], tensor, atol=0, rtol=0, msg=name)
    if family == "llava_1_5":  # model.llava reads it through its own loader
        imported = load_llava_hf(path)
        torch.testing.assert_close(imported.llm.lm_head.weight, reference.lm_head.weight, atol=0, rtol=0)
        torch.testing.assert_close(
            imported.projector[0].weight, reference.model.multi_modal_projector.linear_1.weight, atol=0, rtol=0
        )


def test_a_sample_of_the_published_folder_gives_the_same_logits(published):
    """Yi-VL's processor lacks patch_size etc.: taken from the model config, the image expands to as many tokens as
    the tower gives features, and the model computes what it computes from today's folder."""
    family, source, path, _ = published
    image = Image.new("RGB", (70, 40), "red")
    outputs = []
    for folder in (source, path):
        module = hub_module(folder, family).eval()
        batch = module.processor.collate([module.processor.prompt("a", "Describe it.", image)])
        with torch.no_grad():
            outputs.append(module.model(**batch.generation_inputs()).logits)
    torch.testing.assert_close(outputs[1], outputs[0], atol=0, rtol=0)


def test_weights_the_class_does_not_know_are_an_error_not_dropped(published, tmp_path):
    family, _, path, _ = published
    index_file = Path(path) / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    folder = tmp_path / "extra"
    folder.mkdir()
    for file in Path(path).iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    shard = load_file(folder / first)
    extra = "visual.extra_weight" if family == "qwen25_vl" else "language_model.model.layers.0.extra_weight"
    shard[extra] = torch.ones(3)  # e.g. a layout this loader does not map
    save_file(shard, folder / first, metadata={"format": "pt"})
    index["weight_map"][extra] = first
    (folder / index_file.name).write_text(json.dumps(index))
    with pytest.raises(ValueError, match=f"{folder}.*1 weights it does not know.*extra_weight"):
        load_hub_vlm(str(folder), HubOptions(chat_template=CHAT_TEMPLATES.get(family)))
    if family == "llava_1_5":
        with pytest.raises(ValueError, match=f"{folder}.*1 weights it does not know.*extra_weight"):
            load_llava_hf(str(folder))


def test_a_pre_447_processor_setting_the_model_cannot_give_stops_the_load_by_name():
    processor = SimpleNamespace(patch_size=None, vision_feature_select_strategy=None, num_additional_image_tokens=0)
    model = torch.nn.Module()
    model.config = SimpleNamespace(vision_config=SimpleNamespace(patch_size=14))  # no select strategy, no tower
    with pytest.raises(ValueError, match="'/ckpt': the processor predates .* no vision_feature_select_strategy"):
        complete_legacy_processor(processor, model, "/ckpt")
