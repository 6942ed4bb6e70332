"""Chat templates the published checkpoints lack or get wrong, by name (``chat_template: llava_v1``)."""

from __future__ import annotations

from mllm_safety.data.slot_templates import LLAMAFACTORY_TEMPLATES

_CONTENT = (
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if not loop.first %}{{ '\\n' }}{% endif %}"
    "{% if part['type'] == 'image' %}{{ '<image>' }}{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
)
"""A message's content: its text, or its typed parts (hub VLMs) with an image part as ``<image>``, joined by newlines
(LLaVA's ``<image>\\nQuestion``)."""

LLAVA_V1_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}{% set loop_messages = messages[1:] %}"
    "{% else %}A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the human's questions.{% set loop_messages = messages %}{% endif %} "
    "{% for message in loop_messages %}"
    "{% if message['role'] == 'user' %}USER: " + _CONTENT + " "
    "{% else %}ASSISTANT: " + _CONTENT + "{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
"""LLaVA-1.5's training conversation (``conv_vicuna_v1``): ``<s>SYSTEM USER: <image>\\nQ ASSISTANT: A</s>USER: ...``.
llava-hf's own template drops the system prompt and the ``</s>`` after each reply, so a model finetuned with it
never learns where to stop; the paper configs use this one."""

LLAVA_HF_MISTRAL_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ '<<SYS>>\n' + message['content'][0]['text'] + '\n<</SYS>>\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{{ ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'][0]['text'] + '</s> ' }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
"""llava-hf's ``llava-v1.6-mistral-7b-hf`` template, ``[INST] <image>\nQ [/INST] A</s> ``, with the EOS some revisions
of the checkpoint misspell as ``<\\s>`` (a model trained on that text never learns to stop)."""

NAMED_CHAT_TEMPLATES = {
    "llava_v1": LLAVA_V1_CHAT_TEMPLATE,
    "llava_hf_mistral": LLAVA_HF_MISTRAL_CHAT_TEMPLATE,
    **{name: template.jinja for name, template in LLAMAFACTORY_TEMPLATES.items()},
}
"""Named templates; ``llava_next_mistral``, ``llava_next_llama3`` and ``yi_vl`` are LLaMA-Factory's, with which the
paper trained those models (:mod:`mllm_safety.data.slot_templates`; a hub VLM is then tokenized piece by piece as
LLaMA-Factory tokenizes it)."""


def named_chat_template(template: str | None) -> str | None:
    """The template registered under ``template``, or ``template`` itself (a Jinja template, or ``None``)."""
    return NAMED_CHAT_TEMPLATES.get(template, template) if template is not None else None
