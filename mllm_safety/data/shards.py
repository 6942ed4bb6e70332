"""Reading webdataset shards safely: only JSON and image members are decoded, nothing is ever unpickled."""

from __future__ import annotations

import glob
import io
import json
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import braceexpand
import webdataset as wds
from PIL import Image

from mllm_safety.data.conversation import Conversation, SampleError, parse_llava_record
from mllm_safety.data.manifest import Manifest, ShardEntry, key_position

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def expand_shards(patterns: str | list[str]) -> list[str]:
    """Brace- and glob-expand shard patterns (``data/train-{000..009}.tar``, ``data/*.tar``) into sorted paths."""
    patterns = [patterns] if isinstance(patterns, str) else patterns
    paths: list[str] = []
    for pattern in patterns:
        for expanded in braceexpand.braceexpand(pattern):
            matches = sorted(glob.glob(expanded))
            if not matches:
                raise FileNotFoundError(f"shard pattern {pattern!r} matches no file ({expanded!r} does not exist)")
            paths += matches
    return paths


def manifest_entries(shards: list[str]) -> list[tuple[str, ShardEntry]] | None:
    """Each shard with its entry in the ``manifest.json`` of its folder; ``None`` when no folder has a manifest."""
    manifests = {folder: Manifest.read(folder) for folder in sorted({str(Path(shard).parent) for shard in shards})}
    if all(manifest is None for manifest in manifests.values()):
        return None
    if missing := [folder for folder, manifest in manifests.items() if manifest is None]:
        raise ValueError(f"shard folders {missing} have no manifest.json while others have one; convert them too")
    entries = {(folder, entry.name): entry for folder, manifest in manifests.items() for entry in manifest.shards}
    unlisted = [shard for shard in shards if (str(Path(shard).parent), Path(shard).name) not in entries]
    if unlisted:
        raise ValueError(f"shards {unlisted[:3]} are not listed in the manifest.json beside them")
    return [(shard, entries[str(Path(shard).parent), Path(shard).name]) for shard in shards]


def decode_sample(raw: dict[str, Any]) -> Conversation:
    """A raw webdataset sample (member name -> bytes) to a validated :class:`Conversation`.

    Members other than ``json`` and one image are ignored, never decoded: webdataset's default decoders would
    unpickle ``.pyd``/``.pickle`` members, which runs arbitrary code from whoever wrote the shard.
    """
    key = raw.get("__key__", "<no key>")
    where = f"{key} in {raw.get('__url__', '<unknown shard>')}"
    if "json" not in raw:
        raise SampleError(where, "bad_json", "no .json member")
    try:
        record = json.loads(raw["json"])
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SampleError(where, "bad_json", f"invalid JSON: {error}") from error
    if not isinstance(record, dict):
        raise SampleError(where, "bad_json", "the .json member is not an object")
    record.setdefault("id", key)
    image_keys = [ext for ext in IMAGE_EXTENSIONS if ext in raw]
    image = None
    if image_keys:
        try:
            image = Image.open(io.BytesIO(raw[image_keys[0]]))
            image.load()
        except Exception as error:  # PIL raises many types for corrupt files
            raise SampleError(where, "bad_image", f"unreadable .{image_keys[0]} member: {error}") from error
    try:
        return parse_llava_record(record, image)
    except SampleError as error:
        raise SampleError(where, error.reason, error.detail) from None


def iter_conversations(shard: str) -> Iterator[Conversation]:
    """All samples of one shard, in order (for inspection and tests; training uses the streaming pipeline)."""
    for raw in wds.DataPipeline(wds.SimpleShardList([shard]), wds.tarfile_to_samples()):
        yield decode_sample(raw)


@dataclass(frozen=True)
class ShardSlice:
    """Some samples of one shard, by position (the tar key written by the manifest's writer)."""

    path: str
    positions: tuple[int, ...] | None = None
    """Positions to read, ascending; ``None`` reads every sample (shards without a manifest)."""
    ids: tuple[str, ...] = ()
    """The manifest's ids at ``positions``; each raw sample read carries its expected id as ``__id__``."""


def read_slice(piece: ShardSlice, skipped: Counter[str]) -> Iterator[dict[str, Any]]:
    """The raw samples of ``piece`` in storage order (member name -> bytes; nothing decoded).

    Reading stops after the last wanted position. A damaged tar ends the shard early; the wanted samples it could
    not deliver are counted in ``skipped["corrupt_tar"]`` and the damage is logged.
    """
    wanted = None if piece.positions is None else dict(zip(piece.positions, piece.ids, strict=True))
    errors: list[Exception] = []

    def stop(error: Exception) -> bool:
        errors.append(error)
        return False

    delivered = 0
    samples = wds.tariterators.tarfile_samples([{"url": piece.path}], handler=stop)
    try:
        for raw in samples:
            if wanted is None:
                yield raw
                continue
            position = key_position(raw["__key__"])
            if position in wanted:
                delivered += 1
                raw["__id__"] = wanted[position]
                yield raw
                if delivered == len(wanted):
                    break
    finally:
        samples.close()
    lost = 0 if wanted is None else len(wanted) - delivered
    if errors or lost:
        skipped["corrupt_tar"] += lost
        reason = f": {errors[0]}" if errors else " (it ends early)"
        log.warning("shard %s is damaged%s; %d wanted samples could not be read", piece.path, reason, lost)


def first_images(pieces: list[ShardSlice], count: int) -> list[tuple[str, bytes]]:
    """``(sample id, encoded image)`` of the first ``count`` samples with an image, in shard order."""
    images: list[tuple[str, bytes]] = []
    for piece in pieces:
        for raw in read_slice(piece, Counter()):
            extension = next((ext for ext in IMAGE_EXTENSIONS if ext in raw), None)
            if extension is not None:
                images.append((raw.get("__id__", raw["__key__"]), raw[extension]))
                if len(images) == count:
                    return images
    return images
