"""The hub VLM configs with the paper's recipe, built on the meta device from the published architectures
(configs/architectures/*.json: the architecture part of each checkpoint's config.json; nothing is downloaded or
allocated)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from jsonargparse import ArgumentParser
from paper_recipe import lora_adapters, resolved_paper_config
from published import COCO_SIZES, coco_sample, use_published_processor
from transformers import AutoConfig

from mllm_safety.constants import IMAGE_TOKEN_ID
from mllm_safety.data.conversation import ChatEncoder, SampleError
from mllm_safety.data.hub_processor import HubProcessor
from mllm_safety.model.hub_vlm import HubOptions, load_hub_processor
from mllm_safety.train.module import SafetyAlignModule

CONFIGS = Path(__file__).parents[1] / "configs"
ARCHITECTURES = CONFIGS / "architectures"
PUBLISHED = {  # config -> (test family with the same processor, the published checkpoint's architecture)
    "llava_next_mistral_7b_lora": ("llava_next_mistral", "llava_v1.6_mistral_7b.json"),  # llava-hf/...-hf
    "llama3_llava_next_8b_lora": ("llama3_llava_next", "llama3_llava_next_8b.json"),  # llava-hf/...-hf
    # BUAADreamer/Yi-VL-6B-hf: CLIP ViT-H/14-448 + Yi-6B and the LayerNorm projector; its vocabulary is assumed to be
    # Yi's 64000 tokens + <image>, padded to a multiple of 64 as llava-hf conversions do
    "yi_vl_6b_lora": ("yi_vl", "yi_vl_6b.json"),
    "qwen25_vl_7b_lora": ("qwen25_vl", "qwen2.5_vl_7b.json"),  # Qwen/Qwen2.5-VL-7B-Instruct
}


MAX_LENGTH = {  # LLaVA-NeXT's anyres image alone takes up to 2928 tokens (its configs say why); the others, 2048
    "llava_next_mistral_7b_lora": 4096,
    "llama3_llava_next_8b_lora": 4096,
    "yi_vl_6b_lora": 2048,
    "qwen25_vl_7b_lora": 2048,
}

PUBLISHED_IMAGE_TOKENS = {  # config -> (its published checkpoint, image tokens of a 640x480 image with its settings)
    "llava_next_mistral_7b_lora": ("llava-hf/llava-v1.6-mistral-7b-hf", 2340),  # 672x672 grid: 36x(48+1) + 576
    "llama3_llava_next_8b_lora": ("llava-hf/llama3-llava-next-8b-hf", 2340),
    "qwen25_vl_7b_lora": ("Qwen/Qwen2.5-VL-7B-Instruct", 391),  # 476x644 px: 34x46 patches / 4
}
"""Yi-VL is left out: its published processor files predate the layout transformers 5 reads (issue 17, item 2); its
image is 1,024 tokens whatever its size (benchmarks/image_tokens.py)."""


def architecture(name: str) -> dict:
    return json.loads((ARCHITECTURES / PUBLISHED[name][1]).read_text())


COUNTS = {  # (trainable, total) as logged at start and written in the README's model table
    "llava_next_mistral_7b_lora": (335_544_320, 7_902_291_968),
    "llama3_llava_next_8b_lora": (335_544_320, 8_690_821_120),
    "yi_vl_6b_lora": (290_455_552, 7_005_809_152),
    "qwen25_vl_7b_lora": (322_961_408, 8_615_128_064),
}


MODEL_CARD_BILLIONS = {  # Qwen2.5-VL-7B-Instruct, llava-v1.6-mistral-7b-hf, llama3-llava-next-8b-hf
    "qwen25_vl_7b_lora": 8.29,
    "llava_next_mistral_7b_lora": 7.57,
    "llama3_llava_next_8b_lora": 8.36,
}


def published_folder(name, tmp_path, hub_checkpoint):
    """The processor files of the family's tiny checkpoint under the published config.json, without weights."""
    folder = tmp_path / name
    shutil.copytree(hub_checkpoint(PUBLISHED[name][0]), folder)
    (folder / "model.safetensors").unlink()
    spec = architecture(name)
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    config.save_pretrained(folder)
    return str(folder)


def module_on_meta(name, folder):
    """Instantiate the ``model`` section of configs/<name>.yaml as the CLI would, on the meta device."""
    parser = ArgumentParser()
    parser.add_class_arguments(SafetyAlignModule, "model")
    section = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())["model"]
    section["pretrained"] = folder
    section["hub"] = (section.get("hub") or {}) | {"load_weights": False}
    config = parser.parse_object({"model": section})
    with torch.device("meta"):
        return parser.instantiate_classes(config).model


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_config_builds_the_published_architecture_with_the_recipe(name, tmp_path, hub_checkpoint):
    module = module_on_meta(name, published_folder(name, tmp_path, hub_checkpoint))
    model = module.model
    assert all(p.is_meta for p in model.parameters()), "nothing is allocated"
    text = architecture(name)["text_config"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    parts = model.parameter_parts()
    assert trainable and all(".lora_" in n and parts[n] == "llm" for n in trainable)
    lora = [m for n, m in model.named_modules() if n.endswith("q_proj") and hasattr(m, "lora_A")]
    assert len(lora) == text["num_hidden_layers"] and lora[0].scaling["default"] == 2.0  # alpha 256 / r 128
    assert lora[0].lora_A["default"].weight.shape[0] == 128
    adapters = lora_adapters(model)
    linears = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert len(adapters) == 7 * text["num_hidden_layers"] and {n.rsplit(".", 1)[1] for n in adapters} == linears
    counts = module.parameter_counts
    assert counts["all"][0] == sum(adapters.values())
    assert counts["vision"][0] == counts["projector"][0] == 0
    assert counts["all"] == COUNTS[name]
    # the built model without its adapters has the size its model card gives (the architecture is complete)
    if name in MODEL_CARD_BILLIONS:
        assert round((counts["all"][1] - counts["all"][0]) / 1e9, 2) == MODEL_CARD_BILLIONS[name]
    assert module.processor.encoder.max_length == MAX_LENGTH[name]


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_config_parses_with_the_cli_and_has_the_papers_recipe(name, capsys):
    resolved = resolved_paper_config(CONFIGS / f"{name}.yaml", capsys, MAX_LENGTH[name])
    model = resolved["model"]
    assert model["trainable"] == {"vision": False, "projector": False, "llm": False, "lora": True}
    assert model["pretrained"] and model["llava"] is None and model["llm"] is None


def image_tokens(processor: HubProcessor, sample) -> int:
    return int((sample.input_ids == processor.tokenizer.convert_tokens_to_ids(processor.image_token)).sum())


@pytest.mark.parametrize("name", sorted(PUBLISHED_IMAGE_TOKENS))
def test_config_keeps_coco_and_vg_sized_images_with_the_published_processor(name, tmp_path, hub_checkpoint):
    """The config's processor, built as training builds it from the published processor files, keeps a sample with a
    COCO-, GQA- or VG-sized image whole (image and reply within max_length) instead of skipping it as too long."""
    checkpoint, expected = PUBLISHED_IMAGE_TOKENS[name]
    folder = published_folder(name, tmp_path, hub_checkpoint)
    use_published_processor(folder, checkpoint)
    processor = module_on_meta(name, folder).processor
    samples = {size: processor(coco_sample(size)) for size in COCO_SIZES}  # a skipped one raises SampleError
    assert image_tokens(processor, samples[(640, 480)]) == expected
    for sample in samples.values():
        assert len(sample.input_ids) <= processor.encoder.max_length
        assert sample.labels[-1] != -100, "the reply is kept to its end"


@pytest.mark.parametrize(
    ("family", "checkpoint", "processor_kwargs", "frames"),
    [
        ("idefics3", "HuggingFaceM4/Idefics3-8B-Llama3", {"size": {"longest_edge": 728}}, 5),  # 2 x 2 tiles + global
        ("smolvlm", "HuggingFaceTB/SmolVLM-Instruct", {}, 13),  # published: 4 x 3 tiles of 384 px + global
    ],
)
def test_idefics3_and_smolvlm_keep_coco_images_at_2048_with_the_documented_setting(
    family, checkpoint, processor_kwargs, frames, tmp_path, hub_checkpoint
):
    folder = tmp_path / family
    shutil.copytree(hub_checkpoint(family), folder)
    use_published_processor(folder, checkpoint)

    def processor(kwargs: dict) -> HubProcessor:
        hf_processor = load_hub_processor(str(folder), HubOptions(processor_kwargs=kwargs))
        encoder = ChatEncoder(hf_processor.tokenizer, 0, IMAGE_TOKEN_ID, 2048, image_parts=True)
        return HubProcessor(hf_processor, encoder, [])

    kept = processor(processor_kwargs)
    per_frame = kept.hf_processor.image_seq_len
    for size in COCO_SIZES:
        assert len(kept(coco_sample(size)).input_ids) <= 2048
    assert image_tokens(kept, kept(coco_sample())) == frames * per_frame
    if family == "idefics3":  # what the setting is for: the published 1456 px bound gives 13 frames, 2197 tokens
        with pytest.raises(SampleError, match="would cut the image"):
            processor({})(coco_sample())
