"""Hub VLMs through their own transformers class: exactness per family against transformers itself.

Each family is a tiny random checkpoint with its real config, model and processor classes and a chat template
shaped like the published one (tests/hub_models.py).
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from hub_models import CHAT_TEMPLATES, END_MARKERS, FAMILIES
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from mllm_safety.constants import IGNORE_INDEX
from mllm_safety.data.conversation import Conversation, parse_llava_record
from mllm_safety.data.rejection import RejectionConfig, RejectionSwap
from mllm_safety.data.slot_templates import LLAMAFACTORY_TEMPLATES
from mllm_safety.evaluation.generation import GenerationSettings, generate_replies
from mllm_safety.model.hub_vlm import HubOptions, HubVLM, load_hub_vlm
from mllm_safety.model.lora import LoraSettings
from mllm_safety.model.yi_vl import YiVLForConditionalGeneration
from mllm_safety.train.module import SafetyAlignModule, TrainableParts

ATOL = 1e-5


def hub_module(path, family, **kwargs):
    kwargs.setdefault("lora", LoraSettings(r=4, alpha=8, dropout=0.0))
    kwargs.setdefault("trainable", TrainableParts(projector=False))
    hub = HubOptions(chat_template=CHAT_TEMPLATES.get(family))
    return SafetyAlignModule(pretrained=path, hub=hub, max_length=512, **kwargs)


def reference_model(path, family):
    if family == "yi_vl":  # stock transformers has no Yi-VL projector; LLaMA-Factory patches the class the same way
        return YiVLForConditionalGeneration.from_pretrained(path).eval()
    return AutoModelForImageTextToText.from_pretrained(path).eval()


def picture(colour, size):
    image = Image.new("RGB", size, colour)
    image.paste((255, 255, 255), (3, 3, size[0] // 2, size[1] // 2))
    return image


def conversation(sample_id, image, turns=(("What is it?", "A red box on white."), ("Why?", "It was painted."))):
    messages = []
    for index, (question, reply) in enumerate(turns):
        question = f"<image>\n{question}" if image is not None and index == 0 else question
        messages += [{"from": "human", "value": question}, {"from": "gpt", "value": reply}]
    return parse_llava_record({"id": sample_id, "conversations": messages}, image)


def labelled_runs(sample, tokenizer) -> list[str]:
    """The decoded labels of each contiguous run of learned positions (a label is its input token, or the EOS the
    model learns where LLaMA-Factory's efficient EOS template keeps a separator in the input)."""
    runs, current = [], []
    for token, label in zip(sample.input_ids.tolist(), sample.labels.tolist()):
        if label != IGNORE_INDEX:
            assert label in (token, tokenizer.eos_token_id)
            current.append(label)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, hub_checkpoint):
    path = hub_checkpoint(request.param)
    module = hub_module(path, request.param).eval()
    return request.param, path, module


def hf_prompt(path, module, question, image):
    """Inputs of a single-turn prompt made by transformers' processor alone, as its documentation shows."""
    hf_processor = AutoProcessor.from_pretrained(path)
    hf_processor.chat_template = module.processor.tokenizer.chat_template
    content = [{"type": "image"}] if image is not None else []
    messages = [{"role": "user", "content": [*content, {"type": "text", "text": question}]}]
    text = hf_processor.apply_chat_template(messages, add_generation_prompt=True)
    bos = hf_processor.tokenizer.bos_token
    add_bos = not (bos and text.startswith(bos))
    images = [image] if image is not None else None
    return hf_processor(images=images, text=text, add_special_tokens=add_bos, return_tensors="pt")


def test_prompt_ids_and_image_inputs_match_the_transformers_processor(family):
    name, path, module = family
    image = picture("red", (70, 40))
    expected = hf_prompt(path, module, "What is this?", image)
    sample = module.processor.prompt("a", "What is this?", image)
    text_only = hf_prompt(path, module, "Hi?", None)
    pairs = [
        (sample.input_ids, expected["input_ids"][0]),
        (module.processor.prompt("b", "Hi?", None).input_ids, text_only["input_ids"][0]),
    ]
    for ours, theirs in pairs:
        if CHAT_TEMPLATES.get(name) in LLAMAFACTORY_TEMPLATES:  # tokenized piece by piece (test_paper_templates.py)
            assert module.processor.tokenizer.decode(ours) == module.processor.tokenizer.decode(theirs)
        else:
            assert ours.tolist() == theirs.tolist()
    torch.testing.assert_close(sample.pixel_values, expected["pixel_values"], atol=0, rtol=0)
    for key, value in sample.image_inputs.items():
        assert torch.equal(value, expected[key]), key


def test_loss_equals_the_transformers_loss_with_our_labels(family):
    name, path, module = family
    processor = module.processor
    samples = [
        processor(conversation("a", picture("red", (40, 30)))),
        processor(conversation("b", None, turns=(("Hi", "Hello."),))),
        processor(conversation("c", picture("blue", (120, 70)))),
    ]
    batch = processor.collate(samples)
    with torch.no_grad():
        ours = module.model(**batch.model_inputs())
        expected = reference_model(path, name)(**batch.model_inputs()).loss
    torch.testing.assert_close(ours.loss, expected, atol=ATOL, rtol=0)
    assert ours.num_label_tokens == (batch.labels[:, 1:] != IGNORE_INDEX).sum()


def test_labels_are_exactly_the_replies_and_their_end_of_turn_markers(family):
    name, _, module = family
    sample = module.processor(conversation("a", picture("red", (40, 30))))
    runs = [run.lstrip() for run in labelled_runs(sample, module.processor.tokenizer)]
    marker = END_MARKERS[name]
    assert runs == [f"A red box on white.{marker}", f"It was painted.{marker}"]


def test_the_end_of_turn_marker_is_not_learned_after_a_rejection(family):
    name, _, module = family
    swap = RejectionSwap(1.0, RejectionConfig())
    swapped: Conversation = swap(conversation("a", picture("red", (40, 30))))
    assert swapped.is_rejection and not swapped.learn_end_marker
    sample = module.processor(swapped)
    learned = "".join(labelled_runs(sample, module.processor.tokenizer)).strip()
    assert learned == RejectionConfig().sentence
    text = module.processor.tokenizer.decode(sample.input_ids)
    if CHAT_TEMPLATES.get(name) in LLAMAFACTORY_TEMPLATES:  # the paper's LLaMA-Factory fork drops it
        assert text.endswith(learned)
    else:
        assert text.rstrip().endswith(END_MARKERS[name]), "the marker is there, unlearned"


def test_batched_greedy_generation_equals_transformers_one_prompt_at_a_time(family):
    name, path, module = family
    processor = module.processor
    prompts = [
        ("Describe the picture in detail.", picture("green", (40, 30))),
        ("Write a long story about a dragon?", None),
        ("And this one?", picture("blue", (120, 70))),
    ]
    batch = processor.collate([processor.prompt(str(i), q, image) for i, (q, image) in enumerate(prompts)], "left")
    pad = processor.tokenizer.pad_token_id
    new = module.model.generate(**batch.generation_inputs(), max_new_tokens=8, pad_token_id=pad)
    assert len({tuple(row.tolist()) for row in new}) == len(prompts), "replies differ: the comparison means something"
    reference = reference_model(path, name)
    for row, (question, image) in enumerate(prompts):
        single = hf_prompt(path, module, question, image)
        expected = reference.generate(
            **single,
            max_new_tokens=8,
            do_sample=False,
            repetition_penalty=1.0,
            eos_token_id=processor.stop_token_ids,
            pad_token_id=pad,
        )[0, single["input_ids"].shape[1] :]
        assert new[row, : len(expected)].tolist() == expected.tolist(), (name, row)
        assert (new[row, len(expected) :] == pad).all()


def test_stop_tokens_are_every_eos_of_the_generation_config(family):
    name, path, module = family
    processor = module.processor
    configured = module.model.generation_config.eos_token_id
    configured = [configured] if isinstance(configured, int) else configured
    assert processor.stop_token_ids[: len(configured)] == configured
    if name in ("llama3_llava_next", "qwen25_vl"):
        marker = processor.tokenizer.convert_tokens_to_ids(END_MARKERS[name])
        assert marker in processor.stop_token_ids and processor.tokenizer.eos_token_id in processor.stop_token_ids
    # generation ends at a stop token: make the first greedy token of this prompt one
    sample = processor.prompt("a", "Describe.", picture("red", (40, 30)))
    batch = processor.collate([sample], "left")
    first = int(module.model.generate(**batch.generation_inputs(), max_new_tokens=1)[0, 0])
    original = list(processor.stop_token_ids)
    assert len(generate_replies(module, [sample], GenerationSettings(max_new_tokens=5), ["a"])[0].text) > len(
        processor.tokenizer.decode([first])
    )
    processor.stop_token_ids = [*original, first]
    try:  # the stop token is the reply's last token
        assert [r.text for r in generate_replies(module, [sample], GenerationSettings(max_new_tokens=5), ["a"])] == [
            processor.tokenizer.decode([first]).strip()
        ]
        forced = generate_replies(module, [sample], GenerationSettings(max_new_tokens=5, min_new_tokens=2), ["a"])
        assert forced[0].text != processor.tokenizer.decode([first]).strip(), "min_new_tokens reaches the hub model"
    finally:
        processor.stop_token_ids = original


def test_lora_on_the_language_model_only_and_vision_and_projector_frozen(family):
    name, _, module = family
    parts = module.model.parameter_parts()
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n and parts[n] == "llm" for n in trainable)
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[1] for n in trainable}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert not any("lm_head" in n or "embed" in n for n in trainable)
    counts = module.parameter_counts
    assert counts["vision"][0] == counts["projector"][0] == 0 and counts["vision"][1] > 0 and counts["projector"][1] > 0
    assert counts["all"][1] == sum(counts[part][1] for part in ("vision", "projector", "llm"))


# --- a folder that cannot be trained as a hub VLM: an error naming it and what is missing ---


def copy_checkpoint(source, target, skip=()):
    target.mkdir(parents=True, exist_ok=True)
    for file in Path(source).iterdir():
        if file.name not in skip:
            shutil.copy(file, target / file.name)
    return str(target)


def test_a_folder_that_is_no_image_text_to_text_checkpoint_is_a_clear_error(tmp_path, tiny_llm, tokenizer):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'missing'}.*readable config.json"):
        load_hub_vlm(str(tmp_path / "missing"), HubOptions())
    tiny_llm.save_pretrained(tmp_path / "llm")
    tokenizer.save_pretrained(tmp_path / "llm")
    with pytest.raises(ValueError, match=f"{tmp_path / 'llm'}.*unsupported architecture 'llama'"):
        load_hub_vlm(str(tmp_path / "llm"), HubOptions())


def test_unknown_weights_layout_is_an_unsupported_architecture():
    with pytest.raises(ValueError, match="'/models/x': unsupported architecture Linear: 2 weights lie outside"):
        HubVLM(torch.nn.Linear(2, 2), {}, "/models/x")


def test_a_folder_without_processor_or_chat_template_is_a_clear_error(hub_checkpoint, tmp_path):
    source = hub_checkpoint("qwen25_vl")
    processor_files = ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json")
    no_processor = copy_checkpoint(source, tmp_path / "no_processor", skip=processor_files)
    with pytest.raises(FileNotFoundError, match=f"{no_processor}.*(no multimodal processor|no readable processor)"):
        load_hub_vlm(no_processor, HubOptions())
    no_template = copy_checkpoint(source, tmp_path / "no_template", skip=("chat_template.jinja", "chat_template.json"))
    with pytest.raises(ValueError, match=f"{no_template}.*no chat template.*model.hub.chat_template"):
        load_hub_vlm(no_template, HubOptions())
    model, processor = load_hub_vlm(no_template, HubOptions(chat_template="yi_vl"))
    assert "### Human:" in processor.chat_template
    # Yi-VL's template writes <image>, which Qwen's processor never expands: a config error, not a skip per sample
    with pytest.raises(ValueError, match="does not write the processor's image marker '<\\|image_pad\\|>'"):
        SafetyAlignModule(pretrained=no_template, hub=HubOptions(chat_template="yi_vl"))


def test_remote_code_is_refused_unless_trusted(tmp_path):
    config = {"model_type": "my_vlm", "auto_map": {"AutoConfig": "configuration_my.MyConfig"}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"{tmp_path}.*needs its own code.*trust_remote_code is off"):
        load_hub_vlm(str(tmp_path), HubOptions())


def test_gradient_checkpointing_and_bf16_frozen_weights(hub_checkpoint):
    path = hub_checkpoint("qwen25_vl")
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # the same adapters
        module = hub_module(path, "qwen25_vl", gradient_checkpointing=checkpointing)
        assert module.model.hf.model.language_model.is_activation_checkpointing == checkpointing
        processor = module.processor
        batch = processor.collate([processor(conversation("a", picture("red", (40, 30))))])
        loss = module.model(**batch.model_inputs()).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in module.model.named_parameters() if p.requires_grad}))
    (plain, plain_grads), (recomputed, recomputed_grads) = results
    torch.testing.assert_close(recomputed, plain)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(recomputed_grads[name], grad)
    module = hub_module(path, "qwen25_vl", frozen_dtype="bfloat16")
    assert {p.dtype for p in module.model.parameters() if not p.requires_grad} == {torch.bfloat16}
    assert {p.dtype for p in module.model.parameters() if p.requires_grad} == {torch.float32}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(module.model(**batch.model_inputs()).loss)


class ScriptedHead:
    """A forward hook on the LM head that makes greedy decoding write ``script`` token by token, then ``after``: a
    tiny model whose reply would run on past an end-of-turn marker."""

    def __init__(self, script: list[int], after: int) -> None:
        self.script, self.after, self.step = script, after, 0

    def __call__(self, module, inputs, logits):
        token = self.script[self.step] if self.step < len(self.script) else self.after
        self.step += 1
        logits = logits.clone()
        logits[..., -1, token] += 1e4
        return logits


@pytest.mark.parametrize(
    ("family", "template", "marker"),
    [("llama3_llava_next", None, "<|eot_id|>"), ("idefics3", None, "<end_of_utterance>"), ("yi_vl", "yi_vl", "###")],
)
def test_generation_stops_at_the_templates_end_of_turn_marker_the_generation_config_lacks(
    family, template, marker, hub_checkpoint, tmp_path
):
    """The checkpoint's (or LLaMA-Factory's) template ends a turn with a marker its generation_config does not list:
    the reply still ends there, and its text leaves the marker out."""
    path = tmp_path / family
    shutil.copytree(hub_checkpoint(family), path)
    config_file = path / "generation_config.json"
    config = json.loads(config_file.read_text())
    tokenizer = AutoProcessor.from_pretrained(path).tokenizer
    config["eos_token_id"] = [tokenizer.eos_token_id]
    config_file.write_text(json.dumps(config))
    module = SafetyAlignModule(pretrained=str(path), hub=HubOptions(chat_template=template), max_length=512).eval()
    processor = module.processor
    marker_id = processor.tokenizer.convert_tokens_to_ids(marker)
    assert marker_id not in module.model.generation_config.eos_token_id
    word, other = processor.tokenizer.encode(" red box", add_special_tokens=False)[:2]
    head = module.model.hf.get_output_embeddings()
    sample = processor.prompt("a", "Describe.", picture("red", (40, 30)))
    hook = head.register_forward_hook(ScriptedHead([word, marker_id], other))
    try:
        reply = generate_replies(module, [sample], GenerationSettings(max_new_tokens=6), ["a"])[0]
    finally:
        hook.remove()
    assert reply.tokens[:2] == [word, marker_id], "the model wrote the marker second"
    assert other not in reply.tokens, "the reply ran on past the marker"
    assert reply.text == processor.tokenizer.decode([word]).strip()


def test_llava_v1_template_places_the_image_for_a_hub_llava_checkpoint(tiny_llava_path):
    """``model.hub.chat_template: llava_v1`` on a llava-hf checkpoint loaded as a hub VLM: the template gets the
    image as a content part and writes LLaVA-1.5's ``USER: <image>\\nQ ASSISTANT:``; replies and their EOS are
    learned."""
    module = SafetyAlignModule(pretrained=tiny_llava_path, hub=HubOptions(chat_template="llava_v1"), max_length=512)
    processor = module.processor
    text = processor.encoder.prompt_text("What is it?", has_image=True)
    assert text.endswith("answers to the human's questions. USER: <image>\nWhat is it? ASSISTANT:")
    sample = processor(conversation("a", picture("red", (40, 30))))
    assert (sample.input_ids == processor.hf_processor.image_token_id).sum() == 25
    eos = processor.tokenizer.eos_token
    runs = [run.strip() for run in labelled_runs(sample, processor.tokenizer)]
    assert runs == [f"A red box on white.{eos}", f"It was painted.{eos}"]


def count_calls(modules):
    """A list that grows by one each time any of ``modules`` runs forward."""
    calls = []
    for module in modules:
        module.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_generation_of_an_unsharded_model_runs_the_vision_tower_only_for_images(family):
    name, _, module = family
    processor, model = module.processor, module.model
    calls = count_calls(model.part_modules()["vision"])
    text_only = processor.collate([processor.prompt("t", "Say hello.", None)], "left")
    model.generate(**text_only.generation_inputs(), max_new_tokens=2)
    assert calls == [], f"{name}: a text-only batch needs no blank image unless the model is sharded"
    with_image = processor.collate([processor.prompt("i", "What is it?", picture("red", (40, 30)))], "left")
    model.generate(**with_image.generation_inputs(), max_new_tokens=2)
    assert calls, f"{name}: the hook counts the tower's calls"
