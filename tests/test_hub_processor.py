"""The hub processor: images of any size batch as transformers batches them, image tokens count in lengths and are
never cut, and the same shards feed every family."""

import io

import pytest
import torch
from data_helpers import pieces_of
from hub_models import CHAT_TEMPLATES, FAMILIES
from PIL import Image

from mllm_safety.constants import IMAGE_TOKEN_ID, cache_dir
from mllm_safety.data.conversation import ChatEncoder, SampleError, parse_llava_record
from mllm_safety.data.hub_processor import HubProcessor, stack_images
from mllm_safety.data.manifest import Manifest, ShardSetWriter
from mllm_safety.data.rejection import RejectionConfig, RejectionSwap
from mllm_safety.data.slot_templates import LLAMAFACTORY_TEMPLATES
from mllm_safety.data.streaming import ShardStream
from mllm_safety.data.synthetic import ensure_demo_shards
from mllm_safety.model.hub_vlm import HubOptions, load_hub_processor

SMALL, BIG = (40, 30), (120, 70)


def hub_processor(path, family, max_length=512):
    hf_processor = load_hub_processor(path, HubOptions(chat_template=CHAT_TEMPLATES.get(family)))
    template = LLAMAFACTORY_TEMPLATES.get(CHAT_TEMPLATES.get(family))
    encoder = ChatEncoder(hf_processor.tokenizer, 0, IMAGE_TOKEN_ID, max_length, image_parts=True, template=template)
    return HubProcessor(hf_processor, encoder, [hf_processor.tokenizer.eos_token_id])


def picture(size, colour="red"):
    image = Image.new("RGB", size, colour)
    image.paste((255, 255, 255), (2, 2, size[0] // 2, size[1] // 3))
    return image


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_images_of_different_sizes_batch_like_the_transformers_processor(family, hub_checkpoint):
    processor = hub_processor(hub_checkpoint(family), family)
    hf_processor = processor.hf_processor
    images = [picture(SMALL), picture(BIG, "blue")]
    batch = processor.collate(
        [processor.prompt(str(i), "What is it?", image) for i, image in enumerate(images)], "left"
    )
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    text = hf_processor.apply_chat_template(messages, add_generation_prompt=True)
    bos = processor.tokenizer.bos_token
    expected = hf_processor(
        text=[text, text],
        images=[[image] for image in images],
        padding=True,
        padding_side="left",
        add_special_tokens=not (bos and text.startswith(bos)),
        return_tensors="pt",
    )
    if CHAT_TEMPLATES.get(family) in LLAMAFACTORY_TEMPLATES:
        # tokenized piece by piece as LLaMA-Factory does (tests/test_paper_templates.py): the same text
        def texts(ids, mask):
            return [processor.tokenizer.decode(row[keep.bool()]) for row, keep in zip(ids, mask)]

        assert texts(batch.input_ids, batch.attention_mask) == texts(expected["input_ids"], expected["attention_mask"])
    else:
        assert batch.input_ids.tolist() == expected["input_ids"].tolist()
        assert batch.attention_mask.tolist() == expected["attention_mask"].tolist()
    torch.testing.assert_close(batch.pixel_values, expected["pixel_values"], atol=0, rtol=0)
    assert set(batch.extra_inputs) == set(expected) - {"input_ids", "attention_mask", "pixel_values"}
    for name, value in batch.extra_inputs.items():
        assert torch.equal(value, expected[name]), name
    if family != "yi_vl":  # every other family gives a bigger image more tokens
        assert len(set(batch.attention_mask.sum(1).tolist())) == 2


def test_stacking_pads_tiles_and_frames_with_zeros_and_concatenates_patch_rows():
    tiles = stack_images([torch.ones(1, 3, 2, 4, 4), torch.ones(1, 5, 2, 4, 4)])
    assert tiles.shape == (2, 5, 2, 4, 4) and tiles[0, 3:].abs().sum() == 0 and tiles[1].min() == 1
    rows = stack_images([torch.ones(6, 8), torch.ones(10, 8)])
    assert rows.shape == (16, 8)


def write_shards(folder, sizes):
    """One sample per image size, alternating, with the same conversation: lengths differ by image tokens only."""
    with ShardSetWriter(folder, "mix", shard_size=len(sizes)) as writer:
        writer.start_shard()
        for index, size in enumerate(sizes):
            buffer = io.BytesIO()
            picture(size).save(buffer, format="PNG")
            conversation = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A box."}]
            writer.write(f"s{index}", {"id": f"s{index}", "conversations": conversation}, ("png", buffer.getvalue()))
    Manifest(shards=writer.entries).write(folder)
    return pieces_of(folder)


def stream(pieces, processor, **options):
    options = {"batch_size": 2, "shuffle_buffer": 0, "group_batches": 4} | options
    return ShardStream(pieces, processor, RejectionSwap(0.0, RejectionConfig()), **options)


def test_length_grouping_counts_image_tokens(hub_checkpoint, tmp_path):
    processor = hub_processor(hub_checkpoint("llava_next_mistral"), "llava_next_mistral")
    sizes = [SMALL, BIG] * 4
    pieces = write_shards(tmp_path, sizes)
    batches = list(stream(pieces, processor))
    assert len(batches) == 4
    for batch in batches:  # a batch holds images of one size: the text is the same, only image tokens differ
        assert len({sizes[int(i[1:])] for i in batch.ids}) == 1
        assert batch.attention_mask.all(), "no padding left"


def test_a_sample_whose_image_tokens_would_be_cut_is_skipped_and_counted(hub_checkpoint, tmp_path):
    path = hub_checkpoint("llava_next_mistral")
    record = {"id": "big", "conversations": [{"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "A."}]}
    lengths = [
        len(hub_processor(path, "llava_next_mistral")(parse_llava_record(record, picture(s))).input_ids)
        for s in (SMALL, BIG)
    ]
    max_length = lengths[0] + 2  # the small image's sample fits, the big one's image tokens would be cut
    processor = hub_processor(path, "llava_next_mistral", max_length=max_length)
    with pytest.raises(SampleError, match=f"max_length={max_length} would cut the image") as error:
        processor(parse_llava_record(record, picture(BIG)))
    assert error.value.reason == "too_long"
    pieces = write_shards(tmp_path, [SMALL, BIG] * 2)
    batches = list(stream(pieces, processor, batch_size=2, group_batches=1))
    assert sum(batch.stats["skipped_too_long"] for batch in batches) == 2
    assert all(len(ids) <= max_length for batch in batches for ids in batch.input_ids)
    assert {i for batch in batches for i in batch.ids} == {"s0", "s2"}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_same_shards_train_every_family(family, hub_checkpoint):
    processor = hub_processor(hub_checkpoint(family), family)
    shards = ensure_demo_shards(cache_dir() / "data", 32, 0)
    pieces = pieces_of(shards[0].parent)
    batches = list(stream(pieces, processor, batch_size=4))
    assert sum(len(b.ids) - b.stats["repeated"] for b in batches) == 32
    assert not any(b.stats[name] for b in batches for name in b.stats if name.startswith("skipped"))
    assert all((b.labels != -100).any(dim=1).all() for b in batches)
    assert any(b.pixel_values.numel() for b in batches)


def test_processor_kwargs_bound_the_image_tokens(hub_checkpoint):
    path = hub_checkpoint("qwen25_vl")
    sample = hub_processor(path, "qwen25_vl").prompt("a", "What?", picture((300, 200)))
    options = HubOptions(processor_kwargs={"max_pixels": 56 * 56})
    hf_processor = load_hub_processor(path, options)
    encoder = ChatEncoder(hf_processor.tokenizer, 0, IMAGE_TOKEN_ID, 512, image_parts=True)
    bounded = HubProcessor(hf_processor, encoder, [0]).prompt("a", "What?", picture((300, 200)))
    image_tokens = [int((s.token_inputs["mm_token_type_ids"] == 1).sum()) for s in (sample, bounded)]
    assert image_tokens == [12, 2]  # 6 x 8 patches of 14 px merged 2 x 2; at most 56 x 56 px: 2 x 4 patches
