"""Conversations in the LLaVA layout, and their tokenization with the LLM's chat template and label mask."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, NamedTuple

from jinja2 import TemplateError
from PIL import Image
from transformers import PreTrainedTokenizerBase

from mllm_safety.constants import IGNORE_INDEX, IMAGE_PLACEHOLDER

if TYPE_CHECKING:
    from mllm_safety.data.slot_templates import SlotTemplate

_ROLES = {"human": "user", "gpt": "assistant"}


SKIP_REASONS: dict[str, str] = {
    "bad_json": "the .json member is missing, not JSON, or not an object",
    "bad_conversation": "the turns do not alternate human/assistant with string values",
    "bad_record": "the record does not follow its source's layout (VLGuard: unknown keys, malformed instr-resp)",
    "no_reply": "no assistant turn to learn from",
    "bad_image": "the image is unreadable, or the <image> placeholders do not match the image",
    "missing_image": "the record names an image file that does not exist",
    "too_long": "longer than max_length without a way to truncate (the image or every reply token would be cut)",
    "template": "the chat template cannot render the conversation turn by turn",
    "corrupt_tar": "the shard is damaged: samples after the damage could not be read",
}
"""Why a sample can be skipped; each reason is counted and logged as ``data/skipped_<reason>``."""

TURN_KINDS: dict[str, str] = {
    "answer": "an answer to a safe instruction (about a safe image)",
    "refusal": "a refusal of an unsafe instruction about a safe image",
    "image_refusal": "a refusal of an instruction about an unsafe image",
}
"""What a curated source's turn teaches; stored as the ``kind`` of its reply in the shard, so that the comparison
experiments (``mllm_safety.data.curated``) can remove or rewrite turns by kind. Benign sources have no kinds."""


class SampleError(ValueError):
    """A sample that cannot be trained on; ``reason`` (one of :data:`SKIP_REASONS`) tags it for counting."""

    def __init__(self, sample_id: str, reason: str, detail: str) -> None:
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; add it to SKIP_REASONS")
        super().__init__(f"sample {sample_id!r}: {detail}")
        self.sample_id = sample_id
        self.reason = reason
        self.detail = detail

    def __reduce__(self):  # picklable across worker processes (the default pickles only the message)
        return (SampleError, (self.sample_id, self.reason, self.detail))


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
    source: str | None = None
    """The data source the sample came from (a name given at conversion), for source-limited rejection swaps."""
    kinds: tuple[str, ...] | None = None
    """Each turn's kind (:data:`TURN_KINDS`), aligned with ``turns``, for a curated source; ``None``: not known."""

    def with_turns(
        self, turns: tuple[tuple[str, str], ...], is_rejection: bool, learn_end_marker: bool
    ) -> Conversation:
        """New turns whose replies are no longer the source's: their kinds are dropped."""
        return replace(self, turns=turns, is_rejection=is_rejection, learn_end_marker=learn_end_marker, kinds=None)

    @property
    def is_curated(self) -> bool:
        """Whether the turns know their kind (a curated source's sample)."""
        return self.kinds is not None

    @property
    def shows_safe_image(self) -> bool:
        """A curated sample's image is safe unless one of its turns refuses the image itself."""
        return self.kinds is not None and "image_refusal" not in self.kinds


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
    kinds: list[object] = []
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
        kinds.append(pair[1].get("kind"))
    if not turns:
        raise SampleError(sample_id, "no_reply", "conversation has no assistant turn to learn from")
    placeholders = sum(human.count(IMAGE_PLACEHOLDER) for human, _ in turns)
    if placeholders > 1:
        raise SampleError(sample_id, "bad_image", f"{placeholders} {IMAGE_PLACEHOLDER} placeholders; one image at most")
    if placeholders == 1 and image is None:
        raise SampleError(sample_id, "bad_image", f"has an {IMAGE_PLACEHOLDER} placeholder but no image")
    if placeholders == 0 and image is not None:
        raise SampleError(sample_id, "bad_image", f"has an image but no {IMAGE_PLACEHOLDER} placeholder in its prompt")
    if any(kind is not None for kind in kinds) and not all(kind in TURN_KINDS for kind in kinds):
        raise SampleError(
            sample_id, "bad_conversation", f"turn kinds {kinds} must all be one of {sorted(TURN_KINDS)}, or all unset"
        )
    source = record.get("source")
    return Conversation(
        id=sample_id,
        turns=tuple(turns),
        image=image,
        source=source if isinstance(source, str) else None,
        kinds=tuple(kinds) if kinds[0] is not None else None,
    )


@dataclass(frozen=True)
class TemplateShape:
    """The fixed text a chat template puts around user contents and replies, learned from one probe rendering.

    With it a conversation is laid out by concatenation instead of two template renderings per turn; one rendering
    of the whole conversation then confirms the layout (see :meth:`ChatEncoder.turn_texts`).
    """

    first_prompt: str
    """Before the first user content: system prompt, user header."""
    generation: str
    """After a user content: its footer and the assistant header (the generation prompt)."""
    between: str
    """After a reply and before the next user content."""
    after_last: str
    """After the last reply: end of turn and whatever closes the text."""

    @classmethod
    def probe(cls, render: Callable[[list[dict[str, str]], bool], str]) -> TemplateShape | None:
        """The shape of ``render(messages, add_generation_prompt)``, or ``None`` if it is not this regular."""
        u1, r1, u2, r2 = "QXUSERONEQX", "QXREPLYONEQX", "QXUSERTWOQX", "QXREPLYTWOQX"
        one = [{"role": "user", "content": u1}]
        two = [*one, {"role": "assistant", "content": r1}, {"role": "user", "content": u2}]
        p1, f1 = render(one, True), render([*one, {"role": "assistant", "content": r1}], False)
        p2, f2 = render(two, True), render([*two, {"role": "assistant", "content": r2}], False)
        if p1.count(u1) != 1 or p2.count(u2) != 1:
            return None
        first_prompt, generation = p1.split(u1)
        head = first_prompt + u1 + generation + r1
        between = p2[len(head) : p2.index(u2)]
        shape = cls(first_prompt, generation, between, f1[len(head) :])
        composed = shape.turn_texts([(u1, r1), (u2, r2)])
        return shape if composed == [(p1, f1), (p2, f2)] else None

    def turn_texts(self, turns: list[tuple[str, str]] | tuple[tuple[str, str], ...]) -> list[tuple[str, str]]:
        """For each turn, the text up to its generation prompt and the whole text ending with its reply."""
        texts, text = [], self.first_prompt
        for index, (human, reply) in enumerate(turns):
            prompt = text + (self.between if index else "") + human + self.generation
            texts.append((prompt, prompt + reply + self.after_last))
            text = prompt + reply
        return texts


class Span(NamedTuple):
    """A piece of a rendered conversation; hub processors tokenize each piece on its own."""

    text: str
    learned: bool
    """Its tokens are labels: a reply, or a learned end-of-turn marker."""
    eos_label: bool = False
    """Only input, but its first token is labelled with the EOS id: LLaMA-Factory's ``efficient_eos``, which teaches
    the model to end the reply this piece follows while the input keeps the piece (Yi-VL's newline)."""


@dataclass
class EncodedSample:
    id: str
    input_ids: list[int]
    labels: list[int]
    image: Image.Image | None


class ChatEncoder:
    """Tokenizes conversations with the tokenizer's chat template; only assistant replies carry labels.

    The whole rendered conversation is tokenized at once, as transformers' processors and LLaVA's training tokenize
    it, and the label mask comes from the tokens' character offsets: a token is learned when it covers text of a
    reply (or of a learned end-of-turn marker). Tokenizing each span on its own would differ from that at span
    boundaries with sentencepiece-style tokenizers (a prefix space at every span start, and after special tokens only
    in their legacy mode). :meth:`spans` gives the same conversation as ``(text, learned)`` spans for processors
    that tokenize span by span, as LLaMA-Factory does (hub VLMs: ``mllm_safety.data.hub_processor``).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        num_image_tokens: int,
        image_token_id: int,
        max_length: int = 2048,
        image_parts: bool = False,
        template: SlotTemplate | None = None,
    ) -> None:
        """``image_parts``: give the template the image as a content part (``{"type": "image"}``) where a user turn
        holds ``<image>``, so that it writes the model's own image marker (hub VLMs, whose processor expands that
        marker); otherwise ``<image>`` stays in the text and is expanded to ``num_image_tokens`` ids here.
        ``template``: lay conversations out piece by piece as LLaMA-Factory does instead of by the tokenizer's chat
        template (hub VLMs only: their processor tokenizes piece by piece)."""
        if template is not None and not image_parts:
            raise ValueError(
                "LLaMA-Factory's templates (llava_next_mistral, llava_next_llama3, yi_vl) tokenize piece by piece: "
                "they are for hub VLMs (model.pretrained with model.hub.chat_template)"
            )
        if not image_parts and not getattr(tokenizer, "is_fast", False):  # hub VLMs tokenize span by span
            raise ValueError(
                f"{type(tokenizer).__name__} is not a fast (tokenizers) tokenizer: label masks need the character "
                "offsets of its tokens"
            )
        self.tokenizer = tokenizer
        self.num_image_tokens = num_image_tokens
        self.image_token_id = image_token_id
        self.max_length = max_length
        self.image_parts = image_parts
        self.template = template
        self._placeholder_id = _placeholder_token_id(tokenizer)
        self.bos: list[int] = []
        """The BOS id the tokenizer adds but the template does not write (LLaMA-Factory's: that its prefix names),
        prepended to every sample; or ``[]``."""
        if template is not None:
            self._content_parts, self.shape = False, None
            if template.bos and tokenizer.bos_token_id is not None:
                self.bos = [tokenizer.bos_token_id]
        else:
            self._content_parts = image_parts or _template_reads_content_parts(tokenizer)
            self.bos = _missing_bos(tokenizer, self._render([{"role": "user", "content": "x"}], True))
            self.shape = TemplateShape.probe(self._render)
        self.end_of_turn_ids = self._end_of_turn_ids()
        """Ids that end a reply in this template (its end-of-turn marker, when one token; a LLaMA-Factory template's
        stop words): generation stops at them whatever the checkpoint's ``generation_config`` lists."""

    def _render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        if self._content_parts:
            messages = [m | {"content": self._parts(m["content"], m["role"] == "user")} for m in messages]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def _parts(self, text: str, user: bool) -> list[dict[str, str]]:
        """Typed content parts of a message; with ``image_parts`` a user's ``<image>`` becomes an image part and the
        whitespace beside it goes (``<image>\nQ`` renders as the template places an image before ``Q``)."""
        if not (self.image_parts and user and IMAGE_PLACEHOLDER in text):
            return [{"type": "text", "text": text}]
        pieces = text.split(IMAGE_PLACEHOLDER)
        parts: list[dict[str, str]] = []
        for index, piece in enumerate(pieces):
            if index:
                parts.append({"type": "image"})
                piece = piece.lstrip()
            if index < len(pieces) - 1:
                piece = piece.rstrip()
            if piece:
                parts.append({"type": "text", "text": piece})
        return parts

    def turn_texts(self, conversation: Conversation) -> list[tuple[str, str]]:
        """For each turn, the rendered text up to its generation prompt and up to the end of its reply's turn.

        Laid out from the template's shape when the template is regular and one rendering of the whole
        conversation agrees; otherwise rendered turn by turn (two renderings per turn).
        """
        messages: list[dict[str, str]] = []
        for human, reply in conversation.turns:
            messages += [{"role": "user", "content": human}, {"role": "assistant", "content": reply}]
        if self.shape is not None:
            texts = self.shape.turn_texts(conversation.turns)
            if texts[-1][1] == self._render(messages, add_generation_prompt=False):
                return texts
        return [
            (self._render(messages[: 2 * k + 1], True), self._render(messages[: 2 * k + 2], False))
            for k in range(len(conversation.turns))
        ]

    def _tokens(self, text: str, slot: list[int] | None = None) -> tuple[list[int], list[tuple[int, int] | None]]:
        """Token ids of ``text`` and each token's character span (``None`` for image tokens), ``<image>`` expanded
        to ``slot`` (default: the image tokens)."""
        image = [self.image_token_id] * self.num_image_tokens if slot is None else slot
        ids: list[int] = []
        spans: list[tuple[int, int] | None] = []
        if self._placeholder_id is not None:
            # The tokenizer knows <image>: one piece, as transformers' processors tokenize it; then expand it.
            for token, offset in zip(*self._tokenize([text])[0], strict=True):
                ids += image if token == self._placeholder_id else [token]
                spans += [None] * len(image) if token == self._placeholder_id else [offset]
            return ids, spans
        # Otherwise around each <image>, as LLaVA's tokenizer_image_token does.
        pieces = text.split(IMAGE_PLACEHOLDER)
        starts = [sum(len(p) + len(IMAGE_PLACEHOLDER) for p in pieces[:k]) for k in range(len(pieces))]
        tokenized = iter(self._tokenize([piece for piece in pieces if piece]))
        for index, (piece, start) in enumerate(zip(pieces, starts, strict=True)):
            if index:
                ids += image
                spans += [None] * len(image)
            if piece:
                piece_ids, offsets = next(tokenized)
                ids += piece_ids
                spans += [(start + a, start + b) for a, b in offsets]
        return ids, spans

    def _tokenize(self, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        if not texts:
            return []
        encoded = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        return [
            (ids, [tuple(o) for o in offsets]) for ids, offsets in zip(encoded["input_ids"], encoded["offset_mapping"])
        ]

    def _end_of_turn_ids(self) -> list[int]:
        if self.template is not None:
            return self.template.stop_ids(self.tokenizer)
        probe = Conversation("end-of-turn probe", (("QXUSERQX", "QXREPLYQX"),))
        try:
            marker = self.spans(probe)[2].text
        except SampleError:  # a template that cannot be laid out: its samples are skipped anyway
            return []
        ids = self.tokenizer(marker, add_special_tokens=False)["input_ids"] if marker else []
        return ids if len(ids) == 1 else []

    def spans(self, conversation: Conversation) -> list[Span]:
        """The rendered conversation as consecutive spans: each turn's prompt (not learned), its reply, and its
        end-of-turn marker (learned unless ``conversation.learn_end_marker`` is off). Whitespace the template puts
        after a marker opens the next prompt. A LLaMA-Factory template gives its own pieces (:class:`SlotTemplate`)."""
        if self.template is not None:
            return self.template.spans(conversation, self.tokenizer)
        spans: list[Span] = []
        rendered = ""  # the text covered by spans so far

        for (_, reply), (prompt, full) in zip(conversation.turns, self.turn_texts(conversation), strict=True):
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
            spans += [
                Span(prompt[len(rendered) :], False),
                Span(full[len(prompt) : body_end], True),
                Span(end_marker, conversation.learn_end_marker),
            ]
            rendered = full[: body_end + len(end_marker)]
        return spans

    def encode(self, conversation: Conversation) -> EncodedSample:
        """Token ids and labels of one whole tokenization of the conversation (as LLaVA trains): a token is learned
        when it covers text of a learned span."""
        text, learned = "", []
        for span, learn, _ in self.spans(conversation):
            if learn:
                learned.append((len(text), len(text) + len(span)))
            text += span
        ids, offsets = self._tokens(text)
        mark = bytearray(len(text) + 1)  # 1 on each learned character (one pass, however many spans)
        for start, end in learned:
            mark[start:end] = b"\x01" * (end - start)
        before = [0, *itertools.accumulate(mark)]  # learned characters before each position
        labels = [
            token if offset is not None and _covers_learned(offset, mark, before) else IGNORE_INDEX
            for token, offset in zip(ids, offsets, strict=True)
        ]
        input_ids, labels = [*self.bos, *ids], [IGNORE_INDEX] * len(self.bos) + labels
        keep = input_ids.index(self.image_token_id) + self.num_image_tokens if self.image_token_id in input_ids else 0
        input_ids, labels = truncate(conversation.id, input_ids, labels, self.max_length, keep)
        return EncodedSample(id=conversation.id, input_ids=input_ids, labels=labels, image=conversation.image)

    def prompt_spans(self, question: str, has_image: bool) -> list[Span]:
        """The pieces of a single-turn generation prompt; ``<image>\\n`` leads it when there is an image."""
        content = f"{IMAGE_PLACEHOLDER}\n{question}" if has_image and IMAGE_PLACEHOLDER not in question else question
        if self.template is not None:
            return self.template.prompt_spans(content)
        return [Span(self._render([{"role": "user", "content": content}], add_generation_prompt=True), False)]

    def prompt_text(self, question: str, has_image: bool) -> str:
        """The rendered single-turn generation prompt; ``<image>\\n`` leads it when there is an image, unless the
        question places ``<image>`` itself (the ``img2text`` probe puts it after the text, as the paper does)."""
        return "".join(span.text for span in self.prompt_spans(question, has_image))

    def encode_prompt(self, question: str, has_image: bool, slot: list[int] | None = None) -> list[int]:
        """Token ids of a single-turn generation prompt; ``<image>\\n`` leads it when there is an image and the
        question does not place it. ``slot``: the ids the image slot expands to (default: the image tokens)."""
        return self.bos + self._tokens(self.prompt_text(question, has_image), slot)[0]


def truncate(
    sample_id: str, input_ids: list[int], labels: list[int], max_length: int, keep: int
) -> tuple[list[int], list[int]]:
    """Cut a sample to ``max_length`` tokens; the first ``keep`` (up to the end of its image) must stay whole, and
    some reply token must remain. Otherwise the sample is skipped as ``too_long``, never cut mid-image."""
    if len(input_ids) > max_length:
        if keep > max_length:
            raise SampleError(
                sample_id,
                "too_long",
                f"{len(input_ids)} tokens; truncating to max_length={max_length} would cut the image",
            )
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    if labels[1:].count(IGNORE_INDEX) == len(labels) - 1:
        raise SampleError(sample_id, "too_long", f"no reply token left within max_length={max_length}")
    return input_ids, labels


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


def _covers_learned(offset: tuple[int, int], mark: bytearray, before: list[int]) -> bool:
    """Whether the token at character ``offset`` covers learned text. A zero-width token (a tokenizer that trims
    offsets gives whitespace tokens ``(i, i)``) is learned when it sits on a learned character."""
    start, end = offset
    return before[end] > before[start] if end > start else bool(mark[start])
