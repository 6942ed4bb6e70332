"""The ``manifest.json`` beside a shard set, and the writer that produces both.

The manifest is what makes exact rejection ratios and rank-even streaming possible: it lists every shard with the
ids of its samples in order (so counts per shard, per source and overall are known before reading a byte) and the
samples left out at conversion with the reason. Inside a shard, sample ``i`` is stored under the tar key
``sample_key(i)``, so a reader can pick samples by position without parsing them.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import webdataset as wds

MANIFEST = "manifest.json"
FORMAT = "mllm_safety.shards/1"
SOURCE_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


def sample_key(position: int) -> str:
    """The tar key of the sample at ``position`` in its shard (no dots: webdataset splits keys at the first)."""
    return f"{position:08d}"


def key_position(key: str) -> int | None:
    """The position encoded by :func:`sample_key`, or ``None`` for a key this project did not write."""
    return int(key) if key.isdigit() else None


@dataclass
class ShardEntry:
    name: str
    """File name, relative to the manifest's folder."""
    source: str
    """The data source all samples of this shard come from."""
    ids: list[str]
    """Sample ids in storage order."""
    kinds: list[list[str]] | None = None
    """For a curated source, each sample's turn kinds (``TURN_KINDS``), aligned with ``ids``: lets a run choose
    samples by what they teach (safe images, refusal shares) before reading a shard. ``None`` for other sources."""

    def to_json(self) -> dict[str, Any]:
        """Without ``kinds`` when unset, so that manifests of benign sources stay as they were."""
        data = asdict(self)
        if self.kinds is None:
            del data["kinds"]
        return data


@dataclass
class SkippedSample:
    source: str
    id: str
    reason: str
    """One of :data:`mllm_safety.data.conversation.SKIP_REASONS`."""
    detail: str


@dataclass
class Manifest:
    """Shards with their sample ids, samples skipped at conversion, and how the set was made."""

    shards: list[ShardEntry]
    skipped: list[SkippedSample] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    """Free-form record of how the set was made (converter inputs, demo generation parameters)."""

    @property
    def num_samples(self) -> int:
        return sum(len(entry.ids) for entry in self.shards)

    @property
    def sources(self) -> dict[str, int]:
        """Samples per source."""
        counts: Counter[str] = Counter()
        for entry in self.shards:
            counts[entry.source] += len(entry.ids)
        return dict(counts)

    def to_json(self) -> dict[str, Any]:
        skipped_counts = Counter(f"{s.source}/{s.reason}" for s in self.skipped)
        return {
            "format": FORMAT,
            "num_samples": self.num_samples,
            "sources": self.sources,
            "skipped_counts": dict(sorted(skipped_counts.items())),
            "params": self.params,
            "shards": [entry.to_json() for entry in self.shards],
            "skipped": [asdict(s) for s in self.skipped],
        }

    @classmethod
    def from_json(cls, data: Any, where: str) -> Manifest:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"{where} is not a {FORMAT} manifest (format: {found!r}); rewrite it with the converter")
        try:
            return cls(
                shards=[ShardEntry(**entry) for entry in data["shards"]],
                skipped=[SkippedSample(**s) for s in data.get("skipped", [])],
                params=data.get("params", {}),
            )
        except (KeyError, TypeError) as error:
            raise ValueError(f"{where} is malformed: {error}") from error

    def write(self, folder: str | Path) -> Path:
        """Write ``manifest.json`` atomically: a reader sees the old manifest or the new one, never half of one."""
        path = Path(folder) / MANIFEST
        tmp = path.with_name(f".{MANIFEST}.{uuid.uuid4().hex}")
        tmp.write_text(json.dumps(self.to_json(), indent=1))
        os.replace(tmp, path)
        return path

    @classmethod
    def read(cls, folder: str | Path) -> Manifest | None:
        """The manifest in ``folder``, or ``None`` if there is none."""
        path = Path(folder) / MANIFEST
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from error
        return cls.from_json(data, str(path))


class ShardSetWriter:
    """Writes the samples of one source into numbered shards ``<source>-NNNNNN.tar`` of at most ``shard_size``.

    Each sample is a JSON record plus optional image bytes; the shard entries (names and ids) accumulate in
    :attr:`entries` for the manifest. Tar members carry a fixed mtime so the same input gives the same bytes.
    """

    def __init__(self, folder: str | Path, source: str, shard_size: int) -> None:
        if not SOURCE_NAME.match(source):
            raise ValueError(f"source name {source!r} must use only letters, digits, '_' and '-' (it names files)")
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.folder = Path(folder)
        self.source = source
        self.shard_size = shard_size
        self.entries: list[ShardEntry] = []
        self._writer: wds.TarWriter | None = None

    def write(self, sample_id: str, record: dict[str, Any], image: tuple[str, bytes] | None) -> None:
        """Append one sample; ``image`` is ``(extension, bytes)``, e.g. ``("jpg", data)``."""
        if self._writer is None or len(self.entries[-1].ids) >= self.shard_size:
            self.start_shard()
        entry = self.entries[-1]
        kinds = [
            m.get("kind") for m in record.get("conversations", []) if isinstance(m, dict) and m.get("from") == "gpt"
        ]
        has_kinds = any(kind is not None for kind in kinds)
        if entry.ids and has_kinds != (entry.kinds is not None):
            raise ValueError(
                f"sample {sample_id!r} of source {self.source!r}: either every sample of a source has turn kinds "
                "or none has"
            )
        if has_kinds:
            entry.kinds = entry.kinds if entry.kinds is not None else []
            entry.kinds.append(kinds)
        member: dict[str, Any] = {
            "__key__": sample_key(len(entry.ids)),
            "json": json.dumps({**record, "id": sample_id, "source": self.source}).encode(),
        }
        if image is not None:
            member[image[0]] = image[1]
        self._writer.write(member)
        entry.ids.append(sample_id)

    def start_shard(self) -> None:
        """Close the current shard; the next samples go to a new one (shards fill to ``shard_size`` otherwise)."""
        self.close()
        name = f"{self.source}-{len(self.entries):06d}.tar"
        self._writer = wds.TarWriter(str(self.folder / name), encoder=False, mtime=0.0)
        self.entries.append(ShardEntry(name=name, source=self.source, ids=[]))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> ShardSetWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
