"""VLGuard's training set (``train.json`` of ys-zong/VLGuard) read as a curated source whose turns know their kind.

A record is ``{id, image, safe, harmful_category?, harmful_subcategory?, instr-resp}``: a safe image carries
``[{safe_instruction, response}, {unsafe_instruction, response}]``, an unsafe image ``[{instruction, response}]``.
The conversion is VLGuard's own (``convert_to_llava_format.py``): one turn for an unsafe image; both turns for a safe
image, in the order its ``random.seed(0)`` shuffle gives (one generator drawn in file order), the image before the
first. ``<image>\\n`` leads the prompt, as LLaVA's training puts it whatever the JSON says.

Each reply keeps its kind (:data:`~mllm_safety.data.conversation.TURN_KINDS`) and the record its ``safe`` flag and
harm categories, so that the comparison experiments (:mod:`mllm_safety.data.curated`) can act on turns by kind.
"""

from __future__ import annotations

import random
from typing import Any

from mllm_safety.constants import IMAGE_PLACEHOLDER
from mllm_safety.data.conversation import SampleError

VLGUARD_KEYS = ("id", "image", "safe", "harmful_category", "harmful_subcategory", "instr-resp")
CATEGORY_KEYS = ("harmful_category", "harmful_subcategory")
INSTRUCTION_KINDS = {"safe_instruction": "answer", "unsafe_instruction": "refusal", "instruction": "image_refusal"}
"""The instruction key of an ``instr-resp`` pair and the kind of its reply."""
EXPECTED_PAIRS = {True: ["safe_instruction", "unsafe_instruction"], False: ["instruction"]}
"""The instruction keys a safe (``True``) or unsafe image carries, sorted."""


def vlguard_record(index: int, record: Any, source: str, rng: random.Random) -> dict[str, Any]:
    """One VLGuard record as a LLaVA-layout record whose replies carry their ``kind``; raises :class:`SampleError`.

    ``rng`` is the conversion's one ``random.Random(0)``: it shuffles every record with more than one pair, before
    any check, as VLGuard's script does, so that the order of a safe image's turns matches VLGuard's output.
    """
    if not isinstance(record, dict):
        raise SampleError(
            f"{source}[{index}]", "bad_json", f"record {index} is a {type(record).__name__}, not an object"
        )
    sample_id = str(record["id"]) if record.get("id") is not None else f"{source}-{index:08d}"
    pairs = record.get("instr-resp")
    if isinstance(pairs, list) and len(pairs) > 1:
        pairs = list(pairs)
        rng.shuffle(pairs)
    if unknown := sorted(set(record) - set(VLGUARD_KEYS)):
        raise SampleError(sample_id, "bad_record", f"unknown keys {unknown}; a VLGuard record has {list(VLGUARD_KEYS)}")
    if not isinstance(pairs, list) or not pairs:
        raise SampleError(sample_id, "bad_record", f"'instr-resp' must be a non-empty list of pairs, got {pairs!r}")
    safe, image = record.get("safe"), record.get("image")
    if not isinstance(safe, bool):
        raise SampleError(sample_id, "bad_record", f"'safe' must be true or false, got {safe!r}")
    if not isinstance(image, str) or not image:
        raise SampleError(sample_id, "bad_record", f"'image' must be a path, got {image!r}")
    instruction_keys = [_instruction_key(pair, sample_id) for pair in pairs]
    if sorted(instruction_keys) != EXPECTED_PAIRS[safe]:
        raise SampleError(
            sample_id,
            "bad_record",
            f"{'a safe' if safe else 'an unsafe'} image carries {EXPECTED_PAIRS[safe]}, got {instruction_keys}",
        )
    conversations = []
    for turn, (pair, key) in enumerate(zip(pairs, instruction_keys, strict=True)):
        human = f"{IMAGE_PLACEHOLDER}\n{pair[key].strip()}" if turn == 0 else pair[key]
        conversations += [
            {"from": "human", "value": human},
            {"from": "gpt", "value": pair["response"], "kind": INSTRUCTION_KINDS[key]},
        ]
    categories = {key: record[key] for key in CATEGORY_KEYS if record.get(key) is not None}
    if bad := {key: value for key, value in categories.items() if not isinstance(value, str)}:
        raise SampleError(sample_id, "bad_record", f"categories must be strings, got {bad}")
    return {"id": sample_id, "image": image, "safe": safe, **categories, "conversations": conversations}


def _instruction_key(pair: Any, sample_id: str) -> str:
    """The instruction key of an ``{<instruction key>, response}`` pair with string values."""
    keys = [key for key in pair if key != "response"] if isinstance(pair, dict) else []
    if len(keys) != 1 or len(pair) != 2 or keys[0] not in INSTRUCTION_KINDS:
        raise SampleError(
            sample_id, "bad_record", f"an 'instr-resp' pair must be {{<instruction key>, response}}, got {pair!r}"
        )
    if not all(isinstance(value, str) and value.strip() for value in pair.values()):
        raise SampleError(sample_id, "bad_record", f"an 'instr-resp' pair has an empty or non-string text: {pair!r}")
    return keys[0]
