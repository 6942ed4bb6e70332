"""VLGuard's test set (Zong et al., ICML 2024): safe images with safe and unsafe instructions, unsafe images."""

from __future__ import annotations

from pathlib import Path

from mllm_safety.evaluation.files import existing, read_json, set_name
from mllm_safety.evaluation.sets import EvalPrompt, EvalSet, ImageFile, Task


def load_vlguard(path: str, images: str | None, modes: tuple[str, ...]) -> list[EvalSet]:
    """VLGuard's ``test.json``: safe images carry a safe and an unsafe instruction, unsafe images one instruction.

    ``safe_safe`` (safe image, safe instruction) is benign; ``safe_unsafe`` and ``unsafe`` are harmful, as in
    VLGuard's own evaluation.
    """
    file = Path(path)
    records = read_json(file, "VLGuard test.json")
    folder = existing(images or file.parent / "test", "VLGuard images folder", folder=True)
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
                    set_name("vlguard", mode),
                    category=record.get("harmful_category"),
                    question=instruction,
                    image=ImageFile(str(folder / record["image"])),
                    request=instruction,
                )
            )
    source = f"{file}; images from {folder}"
    contrast = set_name("vlguard", "safe_unsafe") if "safe_unsafe" in modes else None
    return [
        EvalSet(set_name("vlguard", m), "vlguard", m != "safe_safe", p, contrast if m == "safe_safe" else None, source)
        for m, p in prompts.items()
    ]


TASK = Task("vlguard", ("safe_safe", "safe_unsafe", "unsafe"), load_vlguard)
