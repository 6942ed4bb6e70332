"""Export of a hub VLM run: LoRA folded in, a folder transformers loads, the same logits as the trained model."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from hub_models import CHAT_TEMPLATES, FAMILIES
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor, GenerationConfig

from mllm_safety.export import main as export_main
from mllm_safety.model.hub_vlm import HubOptions, load_hub_vlm
from mllm_safety.model.lora import LoraSettings
from mllm_safety.model.trainable import load_trainable
from mllm_safety.model.yi_vl import YiVLForConditionalGeneration
from mllm_safety.train.module import SafetyAlignModule, TrainableParts

CONFIG = str(Path(__file__).parents[1] / "configs" / "tiny.yaml")


def run_config(folder, path, family):
    """The model section of a run of this hub checkpoint, as the fit config an export reads."""
    model = {"llm": None, "vision": None, "projector": None, "pretrained": path}
    model |= {"hub": {"chat_template": CHAT_TEMPLATES.get(family)}, "lora": {"r": 4, "alpha": 8, "dropout": 0.0}}
    file = folder / "model.yaml"
    file.write_text(yaml.safe_dump({"model": model | {"trainable": {"projector": True}}}))
    return ["--config", CONFIG, "--config", str(file)]


def trained_module(path, family):
    torch.manual_seed(0)
    module = SafetyAlignModule(
        pretrained=path,
        hub=HubOptions(chat_template=CHAT_TEMPLATES.get(family)),
        lora=LoraSettings(r=4, alpha=8, dropout=0.0),
        trainable=TrainableParts(projector=True),
    )
    with torch.no_grad():  # stand-in for training: adapters and projector that change the model
        for param in module.model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.05)
    return module.eval()


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_export_folds_lora_in_and_transformers_loads_the_same_model(family, hub_checkpoint, tmp_path):
    path = hub_checkpoint(family)
    module = trained_module(path, family)
    module.save_trainable(tmp_path / "trainable.safetensors")
    ckpt = f"--ckpt_path={tmp_path / 'trainable.safetensors'}"
    export_main([*run_config(tmp_path, path, family), ckpt, f"--output={tmp_path / 'out'}"])

    stops = GenerationConfig.from_pretrained(tmp_path / "out").eos_token_id
    assert set(module.processor.stop_token_ids) <= set(stops if isinstance(stops, list) else [stops]), (
        "a served export stops where evaluation did, at the template's end-of-turn marker too"
    )
    processor = AutoProcessor.from_pretrained(tmp_path / "out")
    assert processor.chat_template == module.processor.tokenizer.chat_template, "the training template goes along"
    loader = YiVLForConditionalGeneration if family == "yi_vl" else AutoModelForImageTextToText
    exported, info = loader.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not any("lora" in name for name, _ in exported.named_parameters())
    image = Image.new("RGB", (70, 40), "red")
    batch = module.processor.collate([module.processor.prompt("a", "Describe it.", image)])
    inputs = batch.generation_inputs()
    torch.testing.assert_close(logits(exported.eval(), inputs), logits(module.model, inputs), atol=1e-4, rtol=0)
    base = load_hub_vlm(path, HubOptions(chat_template=CHAT_TEMPLATES.get(family)))[0].eval()
    assert (logits(base, inputs) - logits(module.model, inputs)).abs().max() > 1e-3, "training changed the model"
    # the trainable-weights file alone puts the run back on the base checkpoint
    load_trainable(base, tmp_path / "trainable.safetensors", require_every_trainable=False)  # a bare base model
    torch.testing.assert_close(logits(base.eval(), inputs), logits(module.model, inputs), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["yi_vl", "qwen25_vl"])
def test_a_bfloat16_export_says_so_and_loads_in_bfloat16_without_being_told(family, hub_checkpoint, tmp_path):
    path = hub_checkpoint(family)
    trained_module(path, family).save_trainable(tmp_path / "trainable.safetensors")
    ckpt = f"--ckpt_path={tmp_path / 'trainable.safetensors'}"
    module = export_main(
        [*run_config(tmp_path, path, family), ckpt, f"--output={tmp_path / 'out'}", "--dtype=bfloat16"]
    )
    # the base weights load in the export's dtype: no float32 copy of the model (benchmarks/export_memory.py)
    assert module.hparams.frozen_dtype == "bfloat16"
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["dtype"] == "bfloat16", "config.json names the dtype of the written tensors"
    written = {t.dtype for file in (tmp_path / "out").glob("*.safetensors") for t in load_file(file).values()}
    assert written == {torch.bfloat16}
    loader = YiVLForConditionalGeneration if family == "yi_vl" else AutoModelForImageTextToText
    assert {p.dtype for p in loader.from_pretrained(tmp_path / "out").parameters()} == {torch.bfloat16}
    if family == "yi_vl":  # a class transformers and vLLM know, and the flag LLaMA-Factory swaps Yi's projector on
        assert config["architectures"] == ["LlavaForConditionalGeneration"]
        assert config["is_yi_vl_derived_model"] is True
