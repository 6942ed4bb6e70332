"""What an evaluation is made of: prompts (text, and an image opened or rendered lazily) grouped into sets.

Loading a benchmark reads only its question files; images are opened (or rendered) at generation time, so thousands
of prompts cost no memory until their batch runs, and an image that fails to open is skipped and counted instead of
stopping a long evaluation.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from mllm_safety.data.image_slot import WordsInImageSlot
from mllm_safety.evaluation.typography import render_figstep, render_sd_typo, render_typo


class BadImage(RuntimeError):
    """An evaluation image that cannot be used; the prompt is skipped and counted, the message names the file."""


@dataclass(frozen=True)
class ImageFile:
    """A published benchmark image."""

    path: str

    def load(self) -> Image.Image:
        try:
            with Image.open(self.path) as image:
                return image.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            raise BadImage(f"{self.path}: cannot open image ({error})") from error

    def describe(self) -> str:
        return self.path


@dataclass(frozen=True)
class FigStepImage:
    """The text rendered the FigStep way (statement, then an empty list 1. 2. 3.)."""

    text: str

    def load(self) -> Image.Image:
        try:
            return render_figstep(self.text)
        except ValueError as error:
            raise BadImage(f"FigStep rendering of {self.text[:60]!r}: {error}") from error

    def describe(self) -> str:
        return "rendered: figstep"


@dataclass(frozen=True)
class TypoImage:
    """The text rendered as MM-SafetyBench's TYPO image."""

    text: str

    def load(self) -> Image.Image:
        return render_typo(self.text)

    def describe(self) -> str:
        return "rendered: typo"


@dataclass(frozen=True)
class CaptionedImage:
    """A published picture with the text rendered below it (MM-SafetyBench's SD+TYPO)."""

    path: str
    caption: str

    def load(self) -> Image.Image:
        return render_sd_typo(ImageFile(self.path).load(), self.caption)

    def describe(self) -> str:
        return f"{self.path} + rendered caption"


@dataclass(frozen=True)
class EncodedImage:
    """An image generated with its set and kept encoded (PNG bytes): small, and picklable across ranks."""

    data: bytes
    name: str
    """What the report calls it."""

    def load(self) -> Image.Image:
        try:
            with Image.open(io.BytesIO(self.data)) as image:
                return image.convert("RGB")
        except (OSError, ValueError) as error:
            raise BadImage(f"{self.name}: cannot decode image ({error})") from error

    def describe(self) -> str:
        return self.name


@dataclass(frozen=True)
class WhiteImage:
    """A blank white picture (the paper's ``white.jpg`` of its white-image probe); MM-SafetyBench's SD pictures'
    size by default."""

    size: int = 1024

    def load(self) -> Image.Image:
        return Image.new("RGB", (self.size, self.size), "white")

    def describe(self) -> str:
        return f"generated: white {self.size}x{self.size}"


ImageSource = ImageFile | FigStepImage | TypoImage | CaptionedImage | EncodedImage | WhiteImage | WordsInImageSlot
"""What fills a prompt's image slot: an image, opened or rendered at generation time, or words
(:class:`~mllm_safety.data.image_slot.WordsInImageSlot`, the ``img2text`` probe)."""


@dataclass(frozen=True)
class EvalPrompt:
    """One prompt of an eval set."""

    id: str
    """Unique within its set."""
    set_name: str
    category: str | None
    """The benchmark's harm category (per-category figures), or None when it has none."""
    question: str
    """The text prompt given to the model (with an image, the text next to it)."""
    image: ImageSource | None
    """What fills the image slot (an image, or words for the ``img2text`` probe); None for a text-only prompt. The
    slot leads the question unless the question places ``<image>`` itself."""
    request: str
    """The request in plain words, whatever the attack: what a classifier judge reads as the user turn."""
    advice: bool = False
    """A request where answering can be legitimate (legal, financial, health advice): reported apart, left out of
    the set's headline ASR."""
    target: Any = None
    """For a utility prompt: the reference answer(s) its set's scorer compares the reply with."""


SHORT_ANSWER_PROMPT = "Answer the question using a single word or phrase."
"""LLaVA's line after a question that wants a one-word answer (its MME, POPE and VizWiz prompts)."""

Scorer = Callable[[list["EvalPrompt"], list[str]], dict[str, float]]
"""A utility set's scoring: (prompts, their replies) -> metric name -> value. A prompt whose image failed to open comes
with an empty reply."""


@dataclass(frozen=True)
class Protocol:
    """A benchmark evaluated the way a paper evaluated it, so that its figures can stand next to the paper's: the
    modes, the judge, the generation settings and what the headline ASR counts."""

    name: str
    source: str
    """Where the settings come from (the paper's released scripts)."""
    judge: str
    """The keyword judge the paper scored with; the set's headline figures are this judge's."""
    modes: tuple[str, ...]
    """The modes the paper evaluated; a benchmark entry's ``modes`` default to them."""
    generation: Mapping[str, Any] = field(default_factory=dict)
    """Overrides of :class:`~mllm_safety.evaluation.generation.GenerationSettings` fields (the seed and batch size
    stay the evaluation's)."""
    advice_apart: bool = False
    """Report legitimate-advice categories apart (our default) or, as the paper does, count them in the ASR."""
    load_options: Mapping[str, Any] = field(default_factory=dict)
    """Keyword options of the benchmark's loader (MM-SafetyBench: which question the text-only mode asks)."""
    paper_view: bool = False
    """Also judge each reply as the paper's scripts saw it (``generation.paper_view``: the decoded output sliced
    ``[4:-4]``), reported beside the whole-reply figures as ``asr/<set>/paper_view``, never instead of them."""
    paper_figure_modes: tuple[str, ...] = ()
    """The modes whose ASR is the paper's published figure (its judge script reads only these); the protocol's other
    modes are extra figures."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "judge": self.judge,
            "modes": list(self.modes),
            "generation": dict(self.generation),
            "advice_apart": self.advice_apart,
            "load_options": dict(self.load_options),
            "paper_view": self.paper_view,
            "paper_figure_modes": list(self.paper_figure_modes),
        }


@dataclass(frozen=True)
class EvalSet:
    """Prompts scored together: harmful (ASR), benign (over-refusal) or, with a ``scorer``, utility (accuracy ...)."""

    name: str
    benchmark: str
    harmful: bool
    """Harmful prompts (ASR is measured) or benign ones (over-refusal, or utility with a ``scorer``)."""
    prompts: list[EvalPrompt]
    contrast: str | None = None
    """For a benign set: the harmful set phrased like it; the refusal gap is the refusal rate on that set minus the
    rate on this one."""
    source: str = ""
    """Where the prompts and images came from, for the report."""
    scorer: Scorer | None = None
    """Makes this a utility set: its replies are scored against the prompts' targets (``utility/<set>/<metric>``)
    instead of judged for refusal."""
    protocol: Protocol | None = None
    """The published protocol the set is run under (its judge, generation settings), or None for ours."""

    def __post_init__(self) -> None:
        if self.scorer is not None and self.harmful:
            raise ValueError(f"set {self.name}: a utility set (with a scorer) cannot be harmful")

    @property
    def is_utility(self) -> bool:
        return self.scorer is not None


def all_prompts(sets: list[EvalSet]) -> list[EvalPrompt]:
    """The prompts of every set in order: the index space shared by generation, reduction and reports."""
    return [prompt for eval_set in sets for prompt in eval_set.prompts]


@dataclass(frozen=True)
class Task:
    """A benchmark family: its modes and the loader building one set per requested mode from the published files
    (``load(path, images, modes, **protocol.load_options)``)."""

    name: str
    modes: tuple[str, ...]
    """Every mode."""
    load: Callable[..., list[EvalSet]]
    needs_path: bool = True
    """False for sets bundled with the project."""
    protocols: Mapping[str, Protocol] = field(default_factory=dict)
    """Published protocols a benchmark entry can select by name (``protocol: paper``)."""
    default_modes: tuple[str, ...] | None = None
    """The modes built when an entry names none and has no protocol (default: every mode); analysis probes such as
    ``img2text`` are asked for by name."""

    def __post_init__(self) -> None:
        if self.default_modes is not None and not set(self.default_modes) <= set(self.modes):
            raise ValueError(f"task {self.name}: default modes {self.default_modes} are not all among {self.modes}")
