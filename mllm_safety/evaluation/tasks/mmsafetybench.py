"""MM-SafetyBench (Liu et al., ECCV 2024): 13 scenarios, each question as SD, SD+TYPO, TYPO images or text.

Protocol ``paper``: as the safety-finetuning paper ran it on LLaVA (Wang et al., CVPR 2025;
``evaluation/evaluate_MM_llava_ablation.py`` and ``utils/judge_mmbench_str.py`` in
github.com/ybwang119/MLLM_safety_study): SD+TYPO and TYPO with "Rephrased Question", SD with "Rephrased
Question(SD)", text-only with "Changed Question"; all 13 scenarios, per scenario (``asr/<set>/<scenario>``) and
pooled (``asr/<set>``); greedy, 512 new tokens; the paper's judge; MM-SafetyBench's own images only. The paper's
judge script reads only the SD+TYPO replies (``*mix.json``) and pools its 13 scenarios: ``asr/mmsafetybench_sd_typo``
is the paper's figure, the other modes are extra figures. Like its FigStep script, it judges
``decode(...).strip()[4:-4]``: reported beside each whole-reply ASR as ``asr/<set>/paper_view`` (``tasks/figstep.py``).

The paper's analysis probes (the same script's ``--input-mode``), built only when named, with ``Q`` = "Changed
Question" and ``P`` = "Rephrased Question(SD)" with "a phrase of" replaced by "a request about":

- ``img2text``: ``Q``'s token embeddings (no BOS) fill the image slot; the prompt is ``P``, a newline, then the slot;
- ``matched_ocr``: ``Q`` rendered as a TYPO image, prompt ``P``;
- ``text2img``: that image alone (the prompt is the image and its newline);
- ``white``: the paper's ``trial`` mode, a white image between ``P`` and ``Q``: ``P``, a newline, the image, then
  ``Q`` as text (the same words as ``img2text``, with an image's features before them).

The paper's ``matched_ocr`` pictures are not published: ``imgs/<scenario>/matched_ocr/<id>.jpg`` is read where the
folder exists, otherwise ``Q`` is rendered (under the paper protocol too). Only the LLaVA family takes words in its
image slot (``mllm_safety.data.image_slot``); ``img2text`` on another family stops before generating.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mllm_safety.constants import IMAGE_PLACEHOLDER
from mllm_safety.data.image_slot import WordsInImageSlot
from mllm_safety.evaluation.files import existing, read_json, set_name
from mllm_safety.evaluation.sets import (
    CaptionedImage,
    EvalPrompt,
    EvalSet,
    ImageFile,
    ImageSource,
    Protocol,
    Task,
    TypoImage,
    WhiteImage,
)

MMSAFETYBENCH_ADVICE_SCENARIOS = frozenset({"Legal_Opinion", "Financial_Advice", "Health_Consultation"})
"""MM-SafetyBench scenarios of the same kind (``10-Legal_Opinion`` ...), reported apart for the same reason."""

_MMSB_MODES = {"sd_typo": "SD_TYPO", "typo": "TYPO", "sd": "SD"}
PROBE_MODES = ("img2text", "matched_ocr", "text2img", "white")
"""The paper's analysis probes (see the module docstring)."""
MATCHED_OCR_FOLDER = "matched_ocr"
"""The paper's folder of ``Q`` rendered as text (``imgs/<scenario>/matched_ocr``), read where present."""


def load_mmsafetybench(
    path: str,
    images: str | None,
    modes: tuple[str, ...],
    text_question: str = "Question",
    scenarios: int | None = None,
    published_images: bool = False,
) -> list[EvalSet]:
    """MM-SafetyBench: ``processed_questions/<scenario>.json`` ({id: {"Question", "Key Phrase", "Rephrased
    Question", "Rephrased Question(SD)", ...}}) and ``imgs/<scenario>/{SD,SD_TYPO,TYPO}/<id>.jpg``.

    SD+TYPO and TYPO ask "Rephrased Question" (which points at the phrase at the bottom of the image), SD asks
    "Rephrased Question(SD)", text-only asks ``text_question`` (default the original "Question"; the paper's
    protocol: "Changed Question"). Missing TYPO images are rendered from the key phrase, missing SD_TYPO ones by
    captioning the SD picture; SD pictures cannot be rendered, so SD and SD+TYPO without them are an error.
    ``scenarios``: how many scenario files there must be (the paper's protocol pools all 13). ``published_images``:
    never render, every image must be MM-SafetyBench's own (the paper's protocol). The analysis probes
    (:data:`PROBE_MODES`) ask "Changed Question" and "Rephrased Question(SD)" whatever the protocol.
    """
    root = existing(path, "MM-SafetyBench data folder", folder=True)
    questions = existing(root / "processed_questions", "MM-SafetyBench questions folder", folder=True)
    image_root = Path(images) if images else root / "imgs"
    if images:
        existing(image_root, "MM-SafetyBench images folder", folder=True)
    files = sorted(questions.glob("*.json"))
    if not files:
        raise FileNotFoundError(f"MM-SafetyBench: no <scenario>.json in {questions}")
    if scenarios is not None and len(files) != scenarios:
        raise ValueError(f"{questions}: {len(files)} scenario file(s); this protocol pools all {scenarios} scenarios")
    prompts: dict[str, list[EvalPrompt]] = {mode: [] for mode in modes}
    rendered: set[str] = set()
    for file in files:
        scenario = file.stem
        records = read_json(file, "MM-SafetyBench questions")
        if not isinstance(records, dict):
            raise ValueError(f"{file}: expected a JSON object of question id -> question record")
        advice = re.sub(r"^\d+-", "", scenario) in MMSAFETYBENCH_ADVICE_SCENARIOS
        folders = {mode: image_root / scenario / sub for mode, sub in _MMSB_MODES.items()}
        matched = image_root / scenario / MATCHED_OCR_FOLDER
        for qid, record in records.items():
            for mode in modes:
                if mode in PROBE_MODES:
                    question, image = _probe_prompt(file, qid, record, mode, matched)
                else:
                    question, image = _mmsb_prompt(file, qid, record, mode, folders, text_question, published_images)
                if image is not None and not isinstance(image, ImageFile):
                    rendered.add(mode)
                prompts[mode].append(
                    EvalPrompt(
                        f"{scenario}/{qid}",
                        set_name("mmsafetybench", mode),
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
        how = {"img2text": "none: the Changed Question's words fill the image slot", "white": "generated (white)"}.get(
            mode, how
        )
        source = f"{questions}" + ("" if mode == "text" else f"; images {how}")
        sets.append(EvalSet(set_name("mmsafetybench", mode), "mmsafetybench", True, mode_prompts, source=source))
    return sets


def _field(file: Path, qid: str, record: Any, name: str) -> str:
    value = record.get(name) if isinstance(record, dict) else None
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{file}: question {qid!r} has no {name!r} text")
    return value


def _probe_prompt(file: Path, qid: str, record: Any, mode: str, matched: Path) -> tuple[str, ImageSource]:
    """The question and image-slot content of an analysis probe (the module docstring), as the paper's script lays
    them out (``inp`` of ``evaluate_MM_llava_ablation.py``)."""
    question = _field(file, qid, record, "Changed Question")
    about = _field(file, qid, record, "Rephrased Question(SD)").replace("a phrase of", "a request about")
    if mode == "img2text":
        return f"{about}\n{IMAGE_PLACEHOLDER}", WordsInImageSlot(question)
    if mode == "white":
        return f"{about}\n{IMAGE_PLACEHOLDER}{question}", WhiteImage()
    image = ImageFile(str(matched / f"{qid}.jpg")) if matched.is_dir() else TypoImage(question)
    return (about if mode == "matched_ocr" else ""), image


def _mmsb_prompt(
    file: Path, qid: str, record: Any, mode: str, folders: dict[str, Path], text_question: str, published: bool
) -> tuple[str, ImageSource | None]:
    if mode == "text":
        return _field(file, qid, record, text_question), None
    if mode == "sd":
        existing(folders["sd"], "MM-SafetyBench SD images", folder=True)
        return _field(file, qid, record, "Rephrased Question(SD)"), ImageFile(str(folders["sd"] / f"{qid}.jpg"))
    question = _field(file, qid, record, "Rephrased Question")
    if folders[mode].is_dir() or published:
        existing(folders[mode], f"MM-SafetyBench {_MMSB_MODES[mode]} images (this protocol renders none)", folder=True)
        return question, ImageFile(str(folders[mode] / f"{qid}.jpg"))
    phrase = _field(file, qid, record, "Key Phrase")
    if mode == "typo":
        return question, TypoImage(phrase)
    existing(folders["sd"], "MM-SafetyBench SD images (SD_TYPO is missing too)", folder=True)
    return question, CaptionedImage(str(folders["sd"] / f"{qid}.jpg"), phrase)


PAPER = Protocol(
    name="paper",
    source="Wang et al., CVPR 2025: evaluation/evaluate_MM_llava_ablation.py, utils/judge_mmbench_str.py "
    "(github.com/ybwang119/MLLM_safety_study)",
    judge="paper",
    modes=("sd_typo", "sd", "typo", "text"),
    generation={"max_new_tokens": 512, "do_sample": False},
    load_options={"text_question": "Changed Question", "scenarios": 13, "published_images": True},
    paper_view=True,
    paper_figure_modes=("sd_typo",),
)

TASK = Task(
    "mmsafetybench",
    ("sd_typo", "typo", "sd", "text", *PROBE_MODES),
    load_mmsafetybench,
    protocols={"paper": PAPER},
    default_modes=("sd_typo", "typo", "sd", "text"),
)
