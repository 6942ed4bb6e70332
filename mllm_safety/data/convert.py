"""``python -m mllm_safety.data.convert --json DATA.json --image_root DIR --output SHARD_DIR``: LLaVA JSON -> shards.

Reads the LLaVA instruction layout (``llava_v1_5_mix665k.json``: ``id``, optional ``image`` relative to the image
root, ``conversations`` of ``{"from": "human"|"gpt", "value"}`` with ``<image>`` in the first human turn) or the
ShareGPT layout (``messages`` of ``{"role": "user"|"assistant", "content"}``, ``images``: a list of at most one
path), and writes webdataset shards with the image bytes embedded plus a ``manifest.json``. ``--format vlguard``
reads VLGuard's ``train.json`` instead (:mod:`mllm_safety.data.vlguard`): each reply keeps its kind.

Converting several sources into the same ``--output`` folder builds a mixture: each source gets its own shards
(``<source>-NNNNNN.tar``), and the manifest counts samples per source, which the data module uses to select
mixtures and to limit rejection swaps to some sources. Converting a source again replaces its shards.

Samples that cannot be used (missing or unreadable image, malformed turns) are left out and listed in the manifest
with the reason, never fatal. Sample ids are kept; an id already taken in the folder gets a ``#2``, ``#3``, ...
suffix (recorded in the manifest), since the rejection swap identifies samples by id.
"""

from __future__ import annotations

import io
import json as jsonlib
import random
import shutil
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path
from typing import Any, Literal

from jsonargparse import auto_cli
from PIL import Image, UnidentifiedImageError

from mllm_safety.data.conversation import SampleError, parse_llava_record
from mllm_safety.data.manifest import SOURCE_NAME, Manifest, ShardSetWriter, SkippedSample
from mllm_safety.data.vlguard import vlguard_record

_KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
"""Image formats stored as they are; any other readable format is re-encoded as PNG."""
_ROLES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}


@dataclass
class _Parsed:
    index: int
    id: str
    record: dict[str, Any]
    """LLaVA-layout record (conversations, original image path)."""
    image_path: str | None


def load_records(path: Path) -> list[Any]:
    """The records of a ``.json`` list or a ``.jsonl`` file."""
    text = path.read_text()
    if path.suffix == ".jsonl":
        return [jsonlib.loads(line) for line in text.splitlines() if line.strip()]
    data = jsonlib.loads(text)
    if not isinstance(data, list):
        raise ValueError(f"{path} must hold a JSON list of samples, found {type(data).__name__}")
    return data


def _turns(record: dict[str, Any], sample_id: str) -> list[dict[str, str]]:
    """The turns of either layout as LLaVA ``{"from", "value"}`` dicts."""
    if "conversations" in record:
        messages, role_key, text_key = record["conversations"], "from", "value"
    elif "messages" in record:
        messages, role_key, text_key = record["messages"], "role", "content"
    else:
        raise SampleError(sample_id, "bad_conversation", "neither 'conversations' (LLaVA) nor 'messages' (ShareGPT)")
    if not isinstance(messages, list):
        raise SampleError(sample_id, "bad_conversation", "the turns must be a list")
    turns = []
    for message in messages:
        role = message.get(role_key) if isinstance(message, dict) else None
        if role not in _ROLES:
            raise SampleError(
                sample_id, "bad_conversation", f"turn role {role!r} is not one of {sorted(_ROLES)} (system prompts)"
            )
        turns.append({"from": _ROLES[role], "value": message.get(text_key)})
    return turns


def _image_path(record: dict[str, Any], sample_id: str) -> str | None:
    if "images" in record:
        images = record["images"] or []
        if not isinstance(images, list) or len(images) > 1:
            raise SampleError(sample_id, "bad_image", f"'images' must list at most one image, got {images!r}")
        return images[0] if images else None
    image = record.get("image")
    if image is not None and not isinstance(image, str):
        raise SampleError(sample_id, "bad_image", f"'image' must be a path, got {image!r}")
    return image


def parse_record(index: int, record: Any, source: str) -> _Parsed:
    """Validate one record of either layout (without touching its image); raises :class:`SampleError`."""
    if not isinstance(record, dict):
        raise SampleError(
            f"{source}[{index}]", "bad_json", f"record {index} is a {type(record).__name__}, not an object"
        )
    sample_id = str(record["id"]) if record.get("id") is not None else f"{source}-{index:08d}"
    llava = {"id": sample_id, "conversations": _turns(record, sample_id)}
    image_path = _image_path(record, sample_id)
    parse_llava_record(llava, image=object() if image_path else None)  # turn structure and <image> placeholders
    if image_path:
        llava["image"] = image_path
    return _Parsed(index, sample_id, llava, image_path)


def parse_vlguard(index: int, record: Any, source: str, rng: random.Random) -> _Parsed:
    """Validate one VLGuard record (without touching its image); raises :class:`SampleError`."""
    llava = vlguard_record(index, record, source, rng)
    parse_llava_record(llava, image=object())  # turn structure and kinds
    return _Parsed(index, llava["id"], llava, llava["image"])


def read_image(path: Path) -> tuple[str, bytes]:
    """``(extension, bytes)`` of an image file that decodes completely; raises :class:`SampleError` otherwise."""
    if not path.is_file():
        raise SampleError(str(path), "missing_image", f"image file {str(path)!r} does not exist")
    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if image.format in _KEPT_FORMATS:
                return _KEPT_FORMATS[image.format], data
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            return "png", buffer.getvalue()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
        raise SampleError(str(path), "bad_image", f"image file {str(path)!r} is unreadable: {error}") from error


def _load(job: tuple[_Parsed, str | None]) -> tuple[_Parsed, tuple[str, bytes] | SampleError | None]:
    parsed, root = job
    if parsed.image_path is None:
        return parsed, None
    if root is None:
        return parsed, SampleError(parsed.id, "missing_image", "the record has an image but no --image_root was given")
    try:
        return parsed, read_image(Path(root) / parsed.image_path)
    except SampleError as error:
        return parsed, error


def _loaded(jobs: list[tuple[_Parsed, str | None]], workers: int) -> Iterator[tuple[_Parsed, Any]]:
    """Images read and verified in input order, by ``workers`` processes when more than one."""
    if workers <= 1:
        yield from map(_load, jobs)
        return
    with Pool(workers) as pool:
        yield from pool.imap(_load, jobs, chunksize=16)


def convert(
    json: Path,
    output: Path,
    image_root: Path | None = None,
    source: str | None = None,
    shard_size: int = 1000,
    workers: int = 1,
    format: Literal["llava", "vlguard"] = "llava",
) -> Manifest:
    """Convert a LLaVA, ShareGPT or VLGuard JSON file into webdataset shards with a manifest.

    Args:
        json: The ``.json`` list (or ``.jsonl``) of samples.
        output: Folder of the shard set; created if needed. Other sources already converted there are kept.
        image_root: Folder the samples' image paths are relative to.
        source: Name of this data source in the manifest (letters, digits, ``_``, ``-``); defaults to the JSON
            file's name without extension.
        shard_size: Samples per shard. Smaller shards spread more evenly over ranks and workers.
        workers: Processes reading and verifying images.
        format: ``llava``: the LLaVA or ShareGPT layout (told apart per record); ``vlguard``: VLGuard's
            ``train.json``, converted as VLGuard does, each reply with its kind (answer or refusal).
    """
    source = source or json.stem.replace(".", "_")
    if not SOURCE_NAME.match(source) or shard_size < 1 or workers < 1:
        raise ValueError(
            f"source {source!r} must use only letters, digits, '_' and '-' (it names files); shard_size "
            f"({shard_size}) and workers ({workers}) must be >= 1"
        )
    output.mkdir(parents=True, exist_ok=True)
    existing = Manifest.read(output) or Manifest(shards=[])
    kept = [entry for entry in existing.shards if entry.source != source]
    taken = {sample_id for entry in kept for sample_id in entry.ids}
    skipped = [s for s in existing.skipped if s.source != source]
    renamed: list[list[str]] = []

    jobs = []
    rng = random.Random(0)  # VLGuard's shuffle of a safe image's two turns
    for index, record in enumerate(load_records(json)):
        try:
            parsed = (
                parse_vlguard(index, record, source, rng)
                if format == "vlguard"
                else parse_record(index, record, source)
            )
            jobs.append((parsed, str(image_root) if image_root else None))
        except SampleError as error:
            skipped.append(SkippedSample(source, error.sample_id, error.reason, error.detail))

    tmp = output / f".{source}.tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        with ShardSetWriter(tmp, source, shard_size) as writer:
            for parsed, image in _loaded(jobs, workers):
                if isinstance(image, SampleError):
                    skipped.append(SkippedSample(source, parsed.id, image.reason, image.detail))
                    continue
                sample_id = parsed.id
                suffix = 1
                while sample_id in taken:
                    suffix += 1
                    sample_id = f"{parsed.id}#{suffix}"
                if sample_id != parsed.id:
                    renamed.append([parsed.id, sample_id])
                taken.add(sample_id)
                writer.write(sample_id, parsed.record, image)
        for entry in existing.shards:
            if entry.source == source:
                (output / entry.name).unlink(missing_ok=True)
        for entry in writer.entries:
            (tmp / entry.name).replace(output / entry.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    params = dict(existing.params)
    params[source] = {
        "format": format,
        "json": str(json),
        "image_root": str(image_root) if image_root else None,
        "shard_size": shard_size,
        "renamed_ids": renamed,
    }
    manifest = Manifest(shards=kept + writer.entries, skipped=skipped, params=params)
    manifest.write(output)
    reasons = Counter(s.reason for s in skipped if s.source == source)
    written = sum(len(entry.ids) for entry in writer.entries)
    print(
        f"{source}: {written} samples in {len(writer.entries)} shards under {output}; "
        f"skipped {sum(reasons.values())} {dict(reasons)}; {len(renamed)} ids renamed; "
        f"the set now holds {manifest.sources}"
    )
    return manifest


def main(args: list[str] | None = None) -> Manifest:
    return auto_cli(convert, args=args, as_positional=False)


if __name__ == "__main__":
    main()
