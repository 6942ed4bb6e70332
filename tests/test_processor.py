import pytest
import torch
from data_helpers import tiny_processor
from PIL import Image

from mllm_safety.data.conversation import Conversation
from mllm_safety.data.processor import MultimodalProcessor
from mllm_safety.model.vision import VisionConfig, build_vision_encoder


def conversation(sample_id, colour):
    return Conversation(sample_id, (("<image>\nWhat?", "A square."),), Image.new("RGB", (40, 24), colour))


def test_training_pixels_stay_uint8_until_the_device_and_then_match_the_full_transform(tokenizer):
    processor = tiny_processor(tokenizer)
    samples = [processor.stream_sample(conversation("a", (200, 30, 10))), processor(conversation("b", (5, 90, 250)))]
    assert samples[1].pixel_values.dtype == torch.float32, "samples outside the stream are model-ready"
    samples[1] = processor.stream_sample(conversation("b", (5, 90, 250)))
    batch = processor.collate(samples)
    assert batch.pixel_values.dtype == torch.uint8 and batch.pixel_values.shape == (2, 3, 16, 16)
    expected = torch.stack(
        [processor.image_transform(conversation(k, c).image) for k, c in [("a", (200, 30, 10)), ("b", (5, 90, 250))]]
    )
    assert torch.equal(processor.finish_pixels(batch.pixel_values), expected)
    assert processor.finish_pixels(expected) is expected, "ready pixels pass through"


def test_a_transform_that_cannot_be_split_runs_whole_in_the_workers(tokenizer):
    base = tiny_processor(tokenizer)
    processor = MultimodalProcessor(base.encoder, lambda image: base.image_transform(image) * 2, (16, 16))
    batch = processor.collate([processor.stream_sample(conversation("a", "red"))])
    assert batch.pixel_values.dtype == torch.float32
    assert torch.equal(processor.finish_pixels(batch.pixel_values), batch.pixel_values)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs a GPU")
def test_batches_pin_their_tensors(tokenizer):
    processor = tiny_processor(tokenizer)
    batch = processor.collate([processor(conversation("a", "red"))])
    batch.stats = {"repeated": 0}
    pinned = batch.pin_memory()
    assert pinned.input_ids.is_pinned() and pinned.pixel_values.is_pinned()
    assert pinned.ids == ["a"] and pinned.stats == {"repeated": 0} and torch.equal(pinned.input_ids, batch.input_ids)


@pytest.mark.parametrize("aspect_ratio", ["pad", "crop"])
def test_the_model_transform_splits_and_finishes_to_the_same_pixels(tokenizer, aspect_ratio):
    tower = build_vision_encoder(VisionConfig(name="tiny-vit", image_aspect_ratio=aspect_ratio))
    processor = MultimodalProcessor(tiny_processor(tokenizer).encoder, tower.image_transform, tower.image_size)
    wide = Conversation("w", (("<image>\nWhat?", "A bar."),), Image.new("RGB", (90, 30), (10, 200, 60)))
    sample = processor.stream_sample(wide)
    assert sample.pixel_values.dtype == torch.uint8
    finished = processor.finish_pixels(processor.collate([sample]).pixel_values)[0]
    assert torch.allclose(finished, tower.image_transform(wide.image), atol=1e-6)
