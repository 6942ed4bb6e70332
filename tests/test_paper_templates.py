"""The paper's LLaMA-Factory templates, token by token: ids and labels of a training sample equal LLaMA-Factory's.

The paper trained llava-v1.6-mistral-7b, llama3-llava-next-8b and Yi-VL-6B with LLaMA-Factory v0.9 (the fork in
ybwang119/MLLM_safety_study: ``LLaMA-Factory/training_script/finetune_task_lora*.sh`` name the templates
``llava_next_mistral``, ``llava_next_llama3`` and ``yi_vl``). ``lf_encode`` below is LLaMA-Factory's rule, written out
here from its source, independently of ``mllm_safety.data.slot_templates``:

- ``src/llamafactory/data/template.py`` (v0.9.0/0.9.1): ``_register_template`` gives an assistant the slots
  ``["{{content}}", {"eos_token"}]``, or ``["{{content}}"]`` when ``efficient_eos``; ``Template._encode`` writes
  turn 0 as ``format_prefix + format_system(system) + format_user(query)``, turn t as ``format_separator +
  format_user(query)``, each reply as ``format_assistant``; ``_convert_elements_to_ids`` tokenizes every string slot
  on its own with ``add_special_tokens=False`` and writes ``{"bos_token"}``/``{"eos_token"}`` as ids;
  ``get_template_and_fix_tokenizer`` makes the first stop word the EOS when ``replace_eos`` and registers the other
  stop words as special tokens. The three registrations are copied into ``LF`` below.
- ``src/llamafactory/data/mm_plugin.py``: the ``llava``/``llava_next`` plugins replace each ``<image>`` of a message
  by as many ``<image>`` as the image has features (counted by the model's processor).
- The fork's ``src/llamafactory/data/processors/supervised.py`` (``_encode_supervised_example``, lines 34-90):
  prompt labels are ignored, except that with ``efficient_eos`` a turn's first prompt token is labelled EOS; replies
  are learned; ``efficient_eos`` appends one learned EOS; after the rejection sentence (lines 83-89) that EOS is not
  appended, and without ``efficient_eos`` the last token (the reply's EOS) is dropped.
"""

from __future__ import annotations

import copy
import re

import pytest
from hub_models import LLAMA3_TOKENS, _tokenizer, write_tiny_llava_next, write_tiny_yi_vl
from PIL import Image

from mllm_safety.constants import IGNORE_INDEX
from mllm_safety.data.conversation import ChatEncoder, parse_llava_record
from mllm_safety.data.rejection import PAPER_REJECTION, RejectionConfig, RejectionSwap
from mllm_safety.data.slot_templates import LLAMAFACTORY_TEMPLATES
from mllm_safety.model.hub_vlm import HubOptions
from mllm_safety.model.llava_hf import load_llava_tokenizer
from mllm_safety.model.lora import LoraSettings
from mllm_safety.train.module import SafetyAlignModule

EOS = {"eos_token"}
BOS = {"bos_token"}
YI_SYSTEM = (
    "This is a chat between an inquisitive human and an AI assistant. "
    "Assume the role of the AI assistant. Read all the images carefully, "
    "and respond to the human's questions with informative, helpful, detailed and polite answers. "
    "这是一个好奇的人类和一个人工智能助手之间的对话。假设你扮演这个AI助手的角色。"
    "仔细阅读所有的图像，并对人类的问题做出信息丰富、有帮助、详细的和礼貌的回答。\n\n"
)
LF = {
    "llava_next_mistral": {
        "format_user": ["[INST] {{content}} [/INST]"],
        "format_prefix": [BOS],
    },
    "llava_next_llama3": {
        "format_user": [
            "<|start_header_id|>user<|end_header_id|>\n\n{{content}}<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n"
        ],
        "format_system": ["<|start_header_id|>system<|end_header_id|>\n\n{{content}}<|eot_id|>"],
        "format_prefix": [BOS],
        "stop_words": ["<|eot_id|>"],
        "replace_eos": True,
    },
    "yi_vl": {
        "format_user": ["### Human: {{content}}\n### Assistant:"],
        "format_separator": ["\n"],
        "default_system": YI_SYSTEM,
        "stop_words": ["###"],
        "efficient_eos": True,
    },
}
"""LLaMA-Factory v0.9's registrations of the three templates (``template.py``); unset fields take its defaults."""


def lf_fix_tokenizer(tokenizer, name):
    """``get_template_and_fix_tokenizer``: the first stop word becomes the EOS with ``replace_eos``; the others are
    registered as special tokens."""
    tokenizer = copy.deepcopy(tokenizer)
    stop_words = LF[name].get("stop_words", [])
    if LF[name].get("replace_eos"):
        tokenizer.add_special_tokens({"eos_token": stop_words[0]})
        stop_words = stop_words[1:]
    if stop_words:
        tokenizer.add_special_tokens({"additional_special_tokens": stop_words}, replace_extra_special_tokens=False)
    return tokenizer


def lf_encode(tokenizer, name, turns, image_seqlen):
    """LLaMA-Factory's ``input_ids`` and ``labels`` of a conversation (``turns``: (query, reply) pairs, the first
    query holding ``<image>``), as the paper's fork computes them."""
    rules = LF[name]
    efficient = rules.get("efficient_eos", False)
    assistant = ["{{content}}"] if efficient else ["{{content}}", EOS]

    def ids(slots, content=""):
        out = []
        for slot in slots:
            if isinstance(slot, str):
                text = slot.replace("{{content}}", content)
                out += tokenizer.encode(text, add_special_tokens=False) if text else []
            elif "bos_token" in slot:
                out.append(tokenizer.bos_token_id)
            else:
                out.append(tokenizer.eos_token_id)
        return out

    input_ids, labels = [], []
    for index, (query, reply) in enumerate(turns):
        query = query.replace("<image>", "<image>" * image_seqlen)  # the llava / llava_next mm_plugin
        if index == 0:
            system = rules.get("default_system", "")
            source = ids(rules.get("format_prefix", []))
            source += ids(rules.get("format_system", ["{{content}}"]), system) if system else []
        else:
            source = ids(rules.get("format_separator", []))
        source += ids(rules["format_user"], query)
        target = ids(assistant, reply)
        source_label = [tokenizer.eos_token_id] + [IGNORE_INDEX] * (len(source) - 1) if efficient else None
        input_ids += source + target
        labels += (source_label or [IGNORE_INDEX] * len(source)) + target
    rejected = turns[-1][1] == "I'm sorry, but I cannot assist with your request"
    if efficient and not rejected:
        input_ids, labels = input_ids + [tokenizer.eos_token_id], labels + [tokenizer.eos_token_id]
    if rejected and not efficient:
        input_ids, labels = input_ids[:-1], labels[:-1]
    return input_ids, labels


def sentencepiece_tokenizer(bos: str, eos: str, add_bos: bool):
    """A Llama-style sentencepiece tokenizer (Mistral's, Yi's): '▁' word boundaries with a prefix space at the start
    of every text tokenized, byte fallback, a few merges; ``<image>`` added as llava-hf adds it."""
    from transformers import LlamaTokenizer

    vocab = {"<unk>": 0, bos: 1, eos: 2} | {f"<0x{i:02X}>": 3 + i for i in range(256)}
    for char in "▁abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ:?.,'![]/#":
        vocab.setdefault(char, len(vocab))
    merges = [("▁", "A"), ("I", "N"), ("IN", "S"), ("INS", "T"), ("▁", "["), ("#", "#"), ("##", "#"), ("▁", "###")]
    merges += [("▁", "H"), ("u", "m"), ("a", "n"), ("▁H", "um"), ("▁Hum", "an"), ("e", "d"), ("▁", "r"), ("▁r", "ed")]
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    tokenizer = LlamaTokenizer(
        vocab=vocab, merges=merges, add_bos_token=add_bos, legacy=True, bos_token=bos, eos_token=eos, unk_token="<unk>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tokenizer.pad_token = "<unk>"
    return tokenizer


def published_like_tokenizer(family, kind):
    """The family's tokenizer as published (its BOS, EOS and special tokens), as byte-level BPE (Llama-3's kind;
    SmolLM2's vocabulary) or sentencepiece (Mistral's and Yi's kind)."""
    if family == "llava_next_llama3":
        return _tokenizer(LLAMA3_TOKENS, bos="<|begin_of_text|>", eos="<|end_of_text|>")
    bos, eos = ("<s>", "</s>") if family == "llava_next_mistral" else ("<|startoftext|>", "<|endoftext|>")
    if kind == "sentencepiece":
        return sentencepiece_tokenizer(bos, eos, add_bos=family == "llava_next_mistral")
    tokenizer = _tokenizer(["<image>"], bos=bos, eos=eos)
    tokenizer.add_bos_token = family == "llava_next_mistral"
    return tokenizer


CASES = [
    ("llava_next_mistral", "bpe"),
    ("llava_next_mistral", "sentencepiece"),
    ("llava_next_llama3", "bpe"),
    ("yi_vl", "bpe"),
    ("yi_vl", "sentencepiece"),
]
TURNS = (
    ("<image>\nWhat is in the picture?", "A red box on a white table."),
    ("Why is it red?", "Someone painted it red."),
    ("Thanks!", "You are welcome."),
)


@pytest.fixture(scope="module", params=CASES, ids=["-".join(case) for case in CASES])
def paper_module(request, tmp_path_factory):
    """The module a paper config builds (``model.pretrained`` + ``model.hub.chat_template``) on a tiny checkpoint
    of the family with a tokenizer like the published one."""
    name, kind = request.param
    tokenizer = published_like_tokenizer(name, kind)
    path = tmp_path_factory.mktemp(f"{name}-{kind}")
    if name == "yi_vl":
        write_tiny_yi_vl(path, tokenizer=tokenizer)
    else:
        write_tiny_llava_next(path, "mistral" if name == "llava_next_mistral" else "llama3", tokenizer=tokenizer)
    module = SafetyAlignModule(
        pretrained=str(path),
        hub=HubOptions(chat_template=name),
        max_length=4096,
        lora=LoraSettings(r=4, alpha=8, dropout=0.0),
    )
    return name, tokenizer, module


def image_seqlen(module, image) -> int:
    """Image features of ``image`` as the model's processor counts them (what LLaMA-Factory's plugin asks it)."""
    hf = module.processor.hf_processor
    ids = list(hf(text=[hf.image_token], images=[image], add_special_tokens=False)["input_ids"][0])
    return ids.count(hf.tokenizer.convert_tokens_to_ids(hf.image_token))


def conversation(turns, image):
    messages = [m for q, a in turns for m in ({"from": "human", "value": q}, {"from": "gpt", "value": a})]
    return parse_llava_record({"id": "s", "conversations": messages}, image)


def test_a_multi_turn_sample_with_an_image_equals_llamafactory_token_by_token(paper_module):
    """Input ids and labels of a 3-turn conversation with an image, as the paper's runs trained on them. The label
    at position 0 is nobody's target (the token at t predicts t + 1), so it is not compared."""
    name, raw_tokenizer, module = paper_module
    image = Image.new("RGB", (70, 40), "red")
    sample = module.processor(conversation(TURNS, image))
    expected_ids, expected_labels = lf_encode(
        lf_fix_tokenizer(raw_tokenizer, name), name, TURNS, image_seqlen(module, image)
    )
    eos = lf_fix_tokenizer(raw_tokenizer, name).eos_token_id
    assert expected_labels[1:].count(eos) == 3, "every reply ends with a learned EOS"
    assert sample.input_ids.tolist() == expected_ids
    assert sample.labels.tolist()[1:] == expected_labels[1:]


def test_a_paper_rejection_sample_equals_llamafactory_token_by_token(paper_module):
    """The paper's rejection (one turn kept, the reply swapped for its sentence): the fork learns no EOS after it."""
    name, raw_tokenizer, module = paper_module
    image = Image.new("RGB", (40, 60), "blue")
    swapped = RejectionSwap(1.0, RejectionConfig(keep_one_turn=True))(conversation(TURNS, image))
    assert swapped.is_rejection and swapped.turns[0][1] == PAPER_REJECTION
    sample = module.processor(swapped)
    tokenizer = lf_fix_tokenizer(raw_tokenizer, name)
    expected_ids, expected_labels = lf_encode(tokenizer, name, swapped.turns, image_seqlen(module, image))
    assert tokenizer.eos_token_id not in expected_labels[1:]
    assert sample.input_ids.tolist() == expected_ids
    assert sample.labels.tolist()[1:] == expected_labels[1:]


def test_the_generation_prompt_is_llamafactory_s_and_the_jinja_template_writes_the_same_text(paper_module):
    """At evaluation the prompt is LLaMA-Factory's first turn without its reply; the exported chat template renders
    that text too (with the image as a content part, as transformers' users pass it)."""
    name, raw_tokenizer, module = paper_module
    image = Image.new("RGB", (50, 50), "green")
    prompt = module.processor.prompt("p", "Describe it.", image)
    tokenizer = lf_fix_tokenizer(raw_tokenizer, name)
    source, _ = lf_encode(tokenizer, name, [("<image>\nDescribe it.", "")], image_seqlen(module, image))
    assert prompt.input_ids.tolist() == source[:-1]  # an empty reply leaves only the EOS after the prompt
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}]
    text = module.processor.tokenizer.apply_chat_template(messages, tokenize=False)
    bos = raw_tokenizer.bos_token if LF[name].get("format_prefix") else ""
    user = LF[name]["format_user"][0].replace("{{content}}", "<image>\nDescribe it.")
    assert text == bos + LF[name].get("default_system", "") + user


def test_a_llamafactory_template_on_the_wrong_path_or_model_is_refused(tiny_llava_path, tokenizer):
    """The templates tokenize piece by piece (hub VLMs only), and their stop words must be tokens of the model."""
    with pytest.raises(ValueError, match="is a LLaMA-Factory template, tokenized piece by piece"):
        load_llava_tokenizer(tiny_llava_path, "yi_vl")
    with pytest.raises(ValueError, match="they are for hub VLMs"):
        ChatEncoder(tokenizer, 3, -200, template=LLAMAFACTORY_TEMPLATES["yi_vl"])
    with pytest.raises(ValueError, match=re.escape("stop word '<|eot_id|>' is not a token of this tokenizer")):
        LLAMAFACTORY_TEMPLATES["llava_next_llama3"].fix_tokenizer(copy.deepcopy(tokenizer))
