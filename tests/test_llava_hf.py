"""Parity with transformers' LlavaForConditionalGeneration on a tiny random llava-hf checkpoint, and export."""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import LLAVA_HF_CHAT_TEMPLATE, write_tiny_llava
from PIL import Image
from safetensors import safe_open
from transformers import (
    AutoProcessor,
    CLIPImageProcessor,
    LlamaTokenizer,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from mllm_safety.constants import IGNORE_INDEX
from mllm_safety.data.conversation import ChatEncoder, parse_llava_record
from mllm_safety.data.processor import MultimodalProcessor
from mllm_safety.model.chat_templates import LLAVA_V1_CHAT_TEMPLATE
from mllm_safety.model.llava_hf import (
    load_llava_hf,
    load_llava_tokenizer,
    read_llava_config,
    save_llava_hf,
)
from mllm_safety.model.lora import LoraSettings, apply_lora
from mllm_safety.model.mllm import MultimodalLM
from mllm_safety.model.projector import build_projector

ATOL = 1e-4


@pytest.fixture(scope="module")
def reference(tiny_llava_path):
    return LlavaForConditionalGeneration.from_pretrained(tiny_llava_path).eval()


def ours(path, aspect="crop"):
    model = load_llava_hf(path, image_aspect_ratio=aspect).eval()
    tokenizer = load_llava_tokenizer(path)
    processor = MultimodalProcessor(
        ChatEncoder(tokenizer, model.vision.num_tokens, model.image_token_id),
        model.vision.image_transform,
        model.vision.image_size,
    )
    return model, processor


def picture(colour, size=(40, 30)):
    image = Image.new("RGB", size, colour)
    image.paste((255, 255, 255), (5, 5, 15, 12))
    return image


def reference_logits(reference, batch):
    pixel_values = batch.pixel_values if batch.pixel_values.shape[0] else None
    with torch.no_grad():
        return reference(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=pixel_values
        ).logits


def test_prompt_ids_and_pixels_match_the_transformers_processor(tiny_llava_path):
    _, processor = ours(tiny_llava_path)
    hf_processor = AutoProcessor.from_pretrained(tiny_llava_path)
    image = picture("red")
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    text = hf_processor.apply_chat_template(conversation, add_generation_prompt=True)
    expected = hf_processor(images=image, text=text, return_tensors="pt")
    sample = processor.prompt("a", "What is this?", image)
    assert sample.input_ids.tolist() == expected["input_ids"][0].tolist()
    assert (sample.input_ids == read_llava_config(tiny_llava_path).image_token_index).sum() == 25
    torch.testing.assert_close(sample.pixel_values, expected["pixel_values"][0], atol=0, rtol=0)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("images", ["mixed", "none"])
def test_logits_match_transformers(tiny_llava_path, reference, side, images):
    model, processor = ours(tiny_llava_path)
    samples = [
        processor.prompt("a", "Describe the picture in detail, please.", picture("red") if images == "mixed" else None),
        processor.prompt("b", "Hi?", None),
        processor.prompt("c", "And this one?", picture("blue", (20, 50)) if images == "mixed" else None),
    ]
    batch = processor.collate(samples, padding_side=side)
    assert batch.pixel_values.shape[0] == (2 if images == "mixed" else 0)
    with torch.no_grad():
        logits = model(batch.input_ids, batch.attention_mask, batch.pixel_values).logits
    expected = reference_logits(reference, batch)
    real = batch.attention_mask.bool()
    torch.testing.assert_close(logits[real], expected[real], atol=ATOL, rtol=0)


def test_greedy_generation_matches_transformers(tiny_llava_path, reference):
    model, processor = ours(tiny_llava_path)
    samples = [
        processor.prompt("a", "Describe the picture.", picture("green")),
        processor.prompt("b", "Write a long story about a dragon?", None),
    ]
    batch = processor.collate(samples, padding_side="left")
    pad = processor.tokenizer.pad_token_id
    new = model.generate(batch.input_ids, batch.attention_mask, batch.pixel_values, 10, pad_token_id=pad)
    expected = reference.generate(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        pixel_values=batch.pixel_values,
        max_new_tokens=10,
        do_sample=False,
        pad_token_id=pad,
    )[:, batch.input_ids.shape[1] :]
    assert new.tolist() == expected.tolist()
    assert new.shape[1] > 1


def test_loss_is_the_reply_token_mean_of_a_hand_computation(tiny_llava_path, reference):
    model, processor = ours(tiny_llava_path)
    records = [
        (
            {
                "id": "a",
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat?"},
                    {"from": "gpt", "value": "A red box on white."},
                ],
            },
            picture("red"),
        ),  # noqa: E501
        ({"id": "b", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]}, None),
    ]
    batch = processor.collate([processor(parse_llava_record(record, image)) for record, image in records])
    loss = model(**batch.model_inputs()).loss
    logits = reference_logits(reference, batch)[:, :-1]
    targets = batch.labels[:, 1:]
    learned = targets != IGNORE_INDEX
    by_hand = F.cross_entropy(logits[learned], targets[learned])
    torch.testing.assert_close(loss, by_hand, atol=ATOL, rtol=0)
    assert learned[0].sum() != learned[1].sum(), "samples of different reply lengths test the per-token mean"


def tensors_of(folder):
    with safe_open(f"{folder}/model.safetensors", framework="pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}


def test_import_export_import_is_lossless(tiny_llava_path, tmp_path):
    model, _ = ours(tiny_llava_path, aspect="pad")
    save_llava_hf(model, tmp_path, load_llava_tokenizer(tiny_llava_path))
    _, info = LlavaForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    source, exported = tensors_of(tiny_llava_path), tensors_of(tmp_path)
    assert source.keys() == exported.keys()
    assert all(torch.equal(source[k], exported[k]) for k in source)
    again = load_llava_hf(str(tmp_path))
    state, state_again = model.state_dict(), again.state_dict()
    assert state.keys() == state_again.keys()
    assert all(torch.equal(state[k], state_again[k]) for k in state)
    exported_config = json.loads((tmp_path / "config.json").read_text())
    assert exported_config["image_token_index"] == model.image_token_id
    assert exported_config["vision_feature_layer"] == -2
    assert exported_config["vision_feature_select_strategy"] == "default"


def test_exported_processor_pads_images_like_training(tiny_llava_path, tmp_path):
    model, processor = ours(tiny_llava_path, aspect="pad")
    save_llava_hf(model, tmp_path, processor.tokenizer)
    exported = AutoProcessor.from_pretrained(tmp_path)
    image = picture("red", (50, 20))
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}]
    text = exported.apply_chat_template(conversation, add_generation_prompt=True)
    inputs = exported(images=image, text=text, return_tensors="pt")
    sample = processor.prompt("a", "What?", image)
    assert inputs["input_ids"][0].tolist() == sample.input_ids.tolist()
    torch.testing.assert_close(inputs["pixel_values"][0], sample.pixel_values, atol=1e-6, rtol=0)


def test_export_folds_lora_into_the_weights(tiny_llava_path, tmp_path):
    model, processor = ours(tiny_llava_path)
    model.llm = apply_lora(model.llm, LoraSettings(r=4, alpha=8, dropout=0.0))
    torch.manual_seed(1)
    for name, param in model.llm.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    model.eval()
    batch = processor.collate([processor.prompt("a", "Describe it.", picture("red"))])
    with torch.no_grad():
        adapted = model(batch.input_ids, batch.attention_mask, batch.pixel_values).logits
    save_llava_hf(model, tmp_path, processor.tokenizer)
    exported = LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(reference_logits(exported, batch), adapted, atol=ATOL, rtol=0)
    base = LlavaForConditionalGeneration.from_pretrained(tiny_llava_path).eval()
    assert (reference_logits(base, batch) - adapted).abs().max() > 1e-3, "the adapters must change the model"


def test_export_refuses_a_model_transformers_cannot_represent(tiny_llava_path, tmp_path, tiny_llm, tokenizer):
    from mllm_safety.model.vision import OpenClipVisionEncoder, VisionConfig

    vision = OpenClipVisionEncoder(VisionConfig(name="tiny-vit"))
    model = MultimodalLM(vision, build_projector("mlp2x_gelu", vision.hidden_size, 32), tiny_llm)
    with pytest.raises(ValueError, match="Hugging Face vision tower"):
        save_llava_hf(model, tmp_path, tokenizer)
    imported, processor = ours(tiny_llava_path)
    with pytest.raises(ValueError, match="image positions use id"):
        save_llava_hf(imported, tmp_path, tokenizer)


def test_a_folder_that_is_not_a_llava_checkpoint_is_a_clear_error(tmp_path, tiny_llm):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}.*not a LLaVA checkpoint.*config.json"):
        load_llava_hf(str(tmp_path))
    tiny_llm.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=f"{tmp_path}.*not a LLaVA checkpoint.*model_type 'llama'"):
        load_llava_hf(str(tmp_path))


def test_missing_weights_are_a_clear_error(tiny_llava_path, tmp_path):
    (tmp_path / "config.json").write_text(open(f"{tiny_llava_path}/config.json").read())
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}.*weights cannot be read"):
        load_llava_hf(str(tmp_path))


def test_hidden_size_mismatch_with_the_projector_is_a_clear_error(tiny_llava_path, tmp_path):
    config = json.loads(open(f"{tiny_llava_path}/config.json").read())
    config["vision_config"]["hidden_size"] = 64
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").symlink_to(f"{tiny_llava_path}/model.safetensors")
    with pytest.raises(ValueError, match=f"{tmp_path}.*do not fit config.json"):
        load_llava_hf(str(tmp_path))


def test_tokenizer_without_the_image_token_is_a_clear_error(tmp_path):
    write_tiny_llava(tmp_path, image_token=False)
    with pytest.raises(ValueError, match=f"tokenizer in '{tmp_path}' has no '<image>' token with id"):
        load_llava_tokenizer(str(tmp_path))


@pytest.mark.parametrize("template", ["llava-hf", "llava_v1"])
def test_prompt_ids_match_with_a_sentencepiece_style_tokenizer(template):
    """Llama's tokenizer prefixes each separately tokenized piece with '▁'; the ids must still be transformers'."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{i:02X}>": 3 + i for i in range(256)}
    for char in "▁abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ:?.,'":
        vocab.setdefault(char, len(vocab))
    tokenizer = LlamaTokenizer(vocab=vocab, merges=[], add_bos_token=True)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tokenizer.chat_template = LLAVA_HF_CHAT_TEMPLATE if template == "llava-hf" else LLAVA_V1_CHAT_TEMPLATE
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    hf_processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30}),
        tokenizer=tokenizer,
        patch_size=6,
        vision_feature_select_strategy="default",
        chat_template=tokenizer.chat_template,
        num_additional_image_tokens=1,
    )
    if template == "llava-hf":
        content = [{"type": "image"}, {"type": "text", "text": "What is it?"}]
    else:
        content = "<image>\nWhat is it?"
    text = hf_processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    # the processor adds BOS unless the template wrote it, as its own apply_chat_template(tokenize=True) does
    add_bos = not text.startswith("<s>")
    expected = hf_processor(images=picture("red"), text=text, add_special_tokens=add_bos)["input_ids"][0]
    ids = ChatEncoder(tokenizer, 25, image_token_id).encode_prompt("What is it?", has_image=True)
    assert ids == expected
    assert ids[0] == tokenizer.bos_token_id and ids.count(image_token_id) == 25
