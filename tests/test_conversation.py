import copy

import pytest

from mllm_safety.constants import IGNORE_INDEX
from mllm_safety.data.conversation import ChatEncoder, SampleError, parse_llava_record

IMAGE = object()  # parse_llava_record only checks presence


def record(*values, sample_id="s1"):
    roles = ["human", "gpt"] * len(values)
    return {"id": sample_id, "conversations": [{"from": r, "value": v} for r, v in zip(roles, values)]}


def learned_text(tokenizer, encoded):
    return tokenizer.decode([i for i, label in zip(encoded.input_ids, encoded.labels) if label != IGNORE_INDEX])


def test_only_assistant_replies_and_their_end_marker_are_learned(tokenizer):
    conv = parse_llava_record(record("<image>\nWhat is this?", "A red circle.", "Colour?", "Red."), IMAGE)
    encoded = ChatEncoder(tokenizer, num_image_tokens=5, image_token_id=-200).encode(conv)
    assert learned_text(tokenizer, encoded) == "A red circle.<|im_end|>Red.<|im_end|>"
    assert len(encoded.input_ids) == len(encoded.labels)
    # the prompt text (system, user turns, role headers) is never learned
    prompt_ids = [i for i, label in zip(encoded.input_ids, encoded.labels) if label == IGNORE_INDEX and i >= 0]
    assert "What is this?" in tokenizer.decode(prompt_ids) and "Colour?" in tokenizer.decode(prompt_ids)


def test_image_placeholder_expands_to_image_tokens_without_labels(tokenizer):
    conv = parse_llava_record(record("<image>\nDescribe it.", "A square."), IMAGE)
    encoded = ChatEncoder(tokenizer, num_image_tokens=7, image_token_id=-200).encode(conv)
    positions = [k for k, i in enumerate(encoded.input_ids) if i == -200]
    assert len(positions) == 7
    assert positions == list(range(positions[0], positions[0] + 7)), "image tokens must be contiguous"
    assert all(encoded.labels[k] == IGNORE_INDEX for k in positions)
    assert "<image>" not in tokenizer.decode([i for i in encoded.input_ids if i >= 0])


def test_training_prompt_matches_the_inference_prompt(tokenizer):
    encoder = ChatEncoder(tokenizer, num_image_tokens=3, image_token_id=-200)
    conv = parse_llava_record(record("<image>\nDescribe it.", "A square."), IMAGE)
    encoded = encoder.encode(conv)
    first_label = next(k for k, label in enumerate(encoded.labels) if label != IGNORE_INDEX)
    assert encoded.input_ids[:first_label] == encoder.encode_prompt("Describe it.", has_image=True)


def test_end_marker_can_be_left_out_of_the_loss(tokenizer):
    conv = parse_llava_record(record("Hi", "I'm sorry, but I cannot assist with your request."), None)
    conv = conv.with_turns(conv.turns, is_rejection=True, learn_end_marker=False)
    encoded = ChatEncoder(tokenizer, 3, -200).encode(conv)
    assert learned_text(tokenizer, encoded) == "I'm sorry, but I cannot assist with your request."


@pytest.mark.parametrize(
    ("rec", "image", "reason"),
    [
        (record("only a question")["conversations"][:1], None, "no_reply"),
        ([{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}], None, "bad_conversation"),
        ([{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}], None, "bad_image"),
        ([{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], IMAGE, "bad_image"),
        ("not a list", None, "bad_conversation"),
    ],
)
def test_malformed_conversations_name_the_sample(rec, image, reason):
    with pytest.raises(SampleError, match="sample 'bad-7'") as error:
        parse_llava_record({"id": "bad-7", "conversations": rec}, image)
    assert error.value.reason == reason


def test_trailing_unanswered_question_is_dropped():
    rec = record("q1", "a1")
    rec["conversations"].append({"from": "human", "value": "q2"})
    assert parse_llava_record(rec, None).turns == (("q1", "a1"),)


def test_truncation_never_cuts_the_image_and_keeps_a_reply(tokenizer):
    conv = parse_llava_record(record("<image>\nDescribe it.", "A square. " * 50), IMAGE)
    full = ChatEncoder(tokenizer, 10, -200).encode(conv)
    image_end = max(k for k, i in enumerate(full.input_ids) if i == -200) + 1
    truncated = ChatEncoder(tokenizer, 10, -200, max_length=image_end + 20).encode(conv)
    assert len(truncated.input_ids) == image_end + 20
    assert any(label != IGNORE_INDEX for label in truncated.labels)
    with pytest.raises(SampleError, match="would cut the image"):
        ChatEncoder(tokenizer, 10, -200, max_length=image_end - 1).encode(conv)
    with pytest.raises(SampleError, match="no reply token"):
        ChatEncoder(tokenizer, 10, -200, max_length=image_end + 3).encode(conv)


CONVERSATIONS = [
    record("<image>\nWhat is this?", "A red circle."),
    record(
        "Describe it.\n<image>",
        "  Leading spaces, trailing newline.\n",
        "And then?",
        "Nothing more.",
        "Why?",
        "Because.",
    ),
    record("  padded question  ", "An answer with <|im_end|> inside?", "Again", "Once more."),
    record("Yes.", "Yes."),
]


@pytest.mark.parametrize("rec", CONVERSATIONS)
def test_laid_out_turns_match_turn_by_turn_rendering(tokenizer, rec):
    image = IMAGE if "<image>" in rec["conversations"][0]["value"] else None
    conv = parse_llava_record(rec, image)
    fast = ChatEncoder(tokenizer, 3, -200)
    slow = ChatEncoder(tokenizer, 3, -200)
    slow.shape = None
    assert fast.shape is not None, "SmolLM2's template is regular"
    assert fast.encode(conv) == slow.encode(conv)


def test_a_template_that_rewrites_content_falls_back_to_rendering(tokenizer):
    trimming = copy.deepcopy(tokenizer)
    trimming.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    encoder = ChatEncoder(trimming, 3, -200)
    assert encoder.shape is not None
    conv = parse_llava_record(record("  spaced out  ", " reply "), None)
    slow = ChatEncoder(trimming, 3, -200)
    slow.shape = None
    assert encoder.encode(conv) == slow.encode(conv)
    assert "spaced out<|im_end|>" in tokenizer.decode([i for i in encoder.encode(conv).input_ids if i >= 0])
