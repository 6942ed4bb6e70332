"""Conversations in the LLaVA layout, and their tokenization with the LLM's chat template and label mask."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from jinja2 import TemplateError
from PIL import Image
from transformers import PreTrainedTokenizerBase

from mllm_safety.model.mllm import IGNORE_INDEX

IMAGE_PLACEHOLDER = "<image>"
_ROLES = {"human": "user", "gpt": "assistant"}


class SampleError(ValueError):
    """A sample that cannot be trained on; ``reason`` is a short tag used to count skipped samples."""

    def __init__(self, sample_id: str, reason: str, detail: str) -> None:
        super().__init__(f"sample {sample_id!r}: {detail}")
        self.sample_id = sample_id
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Conversation:
    """One training sample: alternating (human, assistant) turns and at most one image."""

    id: str
    turns: tuple[tuple[str, str], ...]
    image: Image.Image | None = None
    is_rejection: bool = False
    """The replies were swapped for a rejection sentence."""
    learn_end_marker: bool = True
    """Learn the end-of-turn token after each reply (the paper leaves it out for rejections)."""

    def with_turns(
        self, turns: tuple[tuple[str, str], ...], is_rejection: bool, learn_end_marker: bool
    ) -> Conversation:
        return replace(self, turns=turns, is_rejection=is_rejection, learn_end_marker=learn_end_marker)


def parse_llava_record(record: dict[str, Any], image: Image.Image | None) -> Conversation:
    """Validate a ``{"id", "image"?, "conversations": [{"from", "value"}, ...]}`` record and pair its turns.

    A trailing human turn without an answer is dropped (it teaches nothing); anything else that breaks the
    human/gpt alternation is an error, as is an ``<image>`` placeholder without an image or the reverse.
    """
    sample_id = str(record.get("id", "<no id>"))
    messages = record.get("conversations")
    if not isinstance(messages, list) or not messages:
        raise SampleError(sample_id, "bad_conversation", "'conversations' must be a non-empty list")
    turns: list[tuple[str, str]] = []
    for index in range(0, len(messages), 2):
        pair = messages[index : index + 2]
        roles = [m.get("from") if isinstance(m, dict) else None for m in pair]
        if roles == ["human"]:
            break
        if roles != ["human", "gpt"]:
            raise SampleError(
                sample_id,
                "bad_conversation",
                f"turns {index}-{index + 1} have roles {roles}; expected alternating 'human' then 'gpt'",
            )
        human, gpt = (m.get("value") for m in pair)
        if not isinstance(human, str) or not isinstance(gpt, str):
            raise SampleError(sample_id, "bad_conversation", f"turn {index} has a non-string 'value'")
        turns.append((human, gpt))
    if not turns:
        raise SampleError(sample_id, "no_reply", "conversation has no assistant turn to learn from")
    placeholders = sum(human.count(IMAGE_PLACEHOLDER) for human, _ in turns)
    if placeholders > 1:
        raise SampleError(sample_id, "bad_image", f"{placeholders} {IMAGE_PLACEHOLDER} placeholders; one image at most")
    if placeholders == 1 and image is None:
        raise SampleError(sample_id, "bad_image", f"has an {IMAGE_PLACEHOLDER} placeholder but no image")
    if placeholders == 0 and image is not None:
        raise SampleError(sample_id, "bad_image", f"has an image but no {IMAGE_PLACEHOLDER} placeholder in its prompt")
    return Conversation(id=sample_id, turns=tuple(turns), image=image)


@dataclass
class EncodedSample:
    id: str
    input_ids: list[int]
    labels: list[int]
    image: Image.Image | None


class ChatEncoder:
    """Tokenizes conversations with the tokenizer's chat template; only assistant replies carry labels.

    Each span (prompt, reply, end-of-turn marker) is tokenized on its own, the way it is produced at inference:
    the prompt by the template, the reply by the model. Splitting one tokenization of the whole text by string
    offsets, as LLaVA does, breaks on tokenizer quirks.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        num_image_tokens: int,
        image_token_id: int,
        max_length: int = 2048,
    ) -> None:
        self.tokenizer = tokenizer
        self.num_image_tokens = num_image_tokens
        self.image_token_id = image_token_id
        self.max_length = max_length
        self._content_parts = _template_reads_content_parts(tokenizer)
        self._placeholder_id = _placeholder_token_id(tokenizer)
        self._bos = _missing_bos(tokenizer, self._render([{"role": "user", "content": "x"}], True))

    def _render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        if self._content_parts:
            messages = [m | {"content": [{"type": "text", "text": m["content"]}]} for m in messages]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def _tokens(self, text: str) -> list[int]:
        if self._placeholder_id is not None:
            # The tokenizer knows <image>: tokenize the text in one piece, as transformers' processors do (pieces
            # tokenized apart get an extra prefix space from sentencepiece-style tokenizers), then expand it.
            ids = []
            for token in self.tokenizer(text, add_special_tokens=False)["input_ids"]:
                ids += [self.image_token_id] * self.num_image_tokens if token == self._placeholder_id else [token]
            return ids
        ids: list[int] = []
        for index, piece in enumerate(text.split(IMAGE_PLACEHOLDER)):
            if index:
                ids += [self.image_token_id] * self.num_image_tokens
            if piece:
                ids += self.tokenizer(piece, add_special_tokens=False)["input_ids"]
        return ids

    def encode(self, conversation: Conversation) -> EncodedSample:
        messages: list[dict[str, str]] = []
        input_ids: list[int] = []
        labels: list[int] = []
        rendered = ""  # the text covered by input_ids so far
        input_ids += self._bos
        labels += [IGNORE_INDEX] * len(self._bos)

        def add(text: str, learn: bool) -> None:
            ids = self._tokens(text)
            input_ids.extend(ids)
            labels.extend(ids if learn else [IGNORE_INDEX] * len(ids))

        for human, reply in conversation.turns:
            messages += [{"role": "user", "content": human}]
            prompt = self._render(messages, add_generation_prompt=True)
            messages += [{"role": "assistant", "content": reply}]
            full = self._render(messages, add_generation_prompt=False)
            body_end = full.find(reply.strip(), len(prompt)) + len(reply.strip())
            if (
                not prompt.startswith(rendered)
                or not full.startswith(prompt)
                or body_end < len(prompt) + len(reply.strip())
            ):
                raise SampleError(
                    conversation.id,
                    "template",
                    "the chat template does not render the conversation incrementally "
                    "(each turn's prompt must extend the previous text); set llm.chat_template",
                )
            end_marker = full[body_end:].rstrip()
            add(prompt[len(rendered) :], learn=False)
            add(full[len(prompt) : body_end], learn=True)
            add(end_marker, learn=conversation.learn_end_marker)
            rendered = full[: body_end + len(end_marker)]

        return self._truncate(conversation, input_ids, labels)

    def _truncate(self, conversation: Conversation, input_ids: list[int], labels: list[int]) -> EncodedSample:
        if len(input_ids) > self.max_length:
            if self.image_token_id in input_ids[self.max_length :]:
                raise SampleError(
                    conversation.id,
                    "too_long",
                    f"{len(input_ids)} tokens; truncating to max_length={self.max_length} would cut the image",
                )
            input_ids, labels = input_ids[: self.max_length], labels[: self.max_length]
        if all(label == IGNORE_INDEX for label in labels[1:]):
            raise SampleError(conversation.id, "too_long", f"no reply token left within max_length={self.max_length}")
        return EncodedSample(id=conversation.id, input_ids=input_ids, labels=labels, image=conversation.image)

    def encode_prompt(self, question: str, has_image: bool) -> list[int]:
        """Token ids of a single-turn generation prompt; ``<image>\\n`` leads it when there is an image."""
        content = f"{IMAGE_PLACEHOLDER}\n{question}" if has_image and IMAGE_PLACEHOLDER not in question else question
        rendered = self._render([{"role": "user", "content": content}], add_generation_prompt=True)
        return self._bos + self._tokens(rendered)


def _template_reads_content_parts(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the chat template wants ``[{"type": "text", "text": ...}]`` content (llava-hf's renders a plain string
    as nothing)."""
    probe = "probe-7f3a"
    try:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": probe}], tokenize=False)
    except (TemplateError, TypeError):  # templates that index into content parts may fail on a string
        return True
    return probe not in rendered


def _placeholder_token_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The id of ``<image>`` when the tokenizer has it as one token (llava-hf tokenizers), else ``None``."""
    ids = tokenizer(IMAGE_PLACEHOLDER, add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == 1 and ids[0] != tokenizer.unk_token_id else None


def _missing_bos(tokenizer: PreTrainedTokenizerBase, rendered: str) -> list[int]:
    """``[bos]`` when the tokenizer adds a BOS token by default but the template does not write one (llava-hf): the
    text then starts as transformers' processors start it."""
    bos = tokenizer.bos_token
    adds_bos = tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]
    return [tokenizer.bos_token_id] if bos is not None and adds_bos and not rendered.startswith(bos) else []
