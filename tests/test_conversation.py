import copy
import pickle
import re
import types

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
    assert encoded.id == "s1" and encoded.image is IMAGE
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
    assert "image" not in tokenizer.decode([i for i in encoded.input_ids if i >= 0]), "no piece of the placeholder"


def test_training_prompt_matches_the_inference_prompt(tokenizer):
    encoder = ChatEncoder(tokenizer, num_image_tokens=3, image_token_id=-200)
    conv = parse_llava_record(record("<image>\nDescribe it.", "A square."), IMAGE)
    encoded = encoder.encode(conv)
    first_label = next(k for k, label in enumerate(encoded.labels) if label != IGNORE_INDEX)
    assert encoded.input_ids[:first_label] == encoder.encode_prompt("Describe it.", has_image=True)


def test_end_marker_can_be_left_out_of_the_loss(tokenizer):
    conv = parse_llava_record(record("Hi", "I'm sorry, but I cannot assist with your request."), None)
    conv = conv.with_turns(conv.turns, is_rejection=True, learn_end_marker=False)
    assert conv.is_rejection
    encoded = ChatEncoder(tokenizer, 3, -200).encode(conv)
    assert learned_text(tokenizer, encoded) == "I'm sorry, but I cannot assist with your request."


@pytest.mark.parametrize(
    ("rec", "image", "reason", "detail"),
    [
        (record("only a question")["conversations"][:1], None, "no_reply", "no assistant turn"),
        (
            [{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}],
            None,
            "bad_conversation",
            r"turns 0-1 have roles \['gpt', 'human'\]",
        ),
        (["human: q", "gpt: a"], None, "bad_conversation", r"roles \[None, None\]"),
        ([{"from": "human", "value": "q"}, {"from": "gpt", "value": 3}], None, "bad_conversation", "non-string"),
        ([{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}], None, "bad_image", "but no image"),
        ([{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], IMAGE, "bad_image", "has an image but no"),
        (record("<image> and <image>", "a")["conversations"], IMAGE, "bad_image", "2 <image> placeholders"),
        ("not a list", None, "bad_conversation", "non-empty list"),
        ([], None, "bad_conversation", "non-empty list"),
    ],
)
def test_malformed_conversations_name_the_sample_and_the_problem(rec, image, reason, detail):
    with pytest.raises(SampleError, match="sample 'bad-7'") as error:
        parse_llava_record({"id": "bad-7", "conversations": rec}, image)
    assert error.value.reason == reason
    assert error.value.sample_id == "bad-7"
    assert re.search(detail, error.value.detail), error.value.detail


def test_a_record_without_id_is_named_as_such():
    with pytest.raises(SampleError, match="sample '<no id>'"):
        parse_llava_record({"conversations": []}, None)


def test_a_parsed_record_keeps_its_id_image_and_source():
    parsed = parse_llava_record(record("<image>\nq", "a", sample_id="s9") | {"source": "med"}, IMAGE)
    assert (parsed.id, parsed.image, parsed.source) == ("s9", IMAGE, "med")
    assert parse_llava_record(record("q", "a") | {"source": 3}, None).source is None, "a source is a name"


def test_skip_errors_survive_pickling_into_the_main_process():
    """Loader workers send skips to the main process, which counts them by reason."""
    error = pickle.loads(pickle.dumps(SampleError("s1", "too_long", "detail")))
    assert (error.sample_id, error.reason, error.detail) == ("s1", "too_long", "detail")
    assert str(error) == "sample 's1': detail"
    with pytest.raises(ValueError, match="unknown skip reason 'nope'"):
        SampleError("s1", "nope", "detail")


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
    with pytest.raises(SampleError, match="sample 's1': .* would cut the image"):
        ChatEncoder(tokenizer, 10, -200, max_length=image_end - 1).encode(conv)
    with pytest.raises(SampleError, match="sample 's1': no reply token"):
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


def sentencepiece_llama_tokenizer(legacy: bool):
    """A LLaVA-1.5-style Llama tokenizer built offline: sentencepiece's '▁' word boundaries, byte fallback, a few merges
    (so tokens span characters at span boundaries), BOS added, and <image> as a special token as in llava-hf."""
    from transformers import LlamaTokenizer

    from mllm_safety.model.chat_templates import LLAVA_V1_CHAT_TEMPLATE

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{i:02X}>": 3 + i for i in range(256)}
    for char in "▁abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ:?.,'!":
        vocab.setdefault(char, len(vocab))
    merges = [("▁", "A"), ("U", "S"), ("US", "E"), ("USE", "R"), ("▁", "USER"), ("▁A", "S"), ("▁", "I"), ("'", "m")]
    merges += [("▁", "s"), ("▁s", "o"), ("r", "r"), ("▁so", "rr"), ("e", "d"), ("▁", "R"), ("▁R", "ed")]
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    tokenizer = LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, legacy=legacy)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tokenizer.chat_template = LLAVA_V1_CHAT_TEMPLATE
    return tokenizer


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("image", [True, False])
@pytest.mark.parametrize("swap", ["none", "paper", "every turn"])
def test_llava_v1_label_masks_on_a_sentencepiece_llama_tokenizer_equal_one_whole_tokenization(legacy, image, swap):
    """LLaVA-1.5's template on a Llama tokenizer (transformers 5 builds it as sentencepiece's '▁' scheme, 'legacy'
    adding a prefix space after special tokens too): input ids equal tokenizing the whole conversation at once, and
    exactly the tokens covering reply text (and a learned '</s>') are learned, at every boundary."""
    from PIL import Image

    from mllm_safety.data.rejection import PAPER_REJECTION, RejectionConfig, RejectionSwap

    tokenizer = sentencepiece_llama_tokenizer(legacy)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    first = "<image>\nWhat is it?" if image else "What is it?"
    rec = record(first, "A red circle, I'm sure.", "And you?", "Red!", "Bye.", "Bye bye.")
    conv = parse_llava_record(rec, Image.new("RGB", (4, 4)) if image else None)
    if swap != "none":
        conv = RejectionSwap(1.0, RejectionConfig(keep_one_turn=swap == "paper"))(conv)
    encoded = ChatEncoder(tokenizer, num_image_tokens=3, image_token_id=image_id).encode(conv)

    messages = [
        m
        for human, reply in conv.turns
        for m in ({"role": "user", "content": human}, {"role": "assistant", "content": reply})
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    whole = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    learned_ranges, cursor = [], 0
    for _, reply in conv.turns:
        # what the model produces after the generation prompt 'ASSISTANT:': the reply with its leading space
        start = text.index(f"ASSISTANT: {reply}</s>", cursor) + len("ASSISTANT:")
        cursor = start + len(f" {reply}") + len("</s>") * conv.learn_end_marker
        learned_ranges.append((start, cursor))
    expected_ids, expected_labels = [], []
    for token, (a, b) in zip(whole["input_ids"], whole["offset_mapping"]):
        count = 3 if token == image_id else 1
        learned = token != image_id and any(a < end and b > start for start, end in learned_ranges)
        expected_ids += [token] * count
        expected_labels += [token if learned else IGNORE_INDEX] * count
    assert encoded.input_ids == expected_ids and encoded.input_ids[0] == tokenizer.bos_token_id
    assert encoded.labels == expected_labels
    assert expected_ids.count(image_id) == (3 if image else 0)

    # what is learned, read back: every reply, its '</s>' unless it is the paper's swapped rejection
    end = "" if swap != "none" else "</s>"
    replies = [reply for _, reply in conv.turns]
    assert learned_text(tokenizer, encoded).replace(" ", "") == "".join(r + end for r in replies).replace(" ", "")
    if swap != "none":
        assert replies == [PAPER_REJECTION] * len(replies) and len(replies) == (1 if swap == "paper" else 3)
    # the spans around each boundary: system prompt + 'USER:', image, 'ASSISTANT:' and what follows '</s>' are not
    prompt = tokenizer.decode(
        [i for i, label in zip(encoded.input_ids, encoded.labels) if label == IGNORE_INDEX and i != image_id]
    )
    assert prompt.count("USER:") == len(replies) and prompt.count("ASSISTANT:") == len(replies)
    assert "human's questions." in prompt and "What is it?" in prompt


def test_a_token_is_learned_when_it_covers_reply_text_zero_width_tokens_included():
    """Tokenizers that trim offsets (GPT-2's ByteLevel) give whitespace tokens inside a reply a zero width."""
    import itertools

    from mllm_safety.data.conversation import _covers_learned

    mark = bytearray(b"\x00\x00\x01\x01\x01\x00\x00")  # characters 2..4 are a learned reply
    before = [0, *itertools.accumulate(mark)]
    assert [_covers_learned(o, mark, before) for o in [(0, 2), (1, 3), (4, 6), (5, 6)]] == [False, True, True, False]
    assert [_covers_learned(o, mark, before) for o in [(3, 3), (1, 1), (5, 5)]] == [True, False, False]


def test_llava_hf_template_reads_content_parts_and_gets_the_bos_it_does_not_write():
    """llava-hf's template renders typed content parts (a plain string renders as nothing) and writes no BOS, which
    its Llama tokenizer adds: the sample is one BOS and the whole rendered text tokenized at once, the <image> token
    expanded, only the replies learned."""
    from conftest import LLAVA_HF_CHAT_TEMPLATE

    tokenizer = sentencepiece_llama_tokenizer(legacy=False)
    tokenizer.chat_template = LLAVA_HF_CHAT_TEMPLATE
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    conv = parse_llava_record(record("What is it?\n<image>", "A red circle.", "And you?", "Red!"), IMAGE)
    encoded = ChatEncoder(tokenizer, num_image_tokens=3, image_token_id=image_id).encode(conv)

    # <image> stays where the text has it; the text ends with the last reply (what follows is not in the sample)
    text = "USER: What is it?\n<image> ASSISTANT: A red circle. USER: And you? ASSISTANT: Red!"
    whole = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert whole.count(image_id) == 1
    assert encoded.input_ids == [tokenizer.bos_token_id, *(i for t in whole for i in [t] * (3 if t == image_id else 1))]
    assert learned_text(tokenizer, encoded) == "A red circle. Red!"


def test_image_parts_let_the_template_place_the_image():
    """Hub VLMs: the user's <image> becomes an image content part, wherever it stood, and the template writes it."""
    from conftest import LLAVA_HF_CHAT_TEMPLATE

    tokenizer = sentencepiece_llama_tokenizer(legacy=False)
    tokenizer.chat_template = LLAVA_HF_CHAT_TEMPLATE
    encoder = ChatEncoder(tokenizer, 3, tokenizer.convert_tokens_to_ids("<image>"), image_parts=True)
    assert encoder.prompt_text("What is it?\n<image>", has_image=True) == "USER: <image>\nWhat is it? ASSISTANT:"
    conv = parse_llava_record(record("Left <image> right ", "Both."), IMAGE)  # only the image's side is trimmed
    assert encoder.turn_texts(conv)[0][1] == "USER: <image>\nLeft right  ASSISTANT: Both. "


GENERATION = "{% if add_generation_prompt %}assistant:{% endif %}"
TURN = "{% for m in messages %}{{ m['role'] }}: CONTENT\n{% endfor %}" + GENERATION


@pytest.mark.parametrize(
    "template",
    [
        "{{ messages[-1]['role'] }}: {{ messages[-1]['content'] }}\n" + GENERATION,
        TURN.replace("CONTENT", "{% if m['role'] == 'user' or loop.last %}{{ m['content'] }}{% endif %}"),
        TURN.replace("CONTENT", "{{ m['content'] | upper if m['role'] == 'assistant' else m['content'] }}"),
    ],
    ids=["last message only", "earlier replies dropped", "replies rewritten"],
)
def test_a_template_that_does_not_render_turn_by_turn_is_a_named_skip(tokenizer, template):
    """Label masks need each turn's prompt to extend the text before it and the reply to appear as written; a
    template that breaks either cannot be laid out, and the sample is skipped with a reason instead of learning the
    wrong tokens."""
    irregular = copy.deepcopy(tokenizer)
    irregular.chat_template = template
    conv = parse_llava_record(record("Hi", "Hello there, my friend.", "Bye", "Bye."), None)
    with pytest.raises(SampleError, match="sample 's1': the chat template does not render") as error:
        ChatEncoder(irregular, 3, -200).encode(conv)
    assert error.value.reason == "template"


def test_a_template_that_refuses_plain_string_content_gets_content_parts(tokenizer):
    parts_only = copy.deepcopy(tokenizer)
    parts_only.chat_template = (
        "{% for m in messages %}{% if m['content'] is string %}{{ raise_exception('typed parts only') }}{% endif %}"
        "{{ m['role'] }}: {{ m['content'][0]['text'] }}\n{% endfor %}" + GENERATION
    )
    encoded = ChatEncoder(parts_only, 3, -200).encode(parse_llava_record(record("Hi", "Hello."), None))
    assert learned_text(tokenizer, encoded) == " Hello."  # the reply's first token carries the space before it


def test_label_masks_need_a_fast_tokenizer():
    """Masks come from the tokens' character offsets, which only a fast (tokenizers) tokenizer gives."""
    with pytest.raises(ValueError, match="SimpleNamespace is not a fast .* character offsets"):
        ChatEncoder(types.SimpleNamespace(), 3, -200)


def test_a_template_that_checks_roles_is_read_with_the_roles_it_knows(tokenizer):
    """Templates such as Llama 2's raise on a role they do not know; the encoder's probes use the real roles."""
    strict = copy.deepcopy(tokenizer)
    strict.chat_template = (
        "{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}{{ raise_exception('unknown role') }}"
        "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    encoded = ChatEncoder(strict, 3, -200).encode(parse_llava_record(record("Hi", "Hello."), None))
    assert learned_text(tokenizer, encoded) == "Hello.<|im_end|>"
