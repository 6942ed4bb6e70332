"""The paper's LLaMA-Factory templates, piece by piece: what the paper's LLaVA-NeXT and Yi-VL runs were trained on.

The paper trained llava-v1.6-mistral-7b, llama3-llava-next-8b and Yi-VL-6B with LLaMA-Factory (v0.9, its fork in
ybwang119/MLLM_safety_study). LLaMA-Factory does not render a Jinja template: it writes each message into text slots
(``Template._encode`` in ``src/llamafactory/data/template.py``), tokenizes every slot on its own
(``_convert_elements_to_ids``: ``tokenizer.encode(piece, add_special_tokens=False)``) and labels them in
``processors/supervised.py``. Tokens at piece boundaries differ from one tokenization of the whole text (a
sentencepiece prefix space, BPE merges across ``"\\n\\n###"``), so :class:`SlotTemplate` gives the conversation as
the same pieces, and the hub processor tokenizes each on its own. Its Jinja rendering (``jinja``) is the same text,
for prompts at inference and the exported processor.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from mllm_safety.constants import IMAGE_PLACEHOLDER
from mllm_safety.data.conversation import Conversation, Span

CONTENT = "{content}"


@dataclass(frozen=True)
class SlotTemplate:
    """A conversation format written as LLaMA-Factory writes its templates (field names are its ``_register_template``
    arguments). Turn 0 is ``[BOS] system user``, turn t ``separator user``, each followed by ``reply [EOS]``."""

    user: str
    """``format_user``: the text around a user message (``{content}``), ending with the assistant's header."""
    system: str = CONTENT
    """``format_system``: the text around the system prompt, written before the first user message."""
    default_system: str = ""
    """The system prompt of every conversation (the data have none)."""
    separator: str = ""
    """``format_separator``: written before every user message but the first."""
    bos: bool = False
    """``format_prefix=[bos_token]``: the sequence starts with the BOS id."""
    efficient_eos: bool = False
    """No EOS after each reply: the first token after a reply is labelled EOS (the input keeps the separator there),
    and one EOS ends the sequence."""
    replace_eos: bool = False
    """The first stop word is the EOS (LLaMA-Factory replaces the tokenizer's): what follows every reply."""
    stop_words: tuple[str, ...] = ()
    """Tokens that end a reply at generation; besides the EOS, LLaMA-Factory registers them as special tokens."""
    image_token: str = "<image>"
    """The image marker of its multimodal plugin, written where the user's text has ``<image>``."""

    def eos_token(self, tokenizer) -> str:
        return self.stop_words[0] if self.replace_eos else tokenizer.eos_token

    def fix_tokenizer(self, tokenizer) -> None:
        """Register the stop words as special tokens, as LLaMA-Factory does (they then never merge with the text
        beside them); each must already be in the vocabulary, as the paper's runs did not resize the embeddings."""
        words = list(self.stop_words[1:] if self.replace_eos else self.stop_words)
        for word in [*self.stop_words[:1], *words]:
            if tokenizer.convert_tokens_to_ids(word) in (None, tokenizer.unk_token_id):
                raise ValueError(
                    f"the template's stop word {word!r} is not a token of this tokenizer: the template is written for "
                    "another model"
                )
        if words:
            tokenizer.add_special_tokens({"additional_special_tokens": words}, replace_extra_special_tokens=False)

    def stop_ids(self, tokenizer) -> list[int]:
        """The EOS and every stop word (LLaMA-Factory's ``get_stop_token_ids``)."""
        words = [self.eos_token(tokenizer), *self.stop_words]
        return list(dict.fromkeys(tokenizer.convert_tokens_to_ids(word) for word in words))

    def _user(self, text: str) -> str:
        return self.user.replace(CONTENT, text.replace(IMAGE_PLACEHOLDER, self.image_token))

    def _opening(self) -> list[Span]:
        system = self.system.replace(CONTENT, self.default_system) if self.default_system else ""
        return [Span(system, False)] if system else []

    def prompt_spans(self, question: str) -> list[Span]:
        """The pieces of a single-turn generation prompt (the user slot ends with the assistant's header)."""
        return [*self._opening(), Span(self._user(question), False)]

    def spans(self, conversation: Conversation, tokenizer) -> list[Span]:
        """The conversation's pieces and labels as LLaMA-Factory's fork encodes them: replies and what ends them are
        learned; after a rejection (``learn_end_marker`` off) the end of the replies is not learned, and the sequence
        does not end with it (the fork's ``supervised.py`` drops the EOS after its rejection sentence)."""
        eos, learn_end = self.eos_token(tokenizer), conversation.learn_end_marker
        spans = self._opening()
        last = len(conversation.turns) - 1
        for index, (human, reply) in enumerate(conversation.turns):
            opening = []
            if index and self.separator:
                opening.append(Span(self.separator, False))
            opening.append(Span(self._user(human), False))
            if index and self.efficient_eos and learn_end:  # the reply before ends here: its EOS is learned here
                opening[0] = Span(opening[0].text, False, eos_label=True)
            spans += [*opening, Span(reply, True)]
            if not self.efficient_eos and (learn_end or index < last):
                spans.append(Span(eos, learn_end))
        if self.efficient_eos and learn_end:
            spans.append(Span(eos, True))
        return spans

    @property
    def jinja(self) -> str:
        """A chat template rendering the same text (``{{ bos_token }}`` for the BOS id), for prompts at inference and
        the exported processor. Content may be text (``<image>`` inline) or typed parts (an image part writes the
        image marker; parts are joined by newlines, as LLaVA's ``<image>\\nQuestion``)."""

        def text(value: str) -> str:  # a Jinja string literal (its lexer decodes the JSON escapes)
            return json.dumps(value)

        user_head, user_tail = (text(piece) for piece in self.user.split(CONTENT))
        system_head, system_tail = (text(piece) for piece in self.system.split(CONTENT))
        image, eos = text(self.image_token), text(self.stop_words[0]) if self.replace_eos else "eos_token"
        content = (
            "{% if message['content'] is string %}{% set content = message['content'].replace('<image>', "
            + image
            + ") %}{% else %}{% set parts = namespace(items=[]) %}{% for part in message['content'] %}"
            "{% set parts.items = parts.items + [" + image + " if part['type'] == 'image' else part['text']] %}"
            "{% endfor %}{% set content = parts.items | join('\\n') %}{% endif %}"
        )
        end_of_reply = "{% if loop.last %}{{ " + eos + " }}{% endif %}" if self.efficient_eos else "{{ " + eos + " }}"
        return (
            ("{{ bos_token }}" if self.bos else "")
            + "{% set system = "
            + text(self.default_system)
            + " %}{% set loop_messages = messages %}"
            "{% if messages and messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
            "{% set message = messages[0] %}" + content + "{% set system = content %}{% endif %}"
            "{% if system %}{{ " + system_head + " + system + " + system_tail + " }}{% endif %}"
            "{% for message in loop_messages %}" + content + "{% if message['role'] == 'user' %}"
            "{% if not loop.first %}{{ " + text(self.separator) + " }}{% endif %}"
            "{{ " + user_head + " + content + " + user_tail + " }}"
            "{% else %}{{ content }}" + end_of_reply + "{% endif %}{% endfor %}"
        )


LLAMAFACTORY_TEMPLATES: dict[str, SlotTemplate] = {
    "llava_next_mistral": SlotTemplate(user="[INST] {content} [/INST]", bos=True),
    "llava_next_llama3": SlotTemplate(
        user=(
            "<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n"
        ),
        system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
        bos=True,
        replace_eos=True,
        stop_words=("<|eot_id|>",),
    ),
    "yi_vl": SlotTemplate(
        user="### Human: {content}\n### Assistant:",
        separator="\n",
        default_system=(
            "This is a chat between an inquisitive human and an AI assistant. Assume the role of the AI assistant. "
            "Read all the images carefully, and respond to the human's questions with informative, helpful, detailed "
            "and polite answers. 这是一个好奇的人类和一个人工智能助手之间的对话。假设你扮演这个AI助手的角色。"
            "仔细阅读所有的图像，并对人类的问题做出信息丰富、有帮助、详细的和礼貌的回答。\n\n"
        ),
        efficient_eos=True,
        stop_words=("###",),
    ),
}
"""LLaMA-Factory v0.9's ``llava_next_mistral``, ``llava_next_llama3`` and ``yi_vl`` (``template.py``, as of the
paper's fork; the ``yi_vl`` of 2025 versions moved the separator into the reply, ``"{{content}}\\n"``). The assistant
slot of each is LLaMA-Factory's default: the reply, then the EOS unless ``efficient_eos``."""
