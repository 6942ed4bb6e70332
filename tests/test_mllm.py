import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mllm_safety.constants import IGNORE_INDEX, IMAGE_TOKEN_ID
from mllm_safety.data.conversation import ChatEncoder, parse_llava_record
from mllm_safety.data.processor import MultimodalProcessor
from mllm_safety.model.mllm import MultimodalLM
from mllm_safety.model.projector import build_projector
from mllm_safety.model.vision import OpenClipVisionEncoder, VisionConfig


@pytest.fixture
def model_and_processor(tokenizer, tiny_llm):
    torch.manual_seed(0)
    vision = OpenClipVisionEncoder(VisionConfig(name="tiny-vit"))
    model = MultimodalLM(vision, build_projector("mlp2x_gelu", vision.hidden_size, 32), tiny_llm).eval()
    processor = MultimodalProcessor(
        ChatEncoder(tokenizer, vision.num_tokens, IMAGE_TOKEN_ID), vision.image_transform, vision.image_size
    )
    return model, processor


def image(colour):
    return Image.new("RGB", (120, 90), colour)


def sample(processor, sample_id, question, answer, img):
    prompt = f"<image>\n{question}" if img is not None else question
    record = {"id": sample_id, "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}]}
    return processor(parse_llava_record(record, img))


def test_image_features_land_exactly_on_image_positions(model_and_processor):
    model, processor = model_and_processor
    samples = [
        sample(processor, "a", "Describe.", "Red.", image("red")),
        sample(processor, "b", "What is 2+2?", "Four.", None),
        sample(processor, "c", "And this one?", "Blue.", image("blue")),
    ]
    batch = processor.collate(samples)
    assert batch.pixel_values.shape[0] == 2
    embeds = model.embed(batch.input_ids, batch.pixel_values)
    features = model.projector(model.vision(batch.pixel_values))
    mask = batch.input_ids == IMAGE_TOKEN_ID
    assert mask[1].sum() == 0
    torch.testing.assert_close(embeds[0][mask[0]], features[0])
    torch.testing.assert_close(embeds[2][mask[2]], features[1])
    text = model.llm.get_input_embeddings()(batch.input_ids.clamp(min=0))
    torch.testing.assert_close(embeds[~mask], text[~mask])


def test_loss_is_the_mean_over_all_reply_tokens_of_the_batch(model_and_processor):
    model, processor = model_and_processor
    samples = [
        sample(processor, "a", "Describe.", "A long answer with many reply tokens in it.", image("red")),
        sample(processor, "b", "Hi?", "Hi.", None),
    ]
    batch = processor.collate(samples)
    out = model(**batch.model_inputs())
    inputs = batch.model_inputs() | {"labels": None}
    logits, labels = model(**inputs).logits[:, :-1], batch.labels[:, 1:]
    token_losses = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
    mask = labels != IGNORE_INDEX
    expected = token_losses[mask].mean()
    per_sample_mean = torch.stack([token_losses[i][mask[i]].mean() for i in range(2)]).mean()
    torch.testing.assert_close(out.loss, expected)
    assert out.num_label_tokens == mask.sum()
    assert not torch.isclose(out.loss, per_sample_mean), "the test needs samples of different reply lengths"


def test_padding_side_and_batch_mates_do_not_change_logits(model_and_processor):
    model, processor = model_and_processor
    short = sample(processor, "a", "Hi?", "Hi.", image("green"))
    long = sample(processor, "b", "A much longer question that needs more tokens?", "Yes.", None)
    alone = model(**processor.collate([short]).model_inputs() | {"labels": None}).logits[0]
    for side in ("right", "left"):
        batch = processor.collate([short, long], padding_side=side)
        logits = model(**batch.model_inputs() | {"labels": None}).logits[0][batch.attention_mask[0].bool()]
        torch.testing.assert_close(logits, alone, atol=1e-4, rtol=1e-4)


def test_text_only_batch_still_runs_the_vision_path(model_and_processor):
    model, processor = model_and_processor
    batch = processor.collate([sample(processor, "b", "What is 2+2?", "Four.", None)])
    assert batch.pixel_values.shape == (0, 3, *processor.image_size)
    model.train()
    model(**batch.model_inputs()).loss.backward()
    assert all(p.grad is not None for p in model.projector.parameters()), "projector must take part in every step"


def test_generation_of_an_unsharded_model_runs_the_vision_tower_only_for_images(model_and_processor):
    model, processor = model_and_processor
    calls = []
    model.vision.register_forward_hook(lambda *_: calls.append(1))
    text_only = processor.collate([processor.prompt("t", "Say hello.", None)], padding_side="left")
    model.generate(text_only.input_ids, text_only.attention_mask, text_only.pixel_values, 2)
    assert calls == [], "a text-only batch needs no blank image unless the model is sharded"
    with_image = processor.collate([processor.prompt("i", "What is it?", image("red"))], padding_side="left")
    model.generate(with_image.input_ids, with_image.attention_mask, with_image.pixel_values, 2)
    assert calls == [1], "the hook counts the tower's calls"


def test_image_token_count_mismatch_is_an_error(model_and_processor):
    model, processor = model_and_processor
    batch = processor.collate([sample(processor, "a", "Describe.", "Red.", image("red"))])
    with pytest.raises(ValueError, match="image positions"):
        model.embed(batch.input_ids, torch.cat([batch.pixel_values, batch.pixel_values]))


def test_batched_generation_equals_one_prompt_at_a_time(model_and_processor):
    model, processor = model_and_processor
    prompts = [
        processor.prompt("a", "Describe the image.", image("red")),
        processor.prompt("b", "Write a long story about a dragon and a knight?", None),
        processor.prompt("c", "Hi", image("blue")),
    ]
    pad = processor.tokenizer.pad_token_id
    batch = processor.collate(prompts, padding_side="left")
    together = model.generate(batch.input_ids, batch.attention_mask, batch.pixel_values, 8, pad_token_id=pad)
    for row, prompt in enumerate(prompts):
        one = processor.collate([prompt], padding_side="left")
        alone = model.generate(one.input_ids, one.attention_mask, one.pixel_values, 8, pad_token_id=pad)
        assert together[row, : alone.shape[1]].tolist() == alone[0].tolist()
    with pytest.raises(ValueError, match="left padding"):
        right = processor.collate(prompts, padding_side="right")
        model.generate(right.input_ids, right.attention_mask, right.pixel_values, 2)


@pytest.mark.parametrize(("kind", "layers"), [("linear", 1), ("mlp1x_gelu", 1), ("mlp2x_gelu", 2), ("mlp3x_gelu", 3)])
def test_projector_shapes(kind, layers):
    projector = build_projector(kind, 128, 32)
    linears = [m for m in projector.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == layers
    assert projector(torch.zeros(2, 5, 128)).shape == (2, 5, 32)


@pytest.mark.parametrize("kind", ["mlp", "mlp0x_gelu", "conv"])
def test_unknown_projector_is_an_error(kind):
    with pytest.raises(ValueError, match=repr(kind)):
        build_projector(kind, 8, 8)


@pytest.mark.parametrize(("select_layer", "keep_cls", "tokens"), [(-2, False, 36), (-1, True, 37), (1, False, 36)])
def test_vision_patch_tokens_come_from_the_selected_block(select_layer, keep_cls, tokens):
    """The reference runs the full, uncut tower by hand and indexes its hidden states the HF/LLaVA way
    (``hidden_states[0]`` is the embedding): an off-by-one in the encoder's block index or cut shows here."""
    full = open_clip.create_model("tiny-vit").visual.eval()
    encoder = OpenClipVisionEncoder(VisionConfig(name="tiny-vit", select_layer=select_layer, keep_cls=keep_cls))
    assert not encoder.visual.load_state_dict(full.state_dict(), strict=False).missing_keys
    torch.manual_seed(0)
    pixels = torch.randn(2, 3, 96, 96)
    out = encoder(pixels)
    assert out.shape == (2, tokens, 128) and encoder.num_tokens == tokens
    hidden_states = [full._embeds(pixels)]
    for block in full.transformer.resblocks:
        hidden_states.append(block(hidden_states[-1]))
    assert len(hidden_states) == 4, "tiny-vit has three blocks"
    reference = hidden_states[select_layer]
    torch.testing.assert_close(out, reference if keep_cls else reference[:, 1:])


def test_unknown_vision_model_is_an_error():
    with pytest.raises(ValueError, match="'ViT-Nope'"):
        VisionConfig(name="ViT-Nope")
