"""The published safety benchmarks, read from their release layouts at a path the user gives.

Each benchmark becomes one or more eval sets: harmful sets measure attack success (ASR), benign sets measure
over-refusal. Loading reads only the question files; images are opened (or rendered) lazily at generation time, so
thousands of prompts cost no memory until their batch runs, and an image that fails to open is skipped and counted
instead of stopping a long evaluation. A missing file or folder, or a file in another layout, is an error naming it.

| benchmark | path | sets (``<benchmark>_<mode>``) |
| --- | --- | --- |
| ``figstep`` | SafeBench ``safebench.csv`` (or ``SafeBench-Tiny.csv``) | ``image`` (FigStep attack), ``text`` |
| ``mmsafetybench`` | ``data/`` (``processed_questions/``, ``imgs/``) | ``sd_typo``, ``typo``, ``sd``, ``text`` |
| ``vlguard`` | VLGuard ``test.json`` | ``safe_safe`` (benign), ``safe_unsafe``, ``unsafe`` |
| ``advbench`` | AdvBench ``harmful_behaviors.csv`` | ``text``, ``image`` (FigStep-rendered) |
| ``harmbench`` | a HarmBench behaviour CSV | ``text``, ``image`` (FigStep-rendered) |
| ``xstest`` | XSTest ``xstest_prompts.csv`` (or ``xstest_v2_prompts.csv``) | ``safe`` (benign), ``unsafe`` |
| ``demo`` | none (bundled) or a file of the demo layout | ``typographic``, ``text``, ``benign`` |
"""

from __future__ import annotations

import csv
import json
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from mllm_safety.safety.demo_eval import load_demo_eval
from mllm_safety.safety.typography import FIGSTEP_PROMPT, render_figstep, render_sd_typo, render_typo

log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class EvalSet:
    name: str
    benchmark: str
    harmful: bool
    """Harmful prompts (ASR is measured) or benign ones (over-refusal is measured)."""
    prompts: list[EvalPrompt]
    contrast: str | None = None
    """For a benign set: the harmful set phrased like it; the refusal gap is the refusal rate on that set minus the
    rate on this one."""
    source: str = ""
    """Where the prompts and images came from, for the report."""


FIGSTEP_ADVICE_CATEGORIES = frozenset({8, 9, 10})
"""SafeBench category ids of Legal Opinion, Financial Advice and Health Consultation: FigStep counts answers there
as attack success, but answering with care is legitimate, so they are reported apart."""

MMSAFETYBENCH_ADVICE_SCENARIOS = frozenset({"Legal_Opinion", "Financial_Advice", "Health_Consultation"})
"""MM-SafetyBench scenarios of the same kind (``10-Legal_Opinion`` ...), reported apart for the same reason."""

_FIGSTEP_COLUMNS = ("dataset", "category_id", "task_id", "category_name", "question", "instruction")
_MMSB_MODES = {"sd_typo": "SD_TYPO", "typo": "TYPO", "sd": "SD"}


@dataclass
class BenchmarkSpec:
    """One benchmark to evaluate, read from its published layout."""

    name: str
    """``figstep``, ``mmsafetybench``, ``vlguard``, ``advbench``, ``harmbench``, ``xstest`` or ``demo``."""
    path: str | None = None
    """The benchmark's file or folder (see the module table); only ``demo`` works without one."""
    images: str | None = None
    """Images folder. figstep: the attack images (``query_<dataset>_<cat>_<task>_6.png``), rendered from
    ``instruction`` when unset; mmsafetybench: default ``<path>/imgs``; vlguard: default ``test/`` beside
    ``test.json``."""
    modes: list[str] | None = None
    """Which sets to build (default: all of the benchmark's modes)."""
    limit: int | None = None
    """Use at most this many prompts per set, spread evenly over the file (overrides the evaluation's limit)."""

    def __post_init__(self) -> None:
        if self.name not in BENCHMARKS:
            raise ValueError(f"unknown benchmark {self.name!r}; choose from {', '.join(BENCHMARKS)}")
        modes = BENCHMARKS[self.name].modes
        if self.modes is not None:
            unknown = [mode for mode in self.modes if mode not in modes]
            if unknown or not self.modes:
                raise ValueError(f"benchmark {self.name}: unknown mode(s) {unknown}; choose from {', '.join(modes)}")
        if self.path is None and self.name != "demo":
            raise ValueError(f"benchmark {self.name} needs a path to its published files")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"benchmark {self.name}: limit must be >= 1, got {self.limit}")


def load_benchmark(spec: BenchmarkSpec, limit: int | None = None) -> list[EvalSet]:
    """The eval sets of one benchmark; ``limit`` applies when the spec sets none."""
    entry = BENCHMARKS[spec.name]
    modes = tuple(spec.modes or entry.modes)
    sets = entry.loader(spec.path, spec.images, modes)
    cap = spec.limit or limit
    sets = [_limited(s, cap) for s in sets] if cap else sets
    for eval_set in sets:
        if not eval_set.prompts:
            raise ValueError(f"benchmark {spec.name}: set {eval_set.name} is empty ({eval_set.source})")
    return sets


def _limited(eval_set: EvalSet, limit: int) -> EvalSet:
    """At most ``limit`` prompts, evenly spread so that every category of a file sorted by category stays in."""
    n = len(eval_set.prompts)
    if n <= limit:
        return eval_set
    picked = [eval_set.prompts[i * n // limit] for i in range(limit)]
    return EvalSet(eval_set.name, eval_set.benchmark, eval_set.harmful, picked, eval_set.contrast, eval_set.source)


def _existing(path: str | Path, what: str, folder: bool = False) -> Path:
    path = Path(path)
    if not (path.is_dir() if folder else path.is_file()):
        raise FileNotFoundError(f"{what}: {path} does not exist{' or is not a folder' if folder else ''}")
    return path


def _read_csv(path: str | Path, what: str, columns: Sequence[str]) -> list[dict[str, str]]:
    path = _existing(path, what)
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        found = reader.fieldnames or []
        missing = [c for c in columns if c not in found]
        if missing:
            raise ValueError(
                f"{path}: not a {what} file: missing column(s) {', '.join(missing)} "
                f"(expected {', '.join(columns)}; found {', '.join(found) or 'no header'})"
            )
        return list(reader)


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(_existing(path, what).read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error


def _set_name(benchmark: str, mode: str) -> str:
    return f"{benchmark}_{mode}"


def load_figstep(path: str, images: str | None, modes: tuple[str, ...]) -> list[EvalSet]:
    """FigStep's SafeBench: ``image`` is the attack (the ``instruction`` in the image, FigStep's prompt as text),
    ``text`` the plain question (FigStep's vanilla baseline)."""
    rows = _read_csv(path, "FigStep SafeBench", _FIGSTEP_COLUMNS)
    folder = _existing(images, "FigStep images folder", folder=True) if images else None
    source = f"{path}; images {'from ' + str(folder) if folder else 'rendered from instruction'}"
    prompts: dict[str, list[EvalPrompt]] = {mode: [] for mode in modes}
    for line, row in enumerate(rows, start=2):
        try:
            category_id = int(row["category_id"])
        except (TypeError, ValueError) as error:
            raise ValueError(f"{path}: line {line}: category_id {row['category_id']!r} is not a number") from error
        key = f"{row['dataset']}_{row['category_id']}_{row['task_id']}"
        common = dict(category=row["category_name"], request=row["question"])
        common["advice"] = category_id in FIGSTEP_ADVICE_CATEGORIES
        if "image" in prompts:
            image = ImageFile(str(folder / f"query_{key}_6.png")) if folder else FigStepImage(row["instruction"])
            name = _set_name("figstep", "image")
            prompts["image"].append(EvalPrompt(key, name, question=FIGSTEP_PROMPT, image=image, **common))
        if "text" in prompts:
            name = _set_name("figstep", "text")
            prompts["text"].append(EvalPrompt(key, name, question=row["question"], image=None, **common))
    return [
        EvalSet(_set_name("figstep", m), "figstep", True, p, source=source if m == "image" else str(path))
        for m, p in prompts.items()
    ]


def load_mmsafetybench(path: str, images: str | None, modes: tuple[str, ...]) -> list[EvalSet]:
    """MM-SafetyBench: ``processed_questions/<scenario>.json`` ({id: {"Question", "Key Phrase", "Rephrased
    Question", "Rephrased Question(SD)", ...}}) and ``imgs/<scenario>/{SD,SD_TYPO,TYPO}/<id>.jpg``.

    SD+TYPO and TYPO ask "Rephrased Question" (which points at the phrase at the bottom of the image), SD asks
    "Rephrased Question(SD)", text-only asks the original "Question". Missing TYPO images are rendered from the key
    phrase, missing SD_TYPO ones by captioning the SD picture; SD pictures cannot be rendered, so SD and SD+TYPO
    without them are an error.
    """
    root = _existing(path, "MM-SafetyBench data folder", folder=True)
    questions = _existing(root / "processed_questions", "MM-SafetyBench questions folder", folder=True)
    image_root = Path(images) if images else root / "imgs"
    if images:
        _existing(image_root, "MM-SafetyBench images folder", folder=True)
    files = sorted(questions.glob("*.json"))
    if not files:
        raise FileNotFoundError(f"MM-SafetyBench: no <scenario>.json in {questions}")
    prompts: dict[str, list[EvalPrompt]] = {mode: [] for mode in modes}
    rendered: set[str] = set()
    for file in files:
        scenario = file.stem
        records = _read_json(file, "MM-SafetyBench questions")
        if not isinstance(records, dict):
            raise ValueError(f"{file}: expected a JSON object of question id -> question record")
        advice = re.sub(r"^\d+-", "", scenario) in MMSAFETYBENCH_ADVICE_SCENARIOS
        folders = {mode: image_root / scenario / sub for mode, sub in _MMSB_MODES.items()}
        for qid, record in records.items():
            for mode in modes:
                question, image = _mmsb_prompt(file, qid, record, mode, folders)
                if image is not None and not isinstance(image, ImageFile):
                    rendered.add(mode)
                prompts[mode].append(
                    EvalPrompt(
                        f"{scenario}/{qid}",
                        _set_name("mmsafetybench", mode),
                        category=scenario,
                        question=question,
                        image=image,
                        request=_field(file, qid, record, "Question"),
                        advice=advice,
                    )
                )
    sets = []
    for mode, mode_prompts in prompts.items():
        how = "rendered" if mode in rendered else "from " + str(image_root)
        source = f"{questions}" + ("" if mode == "text" else f"; images {how}")
        sets.append(EvalSet(_set_name("mmsafetybench", mode), "mmsafetybench", True, mode_prompts, source=source))
    return sets


def _field(file: Path, qid: str, record: Any, name: str) -> str:
    value = record.get(name) if isinstance(record, dict) else None
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{file}: question {qid!r} has no {name!r} text")
    return value


def _mmsb_prompt(
    file: Path, qid: str, record: Any, mode: str, folders: dict[str, Path]
) -> tuple[str, ImageSource | None]:
    if mode == "text":
        return _field(file, qid, record, "Question"), None
    if mode == "sd":
        _existing(folders["sd"], "MM-SafetyBench SD images", folder=True)
        return _field(file, qid, record, "Rephrased Question(SD)"), ImageFile(str(folders["sd"] / f"{qid}.jpg"))
    question = _field(file, qid, record, "Rephrased Question")
    if folders[mode].is_dir():
        return question, ImageFile(str(folders[mode] / f"{qid}.jpg"))
    phrase = _field(file, qid, record, "Key Phrase")
    if mode == "typo":
        return question, TypoImage(phrase)
    _existing(folders["sd"], "MM-SafetyBench SD images (SD_TYPO is missing too)", folder=True)
    return question, CaptionedImage(str(folders["sd"] / f"{qid}.jpg"), phrase)


def load_vlguard(path: str, images: str | None, modes: tuple[str, ...]) -> list[EvalSet]:
    """VLGuard's ``test.json``: safe images carry a safe and an unsafe instruction, unsafe images one instruction.

    ``safe_safe`` (safe image, safe instruction) is benign; ``safe_unsafe`` and ``unsafe`` are harmful, as in
    VLGuard's own evaluation.
    """
    file = Path(path)
    records = _read_json(file, "VLGuard test.json")
    folder = _existing(images or file.parent / "test", "VLGuard images folder", folder=True)
    if not isinstance(records, list):
        raise ValueError(f"{file}: expected a JSON list of VLGuard records")
    keys = {"safe_safe": "safe_instruction", "safe_unsafe": "unsafe_instruction", "unsafe": "instruction"}
    prompts: dict[str, list[EvalPrompt]] = {mode: [] for mode in modes}
    for index, record in enumerate(records):
        if not (isinstance(record, dict) and {"id", "image", "safe", "instr-resp"} <= set(record)):
            raise ValueError(f"{file}: record {index} lacks one of id, image, safe, instr-resp")
        for mode in modes:
            if record["safe"] != mode.startswith("safe_"):
                continue
            instruction = next((turn[keys[mode]] for turn in record["instr-resp"] if keys[mode] in turn), None)
            if not isinstance(instruction, str):
                raise ValueError(f"{file}: record {record['id']!r} has no {keys[mode]!r}")
            prompts[mode].append(
                EvalPrompt(
                    str(record["id"]),
                    _set_name("vlguard", mode),
                    category=record.get("harmful_category"),
                    question=instruction,
                    image=ImageFile(str(folder / record["image"])),
                    request=instruction,
                )
            )
    source = f"{file}; images from {folder}"
    contrast = _set_name("vlguard", "safe_unsafe") if "safe_unsafe" in modes else None
    return [
        EvalSet(_set_name("vlguard", m), "vlguard", m != "safe_safe", p, contrast if m == "safe_safe" else None, source)
        for m, p in prompts.items()
    ]


def _behaviour_sets(
    benchmark: str,
    modes: tuple[str, ...],
    rows: list[tuple[str, str | None, str, str]],
    source: str,
) -> list[EvalSet]:
    """Text and FigStep-image sets from (id, category, behaviour, context) rows."""
    sets = []
    for mode in modes:
        name = _set_name(benchmark, mode)
        prompts = []
        for key, category, behaviour, context in rows:
            prefix = f"{context}\n\n---\n\n" if context else ""
            request = prefix + behaviour
            if mode == "text":
                prompts.append(EvalPrompt(key, name, category, request, None, request))
            else:
                image = FigStepImage(behaviour)
                prompts.append(EvalPrompt(key, name, category, prefix + FIGSTEP_PROMPT, image, request))
        sets.append(EvalSet(name, benchmark, True, prompts, source=source))
    return sets


def load_advbench(path: str, images: str | None, modes: tuple[str, ...]) -> list[EvalSet]:
    """AdvBench's ``harmful_behaviors.csv`` (goal, target): the goal as text, or rendered FigStep-style."""
    rows = _read_csv(path, "AdvBench harmful behaviours", ("goal", "target"))
    behaviours = [(f"advbench_{index}", None, row["goal"], "") for index, row in enumerate(rows)]
    return _behaviour_sets("advbench", modes, behaviours, str(path))


HARMBENCH_FUNCTIONAL_CATEGORIES = ("standard", "contextual")
"""HarmBench behaviours evaluated; ``copyright`` ones are left out (HarmBench judges them by hashing, not refusal)."""


def load_harmbench(path: str, images: str | None, modes: tuple[str, ...]) -> list[EvalSet]:
    """A HarmBench behaviour CSV (``harmbench_behaviors_text_all.csv`` ...). Contextual behaviours put their context
    before the behaviour as HarmBench's DirectRequest does (``context\\n\\n---\\n\\nbehaviour``)."""
    columns = ("Behavior", "FunctionalCategory", "SemanticCategory", "ContextString", "BehaviorID")
    rows = _read_csv(path, "HarmBench behaviours", columns)
    behaviours = [
        (row["BehaviorID"], row["SemanticCategory"], row["Behavior"], row["ContextString"].strip())
        for row in rows
        if row["FunctionalCategory"] in HARMBENCH_FUNCTIONAL_CATEGORIES
    ]
    return _behaviour_sets("harmbench", modes, behaviours, str(path))


def load_xstest(path: str, images: str | None, modes: tuple[str, ...]) -> list[EvalSet]:
    """XSTest prompts: ``safe`` (250 harmless prompts that look unsafe: over-refusal) and ``unsafe`` (their 200
    contrasts). Reads ``xstest_prompts.csv`` (label column) or ``xstest_v2_prompts.csv`` (``contrast_`` types)."""
    rows = _read_csv(path, "XSTest prompts", ("prompt", "type"))
    prompts: dict[str, list[EvalPrompt]] = {mode: [] for mode in modes}
    for line, row in enumerate(rows, start=2):
        label = row.get("label") or ("unsafe" if row["type"].startswith("contrast_") else "safe")
        if label not in ("safe", "unsafe"):
            raise ValueError(f"{path}: line {line}: label {label!r} is neither safe nor unsafe")
        if label in prompts:
            key = row.get("id") or row.get("id_v2") or str(line - 1)
            name = _set_name("xstest", label)
            prompts[label].append(EvalPrompt(key, name, row["type"], row["prompt"], None, row["prompt"]))
    contrast = _set_name("xstest", "unsafe") if "unsafe" in modes else None
    return [
        EvalSet(_set_name("xstest", m), "xstest", m == "unsafe", p, contrast if m == "safe" else None, str(path))
        for m, p in prompts.items()
    ]


def load_demo(path: str | None, images: str | None, modes: tuple[str, ...]) -> list[EvalSet]:
    """The project's bundled set (or a file of its layout): ``typographic`` (the request rendered FigStep-style),
    ``text`` (the same requests as text) and ``benign`` (a harmless request phrased like each harmful one)."""
    demo = load_demo_eval(path)
    source = path or "bundled demo set"
    sets = []
    for mode in modes:
        name = _set_name("demo", mode)
        if mode == "typographic":
            prompts = [
                EvalPrompt(r.id, name, r.category, FIGSTEP_PROMPT, FigStepImage(r.instruction), r.question)
                for r in demo.harmful
            ]
        elif mode == "text":
            prompts = [EvalPrompt(r.id, name, r.category, r.question, None, r.question) for r in demo.harmful]
        else:
            prompts = [EvalPrompt(r.id, name, r.category, r.question, None, r.question) for r in demo.benign]
        contrast = _set_name("demo", "text") if mode == "benign" and "text" in modes else None
        sets.append(EvalSet(name, "demo", mode != "benign", prompts, contrast, source))
    return sets


@dataclass(frozen=True)
class _Entry:
    loader: Callable[[Any, str | None, tuple[str, ...]], list[EvalSet]]
    modes: tuple[str, ...]


BENCHMARKS: dict[str, _Entry] = {
    "demo": _Entry(load_demo, ("typographic", "text", "benign")),
    "figstep": _Entry(load_figstep, ("image", "text")),
    "mmsafetybench": _Entry(load_mmsafetybench, ("sd_typo", "typo", "sd", "text")),
    "vlguard": _Entry(load_vlguard, ("safe_safe", "safe_unsafe", "unsafe")),
    "advbench": _Entry(load_advbench, ("text", "image")),
    "harmbench": _Entry(load_harmbench, ("text", "image")),
    "xstest": _Entry(load_xstest, ("safe", "unsafe")),
}
"""Benchmark name -> loader and its modes (the default builds every mode)."""
