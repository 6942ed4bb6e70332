"""Chat templates the published checkpoints lack or get wrong, by name (``chat_template: llava_v1``)."""

from __future__ import annotations

LLAVA_V1_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}{% set loop_messages = messages[1:] %}"
    "{% else %}A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the human's questions.{% set loop_messages = messages %}{% endif %} "
    "{% for message in loop_messages %}"
    "{% if message['role'] == 'user' %}USER: {{ message['content'] }} "
    "{% else %}ASSISTANT: {{ message['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
"""LLaVA-1.5's training conversation (``conv_vicuna_v1``): ``<s>SYSTEM USER: <image>\\nQ ASSISTANT: A</s>USER: ...``.
llava-hf's own template drops the system prompt and the ``</s>`` after each reply, so a model finetuned with it
never learns where to stop; the paper configs use this one."""

YI_VL_SYSTEM = (
    "This is a chat between an inquisitive human and an AI assistant. Assume the role of the AI assistant. Read all "
    "the images carefully, and respond to the human's questions with informative, helpful, detailed and polite "
    "answers. 这是一个好奇的人类和一个人工智能助手之间的对话。假设你扮演这个AI助手的角色。"
    "仔细阅读所有的图像，并对人类的问题做出信息丰富、有帮助、详细的和礼貌的回答。\n\n"
)

YI_VL_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'][0]['text'] + '\\n\\n' }}"
    "{% set loop_messages = messages[1:] %}{% else %}" + YI_VL_SYSTEM + "{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}{% if message['role'] == 'user' %}"
    "{% if not loop.first %}{{ '\\n' }}{% endif %}{{ '### Human: ' }}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<image>\\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{{ '\\n### Assistant:' }}"
    "{% else %}{{ message['content'][0]['text'] + eos_token }}{% endif %}{% endfor %}"
)
"""Yi-VL's conversation as LLaMA-Factory trains it (its ``yi_vl`` template, which the paper used):
``SYSTEM### Human: <image>\\nQ\\n### Assistant:A<|endoftext|>\\n### Human: ...``; content parts as transformers'
processors pass them."""

LLAVA_NEXT_MISTRAL_CHAT_TEMPLATE = (
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
    "llava_next_mistral": LLAVA_NEXT_MISTRAL_CHAT_TEMPLATE,
    "yi_vl": YI_VL_CHAT_TEMPLATE,
}


def named_chat_template(template: str | None) -> str | None:
    """The template registered under ``template``, or ``template`` itself (a Jinja template, or ``None``)."""
    return NAMED_CHAT_TEMPLATES.get(template, template) if template is not None else None
