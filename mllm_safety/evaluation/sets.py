"""What an evaluation is made of: prompts (text, and an image opened or rendered lazily) grouped into sets.

Loading a benchmark reads only its question files; images are opened (or rendered) at generation time, so thousands
of prompts cost no memory until their batch runs, and an image that fails to open is skipped and counted instead of
stopping a long evaluation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from PIL import Image

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


ImageSource = ImageFile | FigStepImage | TypoImage | CaptionedImage


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
    request: str
    """The request in plain words, whatever the attack: what a classifier judge reads as the user turn."""
    advice: bool = False
    """A request where answering can be legitimate (legal, financial, health advice): reported apart, left out of
    the set's headline ASR."""
    target: Any = None
    """For a utility prompt: the reference answer(s) its set's scorer compares the reply with."""


Scorer = Callable[[list["EvalPrompt"], list[str]], dict[str, float]]
"""A utility set's scoring: (prompts, their replies) -> metric name -> value. Prompts whose image failed to open are
left out before scoring."""


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

    def __post_init__(self) -> None:
        if self.scorer is not None and self.harmful:
            raise ValueError(f"set {self.name}: a utility set (with a scorer) cannot be harmful")

    @property
    def is_utility(self) -> bool:
        return self.scorer is not None


@dataclass(frozen=True)
class Task:
    """A benchmark family: its modes and the loader building one set per requested mode from the published files
    (``load(path, images, modes)``)."""

    name: str
    modes: tuple[str, ...]
    """Every mode; the default builds them all."""
    load: Callable[[str | None, str | None, tuple[str, ...]], list[EvalSet]]
    needs_path: bool = True
    """False for sets bundled with the project."""
