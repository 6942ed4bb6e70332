"""Building the training module: model sources, LoRA targets, freezing, checkpointing, dtypes, paper configs."""

from pathlib import Path

import pytest
import torch
import yaml
from conftest import LLAVA_HF_CHAT_TEMPLATE
from jsonargparse import ArgumentParser
from paper_recipe import lora_adapters, resolved_paper_config
from tiny_models import TINY_LLM
from transformers import CLIPImageProcessor, LlamaTokenizer, LlavaConfig, LlavaProcessor

from mllm_safety.data.conversation import parse_llava_record
from mllm_safety.fit import main
from mllm_safety.model.llava_hf import LlavaHFConfig
from mllm_safety.model.llm import LLMConfig
from mllm_safety.model.lora import LoraSettings
from mllm_safety.model.vision import VisionConfig
from mllm_safety.train.module import SafetyAlignModule, TrainableParts

CONFIGS = Path(__file__).parents[1] / "configs"
LLM_LINEARS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def llava_module(path, **kwargs):
    kwargs.setdefault("lora", LoraSettings(r=4, alpha=8))
    return SafetyAlignModule(llava=LlavaHFConfig(path=path), max_length=256, **kwargs)


def adapted_modules(module):
    return {name.rsplit(".lora_A", 1)[0] for name, _ in module.model.named_parameters() if ".lora_A." in name}


def test_lora_targets_every_llm_linear_layer_and_nothing_else(tiny_llava_path):
    module = llava_module(tiny_llava_path)
    adapted = adapted_modules(module)
    assert {name.rsplit(".", 1)[1] for name in adapted} == LLM_LINEARS
    assert all(name.startswith("llm.") for name in adapted) and len(adapted) == 2 * len(LLM_LINEARS)
    trainable = {name for name, p in module.model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in trainable if ".lora_" in n} | {n for n in trainable if n.startswith("projector.")}
    assert any(n.startswith("projector.") for n in trainable)
    assert not any("lm_head" in n or n.startswith("vision.") for n in trainable)
    adapters = lora_adapters(module.model)
    assert adapters.keys() == adapted and {module.model.get_submodule(n).r["default"] for n in adapters} == {4}
    lora_count = sum(adapters.values())
    trainable_count, total = module.parameter_counts["all"]
    assert trainable_count == lora_count + sum(p.numel() for p in module.model.projector.parameters())
    assert total == sum(p.numel() for p in module.model.parameters())


def test_lora_targets_can_be_overridden(tiny_llava_path):
    module = llava_module(tiny_llava_path, lora=LoraSettings(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    assert {name.rsplit(".", 1)[1] for name in adapted_modules(module)} == {"q_proj", "v_proj"}


def test_freezing_per_part(tiny_llava_path):
    module = llava_module(tiny_llava_path, lora=None, trainable=TrainableParts(vision=True, projector=False))
    trainable = {name.split(".")[0] for name, p in module.model.named_parameters() if p.requires_grad}
    assert trainable == {"vision"}


def labelled_batch(module):
    record = {"id": "a", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello there."}]}
    return module.processor.collate([module.processor(parse_llava_record(record, None))])


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_llava_path):
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        module = llava_module(tiny_llava_path, gradient_checkpointing=checkpointing, lora=LoraSettings(4, 8, 0.0))
        assert module.model.llm.get_base_model().is_activation_checkpointing == checkpointing
        loss = module.model(**labelled_batch(module).model_inputs()).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in module.model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads))
    (loss_plain, grads_plain), (loss_ckpt, grads_ckpt) = results
    torch.testing.assert_close(loss_ckpt, loss_plain)
    assert grads_plain.keys() == grads_ckpt.keys()
    for name in grads_plain:
        torch.testing.assert_close(grads_ckpt[name], grads_plain[name])


def test_frozen_weights_in_bf16_trainable_in_fp32(tiny_llava_path):
    module = llava_module(tiny_llava_path, frozen_dtype="bfloat16")
    dtypes = {p.dtype for p in module.model.parameters() if not p.requires_grad}
    assert dtypes == {torch.bfloat16}
    assert {p.dtype for p in module.model.parameters() if p.requires_grad} == {torch.float32}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = module.model(**labelled_batch(module).model_inputs()).loss
    assert torch.isfinite(loss)


def test_frozen_bf16_needs_mixed_precision(tiny_llava_path, tmp_path):
    with pytest.raises(ValueError, match="frozen_dtype=bfloat16.*bf16-mixed.*got 32-true"):
        main(
            [
                "--config",
                str(CONFIGS / "tiny.yaml"),
                f"--trainer.default_root_dir={tmp_path}",
                f"--trainer.logger.init_args.save_dir={tmp_path}",
                "--trainer.callbacks=[]",
                "--trainer.max_steps=1",
                "--model.frozen_dtype=bfloat16",
            ]
        )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"llava": LlavaHFConfig(path="x"), "llm": LLMConfig()}, "leave model.llm, model.vision and model.projector"),
        ({"llava": LlavaHFConfig(path="x"), "projector": "linear"}, "leave model.llm"),
        ({"llm": LLMConfig()}, "set model.pretrained .*, model.llava .*, or model.llm and model.vision"),
        ({"pretrained": "x", "vision": VisionConfig(name="tiny-vit")}, "model.pretrained supplies the LLM"),
        ({"pretrained": "x", "llava": LlavaHFConfig(path="x")}, "set one of model.llava and model.pretrained"),
        ({"vision": VisionConfig(name="tiny-vit")}, "or model.llm and model.vision"),
        ({"llava": LlavaHFConfig(path="x"), "frozen_dtype": "int8"}, "unknown frozen_dtype 'int8'"),
    ],
)
def test_model_source_must_be_one_of_llava_or_parts(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SafetyAlignModule(**kwargs)


# --- the paper configs, built on the meta device: architecture and parameter counts, no weights, no download ---

TEXT_CONFIGS = {  # the text_config of llava-hf/llava-1.5-{7,13}b-hf (Vicuna-1.5 = Llama-2 architecture)
    "7b": {"vocab_size": 32064, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5},
    "13b": {
        "vocab_size": 32064,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "hidden_size": 5120,
        "intermediate_size": 13824,
        "num_attention_heads": 40,
        "num_key_value_heads": 40,
        "num_hidden_layers": 40,
    },
}
VISION_CONFIG = {  # CLIP ViT-L/14-336, as in both checkpoints
    "hidden_size": 1024,
    "image_size": 336,
    "intermediate_size": 4096,
    "model_type": "clip_vision_model",
    "num_attention_heads": 16,
    "num_hidden_layers": 24,
    "patch_size": 14,
    "projection_dim": 768,
}


def write_llava15_folder(path, size):
    """config.json, tokenizer (32000 ids + <image> 32000 + <pad> 32001) and processor of llava-1.5-{size}-hf."""
    config = LlavaConfig(
        vision_config=VISION_CONFIG,
        text_config={"model_type": "llama", **TEXT_CONFIGS[size]},
        image_token_index=32000,
        pad_token_id=32001,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    config.save_pretrained(path)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{i:02X}>": 3 + i for i in range(256)}
    vocab |= {f"▁t{i}": i for i in range(len(vocab), 32000)}
    tokenizer = LlamaTokenizer(vocab=vocab, merges=[])
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    image_processor = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        chat_template=LLAVA_HF_CHAT_TEMPLATE,
        num_additional_image_tokens=1,
    ).save_pretrained(path)
    return str(path)


def paper_module_on_meta(size, folder):
    """Instantiate the ``model`` section of configs/llava15_{size}_lora.yaml as the CLI would, on the meta device."""
    parser = ArgumentParser()
    parser.add_class_arguments(SafetyAlignModule, "model")
    section = yaml.safe_load((CONFIGS / f"llava15_{size}_lora.yaml").read_text())["model"]
    assert section["llava"]["path"] == f"llava-hf/llava-1.5-{size}-hf"
    section["llava"] |= {"path": folder, "load_weights": False}
    config = parser.parse_object({"model": section})
    with torch.device("meta"):
        return parser.instantiate_classes(config).model


@pytest.mark.parametrize(
    ("size", "hidden", "layers", "intermediate", "lora_count"),
    [("7b", 4096, 32, 11008, 319_815_680), ("13b", 5120, 40, 13824, 500_695_040)],
)
def test_paper_config_builds_llava15_with_the_recipe(tmp_path, size, hidden, layers, intermediate, lora_count):
    module = paper_module_on_meta(size, write_llava15_folder(tmp_path, size))
    model = module.model
    assert all(p.is_meta for p in model.parameters()), "nothing is allocated"
    # shapes: CLIP ViT-L/14-336 (576 patch tokens of layer -2, CLS dropped) -> mlp2x_gelu -> Llama-2 (vocab 32064)
    assert model.vision.num_tokens == 576 and model.vision.select_layer == -2 and not model.vision.keep_cls
    assert [tuple(m.weight.shape) for m in model.projector if isinstance(m, torch.nn.Linear)] == [
        (hidden, 1024),
        (hidden, hidden),
    ]
    base = model.llm.get_base_model()
    assert base.get_input_embeddings().weight.shape == (32064, hidden) and len(base.model.layers) == layers
    assert base.model.layers[0].mlp.down_proj.lora_A["default"].weight.shape == (128, intermediate)
    assert base.model.layers[0].self_attn.q_proj.lora_B["default"].weight.shape == (hidden, 128)
    assert base.model.layers[0].self_attn.q_proj.scaling["default"] == 2.0  # alpha 256 / r 128
    assert module.processor.encoder.num_image_tokens == 576 and module.processor.encoder.max_length == 2048
    assert model.image_token_id == 32000
    # trainable: LoRA r=128 on the 7 linear layers of every block (counted on the built model), plus the projector
    adapters = lora_adapters(model)
    assert len(adapters) == 7 * layers and {model.get_submodule(n).r["default"] for n in adapters} == {128}
    assert sum(adapters.values()) == lora_count
    trainable, total = module.parameter_counts["all"]
    assert trainable == lora_count + sum(p.numel() for p in model.projector.parameters())
    assert module.parameter_counts["vision"][0] == 0 and module.parameter_counts["vision"][1] == 303_507_456
    if size == "7b":
        assert trainable == 340_795_392
        assert total - lora_count == 7_063_427_072  # the published llava-1.5-7b-hf


@pytest.mark.parametrize("size", ["7b", "13b"])
def test_paper_config_parses_with_the_cli(size, capsys):
    model = resolved_paper_config(CONFIGS / f"llava15_{size}_lora.yaml", capsys)["model"]
    assert model["optim"]["projector_lr"] == 2e-5
    assert model["trainable"] == {"vision": False, "projector": True, "llm": False, "lora": True}
    assert model["gradient_checkpointing"] is True and model["frozen_dtype"] == "bfloat16"


def test_projector_that_does_not_fit_the_vision_or_llm_size_is_a_clear_error(tiny_llm):
    from mllm_safety.model.mllm import MultimodalLM
    from mllm_safety.model.projector import build_projector
    from mllm_safety.model.vision import OpenClipVisionEncoder

    vision = OpenClipVisionEncoder(VisionConfig(name="tiny-vit"))
    with pytest.raises(ValueError, match="projector maps 64 -> 32 features, but the vision tower gives 128"):
        MultimodalLM(vision, build_projector("mlp2x_gelu", 64, 32), tiny_llm)
    with pytest.raises(ValueError, match="projector maps 128 -> 48 .* the LLM takes 32"):
        MultimodalLM(vision, build_projector("linear", 128, 48), tiny_llm)


def parts_module(**kwargs):
    kwargs.setdefault("lora", LoraSettings(r=4, alpha=8))
    torch.manual_seed(kwargs.pop("seed", 0))
    return SafetyAlignModule(
        llm=LLMConfig(random_init=TINY_LLM), vision=VisionConfig(name="tiny-vit"), max_length=256, **kwargs
    )


def test_init_weights_start_a_run_from_an_earlier_stage_and_its_file_carries_them_on(tmp_path):
    # an earlier stage: a "pretrained" tower (frozen later), its projector and LoRA adapters, all perturbed
    earlier = parts_module(trainable=TrainableParts(vision=True), seed=1)
    with torch.no_grad():
        for param in earlier.model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param))
    earlier.save_trainable(tmp_path / "earlier.safetensors")
    expected = {name: p.detach().clone() for name, p in earlier.model.named_parameters() if p.requires_grad}

    # the next stage trains only the projector: the tower and the adapters are loaded and stay frozen
    # (the same seed: the LLM is rebuilt, not loaded, and its fingerprint must match)
    stage = parts_module(
        trainable=TrainableParts(vision=False, projector=True, lora=False),
        init_weights=[str(tmp_path / "earlier.safetensors")],
        seed=1,
    )
    params = dict(stage.model.named_parameters())
    for name, value in expected.items():
        assert torch.equal(params[name], value), name
    trainable = {name for name, p in params.items() if p.requires_grad}
    assert trainable and all(name.startswith("projector.") for name in trainable)

    # its file holds what it trained and what it was given, so the stage after needs this one file only
    stage.save_trainable(tmp_path / "stage.safetensors")
    after = parts_module(seed=1, init_weights=[str(tmp_path / "stage.safetensors")])
    after_params = dict(after.model.named_parameters())
    for name, value in expected.items():
        assert torch.equal(after_params[name], value), name
    assert any(".lora_" in n and p.requires_grad for n, p in after_params.items())  # trainable.lora defaults to true


def test_init_weights_later_files_win_and_adapters_created_from_a_file_follow_trainable_lora(tmp_path):
    first, second = parts_module(seed=1), parts_module(seed=1)  # one frozen LLM; the projectors differ below
    for module, path in ((first, "first.safetensors"), (second, "second.safetensors")):
        with torch.no_grad():
            module.model.projector[0].weight.normal_()
        module.save_trainable(tmp_path / path)
    files = [str(tmp_path / "first.safetensors"), str(tmp_path / "second.safetensors")]
    stage = parts_module(lora=None, init_weights=files, trainable=TrainableParts(projector=True, lora=False), seed=1)
    assert not torch.equal(first.model.projector[0].weight, second.model.projector[0].weight)
    assert torch.equal(stage.model.projector[0].weight, second.model.projector[0].weight)
    lora = [p for n, p in stage.model.named_parameters() if ".lora_" in n]
    assert lora and not any(p.requires_grad for p in lora)


def test_init_weights_of_another_model_are_a_clear_error(tmp_path):
    other = SafetyAlignModule(
        llm=LLMConfig(random_init={**TINY_LLM, "hidden_size": 48}),
        vision=VisionConfig(name="tiny-vit"),
        lora=None,
    )
    other.save_trainable(tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="other.safetensors.*shape"):
        parts_module(init_weights=[str(tmp_path / "other.safetensors")])
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        parts_module(init_weights=[str(tmp_path / "missing.safetensors")])
