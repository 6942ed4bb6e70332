"""FigStep's SafeBench (Gong et al., 2023): the request as a typographic list image, and as plain text.

Protocol ``paper``: FigStep as the safety-finetuning paper ran it on LLaVA (Wang et al., CVPR 2025;
``evaluation/evaluate_figstep_llava.py`` in github.com/ybwang119/MLLM_safety_study): every SafeBench image with
FigStep's prompt, sampled at temperature 0.2 (Hugging Face's default top-k of 50 in effect) with 512 new tokens,
judged by the paper's matcher, all 10 categories in the ASR, on FigStep's published images only (a rendering of our
own would not be the paper's benchmark). Two differences are left on purpose: the paper's script writes the prompt
over three source lines with backslash continuations, so its sentences are separated by runs of spaces, where we send
FigStep's prompt; and it judges ``tokenizer.decode(output_ids[0]).strip()[4:-4]``, not the reply. The protocol
judges both: ``asr/figstep_image`` the whole reply, ``asr/figstep_image/paper_view`` that slice
(``generation.paper_view``: with LLaVA-1.5 it drops ``"<s> "`` and ``"</s>"``, and the last four characters of a
reply cut at 512 tokens).
"""

from __future__ import annotations

from mllm_safety.evaluation.files import existing, read_csv, set_name
from mllm_safety.evaluation.sets import EvalPrompt, EvalSet, FigStepImage, ImageFile, Protocol, Task
from mllm_safety.evaluation.typography import FIGSTEP_PROMPT

FIGSTEP_ADVICE_CATEGORIES = frozenset({8, 9, 10})
"""SafeBench category ids of Legal Opinion, Financial Advice and Health Consultation: FigStep counts answers there
as attack success, but answering with care is legitimate, so they are reported apart."""

_FIGSTEP_COLUMNS = ("dataset", "category_id", "task_id", "category_name", "question", "instruction")


def load_figstep(
    path: str, images: str | None, modes: tuple[str, ...], published_images: bool = False
) -> list[EvalSet]:
    """FigStep's SafeBench: ``image`` is the attack (the ``instruction`` in the image, FigStep's prompt as text),
    ``text`` the plain question (FigStep's vanilla baseline). Without ``images`` the attack images are rendered,
    unless ``published_images`` asks for FigStep's own."""
    if published_images and images is None and "image" in modes:
        raise ValueError(
            f"benchmark figstep ({path}): this protocol evaluates FigStep's published images; set images to their "
            "folder (query_<dataset>_<category>_<task>_6.png)"
        )
    rows = read_csv(path, "FigStep SafeBench", _FIGSTEP_COLUMNS)
    folder = existing(images, "FigStep images folder", folder=True) if images else None
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
            name = set_name("figstep", "image")
            prompts["image"].append(EvalPrompt(key, name, question=FIGSTEP_PROMPT, image=image, **common))
        if "text" in prompts:
            name = set_name("figstep", "text")
            prompts["text"].append(EvalPrompt(key, name, question=row["question"], image=None, **common))
    return [
        EvalSet(set_name("figstep", m), "figstep", True, p, source=source if m == "image" else str(path))
        for m, p in prompts.items()
    ]


PAPER = Protocol(
    name="paper",
    source="Wang et al., CVPR 2025: evaluation/evaluate_figstep_llava.py, utils/judge_figstep_str.py "
    "(github.com/ybwang119/MLLM_safety_study)",
    judge="paper",
    modes=("image",),
    generation={"max_new_tokens": 512, "do_sample": True, "temperature": 0.2, "top_k": 50, "top_p": 1.0},
    load_options={"published_images": True},
    paper_view=True,
    paper_figure_modes=("image",),
)

TASK = Task("figstep", ("image", "text"), load_figstep, protocols={"paper": PAPER})
